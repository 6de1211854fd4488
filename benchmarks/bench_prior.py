"""The dataset prior loop of the noise model, on datasets of 8 to 512 micrographs.

    python -m benchmarks.bench_prior [--counts 8 64 512] [--size 384] [--json FILE]

For each count: a simulated dataset (dose 20-60 e/Å², ice 150-1400 Å, artifacts) is cleaned,
its CTFs fitted and its noise decomposed with ``noise_dataset(prior=True)`` as ``cryodask
noise`` does it. Reported per prior node (the white noise level, the amount of ice): the
iterations of the empirical-Bayes loop, the last iteration's largest move in standard
errors (it stops at 0.01), whether it converged, and the prior's centre and spread; and
the seconds the whole noise model took per micrograph.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import xarray as xr
    from distributed import Client, LocalCluster

    from cryodask import pipeline, progress
    from cryodask.clean import clean_for_fitting, measure_defects
    from cryodask.ingest import micrographs_dataset
    from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset

    results = []
    ranges = DatasetRanges(dose_e_per_A2=(20.0, 60.0), ice_thickness_A=(150.0, 1400.0), n_hot_pixels=(0, 200),
                           n_xrays=(0, 10))
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster):
        for count in args.counts:
            folder = os.path.join(tmp, str(count))
            params = draw_micrograph_params(count, shape=(args.size, args.size), ranges=ranges, seed=count)
            write_simulated_dataset(folder, params, detector=Detector(gain_std=0.02, seed=count), seed=count)
            ds = micrographs_dataset(os.path.join(folder, "mic_*.mrc"))
            start = time.perf_counter()
            measured = measure_defects(ds)
            work, exclude, extra = clean_for_fitting(ds, measured=measured)
            (ctf,) = progress.compute(xr.merge([pipeline.estimate_ctf_dataset(work, exclude=exclude), extra]))
            noise = pipeline.noise_dataset(ds, ctf, gain_estimate=measured.gain, defects=measured.defects,
                                           prior=True)
            (noise,) = progress.compute(noise)
            seconds = time.perf_counter() - start
            row = {"count": count, "seconds_per_micrograph": seconds / count}
            for name in ("white", "ice_scale"):
                attrs = noise[f"prior_{name}"].attrs
                row[name] = {k: float(attrs[k]) for k in ("iterations", "drift_in_standard_errors", "converged",
                                                         "prior_mean", "prior_spread")}
            results.append(row)
            print(f"{count:>4} micrographs of {args.size}²: {seconds / count:.2f} s each (CTF and noise model); "
                  + "; ".join(f"{name}: {int(row[name]['iterations'])} iterations, final drift "
                              f"{row[name]['drift_in_standard_errors']:.4f} s.e., "
                              f"{'converged' if row[name]['converged'] else 'NOT converged'}"
                              for name in ("white", "ice_scale")), flush=True)
    write_json(args.json, {"size": args.size, "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
