import dask
import numpy as np
import pytest
import starfile

from cryodask import ingest, open_dataset, pipeline, write_variables
from cryodask.cli import main
from cryodask.ctf import CTFSearch
from cryodask.io.star import write_ctf_star, write_ctffind_table
from cryodask.simulate import Detector, draw_micrograph_params, write_simulated_dataset


@pytest.fixture(scope="module")
def ctf_sims(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctfsim")
    params = draw_micrograph_params(3, shape=(768, 768), pixel_size_A=1.1, seed=21)
    truth = write_simulated_dataset(out, params, detector=Detector(seed=21), seed=21)
    return out, truth


def test_store_pipeline_is_lazy_and_matches_truth(ctf_sims, tmp_path):
    out, truth = ctf_sims
    ds = ingest(str(out / "*.mrc"), tmp_path / "s.zarr")
    with dask.config.set(scheduler="sync"):
        lazy = pipeline.estimate_ctf_dataset(ds)
    assert isinstance(lazy["defocus_u_A"].data, dask.array.Array)
    write_variables(lazy, tmp_path / "s.zarr")
    result = open_dataset(tmp_path / "s.zarr")
    mean = 0.5 * (result["defocus_u_A"].values + result["defocus_v_A"].values)
    true_mean = 0.5 * (truth["defocus_u_A"] + truth["defocus_v_A"]).to_numpy()
    np.testing.assert_allclose(mean, true_mean, rtol=0.01)
    assert result["defocus_u_A"].dtype == np.float32 and result["ctf_reliable"].dtype == bool
    assert result["ctf_fit_resolution_A"].attrs["units"] == "Å"


def test_star_and_ctffind_exports(ctf_sims, tmp_path):
    out, _ = ctf_sims
    ds = ingest(str(out / "*.mrc"), tmp_path / "s.zarr")
    results = pipeline.estimate_ctf_dataset(ds, search=CTFSearch(fit_phase_shift=True)).compute()
    table = ds[["micrograph_name", "pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"]].merge(results)
    write_ctf_star(table, tmp_path / "m.star")
    star = starfile.read(tmp_path / "m.star", always_dict=True)
    optics, mics = star["optics"], star["micrographs"]
    assert list(optics.columns) == ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographPixelSize",
                                    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
    assert optics["rlnMicrographPixelSize"].iloc[0] == pytest.approx(1.1)
    assert {"rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
            "rlnCtfAstigmatism", "rlnCtfFigureOfMerit", "rlnCtfMaxResolution", "rlnPhaseShift"} <= set(mics)
    np.testing.assert_allclose(mics["rlnCtfAstigmatism"], mics["rlnDefocusU"] - mics["rlnDefocusV"], rtol=1e-5)
    write_ctffind_table(table, tmp_path / "m.txt")
    rows = np.loadtxt(tmp_path / "m.txt", comments="#")
    assert rows.shape == (3, 7)
    np.testing.assert_allclose(rows[:, 4], np.radians(results["phase_shift_deg"].values), atol=1e-5)
    np.testing.assert_allclose(rows[:, 1], results["defocus_u_A"].values, rtol=1e-6)


def test_cli_ctf_on_files_keeps_names_as_given(ctf_sims, tmp_path, monkeypatch, capsys):
    out, truth = ctf_sims
    monkeypatch.chdir(out)
    star = tmp_path / "micrographs_ctf.star"
    code = main(["ctf", "mic_0000.mrc", "./mic_0001.mrc", "--out", str(star),
                 "--ctffind-txt", str(tmp_path / "ctf.txt"), "--diagnostics", str(tmp_path / "png")])
    assert code == 0
    mics = starfile.read(star, always_dict=True)["micrographs"]
    assert mics["rlnMicrographName"].tolist() == ["mic_0000.mrc", "./mic_0001.mrc"]
    assert "rlnPhaseShift" not in mics
    np.testing.assert_allclose(0.5 * (mics["rlnDefocusU"] + mics["rlnDefocusV"]),
                               0.5 * (truth["defocus_u_A"] + truth["defocus_v_A"])[:2], rtol=0.01)
    assert (tmp_path / "png" / "mic_0000_ctf.png").stat().st_size > 10_000
    assert "estimated 2 CTFs" in capsys.readouterr().out


def test_cli_ctf_on_a_store_adds_variables(ctf_sims, tmp_path):
    out, _ = ctf_sims
    ingest(str(out / "*.mrc"), tmp_path / "s.zarr")
    assert main(["ctf", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m.star"),
                 "--cluster", "threads"]) == 0
    ds = open_dataset(tmp_path / "s.zarr")
    assert set(pipeline.CTF_VARIABLES) <= set(ds.data_vars)


def test_cli_ctf_flags_unreliable_micrographs(tmp_path, capsys):
    from cryodask.io.images import write_mrc

    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "noise.mrc", rng.poisson(30, (512, 512)).astype(np.float32), pixel_size_A=1.0)
    assert main(["ctf", str(tmp_path / "noise.mrc"), "--out", str(tmp_path / "m.star")]) == 0
    captured = capsys.readouterr()
    assert "UNRELIABLE" in captured.out and "no significant Thon rings" in captured.err
    mics = starfile.read(tmp_path / "m.star", always_dict=True)["micrographs"]
    assert mics["rlnCtfMaxResolution"].iloc[0] > 0
