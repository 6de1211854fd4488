"""CTF estimation: seconds per micrograph against an FFT floor, and accuracy against truth.

    python -m benchmarks.bench_ctf [--quick] [--json FILE] [--sizes 1024 2048 4096]

Timing: one core (scipy.fft with one worker, BLAS threads capped by threadpoolctl when
available), each size timed after a warm-up call; the floor is one ``rfft2`` of the same
image in the same run, so the ratio is comparable across machines.

Accuracy: micrographs from cryodask's simulator across dose, defocus and astigmatism, with
the CTF estimated blind (default search). Reports the acceptance subset of issue 3 (dose
>= 20 e/Å², mean defocus 0.8-3 µm) separately.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import numpy as np
import scipy.fft

from benchmarks.common import best_of, write_json
from cryodask.ctf import CTFFitWarning, estimate_ctf
from cryodask.simulate import MicrographParams, simulate_micrograph


def timing(sizes, repeats=3):
    rows = []
    for size in sizes:
        params = MicrographParams(shape=(size, size), pixel_size_A=4096 / size * 0.7,
                                  defocus_u_A=18000, defocus_v_A=17000, defocus_angle_deg=30)
        image = simulate_micrograph(params, seed=1).image
        floor = best_of(lambda: scipy.fft.rfft2(image, workers=1), repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CTFFitWarning)
            ctf = best_of(lambda: estimate_ctf(image, pixel_size_A=params.pixel_size_A), repeats)
        rows.append({"size": size, "pixel_size_A": params.pixel_size_A, "ctf_s": ctf,
                     "rfft2_floor_s": floor, "ratio_to_floor": ctf / floor})
    return rows


def accuracy(n, size, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        mean = rng.uniform(5000, 40000)
        astig = rng.uniform(0, 1500)
        params = MicrographParams(shape=(size, size), pixel_size_A=1.0, defocus_u_A=mean + astig / 2,
                                  defocus_v_A=mean - astig / 2, defocus_angle_deg=rng.uniform(0, 180),
                                  dose_e_per_A2=rng.uniform(10, 60), ice_thickness_A=rng.uniform(150, 1000),
                                  b_motion_A2=rng.uniform(10, 80))
        image = simulate_micrograph(params, seed=seed * 10_000 + i).image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CTFFitWarning)
            fit = estimate_ctf(image, pixel_size_A=1.0)
        true_astig = params.defocus_u_A - params.defocus_v_A
        rows.append({
            "dose_e_per_A2": params.dose_e_per_A2, "mean_defocus_A": mean, "astigmatism_A": true_astig,
            "mean_defocus_error_pct": 100 * abs(fit.mean_defocus_A / mean - 1),
            "angle_error_deg": abs((fit.defocus_angle_deg - params.defocus_angle_deg + 90) % 180 - 90),
            "astigmatism_error_A": abs((fit.defocus_u_A - fit.defocus_v_A) - true_astig),
            "cc": fit.cc, "fit_resolution_A": fit.fit_resolution_A, "reliable": fit.reliable,
        })
    return rows


def summarise(rows):
    sub = [r for r in rows if r["dose_e_per_A2"] >= 20 and 8000 <= r["mean_defocus_A"] <= 30000]
    astig = [r for r in sub if r["astigmatism_A"] >= 300]
    out = {"n_all": len(rows), "n_acceptance": len(sub)}
    if sub:
        errors = [r["mean_defocus_error_pct"] for r in sub]
        out.update(median_defocus_error_pct=statistics.median(errors), worst_defocus_error_pct=max(errors),
                   median_astigmatism_error_A=statistics.median(r["astigmatism_error_A"] for r in sub),
                   worst_astigmatism_error_A=max(r["astigmatism_error_A"] for r in sub))
    if astig:
        out.update(median_angle_error_deg=statistics.median(r["angle_error_deg"] for r in astig),
                   worst_angle_error_deg=max(r["angle_error_deg"] for r in astig))
    out["all_median_defocus_error_pct"] = statistics.median(r["mean_defocus_error_pct"] for r in rows)
    out["all_worst_defocus_error_pct"] = max(r["mean_defocus_error_pct"] for r in rows)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer micrographs and sizes")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--count", type=int, default=None, help="micrographs in the accuracy sweep")
    parser.add_argument("--accuracy-size", type=int, default=2048)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(1)
    except ImportError:
        limiter = None
    sizes = args.sizes or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    count = args.count or (8 if args.quick else 40)
    print(f"{'size':>6} {'CTF s':>8} {'rfft2 s':>8} {'ratio':>6}")
    times = timing(sizes)
    for r in times:
        print(f"{r['size']:>6} {r['ctf_s']:>8.3f} {r['rfft2_floor_s']:>8.3f} {r['ratio_to_floor']:>6.2f}")
    rows = accuracy(count, args.accuracy_size)
    summary = summarise(rows)
    print(f"\naccuracy on {count} simulated {args.accuracy_size}² micrographs "
          "(dose 10-60 e/Å², defocus 0.5-4 µm, astigmatism 0-1500 Å):")
    for key, value in summary.items():
        print(f"  {key:<32} {value:.3f}" if isinstance(value, float) else f"  {key:<32} {value}")
    write_json(args.json, {"timing": times, "accuracy": rows, "summary": summary})
    if limiter is not None:
        limiter.unregister() if hasattr(limiter, "unregister") else None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
