import numpy as np
import pytest
from scipy import ndimage

from cryodask import artifacts
from cryodask.physics import CTFParams, ctf_2d, frequency_grid
from cryodask.simulate import (
    DatasetRanges,
    Detector,
    MicrographParams,
    detector_state,
    draw_micrograph_params,
    gaussian_phantom,
    simulate_micrograph,
)
from cryodask.spectrum import power_spectrum

TILE = 256


def _highpass(ps):
    ps = np.log(ps)
    return ps - ndimage.gaussian_filter(ps, 4.0, mode=["wrap", "nearest"])


def _thon_score(ps_hp, params: MicrographParams, **change):
    """Correlation of the spectrum with CTF^2 in the 30-6 Å band, for changed parameters."""
    ctf = params.ctf
    values = dict(defocus_u_A=ctf.defocus_u_A, defocus_v_A=ctf.defocus_v_A,
                  defocus_angle_deg=ctf.defocus_angle_deg, b_factor_A2=0.0)
    values.update(change)
    ky, kx = frequency_grid((TILE, TILE), params.pixel_size_A, dtype=np.float64)
    model = _highpass(ctf_2d(ky, kx, CTFParams(**values)) ** 2 + 0.05)
    k = np.sqrt(ky**2 + kx**2) + 0 * kx
    band = (k > 1 / 30) & (k < 1 / 6)
    return np.corrcoef(ps_hp[band], model[band])[0, 1]


@pytest.mark.parametrize("u,v,angle", [(16000, 14500, 20.0), (16000, 14500, 70.0),
                                      (16000, 14500, 110.0), (16000, 14500, 160.0),
                                      (14500, 16000, 35.0)])  # U < V in the input: swapped
def test_recorded_ctf_matches_the_thon_rings(u, v, angle):
    params = MicrographParams(shape=(768, 1024), defocus_u_A=u, defocus_v_A=v,
                              defocus_angle_deg=angle, dose_e_per_A2=40, ice_thickness_A=400)
    sim = simulate_micrograph(params, seed=11)
    ps_hp = _highpass(power_spectrum(sim.image, tile_size=TILE).astype(np.float64))
    truth = _thon_score(ps_hp, params)
    assert truth > 0.1
    # The recorded angle comes back as the best of a scan over all angles...
    angles = np.arange(0.0, 180.0, 5.0)
    scores = [_thon_score(ps_hp, params, defocus_angle_deg=a) for a in angles]
    best = angles[int(np.argmax(scores))]
    expected = params.defocus_angle_deg
    assert min(abs(best - expected), 180 - abs(best - expected)) <= 5.0
    # ... and the recorded defocus beats a 3 % error either way.
    for factor in (0.97, 1.03):
        wrong = _thon_score(ps_hp, params, defocus_u_A=params.defocus_u_A * factor,
                            defocus_v_A=params.defocus_v_A * factor)
        assert truth > wrong + 0.05


def test_thon_ring_zeros_are_dark():
    params = MicrographParams(shape=(512, 512), defocus_u_A=20000, defocus_v_A=20000)
    sim = simulate_micrograph(params, seed=5)
    ps = power_spectrum(sim.image, tile_size=TILE).astype(np.float64)
    ps_hp = _highpass(ps)
    ky, kx = frequency_grid((TILE, TILE), 1.0, dtype=np.float64)
    ctf = ctf_2d(ky, kx, CTFParams(20000, 20000))
    k = np.sqrt(ky**2 + kx**2) + 0 * kx
    band = (k > 1 / 25) & (k < 1 / 8)
    zeros = ps_hp[band & (np.abs(ctf) < 0.2)].mean()
    peaks = ps_hp[band & (np.abs(ctf) > 0.9)].mean()
    assert peaks - zeros > 0.05


def test_deterministic_by_seed_and_dtypes():
    params = MicrographParams(shape=(96, 128), n_particles=3, n_hot_pixels=5, n_xrays=2)
    a = simulate_micrograph(params, seed=4)
    b = simulate_micrograph(params, seed=4)
    c = simulate_micrograph(params, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    for name in ("image", "projection", "clean", "expected"):
        assert getattr(a, name).dtype == np.float32 and getattr(a, name).shape == (96, 128)
    assert a.mask.dtype == np.uint8


def test_projection_is_protein_positive_and_clean_is_its_ctf_image():
    params = MicrographParams(shape=(256, 256), n_particles=4, b_motion_A2=0, b_coherence_A2=0)
    sim = simulate_micrograph(params, seed=2)
    assert sim.projection.max() > 10 * abs(sim.projection.min())
    ky, kx = frequency_grid((256, 256), 1.0, dtype=np.float64)
    expected = np.fft.irfft2(np.fft.rfft2(sim.projection) * ctf_2d(ky, kx, params.ctf), s=(256, 256))
    np.testing.assert_allclose(sim.clean, expected, atol=1e-5 * np.abs(expected).max())
    # Under focus, the low-pass CTF image of protein is dark where the particles are.
    y, x = np.round(sim.particle_centres_px[0]).astype(int)
    smooth = ndimage.gaussian_filter(sim.clean, 8)
    assert smooth[y, x] < 0


def test_artifact_masks_match_what_was_added():
    detector = Detector(gain_std=0.02, n_dead_rows=2, n_dead_cols=1, n_stuck_pixels=7, seed=1)
    params = MicrographParams(shape=(256, 300), n_particles=2, n_hot_pixels=30, n_xrays=4)
    sim = simulate_micrograph(params, detector=detector, seed=8)
    state = detector_state(detector, (256, 300))
    assert (sim.mask == artifacts.HOT_PIXEL).sum() == 30
    assert (sim.mask == artifacts.XRAY).sum() >= 4 * 3
    np.testing.assert_array_equal(sim.mask == artifacts.DEFECT, state.defects)
    assert np.all(sim.image[state.dead] == 0)
    assert state.dead.sum() == 2 * 300 + 256 - 2  # two rows and a column, crossing twice
    hot = sim.mask == artifacts.HOT_PIXEL
    assert sim.image[hot].min() > sim.expected.mean() + 8 * np.sqrt(sim.expected.mean())
    assert sim.noise_variance["artifacts"] > 0 and sim.noise_variance["detector"] > 0


def test_noise_budget_adds_up_to_the_image_variance():
    params = MicrographParams(shape=(512, 512), dose_e_per_A2=30, ice_thickness_A=800)
    sim = simulate_micrograph(params, detector=Detector(gain_std=0.03, read_noise_counts=1.0), seed=3)
    nv = sim.noise_variance
    budget = nv["dose"] + nv["ice"] + nv["detector"] + nv["artifacts"] + sim.signal_variance
    assert sim.image.var() == pytest.approx(budget, rel=0.05)
    assert nv["dose"] == pytest.approx(30.0 * np.exp(-800 / 3200), rel=0.05)
    assert nv["read_noise"] == pytest.approx(1.0, rel=0.05)


def test_ice_ring_appears_with_thick_ice():
    base = dict(shape=(512, 512), n_particles=0, b_motion_A2=0, b_coherence_A2=0, dose_e_per_A2=200)
    thin = simulate_micrograph(MicrographParams(ice_thickness_A=50, **base), seed=1)
    thick = simulate_micrograph(MicrographParams(ice_thickness_A=3000, **base), seed=1)
    ky, kx = frequency_grid((TILE, TILE), 1.0, dtype=np.float64)
    k = np.sqrt(ky**2 + kx**2) + 0 * kx
    ring = np.abs(k - 1 / 3.66) < 0.01
    off = np.abs(k - 1 / 5.5) < 0.01

    def contrast(sim):
        ps = power_spectrum(sim.image, tile_size=TILE)
        return ps[ring].mean() / ps[off].mean()

    assert contrast(thick) > contrast(thin) * 1.2


def test_phantom_and_dataset_draws():
    atoms = gaussian_phantom(radius_A=30, seed=0)
    assert atoms.dtype == np.float32 and atoms.shape[1] == 3
    assert np.sqrt((atoms**2).sum(1)).max() <= 31
    assert np.allclose(atoms.mean(0), 0, atol=1e-3)
    params = draw_micrograph_params(10, seed=1, ranges=DatasetRanges(dose_e_per_A2=(20, 25)))
    assert all(20 <= p.dose_e_per_A2 <= 25 for p in params)
    assert all(p.defocus_u_A >= p.defocus_v_A for p in params)
    assert params == draw_micrograph_params(10, seed=1, ranges=DatasetRanges(dose_e_per_A2=(20, 25)))
    with pytest.raises(ValueError, match="dose_e_per_A2"):
        MicrographParams(dose_e_per_A2=-1)
    with pytest.raises(ValueError, match="defocus_A"):
        DatasetRanges(defocus_A=(3.0, 1.0))


def test_atomic_model_from_pdb(data_path, tmp_path):
    from cryodask.simulate import atoms_from_model

    pytest.importorskip("gemmi")
    pdb = tmp_path / "tiny.pdb"
    pdb.write_text(
        "ATOM      1  N   GLY A   1       1.000   2.000   3.000  1.00  0.00           N\n"
        "ATOM      2  CA  GLY A   1       2.000   2.000   3.000  1.00  0.00           C\n"
        "ATOM      3  H   GLY A   1       2.500   2.000   3.000  1.00  0.00           H\n"
        "END\n")
    atoms = atoms_from_model(pdb)
    assert atoms.shape == (2, 3)
    np.testing.assert_allclose(atoms[:, 0], [-0.5, 0.5], atol=1e-6)
    sim = simulate_micrograph(MicrographParams(shape=(64, 64), n_particles=1), atoms=atoms, seed=0)
    assert sim.projection.sum() > 0


def test_paired_counts_are_poisson_and_share_the_realisation_across_a_change():
    params = MicrographParams(shape=(256, 256), dose_e_per_A2=20, ice_thickness_A=900)
    thin = MicrographParams(shape=(256, 256), dose_e_per_A2=20, ice_thickness_A=0.0)

    def residual(sim):
        return (sim.image - sim.expected) / np.sqrt(sim.expected)

    paired = simulate_micrograph(params, seed=6, paired_counts=True)
    z = residual(paired)
    # Poisson whichever way it is drawn: standardised residual of mean 0 and variance 1.
    assert abs(z.mean()) < 0.01 and z.var() == pytest.approx(1.0, abs=0.02)
    assert z.var() == pytest.approx(residual(simulate_micrograph(params, seed=6)).var(), abs=0.02)
    # Without its ice (the expected counts change everywhere) the paired draw keeps the noise;
    # the rejection sampler draws another.
    same = np.corrcoef(z.ravel(), residual(simulate_micrograph(thin, seed=6, paired_counts=True)).ravel())[0, 1]
    other = np.corrcoef(residual(simulate_micrograph(params, seed=6)).ravel(),
                        residual(simulate_micrograph(thin, seed=6)).ravel())[0, 1]
    assert same > 0.9 and abs(other) < 0.05
