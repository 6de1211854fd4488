"""Diagnostic pictures of a CTF fit, for a person to look at."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cryodask.backend import to_numpy
from cryodask.ctf import CTFFit, CTFSearch, fit_spectrum
from cryodask.physics import CTFParams, ctf_2d

__all__ = ["plot_ctf_fit"]


def plot_ctf_fit(image, fit: CTFFit, path, *, pixel_size_A: float, voltage_kV: float = 300.0,
                 cs_mm: float = 2.7, amplitude_contrast: float = 0.07,
                 search: CTFSearch = CTFSearch(), title: str = "") -> None:
    """Write a PNG: the power spectrum with the fitted CTF² over its right half, and the
    rotational average of the background-subtracted spectrum with the fitted curve.

    The spectrum is shown out to the fit band's high-resolution limit (or Nyquist), centred,
    ``ky`` upwards; the dashed circles mark the fit band and the fit resolution.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    spec = fit_spectrum(image, pixel_size_A=pixel_size_A, search=search, voltage_kV=voltage_kV,
                        k_limit=min(0.5 / pixel_size_A, 1.0 / 3.0))
    power = np.log(to_numpy(spec.power).astype(np.float64) + 1e-30)
    ky = to_numpy(spec.ky).astype(np.float64)
    kx = to_numpy(spec.kx).astype(np.float64)
    background = ndimage.gaussian_filter(power, 6.0, mode="nearest")
    flat = power - background
    k = np.sqrt(ky**2 + kx**2)
    band = (k > 1 / search.min_resolution_A) & (k < 1 / search.max_resolution_A)
    scale = np.std(flat[band]) if band.any() else 1.0
    flat = np.clip(flat / (scale + 1e-30), -3, 3)
    params = CTFParams(defocus_u_A=fit.defocus_u_A, defocus_v_A=fit.defocus_v_A,
                       defocus_angle_deg=fit.defocus_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                       amplitude_contrast=amplitude_contrast, phase_shift_deg=fit.phase_shift_deg)
    model = ctf_2d(ky, kx, params) ** 2
    # Full plane: the left half is the data (point-mirrored half plane), the right the model.
    left = flat[::-1, ::-1][:, :-1]
    right = 6.0 * model - 3.0
    picture = np.concatenate([left, right], axis=1)
    extent = [-kx[0, -1], kx[0, -1], ky[0, 0], ky[-1, 0]]

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    ax0.imshow(picture, cmap="gray", origin="lower", extent=extent, vmin=-3, vmax=3)
    for radius, style in ((1 / search.min_resolution_A, "--"), (1 / search.max_resolution_A, "--"),
                          (1 / fit.fit_resolution_A if np.isfinite(fit.fit_resolution_A) else None, ":")):
        if radius:
            ax0.add_patch(plt.Circle((0, 0), radius, fill=False, color="tab:orange", ls=style, lw=0.8))
    ax0.set_xlabel("kx (1/Å)   data | fitted CTF²")
    ax0.set_ylabel("ky (1/Å)")
    ax0.set_title(title or "power spectrum")

    n_bins = max(16, int(kx[0, -1] / max(kx[0, 1] - kx[0, 0], 1e-12)))
    edges = np.linspace(0, kx[0, -1], n_bins + 1)
    idx = np.clip(np.digitize(k.ravel(), edges) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    profile = np.bincount(idx, weights=(power - ndimage.gaussian_filter(power, 12.0, mode="nearest")).ravel(),
                          minlength=n_bins) / np.maximum(counts, 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    mean_params = CTFParams(defocus_u_A=fit.mean_defocus_A, defocus_v_A=fit.mean_defocus_A,
                            voltage_kV=voltage_kV, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                            phase_shift_deg=fit.phase_shift_deg)
    curve = ctf_2d(np.zeros((1, 1)), centres[None, :], mean_params)[0] ** 2
    sel = centres > 1 / search.min_resolution_A
    amp = np.std(profile[sel & (centres < 1 / search.max_resolution_A)]) if sel.any() else 1.0
    ax1.plot(centres[sel], profile[sel], lw=0.8, label="rotational average (background removed)")
    ax1.plot(centres[sel], (curve[sel] - 0.5) * 2 * amp, lw=0.8, label="fitted CTF² (mean defocus)")
    ax1.axvspan(1 / search.min_resolution_A, 1 / search.max_resolution_A, color="0.9", zorder=0)
    ax1.set_xlabel("spatial frequency (1/Å)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"defocus {fit.defocus_u_A:.0f} / {fit.defocus_v_A:.0f} Å, {fit.defocus_angle_deg:.1f}°; "
                  f"cc {fit.cc:.3f}; fit to {fit.fit_resolution_A:.2f} Å", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
