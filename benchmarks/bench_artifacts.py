"""Artifacts and regions: recall, false positives, defect and gain recovery, region accuracy, speed.

    python -m benchmarks.bench_artifacts [--quick] [--only PART ...] [--seed N] [--json FILE]

All on cryodask's simulator with its truth: per artifact type the share of its pixels
flagged (recall) and the flagged good pixels per 10^5 (false positives), across dose and
ice thickness; fixed defects found from 8 micrographs; the gain-pattern estimate's
correlation with the truth from 64; region tiles that match the truth's majority class;
and seconds per 4096^2 micrograph against one rfft2 of it (the floor), one core.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.fft

from benchmarks.common import best_of, write_json
from cryodask import artifacts as A
from cryodask.defects import estimate_defects, micrograph_statistics
from cryodask.regions import classify_regions
from cryodask.simulate import DatasetRanges, Detector, MicrographParams, detector_state, draw_micrograph_params, simulate_micrograph

PARTS = ("impulses", "dataset", "regions", "timing")
DETECTOR = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=2, n_stuck_pixels=20, seed=1)


def impulses(doses, ices, repeats, size):
    rows = []
    state = detector_state(DETECTOR, (size, size))
    for dose in doses:
        for ice in ices:
            for r in range(repeats):
                params = MicrographParams(shape=(size, size), dose_e_per_A2=dose, ice_thickness_A=ice,
                                          n_hot_pixels=300, n_xrays=20)
                sim = simulate_micrograph(params, detector=state, seed=1000 * r + dose + ice)
                found = A.find_impulses(sim.image, defects=state.defects)
                row = {"dose_e_per_A2": dose, "ice_thickness_A": ice}
                for code, name in ((A.HOT_PIXEL, "hot_pixel"), (A.XRAY, "xray")):
                    truth = sim.mask == code
                    row[f"recall_{name}"] = float((truth & (found.mask > 0)).sum() / truth.sum())
                good = sim.mask == A.GOOD
                row["false_per_1e5"] = float(((found.mask > 0) & good).sum() / good.sum() * 1e5)
                rows.append(row)
    return rows


def _oracle_gain_correlation(raw, truth, keep):
    """The best a linear, shift-invariant filter of the measured mean image can do: the
    Wiener filter built from the true gain pattern's ring-averaged power spectrum and the
    true power of the measurement's error (both unknown to the estimator)."""
    fill = np.where(keep, raw, np.median(raw[keep]))
    error = np.where(keep, fill - truth, 0.0)
    ky = np.fft.fftfreq(raw.shape[0])[:, None]
    kx = np.fft.rfftfreq(raw.shape[1])[None, :]
    bins = np.minimum((np.hypot(ky, kx) / 0.5 * 64).astype(int), 64)

    def ring_power(x):
        power = np.abs(np.fft.rfft2(x - x[keep].mean())) ** 2
        return (np.bincount(bins.ravel(), power.ravel(), 65) / np.maximum(np.bincount(bins.ravel(), minlength=65), 1))

    signal, noise = ring_power(np.where(keep, truth, truth[keep].mean())), ring_power(error)
    filtered = np.fft.irfft2(np.fft.rfft2(fill - fill[keep].mean()) * (signal / (signal + noise))[bins], s=raw.shape)
    return float(np.corrcoef(filtered[keep], truth[keep])[0, 1])


def dataset_statistics(n, size, seed=0):
    detector = Detector(gain_std=0.03, n_dead_rows=2, n_dead_cols=2, n_stuck_pixels=30, seed=seed)
    state = detector_state(detector, (size, size))
    params = draw_micrograph_params(n, shape=(size, size), seed=seed,
                                    ranges=DatasetRanges(n_hot_pixels=(100, 400), n_xrays=(5, 30)))
    sums, medians, fanos, out = 0, [], [], {}
    for i, p in enumerate(params):
        sim = simulate_micrograph(p, detector=state, seed=seed * 10_000 + i)
        found = A.find_impulses(sim.image)
        sums = sums + micrograph_statistics(sim.image, found.mask)
        medians.append(float(np.median(sim.image)))
        fanos.append(found.fano)
        if i + 1 in (8, 16, 64):
            est = estimate_defects(sums, i + 1, mean_counts=float(np.mean(medians)), fano=float(np.mean(fanos)))
            keep = ~state.defects & ~est.defects
            out[i + 1] = {
                "defects_found": int((est.defects & state.defects).sum()),
                "defects_true": int(state.defects.sum()),
                "defects_false": int((est.defects & ~state.defects).sum()),
                "gain_correlation": float(np.corrcoef(est.gain[keep], state.gain[keep])[0, 1]),
                "raw_gain_correlation": float(np.corrcoef(est.raw_gain[keep], state.gain[keep])[0, 1]),
                "oracle_gain_correlation": _oracle_gain_correlation(est.raw_gain, state.gain, keep),
            }
    return out


def regions(doses, ices, repeats, size, tile=64, seed=0):
    layouts = {"contamination": {"n_contamination": 3}, "vacuum": {"vacuum_fraction": 0.2},
               "carbon": {"carbon_fraction": 0.3},
               "mixed": {"carbon_fraction": 0.25, "vacuum_fraction": 0.15, "n_contamination": 2}}
    rows = []
    for name, layout in layouts.items():
        for dose in doses:
            for ice in ices:
                for r in range(repeats):
                    params = MicrographParams(shape=(size, size), dose_e_per_A2=dose, ice_thickness_A=ice, **layout)
                    sim = simulate_micrograph(params, seed=100 * r + dose + ice + seed)
                    found = classify_regions(sim.image, tile_px=tile)
                    n = size // tile
                    t = sim.regions.reshape(n, tile, n, tile).transpose(0, 2, 1, 3).reshape(n, n, -1)
                    truth = np.apply_along_axis(lambda v: np.bincount(v, minlength=4).argmax(), -1, t)
                    rows.append({"layout": name, "dose_e_per_A2": dose, "ice_thickness_A": ice,
                                 "tile_accuracy": float((truth == found.tiles).mean())})
    return rows


def timing(size=4096, repeats=2):
    params = MicrographParams(shape=(size, size), n_hot_pixels=400, n_xrays=30, n_particles=50)
    image = simulate_micrograph(params, detector=Detector(gain_std=0.03, seed=2), seed=1).image

    def best(fn):
        return best_of(fn, repeats)

    floor = best(lambda: scipy.fft.rfft2(image, workers=1))
    clean = best(lambda: A.clean_micrograph(image))
    region = best(lambda: classify_regions(image, tile_px=128))
    return {"size": size, "rfft2_floor_s": floor, "clean_s": clean, "regions_s": region,
            "clean_ratio_to_floor": clean / floor, "regions_ratio_to_floor": region / floor}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, metavar="PART",
                        help=f"run only these parts ({', '.join(PARTS)})")
    parser.add_argument("--seed", type=int, default=0, help="added to the seeds of the dataset and region simulations (default 0)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {}
    size = 512 if args.quick else 1024
    repeats = 1 if args.quick else 2
    doses, ices = (20, 40, 60), (150, 500, 1400)
    if "impulses" in args.only:
        _report_impulses(result, doses, ices, repeats, size)
    if "dataset" in args.only:
        _report_dataset(result, args.quick, args.seed)
    if "regions" in args.only:
        _report_regions(result, doses, ices, repeats, size, args.seed)
    if "timing" in args.only and not args.quick:
        result["timing"] = timing()
        t = result["timing"]
        print(f"\n4096² micrograph, one core: clean {t['clean_s']:.2f} s ({t['clean_ratio_to_floor']:.1f}x the "
              f"rfft2 floor of {t['rfft2_floor_s']:.3f} s); regions {t['regions_s']:.2f} s")
    write_json(args.json, result)
    return 0


def _report_impulses(result, doses, ices, repeats, size):
    result["impulses"] = impulses(doses, ices, repeats, size)
    print(f"impulses, {size}² micrographs with 300 hot pixels and 20 X-ray clusters:")
    print(f"{'dose':>5} {'ice Å':>6} {'hot recall':>11} {'X-ray recall':>13} {'false /1e5':>11}")
    for r in result["impulses"]:
        print(f"{r['dose_e_per_A2']:>5} {r['ice_thickness_A']:>6} {r['recall_hot_pixel']:>11.4f} "
              f"{r['recall_xray']:>13.4f} {r['false_per_1e5']:>11.3f}")


def _report_dataset(result, quick, seed):
    result["dataset"] = dataset_statistics(16 if quick else 64, 256 if quick else 512, seed=seed)
    print("\ndefects and gain (gain std 3 %, half smooth, half pixel-to-pixel):")
    for n, d in result["dataset"].items():
        print(f"  {n:>3} micrographs: defects {d['defects_found']}/{d['defects_true']} found, "
              f"{d['defects_false']} false; gain correlation {d['gain_correlation']:.3f} "
              f"(unfiltered mean {d['raw_gain_correlation']:.3f}; the best linear filter, built from the "
              f"truth: {d['oracle_gain_correlation']:.3f})")


def _report_regions(result, doses, ices, repeats, size, seed):
    result["regions"] = regions(doses, ices, repeats, size, seed=seed)
    print("\nregion tiles matching the truth's majority class (64-pixel tiles):")
    for layout in ("contamination", "vacuum", "carbon", "mixed"):
        acc = [r["tile_accuracy"] for r in result["regions"] if r["layout"] == layout]
        cases = [r for r in result["regions"] if r["layout"] == layout]
        worst = min(cases, key=lambda r: r["tile_accuracy"])
        print(f"  {layout:<14} median {np.median(acc):.3f}, worst {min(acc):.3f} (dose {worst['dose_e_per_A2']}, "
              f"ice {worst['ice_thickness_A']} Å), >= 0.95 in {sum(a >= 0.95 for a in acc)}/{len(acc)}")


if __name__ == "__main__":
    raise SystemExit(main())
