"""Noise shares and the top cause against the simulator's truth, by re-simulation.

    python -m benchmarks.bench_causes [--count 12] [--size 768] [--seed 12] [--realizations 4] [--json FILE]

Each micrograph (dose 20-60 e/Å², ice 150-1400 Å, a detector with a 3 % gain pattern,
dead lines, stuck pixels and 1 count of read noise, 0-400 hot pixels and 0-30 X-rays) is
measured once (``measure_noise``) and explained (``explain_noise``); its shares are
compared with the simulator's recorded noise variances. The truth's top cause is found by re-simulating the same micrograph
(same seed) with each cause at its ideal -- no ice noise (thickness 0), a perfect detector
(no gain pattern, defects, read noise; MTF kept), no impulses -- restoring every version
the same way as the pipeline (divided by the dataset's gain estimate, cleaned with its
defect map -- both from a first pass over all the micrographs; own CTF; Wiener) and asking
which gains the most correlation with the CTF-free truth.

One draw of a micrograph's noise and particles is one sample of that truth: the gains of
ice and detector scatter by 0.001-0.027 between draws of the same parameters (standard
deviations over four draws of 60 micrographs), more than the lead of one over the other
on many micrographs. The truth is therefore the mean gain
over ``--realizations`` draws (the first the micrograph measured), each against its own
re-simulations; agreement is also reported against the first draw alone and on the
micrographs whose truth is decided (its top cause leads by more than twice that lead's
standard error over the draws).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.common import correlation, correlation_by_band, restore_as_pipeline, write_json
from cryodask.artifacts import clean_micrograph, find_impulses
from cryodask.causal import (NOISE_CAUSES, explain_noise, ice_on_shells, measure_noise, particle_spectrum,
                             spectrum_shells)
from cryodask.defects import estimate_defects, micrograph_statistics, ring_power
from cryodask.simulate import Detector, MicrographParams, detector_state, simulate_micrograph

DETECTOR = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=2, n_stuck_pixels=20, read_noise_counts=1.0, seed=3)
IDEAL_DETECTOR = Detector(seed=3)  # same MTF, nothing else


def _restored_quality(image, truth, defects, ctf=None):
    """The restoration's correlation with the truth, and its part below 1/200 Å^-1 (the
    shell the thickness background competes for; pixels of 1 Å)."""
    out = restore_as_pipeline(image, defects=defects, ctf=ctf)
    if out is None:
        return float("nan"), float("nan")
    return correlation(out, truth), correlation_by_band(out, truth, [0.0, 1.0 / 200.0, 1.0])[0]


def _true_gains(params, seed, state, ideal_state, dataset, sim=None):
    """The gain in restored correlation with each cause at its ideal, for one draw of the
    micrograph (``seed``; ``sim``: that draw when already simulated), restored with its
    own CTF fit and with the true CTF; and the ice's gain below 1/200 Å^-1 (true CTF)."""
    paired = dict(seed=seed, paired_counts=True)  # common random numbers: see simulate_micrograph
    if sim is None:
        sim = simulate_micrograph(params, detector=state, **paired)
    variants = {
        "ice": simulate_micrograph(dataclasses.replace(params, ice_thickness_A=0.0), detector=state, **paired),
        "detector": simulate_micrograph(params, detector=ideal_state, **paired),
        "artifacts": simulate_micrograph(dataclasses.replace(params, n_hot_pixels=0, n_xrays=0),
                                         detector=state, **paired),
    }

    def quality(cause, variant, ctf=None):
        if cause == "detector":
            return _restored_quality(variant.image, variant.projection, ideal_state.defects, ctf)
        return _restored_quality(variant.image / dataset.gain, variant.projection, dataset.defects, ctf)

    base = quality(None, sim)
    base_true_ctf = quality(None, sim, params.ctf)
    true_ctf = {c: quality(c, v, params.ctf) for c, v in variants.items()}
    return {
        "estimated_ctf": {c: quality(c, v)[0] - base[0] for c, v in variants.items()},
        # The same with the true CTF: the cause's own effect, without the scatter of
        # refitting each re-simulated micrograph's CTF (which is larger than some gains).
        "true_ctf": {c: q - base_true_ctf[0] for c, (q, _) in true_ctf.items()},
        "ice_below_200A": true_ctf["ice"][1] - base_true_ctf[1],
    }


def _mean_gains(draws):
    return {c: float(np.nanmean([d[c] for d in draws])) for c in draws[0]}


def _margin(draws):
    """The mean gains' top cause, its lead over the runner-up and that lead's standard
    error over the draws (NaN for one draw)."""
    mean = _mean_gains(draws)
    top, second = sorted(mean, key=mean.get, reverse=True)[:2]
    leads = [d[top] - d[second] for d in draws]
    error = float(np.std(leads, ddof=1) / np.sqrt(len(leads))) if len(leads) > 1 else float("nan")
    return top, mean[top] - mean[second], error


def _gain_errors(draws):
    """Standard error of each cause's mean gain over the draws (NaN for one draw)."""
    if len(draws) < 2:
        return {c: float("nan") for c in draws[0]}
    return {c: float(np.nanstd([d[c] for d in draws], ddof=1) / np.sqrt(len(draws))) for c in draws[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--realizations", type=int, default=4,
                        help="draws of each micrograph whose mean gains are the truth (default 4)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shape = (args.size, args.size)
    state, ideal_state = detector_state(DETECTOR, shape), detector_state(IDEAL_DETECTOR, shape)
    rows = []
    # Pass 1 over the dataset, as the pipeline does: its defect map and gain estimate.
    drawn = []
    sums, rings, medians, fanos = 0, 0, [], []
    for i in range(args.count):
        mean = rng.uniform(10000, 30000)
        params = MicrographParams(shape=shape, dose_e_per_A2=rng.uniform(20, 60),
                                  defocus_u_A=mean + 300, defocus_v_A=mean - 300,
                                  defocus_angle_deg=rng.uniform(0, 180),
                                  ice_thickness_A=rng.uniform(150, 1400),
                                  n_hot_pixels=int(rng.integers(0, 401)), n_xrays=int(rng.integers(0, 31)))
        seed = 500 + i
        sim = simulate_micrograph(params, detector=state, seed=seed, paired_counts=True)
        impulses = find_impulses(sim.image)
        statistics = micrograph_statistics(sim.image, impulses.mask)
        sums, rings = sums + statistics, rings + ring_power(statistics)
        medians.append(float(np.median(sim.image)))
        fanos.append(impulses.fano)
        drawn.append((params, seed, sim))
    dataset = estimate_defects(sums, args.count, mean_counts=float(np.mean(medians)), fano=float(np.mean(fanos)),
                               ring_power=rings)
    # The sample node across the dataset: the particles' spectrum from every micrograph's shells.
    # Each micrograph's measured amorphous ice is taken out of it, as the pipeline does.
    shells, scales, measurements = [], [], []
    for params, seed, sim in drawn:
        cleaned, _ = clean_micrograph(sim.image / dataset.gain, defects=dataset.defects)
        shells.append(spectrum_shells(cleaned, params.ctf, pixel_size_A=1.0))
        scales.append(float(cleaned.mean()))
        measurements.append(measure_noise(sim.image, params.ctf, pixel_size_A=1.0, defects=dataset.defects,
                                          gain_estimate=dataset, dose_e_per_A2=params.dose_e_per_A2))
    shells = np.asarray(shells)
    edges = np.linspace(0.0, 0.5, shells.shape[2] + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ice = np.asarray([ice_on_shells(measured, centres) for measured in measurements])
    particle_power = (centres, *particle_spectrum(shells[:, 0], shells[:, 1], np.asarray(scales), ice=ice,
                                                  with_error=True))
    for i, ((params, seed, sim), measured) in enumerate(zip(drawn, measurements)):
        alone = explain_noise(measured, params.ctf)
        found = explain_noise(measured, params.ctf, particle_power=particle_power)
        truth = {c: sim.noise_variance[c] for c in NOISE_CAUSES}
        total = sum(truth.values())
        # The defect map is what the dataset pass finds (all of them, bench_artifacts shows).
        # The truth's gains: the mean over ``realizations`` draws of the micrograph (the
        # first is the one measured), each against its own re-simulations.
        drawn_gains = [_true_gains(params, seed + 1000 * r, state, ideal_state, dataset, sim if r == 0 else None)
                       for r in range(args.realizations)]
        first = drawn_gains[0]
        improvement = _mean_gains([g["estimated_ctf"] for g in drawn_gains])
        improvement_true_ctf = _mean_gains([g["true_ctf"] for g in drawn_gains])
        spread = _gain_errors([g["true_ctf"] for g in drawn_gains])
        _, lead, lead_error = _margin([g["estimated_ctf"] for g in drawn_gains])
        rows.append({
            "micrograph": i,
            "ice_thickness_A": params.ice_thickness_A,
            "dose_e_per_A2": params.dose_e_per_A2,
            # How much of the ice's gain (true CTF, first draw) lies below 1/200 Å^-1.
            "ice_gain_below_200A": first["ice_below_200A"],
            "share_error": {c: abs(found.shares[c] - truth[c] / total) for c in NOISE_CAUSES},
            "top_cause": found.top_cause,
            "top_cause_own_spectrum": alone.top_cause,
            "true_top_cause": max(improvement, key=improvement.get),
            "true_top_cause_true_ctf": max(improvement_true_ctf, key=improvement_true_ctf.get),
            "improvement": improvement,
            "improvement_true_ctf": improvement_true_ctf,
            "improvement_true_ctf_error": spread,
            "improvement_first_draw": first["estimated_ctf"],
            "true_top_cause_first_draw": max(first["estimated_ctf"], key=first["estimated_ctf"].get),
            # The truth's top cause leads the runner-up by ``lead`` (± ``lead_error`` over
            # the draws); within two errors of a tie the truth does not decide.
            "lead": lead,
            "lead_error": lead_error,
            "gain": found.gain,
        })
    worst = {c: max(r["share_error"][c] for r in rows) for c in NOISE_CAUSES}

    def agreeing(key, truth="true_top_cause", where=lambda r: True):
        return sum(r[key] == r[truth] for r in rows if where(r)), sum(1 for r in rows if where(r))

    print(f"{args.count} simulated {args.size}² micrographs, truth from {args.realizations} draw(s) of each")
    print("worst absolute share error: " + ", ".join(f"{c} {v:.3f}" for c, v in worst.items()))
    print("top cause agrees with re-simulation on {} of {} with the dataset's particle spectrum, "
          "{} of {} from each micrograph's own spectrum".format(*agreeing("top_cause"),
                                                                *agreeing("top_cause_own_spectrum")))
    print("  re-simulations restored with the true CTF: {} of {} with the dataset's particle spectrum, "
          "{} of {} from each micrograph's own spectrum".format(
              *agreeing("top_cause", "true_top_cause_true_ctf"),
              *agreeing("top_cause_own_spectrum", "true_top_cause_true_ctf")))
    if args.realizations > 1:
        print("  against the first draw alone: {} of {}".format(*agreeing("top_cause", "true_top_cause_first_draw")))
        print("  where the truth's lead is more than twice its standard error: {} of {}".format(
            *agreeing("top_cause", where=lambda r: r["lead"] > 2 * r["lead_error"])))
    for r in rows:
        print(f"  {r['micrograph']:>2} (ice {r['ice_thickness_A']:4.0f} Å, {r['dose_e_per_A2']:2.0f} e/Å²): "
              f"predicted {r['top_cause']:<10} true {r['true_top_cause']:<10} "
              "gains predicted " + ", ".join(f"{c} {r['gain'][c]:+.3f}" for c in r["improvement"])
              + "; measured " + ", ".join(f"{c} {v:+.3f}" for c, v in r["improvement"].items())
              + "; true CTF " + ", ".join(f"{c} {v:+.3f}" for c, v in r["improvement_true_ctf"].items())
              + f" (ice below 1/200 Å^-1 {r['ice_gain_below_200A']:+.3f}; lead {r['lead']:.3f}"
              + f" ± {r['lead_error']:.3f})")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
