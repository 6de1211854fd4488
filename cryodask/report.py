"""A self-contained HTML report of a scored dataset: plots embedded as PNG, nothing linked.

Per dataset: the distributions of defocus, astigmatism and fit resolution; the noise shares
and the top causes; the distributions of HyperScore and LogicScore with the selection
threshold. Per micrograph (the best, the worst, and any named): raw, cleaned and restored
side by side, the power spectrum with the fitted CTF over its right half and the 1D fit,
the artifact mask, and the rules it failed with their reasons.
"""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
import xarray as xr

__all__ = ["write_report"]


def _figure(width=6.0, height=3.2, ncols=1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _values(ds, name):
    return np.asarray(ds[name].values, dtype=np.float64) if name in ds else None


def _histograms(ds, threshold):
    out = []
    u, v = _values(ds, "defocus_u_A"), _values(ds, "defocus_v_A")
    if u is not None:
        fig, axes = _figure(10.0, 3.0, 3)
        panels = ((0.5 * (u + v) / 1e4, "mean defocus (µm)"), (u - v, "astigmatism U − V (Å)"),
                  (_values(ds, "ctf_fit_resolution_A"), "CTF fit resolution (Å)"))
        for ax, (values, label) in zip(axes, panels):
            finite = values[np.isfinite(values)]
            ax.hist(finite, bins=max(5, min(30, finite.size)), color="tab:blue")
            ax.set_xlabel(label)
        axes[0].set_ylabel("micrographs")
        out.append(("CTF", _img(_png(fig), "distributions of defocus, astigmatism and fit resolution")))
    shares = [c for c in ("dose", "ice", "detector", "artifacts") if f"share_{c}" in ds]
    if shares:
        fig, axes = _figure(10.0, 3.0, 2)
        means = [float(np.nanmean(_values(ds, f"share_{c}"))) for c in shares]
        axes[0].bar(shares, means, color="tab:green")
        axes[0].set_ylabel("mean share of the noise variance")
        if "top_cause" in ds:
            causes, counts = np.unique([str(c) for c in ds["top_cause"].values if str(c)], return_counts=True)
            order = np.argsort(-counts)
            axes[1].bar(causes[order], counts[order], color="tab:red")
        axes[1].set_ylabel("micrographs with this top cause")
        out.append(("Causes of noise", _img(_png(fig), "noise shares and top causes")))
    if "hyperscore" in ds:
        fig, axes = _figure(10.0, 3.0, 2)
        hs = _values(ds, "hyperscore")
        axes[0].hist(hs[np.isfinite(hs)], bins=20, color="tab:purple")
        if threshold is not None:
            axes[0].axvline(threshold, color="k", ls="--", label=f"threshold {threshold:g}")
            axes[0].legend(fontsize=8)
        axes[0].set_xlabel("HyperScore")
        logic = _values(ds, "logic")
        axes[1].hist(logic[np.isfinite(logic)], bins=np.linspace(0, 1, 11), color="tab:orange")
        axes[1].set_xlabel("LogicScore (share of rules passed)")
        out.append(("Scores", _img(_png(fig), "distributions of HyperScore and LogicScore")))
    return out


def _micrograph_section(ds, i, label):
    from cryodask.artifacts import clean_micrograph
    from cryodask.ctf import CTFFit
    from cryodask.ctf_plot import plot_ctf_fit
    from cryodask.physics import CTFParams
    from cryodask.restore import wiener_filter

    name = str(ds["micrograph_name"].values[i])
    image = np.asarray(ds["image"].isel(micrograph=i).values, dtype=np.float32)
    pixel = float(ds["pixel_size_A"].values[i])
    raw = image
    defects = None
    if "defect_map" in ds:  # the dataset's defects and gain, as the pipeline cleaned with them
        defects = np.asarray(ds["defect_map"].values) > 0
        if "gain_estimate" in ds and ds["gain_estimate"].attrs.get("applied", 0):
            image = image / np.asarray(ds["gain_estimate"].values, dtype=np.float32)
    cleaned, mask = clean_micrograph(image, defects=defects)
    parts = [f"<h3>{html.escape(label)}: {html.escape(name)}</h3>"]
    facts = []
    for key, fmt in (("hyperscore", "HyperScore {:.1f}"), ("logic", "LogicScore {:.2f}"),
                     ("quality_expected", "expected restored quality {:.2f}")):
        if key in ds:
            facts.append(fmt.format(float(ds[key].values[i])))
    if "top_cause" in ds:
        facts.append(f"top cause {ds['top_cause'].values[i]}")
    if facts:
        parts.append("<p>" + html.escape("; ".join(facts)) + "</p>")
    u = float(ds["defocus_u_A"].values[i]) if "defocus_u_A" in ds else float("nan")
    pictures = [("raw", raw), ("cleaned", cleaned)]
    if np.isfinite(u):
        params = CTFParams(defocus_u_A=u, defocus_v_A=float(ds["defocus_v_A"].values[i]),
                           defocus_angle_deg=float(ds["defocus_angle_deg"].values[i]),
                           voltage_kV=float(ds["voltage_kV"].values[i]), cs_mm=float(ds["cs_mm"].values[i]),
                           amplitude_contrast=float(ds["amplitude_contrast"].values[i]),
                           phase_shift_deg=float(ds["phase_shift_deg"].values[i]) if "phase_shift_deg" in ds else 0.0)
        pictures.append(("restored (Wiener, protein bright)", wiener_filter(cleaned, params, pixel_size_A=pixel)))
    fig, axes = _figure(4.0 * (len(pictures) + 1), 4.0, len(pictures) + 1)
    step = max(1, max(image.shape) // 512)
    for ax, (title, picture) in zip(axes, pictures):
        shown = np.asarray(picture)[::step, ::step].astype(np.float64)
        if title.startswith("restored"):
            from scipy import ndimage

            shown = ndimage.gaussian_filter(shown, 1.0)
        lo, hi = np.percentile(shown, [1, 99])
        ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
    axes[-1].imshow(np.asarray(mask)[::step, ::step] > 0, cmap="magma", interpolation="nearest")
    axes[-1].set_title(f"artifact mask ({int((np.asarray(mask) > 0).sum())} pixels)")
    axes[-1].axis("off")
    parts.append(_img(_png(fig), f"{name}: raw, cleaned, restored and artifact mask"))
    if np.isfinite(u):
        fit = CTFFit(defocus_u_A=u, defocus_v_A=params.defocus_v_A, defocus_angle_deg=params.defocus_angle_deg,
                     phase_shift_deg=params.phase_shift_deg, cc=float(ds["ctf_cc"].values[i]),
                     fit_resolution_A=float(ds["ctf_fit_resolution_A"].values[i]),
                     reliable=bool(ds["ctf_reliable"].values[i]))
        buffer = io.BytesIO()
        plot_ctf_fit(cleaned, fit, buffer, pixel_size_A=pixel, voltage_kV=params.voltage_kV, cs_mm=params.cs_mm,
                     amplitude_contrast=params.amplitude_contrast, title=os.path.basename(name))
        parts.append(_img(base64.b64encode(buffer.getvalue()).decode("ascii"), f"{name}: power spectrum and CTF fit"))
    failed = [r[len("rule_"):] for r in ds.data_vars if r.startswith("rule_") and ds[r].values[i] == 0]
    if failed:
        items = []
        for rule in failed:
            reason = str(ds[f"reason_{rule}"].values[i]) if f"reason_{rule}" in ds else ""
            items.append(f"<li><b>{html.escape(rule)}</b>: {html.escape(reason)}</li>")
        parts.append("<p>Failed rules:</p><ul>" + "".join(items) + "</ul>")
    else:
        parts.append("<p>No rule failed.</p>" if any(r.startswith("rule_") for r in ds.data_vars) else "")
    return "\n".join(parts)


def write_report(ds, path, *, micrographs=(), n_best: int = 2, n_worst: int = 2,
                 threshold: float | None = 140.0, title: str = "cryodask report") -> str:
    """Write the HTML report of a dataset and return its path.

    Parameters
    ----------
    ds : xarray.Dataset, or a sequence of them
        A store's dataset (``image`` and the acquisition variables), with whatever results
        it holds: CTF, noise shares, scores, rules (each section appears when its variables
        are there). Several datasets (e.g. one store per image shape) are reported as one:
        their distributions together, the best and worst among all.
    path : str
        The HTML file to write (replaced atomically).
    micrographs : sequence of str
        Names (or the ends of names) of micrographs to show besides the best and worst.
    n_best, n_worst : int
        How many of the best and worst by HyperScore (else by CTF fit resolution) to show.
    threshold : float or None
        A HyperScore threshold drawn on its distribution.
    """
    from cryodask.io.store import per_micrograph

    groups = [ds] if isinstance(ds, xr.Dataset) else list(ds)
    where = [(g, i) for g, d in enumerate(groups) for i in range(d.sizes["micrograph"])]
    ds = per_micrograph(groups)
    n = ds.sizes["micrograph"]
    if "hyperscore" in ds:
        order = np.argsort(-np.nan_to_num(_values(ds, "hyperscore"), nan=-np.inf))
    elif "ctf_fit_resolution_A" in ds:
        order = np.argsort(np.nan_to_num(_values(ds, "ctf_fit_resolution_A"), nan=np.inf))
    else:
        order = np.arange(n)
    chosen = []
    for i in order[:n_best]:
        chosen.append((int(i), "best"))
    for i in order[::-1][:n_worst]:
        if int(i) not in [c for c, _ in chosen]:
            chosen.append((int(i), "worst"))
    names = [str(v) for v in ds["micrograph_name"].values]
    for wanted in micrographs:
        hits = [i for i, name in enumerate(names) if name == wanted or name.endswith(wanted)]
        if not hits:
            raise ValueError(f"no micrograph named {wanted!r} in the dataset ({n} micrographs, e.g. {names[0]!r})")
        if hits[0] not in [c for c, _ in chosen]:
            chosen.append((hits[0], "named"))
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{n} micrographs; pixel size {float(np.min(ds['pixel_size_A'])):.4g} Å.</p>"]
    for heading, picture in _histograms(ds, threshold if "hyperscore" in ds else None):
        body.append(f"<h2>{html.escape(heading)}</h2>\n{picture}")
    body.append("<h2>Micrographs</h2>")
    for i, label in chosen:
        group, index = where[i]
        body.append(_micrograph_section(groups[group], index, label))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1200px;"
            "margin:auto}} img{max-width:100%}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, path)
    return path
