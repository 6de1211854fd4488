"""Region decomposition (Module 2): ice, vacuum, carbon and contamination in a micrograph.

Region codes (uint8):

=============  =====  ==============================================================
name           value  what it is
=============  =====  ==============================================================
ICE            0      vitreous ice, where the particles are (the micrograph's majority)
VACUUM         1      no ice (a hole or broken film): brighter than the ice
CARBON         2      support film: strong mid-frequency (Thon-ring) structure
CONTAMINATION  3      ice crystals, drops, thick ice: much darker than the ice
=============  =====  ==============================================================

The method
----------
The image is cut into square tiles. For each tile: its mean, its pixel noise (from
neighbour differences, blind to smooth structure) and its structure: the power at
0.05-0.6 of Nyquist, each tile's spectrum divided by its own high-frequency (0.7-1 of
Nyquist) level, relative to the median tile's spectrum. Each is compared
with the median tile, in units of the robust spread of differences between neighbouring
tiles (never less than a tile mean's own noise). A tile passes a test at ``z_threshold``
spreads, or at half of it when the mean over its 3 x 3 neighbourhood does too (regions are
wider than a tile, and the average has a third of the noise); a connected region of tiles
each at least 2 spreads away passes when it stands out from the tiles around it as a step
(its mean minus theirs, in units of the spread of that difference) at the threshold. A bright tile is
vacuum; with that much more structure, carbon. A dark tile is contamination (or thick
ice) when far darker (below 80 % of the ice for counting data, whose variance is about its
mean; 4 x the threshold otherwise);
a connected region of moderately dark tiles is carbon when the region as a whole is more
structured than the ice (its mean structure z above 0.5 and 4 / sqrt(tiles)), and
contamination otherwise. Classes are relative to the
micrograph's majority, taken to be ice. The contamination and vacuum outlines are then
refined to pixels: a smoothed image crossing the level a quarter of the way from the ice
to the class (so a blob's fading rim is included), near the tiles found. Regions (connected tiles of one class) form a graph with
their adjacency (networkx).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

__all__ = [
    "CARBON",
    "CONTAMINATION",
    "ICE",
    "REGION_CODES",
    "VACUUM",
    "RegionResult",
    "classify_regions",
    "exclusion_mask",
    "region_graph",
]

ICE = 0
VACUUM = 1
CARBON = 2
CONTAMINATION = 3

REGION_CODES = {ICE: "ice", VACUUM: "vacuum", CARBON: "carbon", CONTAMINATION: "contamination"}
_BY_NAME = {name: code for code, name in REGION_CODES.items()}
#: Tiles this many spreads from the ice may form a region that is judged as a whole.
_REGION_TILE_Z = 2.0


@dataclass
class RegionResult:
    """Tile classes, the pixel-level region map and the tile features behind them."""

    tiles: np.ndarray  # (n_tiles_y, n_tiles_x) uint8 codes
    mask: np.ndarray  # (ny, nx) uint8 codes, pixel level
    tile_px: int
    features: dict  # name -> (n_tiles_y, n_tiles_x) float arrays (mean, noise, mid_ratio, z_mean, z_mid)


def _tiles(x, tile_px):
    ny, nx = x.shape
    nty, ntx = -(-ny // tile_px), -(-nx // tile_px)
    padded = x
    if (nty * tile_px, ntx * tile_px) != (ny, nx):
        padded = np.pad(x, ((0, nty * tile_px - ny), (0, ntx * tile_px - nx)), mode="reflect")
    return padded.reshape(nty, tile_px, ntx, tile_px).transpose(0, 2, 1, 3)


def _neighbour_spread(values):
    """Robust spread of a tile feature from differences of neighbouring tiles.

    Neighbours are mostly of one class, so regions do not inflate it as they would a
    spread about the median; smooth trends (an ice wedge) cancel too.
    """
    diffs = np.concatenate([np.diff(values, axis=0).ravel(), np.diff(values, axis=1).ravel()])
    return 1.4826 * float(np.median(np.abs(diffs))) / np.sqrt(2.0)


def _median_at(x, where, size):
    """``scipy.ndimage.median_filter(x, size)[where]`` (mode "reflect"), computed at those
    pixels alone when they are few (impulses and defects are)."""
    ys, xs = np.nonzero(where)
    if ys.size * size * size > x.size:
        return ndimage.median_filter(x, size=size)[where]
    padded = np.pad(x, size // 2, mode="symmetric")  # SciPy's "reflect"
    dy, dx = np.divmod(np.arange(size * size), size)  # each window's offsets, row by row
    windows = padded[ys[:, None] + dy, xs[:, None] + dx]
    return np.median(windows, axis=1).astype(x.dtype)


def _tile_median(values):
    """The median of each tile (over the last two axes of ``values``, a temporary: it is
    sorted in place), as ``np.median`` gives it. NumPy sorts float32 rows with vector
    instructions: at 4096² in 64-pixel tiles, 51 ms against the 166 ms of the partition
    ``np.median`` makes."""
    flat = values.reshape(*values.shape[:-2], -1)
    flat.sort(axis=-1)
    half = flat.shape[-1] // 2
    middle = flat[..., half] if flat.shape[-1] % 2 else np.mean(flat[..., half - 1:half + 1], axis=-1)
    return np.where(np.isnan(flat[..., -1]), np.nan, middle).astype(values.dtype)  # NaN sorts last


def classify_regions(image, *, tile_px: int = 64, artifact_mask=None,
                     z_threshold: float = 8.0) -> RegionResult:
    """Classify a micrograph's tiles as ice, vacuum, carbon or contamination.

    Parameters
    ----------
    image : (ny, nx) array
        A micrograph (NumPy), at least two tiles each way.
    tile_px : int
        Tile side in pixels, even, >= 16.
    artifact_mask : (ny, nx) array, optional
        Non-zero pixels (impulses, defects) are replaced by their tile's median first.
    z_threshold : float
        How many robust spreads from the median tile make a tile another class.

    Returns
    -------
    RegionResult
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"image must be 2D (y, x), got shape {x.shape}")
    if tile_px < 16 or tile_px % 2:
        raise ValueError(f"tile_px must be even and >= 16, got {tile_px!r}")
    if min(x.shape) < 2 * tile_px:
        raise ValueError(f"image {x.shape} is smaller than two tiles of {tile_px} pixels")
    if artifact_mask is not None:
        flagged = np.asarray(artifact_mask) > 0
        if flagged.any():
            x = x.copy()
            x[flagged] = _median_at(x, flagged, 5)
    t = _tiles(x, tile_px)
    mean = t.mean(axis=(2, 3))
    diffs = np.diff(t, axis=3)
    deviation = np.abs(diffs - _tile_median(diffs.copy())[..., None, None])
    noise = 1.4826 * _tile_median(deviation) / np.sqrt(2.0)
    window = np.hanning(tile_px)
    spectra = np.abs(scipy.fft.rfft2((t - mean[..., None, None]) * np.outer(window, window))) ** 2
    fy = np.abs(np.fft.fftfreq(tile_px))[:, None]
    fx = np.fft.rfftfreq(tile_px)[None, :]
    f = np.hypot(fy, fx) / 0.5  # fraction of Nyquist
    high = spectra[..., (f > 0.7) & (f <= 1.0)].mean(axis=-1)
    shape_ = spectra / np.maximum(high, 1e-30)[..., None, None]  # spectra on their own noise level
    band = (f > 0.1) & (f < 0.4)
    reference = np.median(shape_[..., band], axis=(0, 1), overwrite_input=True)  # the median tile's spectral shape
    ratio = (shape_[..., band] / np.maximum(reference, 1e-30)).mean(axis=-1)

    m_spread = max(_neighbour_spread(mean), 3.0 * float(np.median(noise)) / tile_px, 1e-12)
    r0 = float(np.median(ratio))
    r_spread = max(_neighbour_spread(ratio), 0.02 * abs(r0), 1e-12)
    z_mid = (ratio - r0) / r_spread
    # Counts (variance about equal to the mean) have a physical zero: contamination is far
    # darker than a carbon film. Other data (offset, scaled) are judged by z alone.
    level = float(np.median(mean))
    counts = level > 0 and float(x.min()) >= 0 and 0.2 < float(np.median(noise)) ** 2 / level < 5.0
    # The ice level: first the median tile, then a plane through the ice tiles (a wedge).
    m0 = np.full(mean.shape, float(np.median(mean)))
    for _ in range(2):
        tiles, z_mean = _classify(mean, m0, m_spread, z_mid, counts, z_threshold)
        ice = (tiles == ICE) & (np.abs(z_mean) < 3.0)  # only clearly ordinary tiles
        if ice.sum() >= 6:
            ty, tx = np.nonzero(np.ones_like(ice))
            design = np.stack([np.ones(ty.size), ty, tx], axis=1)
            coef = np.linalg.lstsq(design[ice.ravel()], mean[ice], rcond=None)[0]
            m0 = (design @ coef).reshape(mean.shape)
    # Against the final ice level, faint regions are judged whole as well.
    tiles, z_mean = _classify(mean, m0, m_spread, z_mid, counts, z_threshold, whole_regions=True)

    mask = np.kron(tiles, np.ones((tile_px, tile_px), dtype=np.uint8))[: x.shape[0], : x.shape[1]]
    # Two box passes of half a tile: close to a Gaussian of tile/4, at a constant cost per
    # pixel. Computed near the tiles found only (most micrographs are all ice), over each
    # group of neighbouring tiles with a margin of both passes' reach: the same values as
    # over the whole image.
    box = max(3, tile_px // 2 + 1)
    reach = 2 * (box // 2)
    for code, sign in ((CONTAMINATION, -1.0), (VACUUM, 1.0)):
        found = tiles == code
        if not found.any():
            continue
        near_tiles = ndimage.binary_dilation(found)
        ice_at = float(np.median(mean[found]))
        groups, _ = ndimage.label(near_tiles, structure=np.ones((3, 3), bool))
        for ty, tx in ndimage.find_objects(groups):
            y0, y1 = ty.start * tile_px, min(ty.stop * tile_px, x.shape[0])
            x0, x1 = tx.start * tile_px, min(tx.stop * tile_px, x.shape[1])
            cy0, cy1 = max(y0 - reach, 0), min(y1 + reach, x.shape[0])
            cx0, cx1 = max(x0 - reach, 0), min(x1 + reach, x.shape[1])
            smooth = ndimage.uniform_filter(ndimage.uniform_filter(x[cy0:cy1, cx0:cx1], box, mode="reflect"),
                                            box, mode="reflect")[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
            cells = np.ones((tile_px, tile_px))
            ice_level = np.kron(m0[ty, tx], cells)[: y1 - y0, : x1 - x0]
            level = ice_level + 0.25 * (ice_at - ice_level)
            near = np.kron(near_tiles[ty, tx], cells.astype(bool))[: y1 - y0, : x1 - x0]
            inside = near & ((smooth - level) * sign > 0)
            part = mask[y0:y1, x0:x1]
            part[near & (part == code)] = ICE
            part[inside] = code
    features = {"mean": mean, "noise": noise, "mid_ratio": ratio, "z_mean": z_mean, "z_mid": z_mid}
    return RegionResult(tiles=tiles, mask=mask, tile_px=tile_px, features=features)


def _classify(mean, m0, m_spread, z_mid, counts, z_threshold, whole_regions=False):
    """Tile classes from the tile means against the ice level ``m0`` and the structure z."""
    z_mean = (mean - m0) / m_spread
    strongly_dark = (mean < 0.8 * m0) if counts else (z_mean < -4.0 * z_threshold)
    # Regions are wider than a tile: a tile also counts when the mean z of its 3 x 3
    # neighbourhood (a third of the noise) passes half the threshold.
    area_mean = ndimage.uniform_filter(z_mean, 3, mode="nearest")
    area_mid = ndimage.uniform_filter(z_mid, 3, mode="nearest")
    half = 0.5 * z_threshold
    bright = (z_mean > z_threshold) | ((area_mean > half) & (z_mean > half))
    dark = (z_mean < -z_threshold) | ((area_mean < -half) & (z_mean < -half))
    # A region whose tiles each differ only a little (vacuum beside thin ice is a few per
    # cent brighter) is judged whole, as a step from the ice around it: the difference of
    # the means of its n tiles and of the m tiles around it has a spread of
    # sqrt(1/n + 1/m). A smooth change of thickness is no step: its surroundings follow it.
    for found, sign in ((bright, 1.0), (dark, -1.0)) if whole_regions else ():
        labels, n = ndimage.label(sign * z_mean > _REGION_TILE_Z)
        for i in range(1, n + 1):
            region = labels == i
            # The ice around it: tiles of other kinds (a carbon edge) are no reference.
            ring = ndimage.binary_dilation(region) & ~region & (np.abs(z_mean) <= _REGION_TILE_Z)
            if region.sum() < 2 or not ring.any():
                continue
            step = sign * (z_mean[region].mean() - z_mean[ring].mean())
            if step / np.sqrt(1.0 / region.sum() + 1.0 / ring.sum()) > z_threshold:
                found |= region
    structured = (z_mid > z_threshold) | ((area_mid > half) & (z_mid > half))
    tiles = np.full(mean.shape, ICE, dtype=np.uint8)
    tiles[structured] = CARBON
    tiles[dark] = CONTAMINATION
    # A moderately dark region is carbon when, taken whole, it is more structured than the
    # ice: the mean z of n tiles has a spread of 1/sqrt(n).
    labels, n = ndimage.label(dark & ~strongly_dark)
    for i in range(1, n + 1):
        region = labels == i
        if z_mid[region].mean() > max(0.5, 4.0 / np.sqrt(region.sum())):
            tiles[region] = CARBON
    tiles[bright] = VACUUM
    # Tiles on a boundary hold some of each side: keep a class only where its mean says it
    # covers most of the tile, judged against the class's core (its most extreme half).
    offset = mean - m0
    for code in (VACUUM, CONTAMINATION, CARBON):
        member = tiles == code
        if member.sum() < 2:
            continue
        values = offset[member]
        core = float(np.median(values[np.abs(values) >= np.median(np.abs(values))]))
        if abs(core) > 0:
            tiles[member & (offset / core < 0.5)] = ICE
    return tiles, z_mean


def exclusion_mask(regions, exclude=("vacuum", "contamination")) -> np.ndarray:
    """Pixels that downstream steps leave out: by default vacuum and contamination.

    Parameters
    ----------
    regions : RegionResult or (ny, nx) array of region codes
    exclude : iterable of names among ``ice, vacuum, carbon, contamination``
    """
    unknown = sorted(set(exclude) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"unknown region names {unknown}; choose from {sorted(_BY_NAME)}")
    codes = regions.mask if isinstance(regions, RegionResult) else np.asarray(regions)
    return np.isin(codes, [_BY_NAME[name] for name in exclude])


def region_graph(result: RegionResult, *, pixel_size_A: float | None = None):
    """The regions as a graph: one node per connected region, edges where they touch.

    Node attributes: ``kind`` (region name), ``n_tiles``, ``area_px`` (and ``area_A2``
    when the pixel size is given), ``mean`` (mean tile intensity) and ``centroid_px``
    ``(y, x)``. Edge attribute ``contact``: the number of tile sides they share.

    Returns
    -------
    networkx.Graph
    """
    import networkx as nx

    graph = nx.Graph()
    labels = np.zeros(result.tiles.shape, dtype=np.int64)
    next_id = 0
    for code, name in REGION_CODES.items():
        lab, n = ndimage.label(result.tiles == code)
        for i in range(1, n + 1):
            where = lab == i
            next_id += 1
            labels[where] = next_id
            ty, tx = np.nonzero(where)
            area = int(where.sum()) * result.tile_px**2
            attrs = {"kind": name, "n_tiles": int(where.sum()), "area_px": area,
                     "mean": float(result.features["mean"][where].mean()),
                     "centroid_px": (float((ty.mean() + 0.5) * result.tile_px),
                                     float((tx.mean() + 0.5) * result.tile_px))}
            if pixel_size_A is not None:
                attrs["area_A2"] = area * pixel_size_A**2
            graph.add_node(next_id, **attrs)
    for a, b in ((labels[:-1, :], labels[1:, :]), (labels[:, :-1], labels[:, 1:])):
        touching = a != b
        for u, v in zip(a[touching], b[touching]):
            u, v = int(u), int(v)
            if graph.has_edge(u, v):
                graph[u][v]["contact"] += 1
            else:
                graph.add_edge(u, v, contact=1)
    return graph
