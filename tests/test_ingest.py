import hashlib
import os
import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import tifffile

from cryodask import IngestError, export_mrc, ingest, micrographs_dataset
from cryodask.io.images import MicrographFileError, write_mrc


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint16"])
def test_mrc_store_mrc_round_trip_is_bit_exact(tmp_path, dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if dtype != "float32" else None
    paths = []
    for i in range(3):
        if info is None:
            data = rng.normal(scale=1e3, size=(40, 56)).astype(dtype)
        else:
            data = rng.integers(info.min, info.max, size=(40, 56), endpoint=True).astype(dtype)
        path = tmp_path / f"in_{i}.mrc"
        write_mrc(path, data, pixel_size_A=0.9)
        paths.append(path)
    digests = [_digest(p) for p in paths]
    ds = ingest([str(p) for p in paths], tmp_path / "s.zarr")
    assert ds["image"].dtype == np.float32
    written = export_mrc(ds, tmp_path / "out")
    for src, dst in zip(paths, written):
        a, b = mrcfile.read(src), mrcfile.read(dst)
        assert b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)
        with mrcfile.open(dst) as mrc:
            assert float(mrc.voxel_size.x) == pytest.approx(0.9)
    assert [_digest(p) for p in paths] == digests  # inputs untouched


def test_real_epu_crop_ingests_with_its_pixel_size_and_voltage(data_path, tmp_path):
    ds = ingest(data_path("epu2.9_crop512.mrc"), tmp_path / "epu.zarr")
    assert ds["pixel_size_A"].values[0] == pytest.approx(0.66655, abs=1e-5)
    assert ds["voltage_kV"].values[0] == pytest.approx(300.0)
    assert ds["dose_e_per_A2"].values[0] == pytest.approx(41.17, abs=0.01)
    assert ds["source_dtype"].values[0] == "uint16"
    expected = mrcfile.read(data_path("epu2.9_crop512.mrc"))
    np.testing.assert_array_equal(ds["image"].values[0], expected.astype(np.float32))


SHARED_EPU = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real",
                          "mrcfile", "epu2.9_example.mrc")


@pytest.mark.skipif(not os.path.isfile(SHARED_EPU), reason="the full 4096x4096 EPU file lies "
                    "outside the project (../shared); its 512x512 crop is tested above")
def test_full_real_epu_micrograph(tmp_path):
    ds = ingest(SHARED_EPU, tmp_path / "epu.zarr")
    assert ds.sizes == {"micrograph": 1, "y": 4096, "x": 4096}
    assert ds["pixel_size_A"].values[0] == pytest.approx(0.66655, abs=1e-5)
    assert ds["voltage_kV"].values[0] == pytest.approx(300.0)


def test_names_are_kept_as_given_and_dataset_is_lazy(sim_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(sim_dir)
    ds = micrographs_dataset(["mic_0001.mrc", "./mic_0000.mrc"])
    assert list(ds["micrograph_name"].values) == ["mic_0001.mrc", "./mic_0000.mrc"]
    assert ds["image"].data.chunksize == (1, 256, 320)
    assert len(ds["image"].data.dask) >= 2  # nothing computed: the reads are graph tasks


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(IngestError, match="nope.mrc: no such file"):
        ingest(str(tmp_path / "nope.mrc"), tmp_path / "s.zarr")
    with pytest.raises(IngestError, match="matches no file"):
        ingest(str(tmp_path / "*.mrc"), tmp_path / "s.zarr")


def test_mixed_shapes_and_pixel_sizes(tmp_path):
    write_mrc(tmp_path / "a.mrc", np.zeros((32, 32), np.float32), pixel_size_A=1.0)
    write_mrc(tmp_path / "b.mrc", np.zeros((32, 40), np.float32), pixel_size_A=1.0)
    write_mrc(tmp_path / "c.mrc", np.zeros((32, 32), np.float32), pixel_size_A=1.3)
    with pytest.raises(IngestError, match="different shapes.*b.mrc"):
        ingest([str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")], tmp_path / "s.zarr")
    with pytest.raises(IngestError, match=r"different pixel sizes: 1.0 Å .*a.mrc.*1.3 Å .*c.mrc"):
        ingest([str(tmp_path / "a.mrc"), str(tmp_path / "c.mrc")], tmp_path / "s.zarr")
    ds = ingest([str(tmp_path / "a.mrc"), str(tmp_path / "c.mrc")], tmp_path / "s.zarr",
                pixel_size_A=1.1)
    assert ds["pixel_size_A"].values.tolist() == pytest.approx([1.1, 1.1])
    assert not os.path.exists(tmp_path / "s.zarr.partial")


def test_nan_micrograph_fails_the_ingest_and_leaves_no_store(tmp_path):
    write_mrc(tmp_path / "ok.mrc", np.zeros((16, 16), np.float32), pixel_size_A=1.0)
    bad = np.zeros((16, 16), np.float32)
    bad[0, 0] = np.nan
    with pytest.warns(RuntimeWarning):
        write_mrc(tmp_path / "bad.mrc", bad, pixel_size_A=1.0)
    with pytest.raises(MicrographFileError, match="bad.mrc: 1 pixel"):
        ingest([str(tmp_path / "ok.mrc"), str(tmp_path / "bad.mrc")], tmp_path / "s.zarr")
    assert sorted(os.listdir(tmp_path)) == ["bad.mrc", "ok.mrc"]


def test_stacks_and_movies(tmp_path):
    stack = np.arange(3 * 16 * 20, dtype=np.float32).reshape(3, 16, 20)
    write_mrc(tmp_path / "parts.mrcs", stack, pixel_size_A=1.0)
    ds = ingest(str(tmp_path / "parts.mrcs"), tmp_path / "a.zarr")
    assert ds.sizes["micrograph"] == 3
    assert ds["micrograph_name"].values[1] == f"000002@{tmp_path / 'parts.mrcs'}"
    np.testing.assert_array_equal(ds["image"].values, stack)
    assert [os.path.basename(p) for p in export_mrc(ds, tmp_path / "out")] == [
        "parts_000001.mrc", "parts_000002.mrc", "parts_000003.mrc"]

    tifffile.imwrite(tmp_path / "movie.tif", stack.astype(np.uint16), photometric="minisblack")
    with pytest.raises(IngestError, match="movie.tif: holds 3 images.*stack='sum'"):
        ingest(str(tmp_path / "movie.tif"), tmp_path / "b.zarr", pixel_size_A=1.0)
    ds = ingest(str(tmp_path / "movie.tif"), tmp_path / "b.zarr", pixel_size_A=1.0, stack="sum")
    np.testing.assert_array_equal(ds["image"].values[0], stack.sum(0))


def test_tiff_needs_a_pixel_size(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((16, 16), np.uint16))
    with pytest.raises(IngestError, match="no pixel size for .*m.tif.*--pixel-size"):
        ingest(str(tmp_path / "m.tif"), tmp_path / "s.zarr")


def test_metadata_priority_star_sidecar_and_arguments(tmp_path, data_path):
    name = "FoilHole_9015883_Data_9017354_6_20250108_154918"
    write_mrc(tmp_path / f"{name}.mrc", np.zeros((16, 16), np.float32), pixel_size_A=1.0)
    shutil.copy(data_path(f"{name}.xml"), tmp_path / f"{name}.xml")
    mic = str(tmp_path / f"{name}.mrc")
    ds = micrographs_dataset(mic)
    # The MRC header gives the pixel size; the EPU sidecar gives dose and defocus.
    assert ds["pixel_size_A"].values[0] == pytest.approx(1.0)
    assert ds["dose_e_per_A2"].values[0] == pytest.approx(14.5578, abs=1e-3)
    assert ds["applied_defocus_A"].values[0] == pytest.approx(27000.0)
    star = tmp_path / "mics.star"
    starfile.write(pd.DataFrame({"rlnMicrographName": [f"Movies/{name}.tiff"],
                                 "rlnVoltage": [200.0], "rlnSphericalAberration": [2.0]}), star)
    ds = micrographs_dataset(mic, metadata=str(star))
    assert ds["voltage_kV"].values[0] == 200.0 and ds["cs_mm"].values[0] == 2.0
    ds = micrographs_dataset(mic, metadata=str(star), voltage_kV=120.0)
    assert ds["voltage_kV"].values[0] == 120.0
    with pytest.raises(IngestError, match="amplitude_contrast = 1.5 is outside"):
        micrographs_dataset(mic, amplitude_contrast=1.5)


def test_particle_coordinates_are_linked(data_path, tmp_path):
    write_mrc(tmp_path / "Ucsf_stack_1142_DW.mrc", np.zeros((32, 32), np.float32), pixel_size_A=1.0)
    write_mrc(tmp_path / "other.mrc", np.zeros((32, 32), np.float32), pixel_size_A=1.0)
    coords = tmp_path / "Ucsf_stack_1142_DW.star"
    shutil.copy(data_path("Ucsf_stack_1142_DW_autopick.star"), coords)
    ds = ingest([str(tmp_path / "other.mrc"), str(tmp_path / "Ucsf_stack_1142_DW.mrc")],
                tmp_path / "s.zarr", coordinates=str(coords))
    assert ds.sizes["particle"] == 45
    assert set(ds["particle_micrograph"].values.tolist()) == {1}
    assert ds["particle_x_px"].values[0] == pytest.approx(839.125, abs=1e-3)
    box = tmp_path / "unknown.box"
    box.write_text("1 2 10 10\n")
    with pytest.raises(IngestError, match="not in the input: \\['unknown'\\]"):
        micrographs_dataset(str(tmp_path / "other.mrc"), coordinates=str(box))
