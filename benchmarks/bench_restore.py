"""Restoration against the truth and the peers' filters, on cryodask's simulator.

    python -m benchmarks.bench_restore [--count 3] [--size 1024] [--json FILE]

For each dose (20, 40, 60 e/Å²) ``count`` micrographs (ice 150-1000 Å, defocus 1-3 µm,
motion B 10-80 Å²); each restored six ways and compared with the CTF-free projection:

* raw (sign flipped so that protein is positive);
* phase flip with the true CTF;
* a flat-SNR Wiener filter (SNR 1) with the true CTF;
* the Warp/IsoNet deconvolution filter with the true CTF:
  ``SNR(f) = 10^strength · exp(-100 f falloff / pixel size) · high-pass`` with f in
  fractions of Nyquist, strength 1, falloff 1, and a cosine high-pass up to 0.02 of Nyquist;
* cryodask: cleaning, its own CTF estimate, the Wiener filter from the micrograph's own
  spectra with the ice separated;
* the linear limit: the Wiener filter from the true signal and noise power per shell,
  applied to the image less its least-squares plane (as cryodask's is).

Reported: correlation with the truth, and the resolution where the Fourier ring
correlation with the truth falls below 0.143.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from benchmarks.common import correlation, restore_as_pipeline, write_json
from cryodask.physics import CTFParams, ctf_2d, frequency_grid
from cryodask.restore import phase_flip
from cryodask.simulate import MicrographParams, simulate_micrograph


def frc_resolution(a, b, pixel_size_A, threshold=0.143, n_shells=128):
    fa, fb = np.fft.rfft2(a - a.mean()), np.fft.rfft2(b - b.mean())
    ky, kx = frequency_grid(a.shape, pixel_size_A, dtype=np.float64)
    k = (np.sqrt(ky**2 + kx**2) + 0 * kx).ravel()
    idx = np.minimum((k / (0.5 / pixel_size_A) * n_shells).astype(int), n_shells - 1)
    num = np.bincount(idx, (fa * np.conj(fb)).real.ravel(), n_shells)
    da = np.bincount(idx, (np.abs(fa) ** 2).ravel(), n_shells)
    db = np.bincount(idx, (np.abs(fb) ** 2).ravel(), n_shells)
    frc = num / np.sqrt(da * db + 1e-30)
    below = np.flatnonzero(frc[1:] < threshold)
    shell = below[0] + 1 if below.size else n_shells
    return 1.0 / (shell * (0.5 / pixel_size_A) / n_shells)


def _filter(image, gain):
    f = np.fft.rfft2(image - image.mean())
    return np.fft.irfft2(f * gain, s=image.shape)


def warp_filter(image, params, pixel_size_A, strength=1.0, falloff=1.0, highpass_nyquist=0.02):
    ky, kx = frequency_grid(image.shape, pixel_size_A, dtype=np.float64)
    f = (np.sqrt(ky**2 + kx**2) + 0 * kx) / (0.5 / pixel_size_A)
    highpass = 1.0 - np.cos(np.pi * np.minimum(1.0, f / highpass_nyquist))
    snr = 10.0**strength * np.exp(-100.0 * f * falloff / pixel_size_A) * highpass
    ctf = ctf_2d(ky, kx, params, with_envelope=False)
    return _filter(image, ctf / (ctf * ctf + 1.0 / np.maximum(snr, 1e-30)))


def flat_wiener(image, params, pixel_size_A, snr=1.0):
    ky, kx = frequency_grid(image.shape, pixel_size_A, dtype=np.float64)
    ctf = ctf_2d(ky, kx, params, with_envelope=False)
    return _filter(image, ctf / (ctf * ctf + 1.0 / snr))


def linear_limit(image, truth, params, pixel_size_A, n_shells=256):
    """The Wiener filter from the true signal and noise power per shell (an oracle), applied
    as cryodask applies its own: to the image less its least-squares plane (a thickness
    gradient is no specimen; left in, its edge-to-edge step spreads over every frequency
    along the axes, and the "limit" fell below cryodask's restorations in thick ice)."""
    from cryodask.restore import _without_plane

    flat = _without_plane(np.asarray(image, np.float32), np).astype(np.float64)
    f, p = np.fft.rfft2(flat - flat.mean()), np.fft.rfft2(truth - truth.mean())
    ky, kx = frequency_grid(image.shape, pixel_size_A, dtype=np.float64)
    ctf = ctf_2d(ky, kx, params, with_envelope=False) + 0 * kx
    k = (np.sqrt(ky**2 + kx**2) + 0 * kx)
    idx = np.minimum((k / (0.5 / pixel_size_A) * n_shells).astype(int), n_shells - 1)

    def shell_mean(x):
        return (np.bincount(idx.ravel(), x.ravel(), n_shells) /
                np.maximum(np.bincount(idx.ravel(), minlength=n_shells), 1))[idx]

    scale = shell_mean((f * np.conj(ctf * p)).real) / np.maximum(shell_mean(np.abs(ctf * p) ** 2), 1e-30)
    signal = shell_mean(np.abs(scale * p) ** 2)
    noise = shell_mean(np.abs(f - scale * ctf * p) ** 2)
    return np.fft.irfft2(f * ctf * signal / (ctf * ctf * signal + noise + 1e-30), s=image.shape)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(4)
    methods = ("raw", "phase flip (true CTF)", "flat Wiener (true CTF)", "Warp filter (true CTF)",
               "cryodask (own CTF)", "linear limit")
    rows = []
    for dose in (20, 40, 60):
        for i in range(args.count):
            mean = rng.uniform(10000, 30000)
            astig = rng.uniform(0, 1000)
            params = MicrographParams(shape=(args.size, args.size), dose_e_per_A2=dose,
                                      defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                                      defocus_angle_deg=rng.uniform(0, 180),
                                      ice_thickness_A=rng.uniform(150, 1000), b_motion_A2=rng.uniform(10, 80))
            sim = simulate_micrograph(params, seed=dose * 100 + i)
            true = CTFParams(params.defocus_u_A, params.defocus_v_A, params.defocus_angle_deg)
            ours = restore_as_pipeline(sim.image)
            outputs = {
                "raw": -(sim.image - sim.image.mean()),
                "phase flip (true CTF)": phase_flip(sim.image, true, pixel_size_A=1.0),
                "flat Wiener (true CTF)": flat_wiener(sim.image, true, 1.0),
                "Warp filter (true CTF)": warp_filter(sim.image, true, 1.0),
                "cryodask (own CTF)": np.zeros_like(sim.image) if ours is None else ours,
                "linear limit": linear_limit(sim.image, sim.projection, true, 1.0),
            }
            for name, out in outputs.items():
                rows.append({"dose": dose, "micrograph": i, "method": name,
                             "correlation": correlation(out, sim.projection),
                             "frc_resolution_A": frc_resolution(out, sim.projection, 1.0)})
    print(f"{'method':<26} " + " ".join(f"{'corr @' + str(d):>10}" for d in (20, 40, 60)) + "   FRC res (Å, median)")
    for name in methods:
        cells = []
        for dose in (20, 40, 60):
            cells.append(statistics.mean(r["correlation"] for r in rows if r["method"] == name and r["dose"] == dose))
        res = statistics.median(r["frc_resolution_A"] for r in rows if r["method"] == name)
        print(f"{name:<26} " + " ".join(f"{c:>10.3f}" for c in cells) + f"   {res:8.1f}")
    ours = [r["correlation"] for r in rows if r["method"] == "cryodask (own CTF)"]
    limit = [r["correlation"] for r in rows if r["method"] == "linear limit"]
    print(f"\ncryodask / linear limit, mean over micrographs: {np.mean(np.array(ours) / np.array(limit)):.3f}")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
