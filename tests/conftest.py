import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", "array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """Array namespaces the pure array kernels must run on unchanged."""
    if request.param == "numpy":
        return np
    if request.param == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    return pytest.importorskip("cupy")


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory):
    """Four small simulated micrographs (256 x 320, non-square) as MRC files with truth."""
    from cryodask.simulate import Detector, draw_micrograph_params, write_simulated_dataset

    out = tmp_path_factory.mktemp("sim")
    params = draw_micrograph_params(4, shape=(256, 320), pixel_size_A=1.2, seed=3)
    write_simulated_dataset(out, params, detector=Detector(gain_std=0.02, seed=3), seed=3)
    return out


@pytest.fixture
def data_path():
    return lambda name: os.path.join(DATA, name)
