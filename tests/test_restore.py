import mrcfile
import numpy as np
import pytest
import starfile

from cryodask.cli import main
from cryodask.io.images import write_mrc
from cryodask.physics import CTFParams
from cryodask.restore import fit_signal_noise, phase_flip, wiener_filter
from cryodask.simulate import MicrographParams, simulate_micrograph


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_wiener_with_unit_ctf_and_no_noise_is_the_identity():
    unit = CTFParams(defocus_u_A=0.0, defocus_v_A=0.0, cs_mm=0.0, amplitude_contrast=0.0,
                     phase_shift_deg=-90.0)  # -sin(-90 deg) = 1 at every frequency
    rng = np.random.default_rng(0)
    image = rng.normal(size=(48, 64)).astype(np.float32)
    k = np.linspace(0, 1, 8)
    out = wiener_filter(image, unit, pixel_size_A=1.0, signal=np.ones(8), noise=np.full(8, 1e-12), k=k)
    y, x = np.mgrid[0:48, 0:64]
    design = np.stack([np.ones(image.size), y.ravel(), x.ravel()], axis=1)
    plane = (design @ np.linalg.lstsq(design, image.ravel().astype(np.float64), rcond=None)[0]).reshape(48, 64)
    np.testing.assert_allclose(out, image - plane, atol=1e-5)  # a gradient is no specimen


def test_kernels_sharing_one_spectral_grid_give_what_each_gives_alone():
    # The second pass makes one CTF grid and one set of the spectral fit's bins per
    # micrograph for its three spectral fits and the restoration.
    from cryodask.causal import measure_noise
    from cryodask.restore import SpectralGrid
    from cryodask.score import measure_micrograph

    params = MicrographParams(shape=(256, 320), dose_e_per_A2=40, defocus_u_A=15000, defocus_v_A=14000)
    sim = simulate_micrograph(params, seed=2)
    ctf = CTFParams(params.defocus_u_A, params.defocus_v_A, params.defocus_angle_deg)
    image = sim.image.astype(np.float32)
    grid = SpectralGrid(image.shape, ctf, 1.0)
    for kernel in (wiener_filter, phase_flip):
        np.testing.assert_array_equal(kernel(image, ctf, pixel_size_A=1.0, grid=grid),
                                      kernel(image, ctf, pixel_size_A=1.0))
    for a, b in zip(fit_signal_noise(image, ctf, pixel_size_A=1.0, grid=grid),
                    fit_signal_noise(image, ctf, pixel_size_A=1.0)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(measure_noise(image, ctf, pixel_size_A=1.0, grid=grid).to_vector(2000),
                                  measure_noise(image, ctf, pixel_size_A=1.0).to_vector(2000))
    shared, alone = (measure_micrograph(image, image, ctf, pixel_size_A=1.0, grid=g) for g in (grid, None))
    assert shared[0] == pytest.approx(alone[0], nan_ok=True, rel=0, abs=0)
    np.testing.assert_array_equal(shared[1], alone[1])
    # A grid made for another CTF, shape or pixel size is refused, not used.
    other = CTFParams(params.defocus_u_A + 100.0, params.defocus_v_A, params.defocus_angle_deg)
    for call in (lambda: wiener_filter(image, other, pixel_size_A=1.0, grid=grid),
                 lambda: fit_signal_noise(image[:, :256], ctf, pixel_size_A=1.0, grid=grid),
                 lambda: phase_flip(image, ctf, pixel_size_A=1.1, grid=grid)):
        with pytest.raises(ValueError, match="grid: made for shape"):
            call()


@pytest.mark.parametrize("seed", [4, 5])
def test_a_thickness_gradient_costs_the_wiener_restoration_little(seed):
    """A wedge of ice (30 % thicker on one side) is no specimen: restored, the micrograph
    correlates with the truth about as well as without it (before its plane was removed,
    0.49 and 0.41 against 0.58 and 0.61)."""
    quality = {}
    for gradient in (0.0, 0.3):
        params = MicrographParams(shape=(512, 512), dose_e_per_A2=40, ice_thickness_A=1200, ice_gradient=gradient)
        sim = simulate_micrograph(params, seed=seed)
        ctf = CTFParams(params.defocus_u_A, params.defocus_v_A, params.defocus_angle_deg)
        quality[gradient] = _corr(wiener_filter(sim.image, ctf, pixel_size_A=1.0), sim.projection)
    assert quality[0.3] > quality[0.0] - 0.05


@pytest.mark.parametrize("dose", [20, 40, 60])
def test_restoration_makes_protein_bright_and_wiener_beats_phase_flip(dose):
    params = MicrographParams(shape=(768, 768), dose_e_per_A2=dose, defocus_u_A=16000,
                              defocus_v_A=15000, defocus_angle_deg=40, ice_thickness_A=400)
    sim = simulate_micrograph(params, seed=dose)
    ctf = CTFParams(params.defocus_u_A, params.defocus_v_A, params.defocus_angle_deg)
    raw = _corr(sim.image, sim.projection)
    flipped = _corr(phase_flip(sim.image, ctf, pixel_size_A=1.0), sim.projection)
    wiener = _corr(wiener_filter(sim.image, ctf, pixel_size_A=1.0), sim.projection)
    assert raw < 0 < flipped  # protein is dark in the raw image, bright once restored
    assert wiener > max(flipped, -raw) + 0.2


@pytest.mark.parametrize("ice_A", [0.0, 150.0])
def test_wiener_on_thin_ice_comes_near_the_linear_limit(ice_A):
    # Thin ice shows few Thon rings beyond the first: the signal below and around the first
    # ring, which falls by orders of magnitude within a few shells, decides the restoration.
    # (Smoothed linearly, it reached 0.81-0.86 of the limit on these micrographs; smoothed in
    # log space below the first ring and without the shells below 1/200 Å^-1, 0.92-0.95.)
    from benchmarks.bench_restore import linear_limit

    from cryodask.simulate import MicrographParams

    params = MicrographParams(shape=(768, 768), dose_e_per_A2=30, defocus_u_A=12300, defocus_v_A=11700,
                              defocus_angle_deg=30, ice_thickness_A=ice_A, n_hot_pixels=0, n_xrays=0)
    for seed in (0, 1):
        sim = simulate_micrograph(params, seed=seed)
        ours = _corr(wiener_filter(sim.image, params.ctf, pixel_size_A=1.0), sim.projection)
        limit = _corr(linear_limit(sim.image, sim.projection, params.ctf, 1.0), sim.projection)
        assert ours >= 0.97 * limit, (seed, ours, limit)


def test_the_shells_below_1_200_are_restored_unless_a_thickness_background_rules():
    from cryodask.simulate import MicrographParams

    for ice_A, kept in ((0.0, True), (1200.0, False)):
        params = MicrographParams(shape=(768, 768), dose_e_per_A2=30, defocus_u_A=12300, defocus_v_A=11700,
                                  ice_thickness_A=ice_A, n_hot_pixels=0, n_xrays=0)
        sim = simulate_micrograph(params, seed=0)
        k, signal, noise = fit_signal_noise(sim.image, params.ctf, pixel_size_A=1.0)
        below = k < 1.0 / 200.0
        assert below.any()
        # No ice: the particles' power, flat, at the level of the first shell above.
        # Thick ice: the thickness background's power is several times theirs; left out.
        assert (signal[below] > 0).all() == kept and (signal[below] <= signal[~below][0]).all()


def test_fitted_spectra_are_positive_and_noise_matches_shot_noise():
    params = MicrographParams(shape=(512, 512), dose_e_per_A2=30, ice_thickness_A=200)
    sim = simulate_micrograph(params, seed=3)
    k, signal, noise = fit_signal_noise(sim.image, params.ctf, pixel_size_A=1.0)
    assert (signal >= 0).all() and (noise > 0).all()
    # Shot noise is white with the variance of the counts; the MTF has no effect on it here.
    mid = (k > 0.1) & (k < 0.3)
    assert np.median(noise[mid]) == pytest.approx(sim.noise_variance["dose"], rel=0.15)


def test_cli_restore_writes_micrographs_and_star(tmp_path):
    for i in range(2):
        sim = simulate_micrograph(MicrographParams(shape=(1024, 1024), defocus_u_A=14000 + 2000 * i,
                                                   defocus_v_A=13500 + 2000 * i), seed=i)
        write_mrc(tmp_path / f"m{i}.mrc", sim.image, pixel_size_A=1.0)
    assert main(["restore", str(tmp_path / "m*.mrc"), "--out-dir", str(tmp_path / "out")]) == 0
    with mrcfile.open(tmp_path / "out" / "m1.mrc") as mrc:
        assert mrc.data.shape == (1024, 1024) and mrc.data.dtype == np.float32
        assert float(mrc.voxel_size.x) == pytest.approx(1.0)
    star = starfile.read(tmp_path / "out" / "micrographs_ctf.star", always_dict=True)["micrographs"]
    assert len(star) == 2
    np.testing.assert_allclose(0.5 * (star["rlnDefocusU"] + star["rlnDefocusV"]), [13750, 15750], rtol=0.01)
    assert main(["restore", str(tmp_path / "m*.mrc"), "--out-dir", str(tmp_path / "out"),
                 "--method", "phaseflip"]) == 2  # outputs exist: refused without --overwrite


def test_restored_output_does_not_depend_on_chunking_or_workers(tmp_path):
    import xarray as xr

    from cryodask import ingest, pipeline
    from cryodask.cluster import ClusterConfig, cluster_client

    for i in range(3):
        sim = simulate_micrograph(MicrographParams(shape=(384, 448), defocus_u_A=15000 + 1000 * i,
                                                   defocus_v_A=14500 + 1000 * i), seed=i)
        write_mrc(tmp_path / f"r{i}.mrc", sim.image, pixel_size_A=1.0)
    ds = ingest(str(tmp_path / "r*.mrc"), tmp_path / "s.zarr")
    ctf = pipeline.estimate_ctf_dataset(ds).compute()
    reference = pipeline.restore_dataset(ds, ctf).compute(scheduler="sync")
    rechunked = ds.chunk({"micrograph": 2})
    two_per_task = pipeline.restore_dataset(rechunked, ctf).compute(scheduler="threads")
    xr.testing.assert_equal(reference, two_per_task)
    with cluster_client(ClusterConfig(kind="local", n_workers=2)):
        distributed = pipeline.restore_dataset(ds, ctf).compute()
    xr.testing.assert_equal(reference, distributed)


def test_cli_restore_on_a_store_adds_the_restored_images(tmp_path):
    from cryodask import ingest, open_dataset

    for i in range(2):
        sim = simulate_micrograph(MicrographParams(shape=(512, 512)), seed=i)
        write_mrc(tmp_path / f"s{i}.mrc", sim.image, pixel_size_A=1.0)
    ingest(str(tmp_path / "s*.mrc"), tmp_path / "s.zarr")
    assert main(["restore", str(tmp_path / "s.zarr"), "--out-dir", str(tmp_path / "out"),
                 "--method", "phaseflip"]) == 0
    ds = open_dataset(tmp_path / "s.zarr")
    assert ds["image_restored"].attrs["method"] == "phaseflip"
    np.testing.assert_array_equal(ds["image_restored"].values[1], mrcfile.read(tmp_path / "out" / "s1.mrc"))


def test_restoration_runs_unchanged_on_other_array_namespaces(xp):
    # The filters are written once for NumPy, CuPy and any array-API namespace.
    params = MicrographParams(shape=(256, 320), dose_e_per_A2=40, defocus_u_A=15300, defocus_v_A=14700,
                              defocus_angle_deg=30)
    image = simulate_micrograph(params, seed=0).image.astype(np.float32)
    for restore in (wiener_filter, phase_flip):
        expected = restore(image, params.ctf, pixel_size_A=1.0)
        found = restore(xp.asarray(image), params.ctf, pixel_size_A=1.0)
        assert type(found).__module__.split(".")[0] == xp.__name__.split(".")[0]
        found = np.asarray(found.get() if hasattr(found, "get") else found)
        np.testing.assert_allclose(found, expected, atol=1e-5 * float(np.abs(expected).max()))


def test_a_restored_file_written_by_an_earlier_attempt_is_left_alone(tmp_path):
    # A worker lost after writing (over its memory limit, restarted) has its task rerun.
    from cryodask.pipeline import _write_restored

    block = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    paths = [str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")]
    assert _write_restored(block, paths, [1.0, 1.0]) == 2
    assert _write_restored(block + 1.0, paths, [1.0, 1.0]) == 0
    with mrcfile.open(paths[1]) as mrc:
        np.testing.assert_array_equal(mrc.data, block[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc"]


@pytest.mark.parametrize("even", [True, False])
def test_shell_interpolation_is_numpys_interp(even):
    from cryodask.restore import _shell_interpolator

    k = (np.arange(40) + 0.5) * 0.5 / 40
    if not even:
        k = k**1.3
    kk = np.random.default_rng(1).uniform(-0.01, 0.8, size=(50, 33)).astype(np.float32)
    values = np.exp(-np.arange(40) / 7.0) + 0.1
    found = _shell_interpolator(kk, k)(values)
    assert found.dtype == np.float32 and found.shape == kk.shape
    np.testing.assert_allclose(found, np.interp(kk.astype(np.float64), k, values), rtol=1e-5)
