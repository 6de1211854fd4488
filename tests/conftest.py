import json
import os
import signal
import subprocess
import sys
import time

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


@pytest.fixture
def external_scheduler(tmp_path):
    """A real ``dask scheduler`` and two ``dask worker`` processes (one thread each) on
    127.0.0.1; yields the scheduler's address and stops them all afterwards."""
    scheduler_file = tmp_path / "scheduler.json"
    dask_cli = os.path.join(os.path.dirname(sys.executable), "dask")
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists():
            if time.time() > deadline:
                raise TimeoutError(f"{scheduler_file} did not appear")
            time.sleep(0.2)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert all(proc.poll() is not None for proc in procs)
