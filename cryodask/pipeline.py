"""Kernels mapped over a store's micrographs with xarray and Dask. No physics lives here.

Every function takes a dataset (as :func:`cryodask.open_dataset` returns it) and returns
lazy variables; nothing is computed until the caller writes or computes them.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import xarray as xr

from cryodask.ctf import CTFSearch, estimate_ctf
from cryodask.spectrum import power_spectrum

__all__ = [
    "CTF_VARIABLES",
    "check_image_chunks",
    "estimate_ctf_dataset",
    "image_statistics",
    "noise_dataset",
    "power_spectra",
    "regions_dataset",
    "restore_dataset",
]

#: The variables :func:`estimate_ctf_dataset` returns, with their units.
CTF_VARIABLES = {
    "defocus_u_A": "Å",
    "defocus_v_A": "Å",
    "defocus_angle_deg": "degree",
    "phase_shift_deg": "degree",
    "ctf_cc": "1",
    "ctf_fit_resolution_A": "Å",
    "ctf_reliable": "bool",
}


def check_image_chunks(image: xr.DataArray) -> None:
    """The chunking contract of per-micrograph kernels: whole micrographs in each chunk.

    Raises
    ------
    ValueError
        ``y`` or ``x`` is split across chunks; the message says how to rechunk.
    """
    if image.dims != ("micrograph", "y", "x"):
        raise ValueError(f"expected dims ('micrograph', 'y', 'x'), got {image.dims}")
    if image.chunks is None:
        return
    for dim, chunks in zip(image.dims[1:], image.chunks[1:]):
        if len(chunks) > 1:
            raise ValueError(
                f"image is split along {dim!r} (chunks {chunks}); per-micrograph kernels need "
                "whole micrographs: image.chunk({'y': -1, 'x': -1})"
            )


def image_statistics(ds: xr.Dataset) -> xr.Dataset:
    """Mean, standard deviation, minimum and maximum of each micrograph (lazy)."""
    image = ds["image"]
    check_image_chunks(image)
    dims = ("y", "x")
    return xr.Dataset({
        "image_mean": image.mean(dims, dtype=np.float64).astype(np.float32),
        "image_std": image.std(dims, dtype=np.float64).astype(np.float32),
        "image_min": image.min(dims),
        "image_max": image.max(dims),
    })


def power_spectra(ds: xr.Dataset, *, tile_size: int = 512, overlap: float = 0.5) -> xr.DataArray:
    """Welch-averaged power spectrum of every micrograph, lazily, one task per micrograph.

    Returns
    -------
    DataArray (micrograph, fy, fx), float32
        ``rfftn`` layout in FFT order (see :func:`cryodask.spectrum.power_spectrum`); the
        ``fy``/``fx`` coordinates are spatial frequencies in 1/Å.
    """
    image = ds["image"]
    check_image_chunks(image)
    pixel = float(ds.attrs.get("pixel_size_A", float(ds["pixel_size_A"][0])))
    result = xr.apply_ufunc(
        _spectrum_stack,
        image,
        input_core_dims=[["y", "x"]],
        output_core_dims=[["fy", "fx"]],
        dask="parallelized",
        output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": {"fy": tile_size, "fx": tile_size // 2 + 1}},
        kwargs={"tile_size": tile_size, "overlap": overlap},
        keep_attrs=False,
    )
    fy = np.fft.fftfreq(tile_size, d=pixel)
    fx = np.fft.rfftfreq(tile_size, d=pixel)
    return result.assign_coords(fy=("fy", fy, {"units": "1/Å"}), fx=("fx", fx, {"units": "1/Å"})).rename(
        "power_spectrum").assign_attrs(units="image units^2 per Fourier pixel", layout="rfftn, FFT order")


def _spectrum_stack(images, *, tile_size, overlap):
    xp = array_api_compat.array_namespace(images)
    flat = xp.reshape(images, (-1, *images.shape[-2:]))
    out = xp.stack([power_spectrum(flat[i, ...], tile_size=tile_size, overlap=overlap)
                    for i in range(flat.shape[0])])
    return xp.reshape(out, (*images.shape[:-2], tile_size, tile_size // 2 + 1))


def _ctf_block(images, pixel, voltage, cs, ac, exclude, *, search, clip_sigma):
    out = np.empty((images.shape[0], len(CTF_VARIABLES)), dtype=np.float64)
    for i in range(images.shape[0]):
        # Unreliable fits are recorded in ctf_reliable and reported by the caller.
        fit = estimate_ctf(images[i], pixel_size_A=float(pixel[i]), voltage_kV=float(voltage[i]),
                           cs_mm=float(cs[i]), amplitude_contrast=float(ac[i]), search=search,
                           exclude=exclude[i] if exclude.ndim == 3 else None, clip_sigma=clip_sigma,
                           warn=False)
        out[i] = [fit.defocus_u_A, fit.defocus_v_A, fit.defocus_angle_deg, fit.phase_shift_deg,
                  fit.cc, fit.fit_resolution_A, float(fit.reliable)]
    return out


def estimate_ctf_dataset(ds: xr.Dataset, *, search: CTFSearch = CTFSearch(),
                         exclude: xr.DataArray | None = None, clip_sigma: float | None = 6.0) -> xr.Dataset:
    """Estimate the CTF of every micrograph, lazily, one task per micrograph.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``image (micrograph, y, x)`` and per-micrograph ``pixel_size_A``,
        ``voltage_kV``, ``cs_mm`` and ``amplitude_contrast``.
    search : CTFSearch
    exclude : DataArray (micrograph, y, x) of bool, optional
        Pixels to leave out of each spectrum (e.g. vacuum and contamination regions).
    clip_sigma : float or None
        The kernel's outlier guard (:func:`cryodask.ctf.clip_outliers`); None fits the
        raw pixels.

    Returns
    -------
    xarray.Dataset
        The variables of :data:`CTF_VARIABLES` along ``micrograph`` (``ctf_reliable`` is
        False where the spectrum shows no significant Thon rings).
    """
    image = ds["image"]
    check_image_chunks(image)
    chunks = image.chunks[0] if image.chunks is not None else None
    scalars = []
    for name in ("pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"):
        var = ds[name].astype(np.float64)
        scalars.append(var.chunk({"micrograph": chunks}) if chunks is not None else var)
    if exclude is None:
        exclude = xr.DataArray(np.zeros(image.sizes["micrograph"], dtype=bool), dims=("micrograph",))
        exclude = exclude.chunk({"micrograph": chunks}) if chunks is not None else exclude
        exclude_dims = []
    else:
        exclude_dims = ["y", "x"]
    result = xr.apply_ufunc(
        _ctf_block, image, *scalars, exclude,
        input_core_dims=[["y", "x"], [], [], [], [], exclude_dims],
        output_core_dims=[["ctf_field"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"ctf_field": len(CTF_VARIABLES)}},
        kwargs={"search": search, "clip_sigma": clip_sigma},
        keep_attrs=False,
    )
    out = xr.Dataset()
    for i, (name, units) in enumerate(CTF_VARIABLES.items()):
        values = result.isel(ctf_field=i, drop=True)
        values = values.astype(bool) if name == "ctf_reliable" else values.astype(np.float32)
        out[name] = values.assign_attrs(units=units)
    out.attrs["ctf_search"] = repr(search)
    return out


def _regions_block(images, *, tile_px):
    from cryodask.regions import classify_regions

    return np.stack([classify_regions(im, tile_px=tile_px).mask for im in images])


def regions_dataset(ds: xr.Dataset, *, tile_px: int = 64, variable: str = "image") -> xr.Dataset:
    """Region decomposition of every micrograph (lazy, one task per micrograph).

    Returns
    -------
    xarray.Dataset
        ``region_mask (micrograph, y, x)`` uint8 (codes of :mod:`cryodask.regions`) and
        ``region_fraction_<name> (micrograph)`` for ice, vacuum, carbon, contamination.
    """
    from cryodask.regions import REGION_CODES

    image = ds[variable]
    check_image_chunks(image)
    mask = xr.apply_ufunc(_regions_block, image, input_core_dims=[["y", "x"]],
                          output_core_dims=[["y", "x"]], dask="parallelized",
                          output_dtypes=[np.uint8], kwargs={"tile_px": tile_px}, keep_attrs=False)
    out = xr.Dataset({"region_mask": mask.assign_attrs(
        codes=", ".join(f"{c} {n}" for c, n in REGION_CODES.items()), tile_px=tile_px)})
    for code, name in REGION_CODES.items():
        out[f"region_fraction_{name}"] = (mask == code).mean(("y", "x")).astype(np.float32)
    return out


def _restore_block(images, u, v, angle, voltage, cs, ac, phase, pixel, *, method):
    from cryodask.physics import CTFParams
    from cryodask.restore import phase_flip, wiener_filter

    out = np.empty(images.shape, dtype=np.float32)
    for i in range(images.shape[0]):
        if not np.isfinite(u[i]):
            out[i] = np.nan  # no CTF, no restoration: NaN says so rather than a guess
            continue
        params = CTFParams(defocus_u_A=float(u[i]), defocus_v_A=float(v[i]),
                           defocus_angle_deg=float(angle[i]), voltage_kV=float(voltage[i]),
                           cs_mm=float(cs[i]), amplitude_contrast=float(ac[i]),
                           phase_shift_deg=float(phase[i]))
        restore = phase_flip if method == "phaseflip" else wiener_filter
        out[i] = restore(images[i], params, pixel_size_A=float(pixel[i]))
    return out


def restore_dataset(ds: xr.Dataset, ctf: xr.Dataset, *, method: str = "wiener",
                    variable: str = "image") -> xr.DataArray:
    """Restore every micrograph with its CTF (lazy, one task per micrograph).

    Parameters
    ----------
    ds : xarray.Dataset
        The micrographs and their acquisition variables.
    ctf : xarray.Dataset
        The CTF variables (:data:`CTF_VARIABLES`), e.g. from :func:`estimate_ctf_dataset`.
    method : {"wiener", "phaseflip"}
    variable : str
        Which image variable to restore (e.g. ``"image_clean"``).

    Returns
    -------
    DataArray ``image_restored (micrograph, y, x)`` float32: the CTF-free projection with
    protein positive; NaN for a micrograph without a CTF estimate.
    """
    if method not in ("wiener", "phaseflip"):
        raise ValueError(f"method must be 'wiener' or 'phaseflip', got {method!r}")
    image = ds[variable]
    check_image_chunks(image)
    chunks = image.chunks[0] if image.chunks is not None else None
    names = [("defocus_u_A", ctf), ("defocus_v_A", ctf), ("defocus_angle_deg", ctf),
             ("voltage_kV", ds), ("cs_mm", ds), ("amplitude_contrast", ds), ("phase_shift_deg", ctf),
             ("pixel_size_A", ds)]
    scalars = []
    for name, source in names:
        var = source[name].astype(np.float64)
        scalars.append(var.chunk({"micrograph": chunks}) if chunks is not None else var)
    restored = xr.apply_ufunc(_restore_block, image, *scalars,
                              input_core_dims=[["y", "x"]] + [[]] * len(scalars),
                              output_core_dims=[["y", "x"]], dask="parallelized",
                              output_dtypes=[np.float32], kwargs={"method": method}, keep_attrs=False)
    return restored.rename("image_restored").assign_attrs(method=method, sign="protein positive")


def _noise_block(images, u, v, angle, voltage, cs, ac, phase, pixel, dose, white, ice_scale, gain, defects):
    from cryodask.causal import BANDS_A, NOISE_CAUSES, decompose_noise
    from cryodask.physics import CTFParams

    n_fields = (2 + len(BANDS_A)) * len(NOISE_CAUSES) + 4
    out = np.full((images.shape[0], n_fields), np.nan, dtype=np.float64)
    for i in range(images.shape[0]):
        if not np.isfinite(u[i]):
            continue
        params = CTFParams(defocus_u_A=float(u[i]), defocus_v_A=float(v[i]),
                           defocus_angle_deg=float(angle[i]), voltage_kV=float(voltage[i]),
                           cs_mm=float(cs[i]), amplitude_contrast=float(ac[i]),
                           phase_shift_deg=float(phase[i]))
        fixed = {name: float(value[i]) for name, value in (("white", white), ("ice_scale", ice_scale))
                 if np.isfinite(value[i])}
        found = decompose_noise(images[i], params, pixel_size_A=float(pixel[i]),
                                gain_estimate=gain if gain.ndim == 2 else None,
                                defects=defects > 0 if defects.ndim == 2 else None, fixed=fixed,
                                dose_e_per_A2=float(dose[i]))
        out[i] = ([found.variance[c] for c in NOISE_CAUSES] + [found.gain[c] for c in NOISE_CAUSES]
                  + [v for c in NOISE_CAUSES for v in found.band_shares[c]]
                  + [*found.parameters["white"], *found.parameters["ice_scale"]])
    return out


def _noise_fields(ds, ctf, gain, known, white, ice_scale):
    from cryodask.causal import BANDS_A, NOISE_CAUSES

    image = ds["image"]
    check_image_chunks(image)
    chunks = image.chunks[0] if image.chunks is not None else None
    names = [("defocus_u_A", ctf), ("defocus_v_A", ctf), ("defocus_angle_deg", ctf),
             ("voltage_kV", ds), ("cs_mm", ds), ("amplitude_contrast", ds), ("phase_shift_deg", ctf),
             ("pixel_size_A", ds)]
    scalars = [source[name].astype(np.float64) for name, source in names]
    dose = ds["dose_e_per_A2"] if "dose_e_per_A2" in ds else xr.full_like(ds["pixel_size_A"], np.nan)
    scalars.append(dose.astype(np.float64))
    scalars += [xr.DataArray(np.asarray(values, np.float64), dims=("micrograph",)) for values in (white, ice_scale)]
    if chunks is not None:
        scalars = [var.chunk({"micrograph": chunks}) for var in scalars]
    n_fields = (2 + len(BANDS_A)) * len(NOISE_CAUSES) + 4
    return xr.apply_ufunc(
        _noise_block, image, *scalars,
        input_core_dims=[["y", "x"]] + [[]] * len(scalars), output_core_dims=[["noise_field"]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"noise_field": n_fields}},
        kwargs={"gain": gain, "defects": known}, keep_attrs=False)


def noise_dataset(ds: xr.Dataset, ctf: xr.Dataset, *, gain_estimate=None, defects=None,
                  prior: bool = False) -> xr.Dataset:
    """Each micrograph's noise variance per cause and counterfactual gains (lazy).

    Parameters
    ----------
    ds, ctf : xarray.Dataset
        The micrographs and their CTF variables.
    gain_estimate, defects : (y, x) arrays, optional
        From :func:`cryodask.clean.measure_defects`.
    prior : bool
        Fit dataset priors of the white noise level and the amount of ice
        (:func:`cryodask.prior.fit_prior`, computing a first pass now) and decompose each
        micrograph with its posterior values. The priors' centre, spread, iterations and
        final drift are in the attributes of ``prior_white`` and ``prior_ice_scale``.

    Returns
    -------
    xarray.Dataset
        ``noise_var_<cause>``, ``share_<cause>`` and ``gain_<cause>`` per micrograph, and
        ``band_share_<cause> (micrograph, band)`` over the bands of
        :data:`cryodask.causal.BANDS_A`, for the causes of
        :data:`cryodask.causal.NOISE_CAUSES` (NaN where there is no CTF).
    """
    from cryodask import progress
    from cryodask.causal import BANDS_A, NOISE_CAUSES
    from cryodask.prior import fit_prior

    gain = np.zeros(0) if gain_estimate is None else np.asarray(gain_estimate, np.float32)
    known = np.zeros(0) if defects is None else np.asarray(defects, np.uint8)
    n_micrographs = ds.sizes["micrograph"]
    unfixed = np.full(n_micrographs, np.nan)
    result = _noise_fields(ds, ctf, gain, known, unfixed, unfixed)
    n = len(NOISE_CAUSES)
    first_param = (2 + len(BANDS_A)) * n
    priors = {}
    if prior:
        (measured,) = progress.compute(result.isel(noise_field=slice(first_param, first_param + 4)))
        values = np.asarray(measured)
        fixed = []
        for j, name in enumerate(("white", "ice_scale")):
            estimates, errors = values[:, 2 * j], values[:, 2 * j + 1]
            if np.sum(np.isfinite(estimates) & (errors > 0)) >= 2:
                fit = fit_prior(estimates, errors)
                priors[name] = fit
                fixed.append(fit.values)
            else:
                fixed.append(unfixed)
        result = _noise_fields(ds, ctf, gain, known, *fixed)
    out = xr.Dataset()
    total = result.isel(noise_field=slice(0, n)).sum("noise_field")
    for i, cause in enumerate(NOISE_CAUSES):
        var = result.isel(noise_field=i, drop=True)
        out[f"noise_var_{cause}"] = var.astype(np.float32).assign_attrs(units="image units^2")
        out[f"share_{cause}"] = (var / total).astype(np.float32)
        out[f"gain_{cause}"] = result.isel(noise_field=n + i, drop=True).astype(np.float32).assign_attrs(
            meaning="predicted change in Wiener restoration quality with this cause at its ideal")
        first = 2 * n + i * len(BANDS_A)
        band = result.isel(noise_field=slice(first, first + len(BANDS_A))).rename(noise_field="band")
        out[f"band_share_{cause}"] = band.astype(np.float32)
    for j, name in enumerate(("white", "ice_scale")):
        out[f"measured_{name}"] = result.isel(noise_field=first_param + 2 * j, drop=True).astype(np.float32)
        fit = priors.get(name)
        if fit is not None:
            out[f"prior_{name}"] = xr.DataArray(fit.values.astype(np.float32), dims=("micrograph",)).assign_attrs(
                prior_mean=fit.mean, prior_spread=fit.spread, iterations=fit.iterations,
                drift_in_standard_errors=fit.drift, converged=int(fit.converged))
    return out.assign_coords(band=("band", [f"{lo:g}-{hi:g} Å" if hi else f"{lo:g} Å-Nyquist"
                                           for lo, hi in BANDS_A]))
