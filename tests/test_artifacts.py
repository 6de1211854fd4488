import numpy as np
import pytest

from cryodask import artifacts as A
from cryodask.simulate import Detector, MicrographParams, detector_state, simulate_micrograph
from cryodask.spectrum import power_spectrum

DETECTOR = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=2, n_stuck_pixels=20, seed=4)


def _sim(dose, ice, seed, n_hot=300, n_xrays=20, shape=(768, 1024)):
    params = MicrographParams(shape=shape, dose_e_per_A2=dose, ice_thickness_A=ice,
                              n_hot_pixels=n_hot, n_xrays=n_xrays)
    return simulate_micrograph(params, detector=DETECTOR, seed=seed), params


@pytest.mark.parametrize("dose, ice", [(20, 150), (20, 1400), (60, 150), (60, 1400)])
def test_recall_and_false_positives(dose, ice):
    sim, params = _sim(dose, ice, seed=dose + ice)
    state = detector_state(DETECTOR, params.shape)
    found = A.find_impulses(sim.image, defects=state.defects)
    truth = sim.mask
    for code in (A.HOT_PIXEL, A.XRAY):
        recall = ((truth == code) & (found.mask > 0)).sum() / (truth == code).sum()
        assert recall >= 0.99, (code, recall)
    good = truth == A.GOOD
    assert ((found.mask > 0) & good).sum() <= 1e-5 * good.sum() + 1  # <= 1 in 10^5 (+1 slack)
    assert found.counting and 0.8 < found.fano < 1.5
    np.testing.assert_array_equal(found.mask == A.DEFECT, state.defects)


def test_correction_touches_only_masked_pixels_and_keeps_the_spectrum():
    sim, params = _sim(40, 400, seed=9)
    clean_params = MicrographParams(shape=params.shape, dose_e_per_A2=40, ice_thickness_A=400)
    # The same gain pattern (drawn first from the same seed), without defects or impulses.
    truth = simulate_micrograph(clean_params, detector=Detector(gain_std=0.03, seed=4), seed=9)
    state = detector_state(DETECTOR, params.shape)
    corrected, mask = A.clean_micrograph(sim.image, defects=state.defects, seed=1)
    assert corrected.dtype == np.float32
    np.testing.assert_array_equal(corrected[mask == 0], sim.image[mask == 0])
    ps_raw = power_spectrum(sim.image, tile_size=256)
    ps_clean = power_spectrum(corrected, tile_size=256)
    ps_truth = power_spectrum(truth.image, tile_size=256)
    # The artifacts dominate the raw spectrum; after correction it is the truth's within noise.
    assert np.median(ps_raw / ps_truth) > 1.5
    ratio = ps_clean[1:, 1:] / ps_truth[1:, 1:]
    assert abs(np.median(ratio) - 1.0) < 0.1
    assert np.percentile(ratio, 99) < 1.6


def test_gaussian_noise_data_without_counts():
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 1.0, size=(300, 400)).astype(np.float32)
    image[50, 60] = 12.0
    image[100:103, 200:202] += 30.0
    found = A.find_impulses(image)
    assert not found.counting
    assert found.mask[50, 60] == A.HOT_PIXEL
    assert (found.mask[100:103, 200:202] == A.XRAY).all()
    assert (found.mask > 0).sum() <= 6 + 2


def test_flat_image_and_bad_arguments():
    found = A.find_impulses(np.full((40, 50), 7.0, np.float32))
    assert (found.mask == 0).all()
    with pytest.raises(ValueError, match="grow_threshold"):
        A.find_impulses(np.zeros((8, 8)), threshold=3, grow_threshold=4)
    with pytest.raises(ValueError, match="defects has shape"):
        A.find_impulses(np.zeros((8, 8)), defects=np.zeros((8, 9), bool))
    with pytest.raises(ValueError, match="2D"):
        A.find_impulses(np.zeros((2, 8, 8)))


def test_fill_is_reproducible_by_seed():
    sim, _ = _sim(30, 300, seed=2, shape=(256, 256))
    a, _ = A.clean_micrograph(sim.image, seed=5)
    b, _ = A.clean_micrograph(sim.image, seed=5)
    c, _ = A.clean_micrograph(sim.image, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_counts_with_read_noise_are_counts_and_normalised_images_are_not():
    # 12 counts a pixel and 1 count of read noise: a few pixels fall below zero.
    rng = np.random.default_rng(5)
    counts = rng.poisson(12.0, size=(512, 512)) + rng.normal(0.0, 1.0, size=(512, 512))
    assert 0 < (counts < 0).sum() < 50
    found = A.find_impulses(counts.astype(np.float32))
    assert found.counting and 0.8 < found.fano < 1.3
    # The same pixels scaled to a mean of 1 and a spread of 1: not counts (a sixth negative).
    scaled = 1.0 + (counts - counts.mean()) / counts.std()
    assert not A.find_impulses(scaled.astype(np.float32)).counting


@pytest.mark.parametrize("shape", [(4, 6), (7, 9), (33, 70), (64, 65), (100, 37)])
@pytest.mark.parametrize("size", [3, 5, 9])
def test_box_sum_is_scipys_reflecting_uniform_filter(shape, size):
    from scipy import ndimage

    x = np.random.default_rng(shape[0] * size).normal(size=shape).astype(np.float32)
    expected = ndimage.uniform_filter(x, size, mode="reflect") * size * size
    found = A.box_sum(x, size)
    assert found.dtype == np.float32 and found.shape == x.shape
    np.testing.assert_allclose(found, expected, atol=2e-5 * size * size)


def test_fano_factor_is_the_one_find_impulses_measures():
    rng = np.random.default_rng(3)
    counts = (2.0 * rng.poisson(15.0, size=(300, 260))).astype(np.float32)  # Fano factor 2
    counts[40, 50] = 900.0
    assert A.fano_factor(counts) == A.find_impulses(counts).fano
    assert 1.8 < A.fano_factor(counts) < 2.2
    assert A.fano_factor(rng.normal(size=(64, 64))) == 0.0  # not counts
    assert A.fano_factor(np.full((32, 32), 5.0)) == 0.0


def test_cluster_boxes_are_the_ones_find_objects_gives():
    from scipy import ndimage

    rng = np.random.default_rng(11)
    above = rng.random((120, 90)) > 0.93  # many small components, some touching the edges
    labels, n = ndimage.label(above, structure=np.ones((3, 3), bool))
    where = np.nonzero(above)
    wanted = np.flatnonzero(np.bincount(labels[where], minlength=n + 1) > 1)
    assert wanted.size > 20
    boxes = A._bounding_boxes(where, labels[where], wanted)
    objects = ndimage.find_objects(labels)
    assert boxes == [(objects[i - 1][0].start, objects[i - 1][0].stop, objects[i - 1][1].start,
                      objects[i - 1][1].stop) for i in wanted]
    assert A._bounding_boxes(where, labels[where], wanted[:0]) == []


def test_finding_impulses_leaves_the_image_as_it_was():
    rng = np.random.default_rng(4)
    image = rng.poisson(20.0, size=(200, 180)).astype(np.float32)
    image[50:53, 60:62] += 500.0  # an X-ray cluster, grown in the second look
    image[120, 30] += 400.0
    before = image.copy()
    found = A.find_impulses(image)
    np.testing.assert_array_equal(image, before)
    assert found.mask[51, 61] == A.XRAY and found.mask[120, 30] == A.HOT_PIXEL
    flat = np.full((64, 64), 3.0, np.float32)  # no spread: the reference is a copy
    A.find_impulses(flat).reference[0, 0] = 7.0
    assert flat[0, 0] == 3.0
