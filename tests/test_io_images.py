import hashlib
import os
import shutil

import mrcfile
import numpy as np
import pytest
import tifffile

from cryodask.io.images import MicrographFileError, probe, read_micrograph, write_mrc


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_probe_real_epu_crop_reads_fei_metadata(data_path):
    header = probe(data_path("epu2.9_crop512.mrc"))
    assert header.shape == (512, 512) and header.n_sections == 1 and header.dtype == "uint16"
    assert header.pixel_size_A == pytest.approx(0.66655, abs=1e-5)
    assert header.voltage_kV == pytest.approx(300.0)
    assert header.dose_e_per_A2 == pytest.approx(41.17, abs=0.01)
    assert header.applied_defocus_A == pytest.approx(22000.0)  # EPU: -2.2 µm = 2.2 µm underfocus


def test_truncated_mrc_names_the_file(tmp_path):
    good = tmp_path / "good.mrc"
    write_mrc(good, np.ones((64, 64), np.float32), pixel_size_A=1.0)
    bad = tmp_path / "truncated.mrc"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(MicrographFileError, match="truncated.mrc"):
        probe(str(bad))


def test_not_an_mrc_and_unknown_suffix(tmp_path):
    fake = tmp_path / "fake.mrc"
    fake.write_bytes(b"this is not an MRC file" * 100)
    with pytest.raises(MicrographFileError, match="fake.mrc: not a valid MRC"):
        probe(str(fake))
    other = tmp_path / "image.png"
    other.write_bytes(b"x")
    with pytest.raises(MicrographFileError, match="unknown micrograph format"):
        probe(str(other))
    with pytest.raises(MicrographFileError, match="no such file"):
        probe(str(tmp_path / "missing.mrc"))


def test_nan_pixels_are_refused_with_the_file_named(tmp_path):
    data = np.zeros((32, 48), np.float32)
    data[3, 4] = np.nan
    data[5, 6] = np.inf
    path = tmp_path / "nan.mrc"
    with pytest.warns(RuntimeWarning, match="NaN"):
        write_mrc(path, data, pixel_size_A=1.0)
    with pytest.raises(MicrographFileError, match=r"nan.mrc: 2 pixel\(s\) are NaN or Inf"):
        read_micrograph(str(path))


def test_volume_is_refused(tmp_path):
    path = tmp_path / "vol.map"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.float32))
        mrc.set_volume()
    with pytest.raises(MicrographFileError, match="3D volume"):
        probe(str(path))


def test_tiff_and_movie_sum(tmp_path):
    frames = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30) % 7
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, frames, photometric="minisblack")
    header = probe(str(path))
    assert header.kind == "tiff" and header.n_sections == 3 and header.shape == (20, 30)
    summed = read_micrograph(str(path), sum_frames=True)
    np.testing.assert_array_equal(summed, frames.sum(0))
    np.testing.assert_array_equal(read_micrograph(str(path), 1), frames[1])
    with pytest.raises(MicrographFileError, match="out of range"):
        read_micrograph(str(path), 5)


def test_reading_never_modifies_the_input(data_path, tmp_path):
    src = tmp_path / "copy.mrc"
    shutil.copy(data_path("epu2.9_crop512.mrc"), src)
    before, mtime = _digest(src), os.stat(src).st_mtime_ns
    probe(str(src))
    read_micrograph(str(src))
    assert _digest(src) == before and os.stat(src).st_mtime_ns == mtime


def test_write_mrc_refuses_to_overwrite_and_leaves_no_partial(tmp_path):
    path = tmp_path / "a.mrc"
    write_mrc(path, np.zeros((4, 4), np.float32), pixel_size_A=2.0)
    with pytest.raises(FileExistsError, match="a.mrc"):
        write_mrc(path, np.zeros((4, 4), np.float32), pixel_size_A=2.0)
    assert sorted(os.listdir(tmp_path)) == ["a.mrc"]
    with mrcfile.open(path) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(2.0)
