import mrcfile
import numpy as np
import pytest

from cryodask import ingest, open_dataset
from cryodask.clean import clean_dataset
from cryodask.cli import main
from cryodask.io.images import write_mrc
from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    out = tmp_path_factory.mktemp("dirty")
    detector = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=1, n_stuck_pixels=10, seed=5)
    params = draw_micrograph_params(8, shape=(256, 288), seed=5,
                                    ranges=DatasetRanges(n_hot_pixels=(50, 100), n_xrays=(3, 8)))
    write_simulated_dataset(out, params, detector=detector, seed=5, save_truth_images=True)
    return out


def test_clean_dataset_finds_what_the_simulator_put_in(dirty, tmp_path):
    ds = ingest(str(dirty / "mic_*.mrc"), tmp_path / "s.zarr")
    out = clean_dataset(ds)
    assert out["image_clean"].chunks[0] == (1,) * 8  # lazy, one task per micrograph
    out = out.compute()
    truth = np.stack([mrcfile.read(dirty / "truth" / f"mic_{i:04d}_mask.mrc") for i in range(8)])
    found = out["artifact_mask"].values
    assert ((truth > 0) & (found > 0)).sum() / (truth > 0).sum() > 0.99
    assert ((truth == 0) & (found > 0)).sum() < 1e-4 * (truth == 0).sum()
    defects = mrcfile.read(dirty / "truth" / "defects.mrc").astype(bool)
    np.testing.assert_array_equal(out["defect_map"].values.astype(bool) & defects, defects)
    assert int(out["n_defect_pixels"][0]) == int(defects.sum())
    # Outside the mask the image is only divided by the (applied) gain estimate.
    raw = ds["image"].values
    expected = raw / out["gain_estimate"].values
    keep = found == 0
    np.testing.assert_allclose(out["image_clean"].values[keep], expected[keep], rtol=1e-6)
    assert out["gain_estimate"].attrs["applied"] == 1


def test_the_dataset_pass_in_groups_finds_what_it_finds_whole(dirty, tmp_path, monkeypatch):
    # Computed a group of micrographs at a time (what it holds does not grow with the
    # dataset), the dataset pass must find the same defects and gain as summed in one tree.
    import dask

    from cryodask import clean, progress

    ds = ingest(str(dirty / "mic_*.mrc"), tmp_path / "s.zarr")
    whole = clean.measure_defects(ds)
    computed = []
    original = progress.compute
    monkeypatch.setattr(progress, "compute", lambda *a, **k: computed.append(1) or original(*a, **k))
    monkeypatch.setattr(clean, "DATASET_PASS_GROUP", 3)
    grouped = clean.measure_defects(ds)
    assert len(computed) == 3  # 3 + 3 + 2 micrographs
    np.testing.assert_array_equal(grouped.defects, whole.defects)
    assert (grouped.dead_rows, grouped.dead_columns) == (whole.dead_rows, whole.dead_columns)
    # Only the order of the additions differs.
    np.testing.assert_allclose(grouped.gain, whole.gain, rtol=1e-6)
    np.testing.assert_allclose(grouped.raw_gain, whole.raw_gain, rtol=1e-6)
    # (The error's power per ring comes from differences of the summed powers: 2e-4 here.)
    np.testing.assert_allclose(grouped.gain_error_power, whole.gain_error_power, rtol=1e-3)
    assert whole.n_micrographs == grouped.n_micrographs == 8
    # The group's size is a Dask config key.
    computed.clear()
    monkeypatch.setattr(clean, "DATASET_PASS_GROUP", 8)
    with dask.config.set({"cryodask.dataset-pass-group": 4}):
        clean.measure_defects(ds)
    assert len(computed) == 2


def test_chunks_of_several_micrographs_are_cleaned_and_summed_whole(dirty, tmp_path):
    # The dataset pass and the cleaning took a chunk's first micrograph alone.
    import dask

    from cryodask import clean

    ds = ingest(str(dirty / "mic_*.mrc"), tmp_path / "s.zarr")
    several = ds.chunk({"micrograph": 3})
    assert several["image"].chunks[0] == (3, 3, 2)
    one, three = clean.measure_defects(ds), clean.measure_defects(several)
    np.testing.assert_array_equal(three.defects, one.defects)
    np.testing.assert_array_equal(three.gain, one.gain)
    np.testing.assert_array_equal(three.gain_error_power, one.gain_error_power)
    a = clean_dataset(ds, measured=one).compute()
    b = clean_dataset(several, measured=three).compute()
    for name in ("image_clean", "artifact_mask", "n_hot_pixels", "n_xray_pixels"):
        np.testing.assert_array_equal(b[name].values, a[name].values)
    with dask.config.set({"cryodask.dataset-pass-group": 0}):
        with pytest.raises(ValueError, match="cryodask.dataset-pass-group' must be in 1..65535, got 0"):
            clean.measure_defects(ds)


def test_single_micrograph_mode_changes_only_masked_pixels(dirty, tmp_path):
    ds = ingest(str(dirty / "mic_000[01].mrc"), tmp_path / "s.zarr")
    out = clean_dataset(ds, dataset_defects=False).compute()
    assert "defect_map" not in out
    keep = out["artifact_mask"].values == 0
    np.testing.assert_array_equal(out["image_clean"].values[keep], ds["image"].values[keep])
    with pytest.raises(ValueError, match="gain correction needs"):
        clean_dataset(ds, gain_correction=True)


def test_user_gain_and_defects_are_applied(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        write_mrc(tmp_path / f"m{i}.mrc", rng.poisson(20, (64, 80)).astype(np.float32), pixel_size_A=1.0)
    ds = ingest(str(tmp_path / "m*.mrc"), tmp_path / "s.zarr")
    gain = np.full((64, 80), 2.0, np.float32)
    known = np.zeros((64, 80), bool)
    known[5, :] = True
    out = clean_dataset(ds, gain_reference=gain, defects=known, dataset_defects=False).compute()
    assert (out["artifact_mask"].values[:, 5, :] == 3).all()
    keep = out["artifact_mask"].values == 0
    np.testing.assert_allclose(out["image_clean"].values[keep], 2 * ds["image"].values[keep])


def test_cli_clean_writes_images_and_masks(dirty, tmp_path, capsys):
    assert main(["clean", str(dirty / "mic_000*.mrc"), "--out-dir", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "defective pixels found across 8 micrographs" in text
    src = mrcfile.open(dirty / "mic_0003.mrc")
    with mrcfile.open(tmp_path / "out" / "mic_0003.mrc") as img, \
            mrcfile.open(tmp_path / "out" / "mic_0003_mask.mrc") as mask:
        assert img.data.shape == src.data.shape and img.data.dtype == np.float32
        assert img.voxel_size.x == pytest.approx(src.voxel_size.x)
        assert mask.header.mode == 0 and set(np.unique(mask.data)) <= {0, 1, 2, 3}
        truth = mrcfile.read(dirty / "truth" / "mic_0003_mask.mrc")
        assert ((mask.data > 0) & (truth > 0)).sum() / (truth > 0).sum() > 0.99
    src.close()
    assert main(["clean", str(dirty / "mic_000*.mrc"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_clean_on_a_store_adds_variables(dirty, tmp_path):
    ingest(str(dirty / "mic_000*.mrc"), tmp_path / "s.zarr")
    assert main(["clean", str(tmp_path / "s.zarr"), "--out-dir", str(tmp_path / "o"), "--no-gain-estimate"]) == 0
    ds = open_dataset(tmp_path / "s.zarr")
    assert {"image_clean", "artifact_mask", "defect_map", "gain_estimate", "n_hot_pixels"} <= set(ds.data_vars)
    assert ds["gain_estimate"].attrs["applied"] == 0


def test_cli_clean_writes_region_maps(tmp_path, capsys):
    from cryodask.simulate import MicrographParams, simulate_micrograph

    for i in range(2):
        sim = simulate_micrograph(MicrographParams(shape=(512, 512), n_contamination=2), seed=i)
        write_mrc(tmp_path / f"c{i}.mrc", sim.image, pixel_size_A=1.0)
    assert main(["clean", str(tmp_path / "c*.mrc"), "--out-dir", str(tmp_path / "o"), "--regions"]) == 0
    regions = mrcfile.read(tmp_path / "o" / "c0_regions.mrc")
    assert regions.shape == (512, 512) and (regions == 3).any() and (regions == 0).mean() > 0.5
