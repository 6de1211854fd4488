import numpy as np
import pytest

from cryodask import artifacts as A
from cryodask.defects import (
    estimate_defects,
    micrograph_statistics,
    ring_power,
    read_defect_file,
    read_gain_reference,
)
from cryodask.io.images import MicrographFileError, write_mrc
from cryodask.simulate import DatasetRanges, Detector, detector_state, draw_micrograph_params, simulate_micrograph


def _dataset_sums(n, shape, detector, seed=0):
    state = detector_state(detector, shape)
    params = draw_micrograph_params(n, shape=shape, seed=seed,
                                    ranges=DatasetRanges(n_hot_pixels=(20, 60), n_xrays=(2, 6)))
    sums, medians, fanos = 0, [], []
    for i, p in enumerate(params):
        sim = simulate_micrograph(p, detector=state, seed=seed * 1000 + i)
        found = A.find_impulses(sim.image)
        sums = sums + micrograph_statistics(sim.image, found.mask)
        medians.append(float(np.median(sim.image)))
        fanos.append(found.fano)
    return state, sums, float(np.mean(medians)), float(np.mean(fanos))


def test_fixed_defects_found_from_eight_micrographs():
    detector = Detector(gain_std=0.03, n_dead_rows=2, n_dead_cols=1, n_stuck_pixels=15, seed=8)
    state, sums, counts, fano = _dataset_sums(8, (256, 320), detector)
    found = estimate_defects(sums, 8, mean_counts=counts, fano=fano)
    assert (found.defects & state.defects).sum() == state.defects.sum()  # all found
    assert (found.defects & ~state.defects).sum() <= 5
    assert len(found.dead_rows) == 2 and len(found.dead_columns) == 1


def test_gain_estimate_correlates_with_the_truth():
    detector = Detector(gain_std=0.05, seed=3)
    state, sums, counts, fano = _dataset_sums(64, (128, 128), detector, seed=1)
    found = estimate_defects(sums, 64, mean_counts=counts, fano=fano)
    corr = np.corrcoef(found.gain.ravel(), state.gain.ravel())[0, 1]
    raw = np.corrcoef(found.raw_gain.ravel(), state.gain.ravel())[0, 1]
    assert corr >= 0.85 and corr >= raw  # the Wiener filter never makes it worse
    assert found.gain.mean() == pytest.approx(1.0, abs=0.01)


def test_gain_estimate_against_what_varies_between_micrographs_leaves_less_error():
    """Twelve micrographs of thick ice and particles: what the specimen leaves in their
    mean is noise to the gain estimate too. Filtered against the measured spread per ring,
    the estimate's error (what dividing by it leaves in every micrograph) is smaller than
    against the counting noise alone, and the error power it reports is that error's."""
    shape = (384, 384)
    state = detector_state(Detector(gain_std=0.03, seed=3), shape)
    params = draw_micrograph_params(12, shape=shape, seed=2, ranges=DatasetRanges(ice_thickness_A=(800.0, 1400.0)))
    sums, rings, medians, fanos = 0, 0, [], []
    for i, p in enumerate(params):
        sim = simulate_micrograph(p, detector=state, seed=100 + i)
        found = A.find_impulses(sim.image)
        statistics = micrograph_statistics(sim.image, found.mask)
        sums, rings = sums + statistics, rings + ring_power(statistics)
        medians.append(float(np.median(sim.image)))
        fanos.append(found.fano)
    counting = estimate_defects(sums, 12, mean_counts=float(np.mean(medians)), fano=float(np.mean(fanos)))
    spread = estimate_defects(sums, 12, mean_counts=float(np.mean(medians)), fano=float(np.mean(fanos)),
                              ring_power=rings)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    bins = np.minimum((np.hypot(ky, kx) / 0.5 * 64).astype(int), 64)
    weight = np.where(kx == 0, 1.0, 2.0) + 0 * ky
    low = (bins > 0) & (bins < 8)  # below 1/16 per pixel, where the particles' power lies

    def low_error(found):
        f = np.fft.rfft2(found.gain - state.gain)
        return float((weight * np.abs(f) ** 2)[low].sum())

    assert low_error(spread) < 0.8 * low_error(counting)  # 0.67 when written
    # The reported error power, summed over the Fourier pixels, is the error's variance.
    reported = float((spread.gain_error_power[bins] * weight).sum()) / (shape[0] * shape[1])
    assert reported == pytest.approx(float(np.var(spread.gain - state.gain)), rel=0.5)


def test_too_few_micrographs():
    with pytest.raises(ValueError, match="at least 4 micrographs"):
        estimate_defects(np.zeros((4, 8, 8)), 2)


def test_gain_reference_rotation_and_flip(tmp_path):
    gain = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    path = tmp_path / "gain.mrc"
    write_mrc(path, gain, pixel_size_A=1.0)
    np.testing.assert_array_equal(read_gain_reference(path), gain)
    turned = read_gain_reference(path, rotate=1)
    assert turned.shape == (3, 2)
    # One quarter turn from +x towards +y: the pixel at (y=0, x=2) goes to (y=2, x=1).
    assert turned[2, 1] == gain[0, 2]
    np.testing.assert_array_equal(read_gain_reference(path, flip=2), gain[:, ::-1])
    np.testing.assert_array_equal(read_gain_reference(path, rotate=2), gain[::-1, ::-1])
    with pytest.raises(MicrographFileError, match="gain.mrc: gain reference is 2x3"):
        read_gain_reference(path, shape=(3, 3))
    with pytest.raises(ValueError, match="rotate"):
        read_gain_reference(path, rotate=4)


def test_defect_file(tmp_path):
    path = tmp_path / "defects.txt"
    path.write_text("# x y w h\n2 1 3 1\n0 0 1 4\n")
    defects = read_defect_file(path, (4, 6))
    assert defects.sum() == 3 + 4
    assert defects[1, 2:5].all() and defects[:, 0].all()
    path.write_text("1 2 a b\n")
    with pytest.raises(ValueError, match="defects.txt, line 1"):
        read_defect_file(path, (4, 6))
    path.write_text("10 0 1 1\n")
    with pytest.raises(ValueError, match="outside"):
        read_defect_file(path, (4, 6))


def test_micrograph_statistics_planes_on_any_array_namespace(xp):
    rng = np.random.default_rng(8)
    image = rng.poisson(12.0, size=(40, 56)).astype(np.float32)
    image[3, 4] = -1.0  # below 5 % of the mean
    mask = np.zeros(image.shape, np.uint8)
    mask[10, 11], mask[20, 21:23], mask[30, :] = A.HOT_PIXEL, A.XRAY, A.DEFECT
    impulse = (mask == A.HOT_PIXEL) | (mask == A.XRAY)
    mean = image[~impulse].mean(dtype=np.float64)
    found = micrograph_statistics(xp.asarray(image), xp.asarray(mask))
    out = np.asarray(found.get() if hasattr(found, "get") else found)
    assert out.shape == (4, 40, 56) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.where(impulse, 0.0, image / mean), rtol=1e-6)
    np.testing.assert_array_equal(out[1], ~impulse)  # defects are not impulses: valid
    np.testing.assert_array_equal(out[2], image < 0.05 * mean)
    np.testing.assert_array_equal(out[3], impulse)
