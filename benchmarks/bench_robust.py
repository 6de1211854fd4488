"""CTF accuracy and restoration on raw micrographs full of artifacts: cleaned, not cleaned,
and an oracle.

    python -m benchmarks.bench_robust [--count 16] [--size 1024] [--json FILE]

A dataset from cryodask's simulator sharing one detector (a 3 % gain pattern, dead lines,
stuck pixels) with 20-50 e/Å², ice 150-1400 Å, 100-400 hot pixels and 5-30 X-ray clusters
per micrograph. The same files go through ``cryodask ctf`` with the default cleaning and
with ``--no-clean`` (which keeps the CTF kernel's own 6-sigma outlier guard); then the
kernel on raw pixels with no guard at all; and the oracle: the same micrographs simulated
without impulses (same seeds), whose gain pattern and defects are given to it exactly (as a
gain reference and a defect map).

Restoration: each micrograph restored as ``cryodask restore`` does it (Wiener filter, its own
CTF), cleaned and with ``--no-clean``, and the oracle's; the correlation with the CTF-free
projection the simulator recorded (the same for a micrograph and its oracle), and its ratio
to the oracle's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import correlation, write_json
from cryodask import ingest, progress
from cryodask.clean import clean_for_fitting, estimate_ctf_cleaned
from cryodask.pipeline import estimate_ctf_dataset, restore_dataset
from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset


def _errors(results, truth):
    fitted = 0.5 * (results["defocus_u_A"].values + results["defocus_v_A"].values)
    true = 0.5 * (truth["defocus_u_A"] + truth["defocus_v_A"]).to_numpy()
    return [float(e) for e in 100 * np.abs(fitted / true - 1)]


def _read(path):
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    dirty_ranges = DatasetRanges(dose_e_per_A2=(20, 50), ice_thickness_A=(150, 1400),
                                 n_hot_pixels=(100, 400), n_xrays=(5, 30))
    shape = (args.size, args.size)
    dirty = draw_micrograph_params(args.count, shape=shape, ranges=dirty_ranges, seed=args.seed)
    # The oracle: identical draws but no impulses (the counts are drawn before any artifact).
    oracle = [p.__class__(**{**{f: getattr(p, f) for f in p.__dataclass_fields__ if f != "ctf"},
                             "n_hot_pixels": 0, "n_xrays": 0}) for p in dirty]
    detector = Detector(gain_std=0.03, n_dead_rows=2, n_dead_cols=2, n_stuck_pixels=30, seed=args.seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        truth = write_simulated_dataset(f"{tmp}/dirty", dirty, detector=detector, seed=args.seed,
                                        save_truth_images=True)
        write_simulated_dataset(f"{tmp}/oracle", oracle, detector=detector, seed=args.seed)
        ds = ingest(f"{tmp}/dirty/*.mrc", f"{tmp}/dirty.zarr")
        ds_oracle = ingest(f"{tmp}/oracle/*.mrc", f"{tmp}/oracle.zarr")
        # The oracle knows where every artifact is: no impulses, and the true gain and defects
        # given as a gain reference and a defect map.
        gain = _read(f"{tmp}/dirty/truth/gain.mrc")
        known = _read(f"{tmp}/dirty/truth/defects.mrc") > 0
        work_oracle, exclude_oracle, _ = clean_for_fitting(ds_oracle, gain_reference=1.0 / gain, defects=known)
        for name, lazy in (("cleaned (default)", lambda: estimate_ctf_cleaned(ds)),
                           ("--no-clean", lambda: estimate_ctf_dataset(ds)),
                           ("raw (no outlier guard)", lambda: estimate_ctf_dataset(ds, clip_sigma=None)),
                           ("oracle (no artifacts)", lambda: estimate_ctf_dataset(work_oracle,
                                                                                  exclude=exclude_oracle))):
            start = time.perf_counter()
            (results,) = progress.compute(lazy())
            seconds = time.perf_counter() - start
            errors = _errors(results, truth)
            out[name] = {"median_defocus_error_pct": statistics.median(errors),
                         "worst_defocus_error_pct": max(errors),
                         "unreliable": int((~results["ctf_reliable"].values).sum()),
                         "seconds_per_micrograph": seconds / args.count, "errors_pct": errors,
                         "ctf": results}
        projections = [_read(f"{tmp}/dirty/truth/mic_{i:04d}_projection.mrc") for i in range(args.count)]
        work, _, _ = clean_for_fitting(ds)
        for name, images in (("cleaned (default)", work), ("--no-clean", ds), ("oracle (no artifacts)", work_oracle)):
            restored = restore_dataset(images, out[name]["ctf"]).values
            out[name]["restored_correlation"] = [
                correlation(r, t) if np.all(np.isfinite(r)) else 0.0 for r, t in zip(restored, projections)]
        for name in out:
            out[name].pop("ctf")
    print(f"{args.count} simulated {args.size}² micrographs with artifacts (see the module notes)")
    print(f"{'':<24} {'median %':>9} {'worst %':>9} {'unreliable':>11} {'s / micrograph':>15}")
    for name, r in out.items():
        print(f"{name:<24} {r['median_defocus_error_pct']:>9.3f} {r['worst_defocus_error_pct']:>9.3f} "
              f"{r['unreliable']:>11} {r['seconds_per_micrograph']:>15.2f}")
    oracle_corr = np.asarray(out["oracle (no artifacts)"]["restored_correlation"])
    print("\nrestoration (Wiener, own CTF): correlation with the CTF-free truth, and its ratio to the oracle's")
    print(f"{'':<24} {'mean corr':>10} {'mean ratio':>11} {'worst ratio':>12}")
    for name in ("cleaned (default)", "--no-clean", "oracle (no artifacts)"):
        corr = np.asarray(out[name]["restored_correlation"])
        ratio = corr / oracle_corr
        out[name]["restored_ratio_to_oracle"] = [float(v) for v in ratio]
        print(f"{name:<24} {corr.mean():>10.3f} {ratio.mean():>11.3f} {ratio.min():>12.3f}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
