"""Quality scores against the true restored quality, and the learning of their weights.

    python -m benchmarks.bench_score [--count 64] [--size 768] [--trials 300]
                                     [--save-weights FILE] [--json FILE]

Two simulated datasets of ``--count`` micrographs each (different seeds: one to learn the
weights on, one to judge them on), whose quality varies through dose (20-60 e/Å²), ice
(150-1400 Å), motion (B 10-250 Å²), defocus (0.8-3 µm) and artifacts (0-400 hot pixels,
0-30 X-rays), on a detector with a 2 % gain pattern, a dead row and a dead column. The
stated dose of each micrograph is its true dose (as metadata would give it).

The true quality of a micrograph is the correlation of its restoration -- as ``cryodask
restore`` makes it: cleaned with the dataset's defect map and gain, Wiener-filtered with
the CTF cryodask estimated -- with the CTF-free projection the simulator recorded.

Reported: the Spearman correlation with the true quality of V (weights learned on the
other dataset), of HyperScore, of each component alone, and of ranking by CTF fit
resolution (finer is better), side by side.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np

from benchmarks.common import correlation, write_json

RANGES = dict(defocus_A=(8000.0, 30000.0), dose_e_per_A2=(20.0, 60.0), ice_thickness_A=(150.0, 1400.0),
              b_motion_A2=(10.0, 250.0), n_hot_pixels=(0, 400), n_xrays=(0, 30))


def simulate(out_dir, count, size, seed):
    """A simulated dataset with truth images; returns its truth table."""
    from cryodask.simulate import Detector
    from cryodask.simulate.dataset import DatasetRanges, draw_micrograph_params, write_simulated_dataset

    params = draw_micrograph_params(count, shape=(size, size), ranges=DatasetRanges(**RANGES), seed=seed)
    detector = Detector(gain_std=0.02, n_dead_rows=1, n_dead_cols=1, seed=seed)
    return write_simulated_dataset(out_dir, params, detector=detector, seed=seed, save_truth_images=True)


def score_and_truth(out_dir, truth, weights=None):
    """Score a simulated dataset and measure each micrograph's true restored quality."""
    import mrcfile

    from cryodask import pipeline
    from cryodask.clean import clean_for_fitting, measure_defects
    from cryodask.ingest import micrographs_dataset

    paths = sorted(glob.glob(os.path.join(out_dir, "mic_*.mrc")))
    ds = micrographs_dataset(paths)
    ds["dose_e_per_A2"] = ("micrograph", truth["dose_e_per_A2"].to_numpy(np.float32))
    start = time.perf_counter()
    scores, _ = pipeline.score_dataset(ds, weights=weights)
    seconds = time.perf_counter() - start
    work, _, _ = clean_for_fitting(ds, measured=measure_defects(ds))
    restored = pipeline.restore_dataset(work, scores).compute()
    quality, ceiling = [], []
    for i, path in enumerate(paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        with mrcfile.open(os.path.join(out_dir, "truth", f"{stem}_projection.mrc"), permissive=True) as mrc:
            projection = np.asarray(mrc.data, np.float32)
        image = restored.values[i]
        quality.append(correlation(image, projection) if np.all(np.isfinite(image)) else 0.0)
        ceiling.append(expected_quality_oracle(np.asarray(work["image"][i].values), projection, truth.iloc[i],
                                               scores.isel(micrograph=i)))
    return scores, np.asarray(quality), seconds, np.asarray(ceiling)


def expected_quality_oracle(cleaned, projection, truth, fit):
    """The restoration's expected correlation with the truth, predicted by an oracle that
    knows everything but the noise realisation.

    It knows the true CTF, envelope (motion and coherence B), detector MTF and this
    micrograph's own particle projection power per Fourier pixel, and applies the Wiener
    filter the restoration applied (built from the fitted CTF, as ``cryodask restore``):
    expected cross power ``Σ H·CTF·E·MTF·|P|²·mean`` over ``sqrt(Σ |P|² · Σ H²·|F|²)``. How
    well it ranks micrographs by their true restored quality is the ceiling of any
    prediction of expected quality: what it misses is the chance alignment of this noise
    realisation with these particles.
    """
    from cryodask.physics import CTFParams, ctf_2d, frequency_grid
    from cryodask.restore import fit_signal_noise, wiener_gain

    if not np.isfinite(float(fit["defocus_u_A"])):
        return np.nan
    pixel = float(truth["pixel_size_A"])
    x = np.asarray(cleaned, np.float32)
    fitted = CTFParams(defocus_u_A=float(fit["defocus_u_A"]), defocus_v_A=float(fit["defocus_v_A"]),
                       defocus_angle_deg=float(fit["defocus_angle_deg"]), voltage_kV=float(truth["voltage_kV"]),
                       cs_mm=float(truth["cs_mm"]), amplitude_contrast=float(truth["amplitude_contrast"]))
    k, signal, noise = fit_signal_noise(x, fitted, pixel_size_A=pixel)
    h = wiener_gain(x.shape, fitted, pixel_size_A=pixel, k=k, signal=signal, noise=noise)
    true = CTFParams(defocus_u_A=float(truth["defocus_u_A"]), defocus_v_A=float(truth["defocus_v_A"]),
                     defocus_angle_deg=float(truth["defocus_angle_deg"]), voltage_kV=float(truth["voltage_kV"]),
                     cs_mm=float(truth["cs_mm"]), amplitude_contrast=float(truth["amplitude_contrast"]),
                     phase_shift_deg=float(truth["phase_shift_deg"]))
    ky, kx = frequency_grid(x.shape, pixel, layout="rfft", dtype=np.float64)
    k2 = ky**2 + kx**2
    envelope = np.exp(-(float(truth["b_motion_A2"]) + float(truth["b_coherence_A2"])) * k2 / 4.0)
    mtf = (np.sinc(kx * pixel) * np.sinc(ky * pixel)) ** float(truth["detector_mtf_power"])
    f = np.fft.rfft2(x - x.mean())
    p = np.fft.rfft2(projection - projection.mean())
    weight = np.ones(f.shape)
    weight[:, 1:(x.shape[1] + 1) // 2] = 2.0  # the half plane's columns that stand for two
    p2 = np.abs(p) ** 2
    cross = (weight * h * ctf_2d(ky, kx, true, with_envelope=False) * envelope * mtf * p2).sum() * float(x.mean())
    return float(cross / np.sqrt((weight * p2).sum() * (weight * h * h * np.abs(f) ** 2).sum()))


def components_of(scores):
    from cryodask.score import COMPONENTS

    return {name: np.asarray(scores[name], np.float64) for name in COMPONENTS}


def spearman(a, b):
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep]).statistic)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of the optimiser (default 0)")
    parser.add_argument("--save-weights", metavar="FILE", help="write the learned weights here")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from cryodask.score import COMPONENTS, combine, hyperscore, learn_weights

    results = {}
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=2, threads_per_worker=1,
                                                            processes=True) as cluster, Client(cluster):
        data = {}
        for role, seed in (("learn", 101), ("judge", 202)):
            out_dir = os.path.join(tmp, role)
            truth = simulate(out_dir, args.count, args.size, seed)
            scores, quality, seconds, ceiling = score_and_truth(out_dir, truth)
            data[role] = (scores, quality, ceiling)
            print(f"{role}: {args.count} micrographs of {args.size}² scored in {seconds:.1f} s "
                  f"({seconds / args.count:.2f} s each); true quality {quality.min():.3f}-{quality.max():.3f}")
        scores, quality, _ = data["learn"]
        command = (f"python -m benchmarks.bench_score --count {args.count} --size {args.size} "
                   f"--trials {args.trials} --seed {args.seed}")
        weights = learn_weights(components_of(scores), quality, n_trials=args.trials, seed=args.seed,
                                provenance={"command": command, "data": "bench_score 'learn' dataset (seed 101)",
                                            "size_px": args.size, "ranges": {k: list(v) for k, v in RANGES.items()}})
        again = learn_weights(components_of(scores), quality, n_trials=args.trials, seed=args.seed)
        print(f"learned w = {weights.w}, beta {weights.beta}, gamma {weights.gamma}, kappa {weights.kappa} "
              f"(Spearman on the learning set {weights.provenance['spearman']:.3f}); "
              f"relearned with the same seed: {'identical' if again.w == weights.w and again.beta == weights.beta else 'DIFFERENT'}")
        if args.save_weights:
            weights.save(args.save_weights)
        scores, quality, ceiling = data["judge"]
        components = components_of(scores)
        v = combine(components, weights)
        rows = {"V (learned weights)": spearman(v, quality),
                "HyperScore": spearman(hyperscore(v, weights), quality),
                "CTF fit resolution alone": spearman(-np.asarray(scores["ctf_fit_resolution_A"]), quality)}
        for name in COMPONENTS:
            rows[f"{name} alone"] = spearman(components[name], quality)
        rows["expected quality (dataset particle spectrum)"] = spearman(np.asarray(scores["quality_expected"]), quality)
        rows["expected quality (own spectrum alone)"] = spearman(np.asarray(scores["quality_predicted"]), quality)
        rows["oracle expected quality (the ceiling)"] = spearman(ceiling, quality)
        print(f"\nSpearman correlation with the true restored quality, {args.count} unseen micrographs:")
        for name, value in rows.items():
            print(f"  {name:<36} {value:+.3f}")
        predicted = (hyperscore(v, weights) - 100.0) / 100.0
        print(f"HyperScore - 100 against 100 x quality: RMS error {100 * np.sqrt(np.mean((predicted - quality) ** 2)):.1f}; "
              f"HyperScore {hyperscore(v, weights).min():.1f}-{hyperscore(v, weights).max():.1f} for qualities "
              f"{quality.min():.3f}-{quality.max():.3f}")
        results = {"spearman": rows, "weights": {"w": weights.w, "beta": weights.beta, "gamma": weights.gamma,
                                                 "kappa": weights.kappa},
                   "reproducible": again.w == weights.w, "count": args.count, "size": args.size}
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
