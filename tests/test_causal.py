import numpy as np
import pandas as pd
import pytest

from cryodask.causal import NOISE_CAUSES, causal_graph, decompose_noise
from cryodask.cli import main
from cryodask.io.images import write_mrc
from cryodask.simulate import Detector, MicrographParams, detector_state, simulate_micrograph

DETECTOR = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=1, n_stuck_pixels=10,
                    read_noise_counts=1.0, seed=2)


def test_graph_has_every_cause_pointing_at_the_spectrum():
    graph = causal_graph()
    for node in ("dose", "motion", "coherence", "aberrations", "ice", "sample", "detector", "artifacts"):
        assert graph.has_edge(node, "spectrum")
    assert {n for n, d in graph.nodes(data=True) if d["adds_noise"]} == set(NOISE_CAUSES)


@pytest.mark.parametrize("dose, ice, hot, xrays", [(20, 150, 100, 5), (40, 500, 300, 20),
                                                  (60, 1400, 400, 30), (30, 800, 0, 0)])
def test_noise_shares_match_the_simulators_truth(dose, ice, hot, xrays):
    state = detector_state(DETECTOR, (1024, 1024))
    params = MicrographParams(shape=(1024, 1024), dose_e_per_A2=dose, ice_thickness_A=ice,
                              n_hot_pixels=hot, n_xrays=xrays)
    sim = simulate_micrograph(params, detector=state, seed=dose + ice)
    found = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, defects=state.defects,
                            gain_estimate=state.gain)
    truth = {c: sim.noise_variance[c] for c in NOISE_CAUSES}
    total = sum(truth.values())
    for cause in NOISE_CAUSES:
        assert found.shares[cause] == pytest.approx(truth[cause] / total, abs=0.05), cause
    assert sum(found.shares.values()) == pytest.approx(1.0)
    assert found.top_cause in ("ice", "detector", "artifacts")
    assert all(g >= 0 for g in found.gain.values())
    # Restoration loses only the signal of the pixels the impulses covered: about half
    # their share, times the quality (a correlation, at most 1).
    covered = ((sim.mask == 1) | (sim.mask == 2)).mean()
    assert 0.0 <= found.gain["artifacts"] <= 0.6 * covered + 1e-6
    if covered:
        assert found.gain["artifacts"] > 0


def test_thicker_ice_gains_more_from_thin_ice():
    gains = []
    for ice in (150, 1400):
        params = MicrographParams(shape=(1024, 1024), dose_e_per_A2=40, ice_thickness_A=ice)
        sim = simulate_micrograph(params, seed=8)
        gains.append(decompose_noise(sim.image, params.ctf, pixel_size_A=1.0).gain["ice"])
    assert gains[1] > 3 * gains[0]


def test_cli_noise_writes_the_table(tmp_path):
    state = detector_state(DETECTOR, (512, 512))
    for i in range(4):
        params = MicrographParams(shape=(512, 512), dose_e_per_A2=30 + 5 * i, n_hot_pixels=50, n_xrays=3)
        write_mrc(tmp_path / f"n{i}.mrc", simulate_micrograph(params, detector=state, seed=i).image,
                  pixel_size_A=1.0)
    assert main(["noise", str(tmp_path / "n*.mrc"), "--out", str(tmp_path / "noise.csv")]) == 0
    table = pd.read_csv(tmp_path / "noise.csv")
    expected = (["micrograph"] + [f"share_{c}" for c in NOISE_CAUSES]
                + [f"gain_{c}" for c in NOISE_CAUSES] + ["top_cause", "n_hot_pixels", "n_xray_pixels",
                                                         "n_defect_pixels", "ctf_reliable",
                                                         "b_factor_relative_A2", "b_factor_relative_A2_se"])
    assert list(table.columns) == expected
    assert table["micrograph"].iloc[0] == str(tmp_path / "n0.mrc")
    np.testing.assert_allclose(table[[f"share_{c}" for c in NOISE_CAUSES]].sum(axis=1), 1.0, atol=1e-4)
    assert set(table["top_cause"]) <= {"ice", "detector", "artifacts"}
    assert (table["n_hot_pixels"] >= 40).all()  # 50 hot pixels each, counted as corrected


def test_band_shares_sum_to_one_and_follow_the_simulated_ice(monkeypatch):
    """The ice's share of the noise in each band against the truth: the same micrograph
    simulated without the ice's structure gives the ice's own contribution, and the image
    minus its expected counts (defects left out) the other noise. The ice passes the
    envelope (B = 50 Å²) and the pixel's MTF like the particles: most of its ring's power
    is damped away, and its share is larger below 1/20 Å^-1 than beyond 1/8 Å^-1."""
    import cryodask.simulate.micrograph as simulator
    from cryodask.causal import BANDS_A
    from cryodask.physics import frequency_grid

    state = detector_state(DETECTOR, (1024, 1024))
    params = MicrographParams(shape=(1024, 1024), dose_e_per_A2=30, ice_thickness_A=1400)
    sim = simulate_micrograph(params, detector=state, seed=5)
    found = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, defects=state.defects)
    ice_spectrum = simulator.ice_power_spectrum
    monkeypatch.setattr(simulator, "ice_power_spectrum", lambda k, t, c=0.07: 0.0 * ice_spectrum(k, t, c))
    without_ice = simulate_micrograph(params, detector=state, seed=5)
    monkeypatch.undo()

    def power(x):
        f = np.fft.rfft2(x - x.mean())
        return (f.real**2 + f.imag**2) / x.size

    ice = power(sim.expected - without_ice.expected)
    other = power(np.where(state.defects, 0.0, sim.image - sim.expected))
    ky, kx = frequency_grid(sim.image.shape, 1.0, layout="rfft")
    k = np.sqrt(ky**2 + kx**2)
    truth = []
    for band, (low_A, high_A) in enumerate(BANDS_A):
        assert sum(found.band_shares[c][band] for c in NOISE_CAUSES) == pytest.approx(1.0)
        inside = (k >= 1.0 / low_A) & ((k < 1.0 / high_A) if high_A > 0 else True)
        truth.append(ice[inside].mean() / (ice[inside].mean() + other[inside].mean()))
        assert found.band_shares["ice"][band] == pytest.approx(truth[band], abs=0.05)
    assert truth[0] > truth[2] and found.band_shares["ice"][0] > found.band_shares["ice"][2]


def test_fixed_node_values_are_used():
    params = MicrographParams(shape=(512, 512), dose_e_per_A2=30, ice_thickness_A=800)
    sim = simulate_micrograph(params, seed=2)
    free = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0)
    white, white_error = free.parameters["white"]
    assert white_error > 0
    louder = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, fixed={"white": 2 * white})
    assert louder.variance["detector"] > free.variance["detector"] + 0.5 * white
    no_ice = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, fixed={"ice_scale": 0.0})
    assert no_ice.variance["ice"] <= free.variance["ice"]
    with pytest.raises(ValueError, match="unknown node value"):
        decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, fixed={"motion": 1.0})


def test_noise_dataset_with_priors(tmp_path):
    from cryodask import ingest, pipeline

    state = detector_state(DETECTOR, (384, 384))
    for i in range(5):
        params = MicrographParams(shape=(384, 384), dose_e_per_A2=30, ice_thickness_A=300 + 200 * i)
        write_mrc(tmp_path / f"p{i}.mrc", simulate_micrograph(params, detector=state, seed=i).image,
                  pixel_size_A=1.0)
    ds = ingest(str(tmp_path / "p*.mrc"), tmp_path / "s.zarr")
    ctf = pipeline.estimate_ctf_dataset(ds).compute()
    noise = pipeline.noise_dataset(ds, ctf, prior=True).compute()
    attrs = noise["prior_white"].attrs
    assert attrs["converged"] == 1 and attrs["iterations"] < 200
    np.testing.assert_allclose(sum(noise[f"share_{c}"] for c in NOISE_CAUSES), 1.0, atol=1e-5)
    assert noise["band_share_ice"].dims == ("micrograph", "band")


def test_particle_spectrum_is_recovered_across_defoci():
    from cryodask.causal import dataset_quality, measured_spectrum, particle_spectrum

    rng = np.random.default_rng(2)
    n, shells = 20, 40
    truth = np.geomspace(1e3, 1e-2, shells)  # steep, as a particle's power is
    background = np.linspace(0.5, 0.1, shells)
    scale = rng.uniform(20, 60, n)
    ctf2 = rng.uniform(0.0, 1.0, (n, shells))
    power = scale[:, None] ** 2 * (background + truth * ctf2) + scale[:, None] * 1.1
    power *= rng.normal(1.0, 0.01, power.shape)  # periodogram shells of many pixels
    found = particle_spectrum(power, ctf2, scale)
    np.testing.assert_allclose(found[:20], truth[:20], rtol=0.1)
    # The micrograph whose CTF passes most of the particles' power restores best.
    k = np.linspace(0.01, 0.5, shells)
    q = dataset_quality(power, ctf2, scale, found, k, k_min=0.0)
    assert np.argmax(q) == np.argmax((k * truth * ctf2).sum(axis=1) / (k * truth).sum())
    assert np.all((q >= 0) & (q <= 1))
    # Fewer than 3 micrographs measure nothing.
    assert np.isnan(particle_spectrum(power[:2], ctf2[:2], scale[:2])).all()
    # Where the scatter of the shells hides the particles' power, it is not measured: 0,
    # not the regression's noise (which was at times orders of magnitude above the truth).
    faint = truth * 1e-3
    noisy = scale[:, None] ** 2 * (background + faint * ctf2) * rng.normal(1.0, 0.1, power.shape)
    hidden = measured_spectrum(*particle_spectrum(noisy, ctf2, scale, with_error=True))
    weak = faint < 0.01  # a few times under the slope's standard error here
    assert weak.sum() >= 20 and (hidden[weak] == 0).mean() >= 0.8
    np.testing.assert_allclose(hidden[:3], faint[:3], rtol=0.3)


def test_dataset_particle_spectrum_changes_the_gains():
    state = detector_state(DETECTOR, (512, 512))
    params = MicrographParams(shape=(512, 512), dose_e_per_A2=40, ice_thickness_A=800)
    sim = simulate_micrograph(params, detector=state, seed=3)
    alone = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0)
    k = np.linspace(0.0, 0.5, 97)[1:] - 0.5 / 192
    steep = 1e-2 * (0.02 / np.maximum(k, 0.005)) ** 3  # most power at the lowest frequencies
    weighted = decompose_noise(sim.image, params.ctf, pixel_size_A=1.0, particle_power=(k, steep))
    assert alone.shells.shape == (2, 96) and weighted.scale > 0
    assert weighted.quality != pytest.approx(alone.quality)
    assert set(weighted.gain) == set(alone.gain)


def test_standard_errors_of_the_shares_match_their_scatter(tmp_path):
    from cryodask import pipeline
    from cryodask.ingest import micrographs_dataset

    params = MicrographParams(shape=(512, 512), dose_e_per_A2=30, ice_thickness_A=900, n_hot_pixels=100,
                              n_xrays=5)
    state = detector_state(DETECTOR, (512, 512))
    for seed in range(8):  # the same conditions, eight realisations
        write_mrc(tmp_path / f"r{seed}.mrc", simulate_micrograph(params, detector=state, seed=seed).image,
                  pixel_size_A=1.0)
    ds = micrographs_dataset(sorted(str(p) for p in tmp_path.glob("r*.mrc")))
    ctf = pipeline.estimate_ctf_dataset(ds).compute()
    noise = pipeline.noise_dataset(ds, ctf, uncertainty=True).compute()
    for cause in ("dose", "ice"):
        se = noise[f"share_{cause}_se"].values
        scatter = float(np.std(noise[f"share_{cause}"].values, ddof=1))
        assert np.all(np.isfinite(se)) and np.all(se >= 0)
        # Half the halves' difference is a one-degree-of-freedom estimate: judged by its RMS.
        rms = float(np.sqrt(np.mean(se**2)))
        assert scatter / 4 < rms < scatter * 4, (cause, rms, scatter)
    assert "gain_ice_se" in noise


def test_fit_envelope_recovers_a_known_b_factor():
    from cryodask.causal import fit_envelope

    k = np.linspace(0.005, 0.5, 96)
    truth = 1e-3 / (1.0 + (k / 0.05) ** 2)
    b, error = fit_envelope(k, 3.0 * np.exp(-120.0 * k**2 / 2.0) * truth, truth)
    assert b == pytest.approx(120.0, abs=1e-6) and error < 1e-6
    rng = np.random.default_rng(0)
    noisy = np.exp(-120.0 * k**2 / 2.0 + rng.normal(0.0, 0.2, k.size)) * truth
    b, error = fit_envelope(k, noisy, truth)
    assert abs(b - 120.0) < 4 * error and 0 < error < 100
    assert np.isnan(fit_envelope(k[:3], truth[:3], truth[:3])[0])  # too few shells: no value


def test_motion_and_coherence_envelope_follows_the_simulators_b_factor(tmp_path):
    """The envelope node against the truth: 16 micrographs of 512², B (motion + coherence)
    37-250 Å²; the estimates rank like the truth, and their scatter about it is the size of
    their standard errors."""
    import dask
    import xarray as xr
    from scipy.stats import spearmanr

    from cryodask import pipeline
    from cryodask.clean import clean_for_fitting, measure_defects
    from cryodask.ingest import micrographs_dataset
    from cryodask.simulate import DatasetRanges, draw_micrograph_params, write_simulated_dataset

    params = draw_micrograph_params(16, shape=(512, 512), seed=5, ranges=DatasetRanges(
        b_motion_A2=(10.0, 250.0), dose_e_per_A2=(20.0, 60.0), ice_thickness_A=(150.0, 1000.0)))
    truth = write_simulated_dataset(tmp_path, params, detector=Detector(seed=5), seed=5)
    with dask.config.set(scheduler="threads"):
        ds = micrographs_dataset(str(tmp_path / "mic_*.mrc"))
        measured = measure_defects(ds)
        work, exclude, extra = clean_for_fitting(ds, measured=measured)
        ctf = xr.merge([pipeline.estimate_ctf_dataset(work, exclude=exclude), extra]).compute()
        noise = pipeline.noise_dataset(ds, ctf, gain_estimate=measured.gain, defects=measured.defects,
                                       prior=True).compute()
    b_true = (truth["b_motion_A2"] + truth["b_coherence_A2"]).to_numpy()
    b = noise["b_factor_relative_A2"].values
    error = noise["b_factor_relative_A2_error"].values
    assert spearmanr(b, b_true).statistic > 0.5
    residual = b - b_true
    residual = residual - np.median(residual)  # the node is relative to the dataset's envelope
    assert 1 / 3 < np.std(residual) / np.sqrt(np.mean(error**2)) < 3


def test_the_gain_estimates_error_is_interpolated_between_rings_as_a_falling_power():
    from cryodask.causal import _log_interp

    rings = np.array([0.004, 0.012, 0.020, 0.028])
    error = 100.0 * np.exp(-rings / 0.002)  # an order of magnitude and more per ring
    between = np.array([0.008, 0.016, 0.024])
    assert np.allclose(_log_interp(between, rings, error), 100.0 * np.exp(-between / 0.002), rtol=1e-9)
    # Linearly the midpoints would come out several times too high.
    assert np.all(np.interp(between, rings, error) > 2.5 * 100.0 * np.exp(-between / 0.002))
    # Beyond the rings the ends are held; rings without error give none.
    assert _log_interp([0.0, 0.1], rings, error) == pytest.approx([error[0], error[-1]])
    assert np.all(_log_interp(between, rings, np.array([1.0, 0.0, 0.0, 1.0]))[1] == 0.0)
    assert np.all(_log_interp(between, rings, np.zeros(4)) == 0.0)
