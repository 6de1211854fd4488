import mrcfile
import numpy as np
import pytest

from cryodask.regions import (
    CARBON,
    CONTAMINATION,
    ICE,
    VACUUM,
    classify_regions,
    exclusion_mask,
    region_graph,
)
from cryodask.simulate import MicrographParams, simulate_micrograph

TILE = 64


def _tile_truth(codes):
    ny, nx = codes.shape
    t = codes.reshape(ny // TILE, TILE, nx // TILE, TILE).transpose(0, 2, 1, 3).reshape(ny // TILE, nx // TILE, -1)
    return np.apply_along_axis(lambda v: np.bincount(v, minlength=4).argmax(), -1, t)


CASES = [(dose, ice, regions) for dose, ice in ((20, 300), (60, 1400), (40, 500))
         for regions in ({"n_contamination": 3}, {"vacuum_fraction": 0.2})]
# Carbon is told from thick ice by its structure (strongest at 0.1-0.4 of Nyquist), also at
# the lowest dose; vacuum beside thin ice is only a few per cent brighter, and is found as
# a whole region; and all of them at once.
CASES += [(60, 1400, {"carbon_fraction": 0.3}), (40, 500, {"carbon_fraction": 0.3}),
          (20, 500, {"carbon_fraction": 0.3}), (20, 1400, {"carbon_fraction": 0.3}),
          (20, 150, {"vacuum_fraction": 0.2}),
          (20, 500, {"carbon_fraction": 0.25, "vacuum_fraction": 0.15, "n_contamination": 2}),
          (40, 1400, {"carbon_fraction": 0.25, "vacuum_fraction": 0.15, "n_contamination": 2})]


@pytest.mark.parametrize("dose, ice, regions", CASES)
def test_region_tiles_match_the_truth(dose, ice, regions):
    params = MicrographParams(shape=(1024, 1024), dose_e_per_A2=dose, ice_thickness_A=ice, **regions)
    sim = simulate_micrograph(params, seed=dose + ice)
    result = classify_regions(sim.image, tile_px=TILE)
    truth = _tile_truth(sim.regions)
    assert (result.tiles == truth).mean() >= 0.95
    code = {"n_contamination": CONTAMINATION, "vacuum_fraction": VACUUM, "carbon_fraction": CARBON}[next(iter(regions))]
    assert ((result.tiles == code) & (truth == code)).sum() >= 0.8 * (truth == code).sum()


def test_plain_ice_stays_ice():
    sim = simulate_micrograph(MicrographParams(shape=(768, 1024), ice_thickness_A=600, ice_gradient=0.3), seed=1)
    result = classify_regions(sim.image, tile_px=TILE)
    assert (result.tiles == ICE).mean() >= 0.97


def test_real_contamination_blob_is_masked(data_path):
    """The blob of a real micrograph, against MicrographCleaner's mask for it."""
    image = mrcfile.read(data_path("Ucsf_stack_1142_DW_bin2.mrc"))
    reference = mrcfile.read(data_path("Ucsf_stack_1142_DW_bin2_cleaner_mask.mrc")) > 0
    result = classify_regions(image, tile_px=TILE)
    ours = exclusion_mask(result)
    assert (ours & reference).sum() >= 0.85 * reference.sum()  # recall of their mask
    assert (ours & reference).sum() >= 0.9 * ours.sum()  # what we mask, they mask too


def test_region_graph_and_exclusion():
    params = MicrographParams(shape=(512, 512), n_contamination=2, vacuum_fraction=0.15)
    sim = simulate_micrograph(params, seed=3)
    result = classify_regions(sim.image, tile_px=TILE)
    graph = region_graph(result, pixel_size_A=1.0)
    kinds = {d["kind"] for _, d in graph.nodes(data=True)}
    assert "ice" in kinds and kinds & {"vacuum", "contamination"}
    assert sum(d["n_tiles"] for _, d in graph.nodes(data=True)) == result.tiles.size
    ice = [n for n, d in graph.nodes(data=True) if d["kind"] == "ice"]
    assert all(graph.degree(n) >= 1 for n in graph.nodes if n not in ice)  # regions touch the ice
    mask = exclusion_mask(result)
    assert mask.shape == sim.image.shape
    assert not mask[result.mask == ICE].any()
    with pytest.raises(ValueError, match="unknown region names"):
        exclusion_mask(result, exclude=("lava",))


def test_bad_arguments():
    with pytest.raises(ValueError, match="tile_px"):
        classify_regions(np.zeros((256, 256)), tile_px=15)
    with pytest.raises(ValueError, match="smaller than two tiles"):
        classify_regions(np.zeros((100, 100)), tile_px=64)
    assert CARBON == 2


def test_median_at_few_pixels_is_the_median_filter():
    from scipy import ndimage

    from cryodask.regions import _median_at

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 57)).astype(np.float32)
    where = rng.random(x.shape) < 0.02
    where[0, 0] = where[-1, -1] = where[0, -1] = where[20, 1] = True  # the mirrored edges
    np.testing.assert_array_equal(_median_at(x, where, 5), ndimage.median_filter(x, size=5)[where])
    many = rng.random(x.shape) < 0.5  # the whole filter then
    np.testing.assert_array_equal(_median_at(x, many, 3), ndimage.median_filter(x, size=3)[many])


@pytest.mark.parametrize("shape", [(4, 5, 16, 15), (2, 3, 7, 7), (1, 2, 4, 5)])
def test_tile_medians_are_numpys(shape):
    from cryodask.regions import _tile_median

    values = np.random.default_rng(shape[2]).normal(size=shape).astype(np.float32)
    values[0, 1, 2, 3] = np.nan  # a tile with a NaN has a NaN median, as in NumPy
    expected = np.median(values, axis=(2, 3))
    found = _tile_median(values.copy())
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found, expected)
    assert np.isnan(found[0, 1])
