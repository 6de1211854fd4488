"""Kernels mapped over a store's micrographs with xarray and Dask. No physics lives here.

Every function takes a dataset (as :func:`cryodask.open_dataset` returns it) and returns
lazy variables; nothing is computed until the caller writes or computes them.
"""

from __future__ import annotations

import dataclasses
import os

import array_api_compat
import numpy as np
import xarray as xr

from cryodask import progress
from cryodask.ctf import CTFSearch, estimate_ctf
from cryodask.spectrum import power_spectrum

__all__ = [
    "CTF_VARIABLES",
    "check_image_chunks",
    "estimate_ctf_dataset",
    "image_statistics",
    "noise_dataset",
    "noise_measurements",
    "power_spectra",
    "regions_dataset",
    "restore_dataset",
    "restore_files",
    "score_dataset",
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


def _ctf_block(images, pixel, voltage, cs, ac, exclude, prior, *, search, clip_sigma, prior_window,
               transforms=None):
    """The CTF fits of a chunk of micrographs (rows of :data:`CTF_VARIABLES`); ``transforms``:
    each micrograph's :func:`cryodask.ctf.frame_transform` when the caller has them."""
    out = np.empty((images.shape[0], len(CTF_VARIABLES)), dtype=np.float64)
    for i in range(images.shape[0]):
        searched = search
        if np.isfinite(prior[i]) and prior[i] > 0:
            searched = dataclasses.replace(search, min_defocus_A=float(prior[i]) * (1.0 - prior_window),
                                           max_defocus_A=float(prior[i]) * (1.0 + prior_window))
        # Unreliable fits are recorded in ctf_reliable and reported by the caller.
        fit = estimate_ctf(images[i], pixel_size_A=float(pixel[i]), voltage_kV=float(voltage[i]),
                           cs_mm=float(cs[i]), amplitude_contrast=float(ac[i]), search=searched,
                           exclude=exclude[i] if exclude.ndim == 3 else None, clip_sigma=clip_sigma,
                           warn=False, transform=None if transforms is None else transforms[i])
        out[i] = [fit.defocus_u_A, fit.defocus_v_A, fit.defocus_angle_deg, fit.phase_shift_deg,
                  fit.cc, fit.fit_resolution_A, float(fit.reliable)]
    return out


def estimate_ctf_dataset(ds: xr.Dataset, *, search: CTFSearch = CTFSearch(),
                         exclude: xr.DataArray | None = None, clip_sigma: float | None = 6.0,
                         prior=None, prior_window: float = 0.25) -> xr.Dataset:
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
    prior : DataFrame, optional
        Earlier CTF results (:func:`cryodask.io.read_ctf_results`: RELION STAR, CTFFIND
        text, cryoSPARC ``.cs``), matched to the micrographs by file stem. A matched
        micrograph's mean defocus is searched within ``prior_window`` (a fraction) of the
        prior's instead of over ``search``'s range; the others keep that range.
    prior_window : float
        Half-width of the prior's window, as a fraction of its mean defocus, in (0, 1).

    Returns
    -------
    xarray.Dataset
        The variables of :data:`CTF_VARIABLES` along ``micrograph`` (``ctf_reliable`` is
        False where the spectrum shows no significant Thon rings).
    """
    if not 0.0 < prior_window < 1.0:
        raise ValueError(f"prior_window: expected a fraction in (0, 1), got {prior_window!r}")
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
    n = image.sizes["micrograph"]
    if prior is None:
        centre = np.full(n, np.nan)
    else:
        from cryodask.io.ctf_results import prior_defocus

        centre = prior_defocus([str(name) for name in ds["micrograph_name"].values], prior)
    n_prior = int(np.isfinite(centre).sum())
    centre = xr.DataArray(centre, dims=("micrograph",))
    centre = centre.chunk({"micrograph": chunks}) if chunks is not None else centre
    result = xr.apply_ufunc(
        _ctf_block, image, *scalars, exclude, centre,
        input_core_dims=[["y", "x"], [], [], [], [], exclude_dims, []],
        output_core_dims=[["ctf_field"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"ctf_field": len(CTF_VARIABLES)}},
        kwargs={"search": search, "clip_sigma": clip_sigma, "prior_window": prior_window},
        keep_attrs=False,
    )
    return _ctf_variables(result, search, None if prior is None else _prior_message(n_prior, n, prior_window))


def _ctf_variables(result: xr.DataArray, search: CTFSearch, prior_note: str | None) -> xr.Dataset:
    """The CTF variables from the fields of :func:`_ctf_block` (dimension ``ctf_field``)."""
    out = xr.Dataset()
    for i, (name, units) in enumerate(CTF_VARIABLES.items()):
        values = result.isel(ctf_field=i, drop=True)
        values = values.astype(bool) if name == "ctf_reliable" else values.astype(np.float32)
        out[name] = values.assign_attrs(units=units)
    out["ctf_fit_resolution_A"].attrs["fit_band_low_A"] = float(search.min_resolution_A)
    out.attrs["ctf_search"] = repr(search)
    if prior_note is not None:
        out.attrs["ctf_prior"] = prior_note
    return out


def _prior_message(n_prior, n, prior_window):
    return f"{n_prior} of {n} micrographs searched within {prior_window:.0%} of a prior mean defocus"


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


#: The restoration methods (:func:`restore_dataset`).
RESTORE_METHODS = ("wiener", "phaseflip")


def _check_restore_method(method) -> None:
    if method not in RESTORE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, RESTORE_METHODS))}, got {method!r}")


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
    _check_restore_method(method)
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


#: Shells of the particle spectrum (from 0 to the dataset's Nyquist frequency).
N_SHELLS = 96


def _n_noise_fields():
    from cryodask.causal import BANDS_A, NOISE_CAUSES

    # variance, gain and band shares per cause; white and ice_scale with their errors;
    # the expected quality, in all and up to the CTF fit's resolution; the scale and the
    # shells (power, CTF²) of the particle spectrum; the standard errors of the shares and
    # gains; the envelope B-factor with its error.
    return (2 + len(BANDS_A)) * len(NOISE_CAUSES) + 4 + 2 + 1 + 2 * N_SHELLS + 2 * len(NOISE_CAUSES) + 2


def _noise_block(images, u, v, angle, voltage, cs, ac, phase, pixel, resolution, dose, white, ice_scale,
                 gain, defects, shell_edges, particle_power, uncertainty=False):
    """The noise fields of a chunk: its measurements (:func:`_measure_noise_block`)
    explained at once (:func:`_explain_rows`), without dataset priors."""
    from cryodask.causal import measurement_length

    length = measurement_length(images.shape[1:], len(shell_edges) - 1)
    measured = _measure_noise_block(images, u, v, angle, voltage, cs, ac, phase, pixel, dose, gain, defects,
                                    shell_edges, length, uncertainty=uncertainty)
    ctf_rows = np.stack([u, v, angle, voltage, cs, ac, phase], axis=1)
    return _explain_rows(measured, ctf_rows, resolution, white, ice_scale, length, particle_power=particle_power,
                         uncertainty=uncertainty)


def _noise_row(found, errors, resolution):
    """One micrograph's noise fields (:func:`_n_noise_fields`) from its decomposition."""
    from cryodask.causal import NOISE_CAUSES

    return ([found.variance[c] for c in NOISE_CAUSES] + [found.gain[c] for c in NOISE_CAUSES]
            + [v for c in NOISE_CAUSES for v in found.band_shares[c]]
            + [*found.parameters["white"], *found.parameters["ice_scale"]]
            + [found.quality, found.quality_model(1.0 / resolution) if resolution > 0 else np.nan]
            + [found.scale] + list(found.shells.ravel()) + list(errors) + [*found.parameters["b_factor"]])


def _ctf_params(ctf_row):
    from cryodask.physics import CTFParams

    u, v, angle, voltage, cs, ac, phase = (float(x) for x in ctf_row)
    return CTFParams(defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=angle, voltage_kV=voltage, cs_mm=cs,
                     amplitude_contrast=ac, phase_shift_deg=phase)


def _measure_noise_block(images, u, v, angle, voltage, cs, ac, phase, pixel, dose, gain, defects, shell_edges,
                         length, uncertainty=False):
    """Each micrograph's :class:`cryodask.causal.NoiseMeasurement` as a vector (and its two
    halves' after it with ``uncertainty``): the one pass of the noise model that reads images."""
    from cryodask.causal import measure_noise

    parts = 3 if uncertainty else 1
    out = np.full((images.shape[0], parts * length), np.nan, dtype=np.float64)
    for i in range(images.shape[0]):
        if not np.isfinite(u[i]):
            continue
        params = _ctf_params((u[i], v[i], angle[i], voltage[i], cs[i], ac[i], phase[i]))

        def measure(rows):
            return measure_noise(images[i][rows], params, pixel_size_A=float(pixel[i]),
                                 # the whole gain itself: it keeps what it computed once
                                 gain_estimate=None if gain.ndim != 2 else gain if rows == slice(None) else gain[rows],
                                 defects=defects[rows] > 0 if defects.ndim == 2 else None,
                                 dose_e_per_A2=float(dose[i]), shell_edges=shell_edges).to_vector(length)

        half = images.shape[1] // 2
        rows = [slice(None), slice(0, half), slice(half, None)][:parts]
        out[i] = np.concatenate([measure(r) for r in rows])
    return out


def _explain_rows(measured, ctf_rows, resolution, white, ice_scale, length, particle_power=None,
                  uncertainty=False):
    """The noise fields of every micrograph from its measurement vectors (no images read)."""
    from cryodask.causal import NOISE_CAUSES, NoiseMeasurement, explain_noise

    out = np.full((measured.shape[0], _n_noise_fields()), np.nan, dtype=np.float64)
    for i in range(measured.shape[0]):
        if not np.isfinite(measured[i, 0]):  # not measured: no CTF
            continue
        params = _ctf_params(ctf_rows[i])
        fixed = {name: float(value[i]) for name, value in (("white", white), ("ice_scale", ice_scale))
                 if np.isfinite(value[i])}

        def explain(part):
            m = NoiseMeasurement.from_vector(measured[i, part * length:(part + 1) * length])
            return explain_noise(m, params, fixed=fixed, particle_power=particle_power)

        found = explain(0)
        errors = [np.nan] * (2 * len(NOISE_CAUSES))
        if uncertainty:
            # Two halves of the field measured alone: the whole's standard error is about
            # half their difference (spatial heterogeneity included).
            top, bottom = explain(1), explain(2)
            errors = ([abs(top.shares[c] - bottom.shares[c]) / 2 for c in NOISE_CAUSES]
                      + [abs(top.gain[c] - bottom.gain[c]) / 2 for c in NOISE_CAUSES])
        out[i] = _noise_row(found, errors, resolution[i])
    return out


def _information_resolution(ctf: xr.Dataset) -> xr.DataArray:
    """The resolution up to which the expected information is counted: the CTF fit's.
    Where no window of the fit band showed Thon rings (the fit resolution is NaN) but a
    defocus was fitted, the band's low edge: the fit established nothing finer, and the
    low frequencies below it carry most of a thin-ice, far-from-focus micrograph's
    contrast (bench_score's micrographs with a NaN fit resolution restored at 0.68-0.87)."""
    resolution = ctf["ctf_fit_resolution_A"]
    low = float(resolution.attrs.get("fit_band_low_A", CTFSearch().min_resolution_A))
    fitted = np.isfinite(ctf["defocus_u_A"]) & np.isfinite(ctf["defocus_v_A"])
    return resolution.where(np.isfinite(resolution) | ~fitted, low)


def _noise_fields(ds, ctf, gain, known, white, ice_scale, particle_power=None, uncertainty=False):
    image = ds["image"]
    check_image_chunks(image)
    chunks = image.chunks[0] if image.chunks is not None else None
    scalars = _noise_inputs(ds, ctf)
    scalars.insert(8, _information_resolution(ctf).astype(np.float64))
    scalars += [xr.DataArray(np.asarray(values, np.float64), dims=("micrograph",)) for values in (white, ice_scale)]
    if chunks is not None:
        scalars = [var.chunk({"micrograph": chunks}) for var in scalars]
    n_fields = _n_noise_fields()
    return xr.apply_ufunc(
        _noise_block, image, *scalars,
        input_core_dims=[["y", "x"]] + [[]] * len(scalars), output_core_dims=[["noise_field"]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"noise_field": n_fields}},
        kwargs={"gain": gain, "defects": known, "particle_power": particle_power, "uncertainty": uncertainty,
                "shell_edges": np.linspace(0.0, 0.5 / float(np.max(np.asarray(ds["pixel_size_A"]))), N_SHELLS + 1)},
        keep_attrs=False)


def _noise_inputs(ds, ctf):
    names = [("defocus_u_A", ctf), ("defocus_v_A", ctf), ("defocus_angle_deg", ctf),
             ("voltage_kV", ds), ("cs_mm", ds), ("amplitude_contrast", ds), ("phase_shift_deg", ctf),
             ("pixel_size_A", ds)]
    scalars = [source[name].astype(np.float64) for name, source in names]
    dose = ds["dose_e_per_A2"] if "dose_e_per_A2" in ds else xr.full_like(ds["pixel_size_A"], np.nan)
    return scalars + [dose.astype(np.float64)]


def _measure_noise_fields(ds, ctf, gain, known, length, uncertainty):
    image = ds["image"]
    check_image_chunks(image)
    chunks = image.chunks[0] if image.chunks is not None else None
    scalars = _noise_inputs(ds, ctf)
    if chunks is not None:
        scalars = [var.chunk({"micrograph": chunks}) for var in scalars]
    return xr.apply_ufunc(
        _measure_noise_block, image, *scalars,
        input_core_dims=[["y", "x"]] + [[]] * len(scalars), output_core_dims=[["measure_field"]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"measure_field": (3 if uncertainty else 1) * length}},
        kwargs={"gain": gain, "defects": known, "length": length, "uncertainty": uncertainty,
                "shell_edges": np.linspace(0.0, 0.5 / float(np.max(np.asarray(ds["pixel_size_A"]))), N_SHELLS + 1)},
        keep_attrs=False)


def noise_measurements(ds: xr.Dataset, ctf: xr.Dataset, *, gain_estimate=None, defects=None,
                       uncertainty: bool = False) -> xr.DataArray:
    """The noise model's pass over the images (lazy, one task per chunk of micrographs): each
    micrograph's :class:`cryodask.causal.NoiseMeasurement` as a vector, and with
    ``uncertainty`` those of its two halves after it. Give the computed result to
    :func:`noise_dataset` as ``measured``, e.g. after computing it together with other work
    on the same images, so that each micrograph is read once for both."""
    from cryodask.causal import measurement_length, smooth_gain_pattern

    gain = np.zeros(0) if gain_estimate is None else smooth_gain_pattern(gain_estimate)
    known = np.zeros(0) if defects is None else np.asarray(defects, np.uint8)
    length = measurement_length(ds["image"].shape[1:], N_SHELLS)
    return _measure_noise_fields(ds, ctf, gain, known, length, uncertainty).rename("noise_measurement")


def noise_dataset(ds: xr.Dataset, ctf: xr.Dataset, *, gain_estimate=None, defects=None,
                  prior: bool = False, uncertainty: bool = False, checkpoint=None,
                  measured=None) -> xr.Dataset:
    """Each micrograph's noise variance per cause and counterfactual gains (lazy).

    Parameters
    ----------
    ds, ctf : xarray.Dataset
        The micrographs and their CTF variables.
    gain_estimate, defects : (y, x) arrays, optional
        From :func:`cryodask.clean.measure_defects`; ``gain_estimate`` may be its whole
        :class:`cryodask.defects.DatasetDefects` (see :func:`cryodask.causal.smooth_gain_pattern`).
    prior : bool
        Learn from the whole dataset first (computing now the one pass that reads the
        images, :func:`cryodask.causal.measure_noise`; the rest works on what it measured):
        each micrograph decomposed alone gives the dataset priors of the white noise level
        and the amount of ice (:func:`cryodask.prior.fit_prior`; their centre, spread,
        iterations and final drift are in the attributes of ``prior_white`` and
        ``prior_ice_scale``), and the particles' power spectrum shared by the micrographs
        (:func:`cryodask.causal.particle_spectrum`, variable ``particle_spectrum``); then
        each is decomposed under them (:func:`cryodask.causal.explain_noise`). The result
        is then in memory, not lazy.
    uncertainty : bool
        Also decompose each half of every micrograph alone (twice the work) and give the
        standard errors ``share_<cause>_se`` and ``gain_<cause>_se``: half the difference of
        the halves, spatial heterogeneity (an ice gradient) included.
    checkpoint : cryodask.checkpoint.Checkpoint, optional
        Keeps the measurements (with ``prior``) per micrograph as they complete, and reads
        back those of an interrupted run.
    measured : (micrograph, field) array, optional
        The computed :func:`noise_measurements` (same ``uncertainty``), which then are not
        measured again; the result is then in memory, not lazy.

    Returns
    -------
    xarray.Dataset
        ``noise_var_<cause>``, ``share_<cause>`` and ``gain_<cause>`` per micrograph, and
        ``band_share_<cause> (micrograph, band)`` over the bands of
        :data:`cryodask.causal.BANDS_A`, for the causes of
        :data:`cryodask.causal.NOISE_CAUSES` (NaN where there is no CTF).
    """
    from cryodask import progress
    from cryodask.causal import BANDS_A, NOISE_CAUSES, particle_spectrum
    from cryodask.prior import fit_prior

    from cryodask.causal import smooth_gain_pattern

    # Smoothed once for the dataset, not once per micrograph.
    gain = np.zeros(0) if gain_estimate is None else smooth_gain_pattern(gain_estimate)
    known = np.zeros(0) if defects is None else np.asarray(defects, np.uint8)
    n_micrographs = ds.sizes["micrograph"]
    unfixed = np.full(n_micrographs, np.nan)
    n = len(NOISE_CAUSES)
    first_param = (2 + len(BANDS_A)) * n
    priors = {}
    spectrum = None
    first_shell = first_param + 7
    coords = {"micrograph": ds["micrograph"]} if "micrograph" in ds.coords else {}
    if not prior and measured is None:
        result = _noise_fields(ds, ctf, gain, known, unfixed, unfixed, uncertainty=uncertainty)
    else:
        # One pass reads the images; the decompositions, first alone and then under the
        # dataset's priors and particle spectrum, need only what it measured.
        from cryodask.causal import NoiseMeasurement, ice_on_shells, measurement_length

        length = measurement_length(ds["image"].shape[1:], N_SHELLS)
        if measured is None:
            lazy = _measure_noise_fields(ds, ctf, gain, known, length, uncertainty)
            if checkpoint is not None:
                measured = checkpoint.compute("noise_measurements", lazy)
            else:
                (measured,) = progress.compute(lazy)
        measured = np.asarray(measured)
        if measured.shape != (n_micrographs, (3 if uncertainty else 1) * length):
            raise ValueError(f"measured: expected shape {(n_micrographs, (3 if uncertainty else 1) * length)} "
                             f"(noise_measurements with uncertainty={uncertainty}), got {measured.shape}")
        inputs = [np.asarray(v) for v in _noise_inputs(ds, ctf)]
        ctf_rows = np.stack(inputs[:7], axis=1)
        resolution = np.asarray(_information_resolution(ctf), np.float64)
        alone = _explain_rows(measured, ctf_rows, resolution, unfixed, unfixed, length,
                              uncertainty=uncertainty and not prior)
    if not prior and measured is not None:
        result = xr.DataArray(alone, dims=("micrograph", "noise_field"), coords=coords)
    elif prior:
        values = alone[:, first_param:first_param + 4]
        shells = alone[:, first_shell:first_shell + 2 * N_SHELLS].reshape(n_micrographs, 2, N_SHELLS)
        edges = np.linspace(0.0, 0.5 / float(np.max(np.asarray(ds["pixel_size_A"]))), N_SHELLS + 1)
        centres = 0.5 * (edges[1:] + edges[:-1])
        ice = np.zeros((n_micrographs, N_SHELLS))
        for i in np.flatnonzero(np.isfinite(measured[:, 0])):
            ice[i] = ice_on_shells(NoiseMeasurement.from_vector(measured[i, :length]), centres, values[i, 2])
        spectrum, spectrum_error = particle_spectrum(shells[:, 0], shells[:, 1], alone[:, first_param + 6], ice=ice,
                                                     with_error=True)
        fixed = []
        for j, name in enumerate(("white", "ice_scale")):
            estimates, errors = values[:, 2 * j], values[:, 2 * j + 1]
            if np.sum(np.isfinite(estimates) & (errors > 0)) >= 2:
                fit = fit_prior(estimates, errors)
                priors[name] = fit
                fixed.append(fit.values)
            else:
                fixed.append(unfixed)
        rows = _explain_rows(measured, ctf_rows, resolution, *fixed, length,
                             particle_power=(centres, spectrum, spectrum_error),
                             uncertainty=uncertainty)
        result = xr.DataArray(rows, dims=("micrograph", "noise_field"), coords=coords)
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
        out[f"measured_{name}_error"] = result.isel(noise_field=first_param + 2 * j + 1,
                                                    drop=True).astype(np.float32)
        fit = priors.get(name)
        if fit is not None:
            out[f"prior_{name}"] = xr.DataArray(fit.values.astype(np.float32), dims=("micrograph",)).assign_attrs(
                prior_mean=fit.mean, prior_spread=fit.spread, iterations=fit.iterations,
                drift_in_standard_errors=fit.drift, converged=int(fit.converged))
    out["shell_scale"] = result.isel(noise_field=first_param + 6, drop=True)
    out["shell_power"] = result.isel(noise_field=slice(first_shell, first_shell + N_SHELLS)).rename(
        noise_field="shell_k")
    out["shell_ctf2"] = result.isel(noise_field=slice(first_shell + N_SHELLS, first_shell + 2 * N_SHELLS)).rename(
        noise_field="shell_k")
    if uncertainty:
        first_se = first_shell + 2 * N_SHELLS
        for i, cause in enumerate(NOISE_CAUSES):
            out[f"share_{cause}_se"] = result.isel(noise_field=first_se + i, drop=True).astype(np.float32)
            out[f"gain_{cause}_se"] = result.isel(noise_field=first_se + n + i, drop=True).astype(np.float32)
    edges = np.linspace(0.0, 0.5 / float(np.max(np.asarray(ds["pixel_size_A"]))), N_SHELLS + 1)
    out = out.assign_coords(shell_k=("shell_k", 0.5 * (edges[1:] + edges[:-1]), {"units": "1/Å"}))
    if spectrum is not None:
        # The motion and coherence nodes, measured against the dataset's particle spectrum.
        last = _n_noise_fields() - 2
        out["b_factor_relative_A2"] = result.isel(noise_field=last, drop=True).astype(np.float32).assign_attrs(
            units="Å²", meaning="envelope B-factor (motion and coherence) relative to the dataset's; "
                                "positive is blurrier (cryodask.causal.fit_envelope)")
        out["b_factor_relative_A2_error"] = result.isel(noise_field=last + 1, drop=True).astype(np.float32)
        out["particle_spectrum"] = ("shell_k", spectrum, {
            "meaning": "the particles' power shared by the dataset, per Fourier pixel, over the mean count squared"})
        out["particle_spectrum_error"] = ("shell_k", spectrum_error, {"meaning": "its standard error"})
    out["quality_predicted"] = result.isel(noise_field=first_param + 4, drop=True).astype(np.float32).assign_attrs(
        meaning="correlation with the CTF-free truth a Wiener restoration is expected to reach")
    out["quality_predicted_to_fit"] = result.isel(noise_field=first_param + 5, drop=True).astype(
        np.float32).assign_attrs(meaning="the same, restoring only up to the CTF fit's resolution (the fit "
                                         "band's low edge where no rings showed beyond it)")
    return out.assign_coords(band=("band", np.array([f"{lo:g}-{hi:g} Å" if hi else f"{lo:g} Å-Nyquist"
                                                     for lo, hi in BANDS_A], dtype=object)))


def _measure_block(raw, cleaned, exclude, u, v, angle, voltage, cs, ac, phase, pixel, *, search, defects,
                   descriptor_k):
    from cryodask.physics import CTFParams
    from cryodask.score import MEASUREMENTS, measure_micrograph

    n = len(MEASUREMENTS)
    out = np.full((raw.shape[0], n + len(descriptor_k)), np.nan)
    for i in range(raw.shape[0]):
        params = None
        if np.isfinite(u[i]):
            params = CTFParams(defocus_u_A=float(u[i]), defocus_v_A=float(v[i]),
                               defocus_angle_deg=float(angle[i]), voltage_kV=float(voltage[i]),
                               cs_mm=float(cs[i]), amplitude_contrast=float(ac[i]),
                               phase_shift_deg=float(phase[i]))
        found, descriptor = measure_micrograph(
            raw[i], cleaned[i], params, pixel_size_A=float(pixel[i]), search=search,
            exclude=exclude[i] if exclude.ndim == 3 else None,
            defects=defects if defects.ndim == 2 else None, descriptor_k=descriptor_k)
        out[i, :n] = [found[name] for name in MEASUREMENTS]
        out[i, n:] = descriptor
    return out


def score_measurements(raw: xr.Dataset, work: xr.Dataset, ctf: xr.Dataset, *, exclude=None,
                       search: CTFSearch = CTFSearch(), defects=None, descriptor_k=None) -> xr.Dataset:
    """The per-micrograph measurements of :func:`cryodask.score.measure_micrograph` (lazy).

    ``raw`` holds the images as recorded, ``work`` the same cleaned (or ``raw`` again).
    Returns the variables of :data:`cryodask.score.MEASUREMENTS` and ``descriptor
    (micrograph, descriptor_k)``.
    """
    from cryodask.score import MEASUREMENTS

    check_image_chunks(raw["image"])
    check_image_chunks(work["image"])
    chunks = work["image"].chunks[0] if work["image"].chunks is not None else None
    pixel = float(np.max(np.asarray(raw["pixel_size_A"])))
    if descriptor_k is None:
        descriptor_k = np.geomspace(1.0 / 100.0, 0.9 * 0.5 / pixel, 24)
    names = [("defocus_u_A", ctf), ("defocus_v_A", ctf), ("defocus_angle_deg", ctf),
             ("voltage_kV", raw), ("cs_mm", raw), ("amplitude_contrast", raw), ("phase_shift_deg", ctf),
             ("pixel_size_A", raw)]
    scalars = [source[name].astype(np.float64) for name, source in names]
    if exclude is None:
        exclude, exclude_dims = xr.zeros_like(scalars[0], dtype=bool), []
    else:
        exclude_dims = ["y", "x"]
    if chunks is not None:
        scalars = [var.chunk({"micrograph": chunks}) for var in scalars]
        exclude = exclude.chunk({"micrograph": chunks})
    known = np.zeros(0) if defects is None else np.asarray(defects, bool)
    n = len(MEASUREMENTS)
    result = xr.apply_ufunc(
        _measure_block, raw["image"], work["image"], exclude, *scalars,
        input_core_dims=[["y", "x"], ["y", "x"], exclude_dims] + [[]] * len(scalars),
        output_core_dims=[["measure_field"]], dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"measure_field": n + len(descriptor_k)}},
        kwargs={"search": search, "defects": known, "descriptor_k": np.asarray(descriptor_k)},
        keep_attrs=False)
    return _measurement_variables(result, descriptor_k)


def _measurement_variables(result: xr.DataArray, descriptor_k) -> xr.Dataset:
    """The variables of :func:`score_measurements` from the fields of :func:`_measure_block`
    (dimension ``measure_field``)."""
    from cryodask.score import MEASUREMENTS

    n = len(MEASUREMENTS)
    out = xr.Dataset({name: result.isel(measure_field=i, drop=True) for i, name in enumerate(MEASUREMENTS)})
    out["descriptor"] = result.isel(measure_field=slice(n, None)).rename(measure_field="descriptor_k").astype(
        np.float32)
    return out.assign_coords(descriptor_k=("descriptor_k", np.asarray(descriptor_k), {"units": "1/Å"}))


def _resumable_defects(ds, gain_reference, defects, checkpoint):
    from cryodask.clean import measure_defects
    from cryodask.defects import DatasetDefects

    if checkpoint is None:
        return measure_defects(ds, gain_reference=gain_reference, defects=defects)
    path = os.path.join(checkpoint.directory, "dataset_defects.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            found = DatasetDefects(defects=saved["defects"], gain=saved["gain"], raw_gain=saved["raw_gain"],
                                   n_micrographs=int(saved["n_micrographs"]),
                                   dead_rows=tuple(int(r) for r in saved["dead_rows"]),
                                   dead_columns=tuple(int(c) for c in saved["dead_columns"]),
                                   **{name: saved[name] for name in ("gain_pattern_power", "gain_error_power")
                                      if name in saved.files})
        checkpoint.resumed["dataset_defects"] = ds.sizes["micrograph"]
        if checkpoint.echo is not None:
            checkpoint.echo(f"dataset defects and gain read back from {path}")
        return found
    found = measure_defects(ds, gain_reference=gain_reference, defects=defects)
    tmp = path + ".partial.npz"
    np.savez(tmp, **dataclasses.asdict(found))
    os.replace(tmp, path)
    return found


def _write_restored(block, paths, pixels):
    """Write a chunk's restored micrographs (each under a temporary name, then renamed).

    A file there already is complete (renamed whole) and left alone: it was written by an
    earlier attempt of this task, computed again when a worker was lost (a worker over its
    memory limit is restarted, and its finished tasks rerun elsewhere).
    """
    from cryodask.io.export import _write_one

    written = 0
    for image, path, pixel in zip(block, paths, pixels):
        if not os.path.isfile(path):
            _write_one(path, image, float(pixel), "float32", False)
            written += 1
    return written


#: Micrographs per batch of :func:`score_dataset`'s second pass (whole chunks; at least one).
#: Built as separate kernels, that pass's graph held ~100 tasks, ~0.1 MB, per micrograph
#: once materialised, and built for the whole dataset it was what grew with the count
#: (256² micrographs on threads: 0.25 GB peak for 16, 0.31 GB for 512; in batches, 0.25
#: and 0.26 GB). Fused into one task per chunk it holds a few; the batches still bound
#: what is built and held at once.
SECOND_PASS_BATCH = 128


def second_pass_batches(ds: xr.Dataset, size: int | None = None) -> list:
    """``(start, stop)`` of the batches of micrographs the second pass computes in turn:
    whole chunks of ``image``, about ``size`` micrographs each (default: the Dask config key
    ``cryodask.second-pass-batch``, else :data:`SECOND_PASS_BATCH`)."""
    import dask

    n = ds.sizes["micrograph"]
    if size is None:
        size = dask.config.get("cryodask.second-pass-batch", SECOND_PASS_BATCH)
    return whole_chunks(ds["image"].chunks[0] if ds["image"].chunks is not None else (n,), size)


def whole_chunks(chunks, size: int) -> list:
    """``(start, stop)`` of consecutive groups of whole ``chunks`` (their lengths), each at
    least ``size`` long but the last."""
    size = int(size)
    if size < 1:
        raise ValueError(f"batch size: expected at least 1 micrograph, got {size}")
    bounds, start, stop = [], 0, 0
    for length in chunks:
        stop += length
        if stop - start >= size:
            bounds.append((start, stop))
            start = stop
    if stop > start or not bounds:
        bounds.append((start, stop))
    return bounds


#: The per-micrograph numbers each task of the second pass takes, in this order.
_PASS_SCALARS = ("index", "pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast", "dose_e_per_A2",
                 "prior_defocus_A")


def _pass_layout(clean: bool, n_descriptor: int, length: int) -> tuple[dict, int]:
    """Where each group of fields lies in a row of :func:`_second_pass_block`, and the row's
    length: the CTF (:data:`CTF_VARIABLES`), with cleaning the artifact counts and region
    fractions, the rule measurements with the descriptor (:func:`_measure_block`), the
    noise measurement (:func:`_measure_noise_block`)."""
    from cryodask.regions import REGION_CODES
    from cryodask.score import MEASUREMENTS

    sizes = {"ctf": len(CTF_VARIABLES), "extra": 3 + len(REGION_CODES) if clean else 0,
             "measure": len(MEASUREMENTS) + n_descriptor, "noise": length}
    layout, start = {}, 0
    for name, size in sizes.items():
        layout[name] = slice(start, start + size)
        start += size
    return layout, start


@dataclasses.dataclass(frozen=True)
class _PassConstants:
    """What every task of the second pass shares, as one object: the user's gain reference
    (None: none), the divisor (the dataset's gain estimate; None: none), the defects (uint8;
    empty: none) and the noise model's smoothed gain (:func:`cryodask.causal.smooth_gain_pattern`;
    empty: none). One object, pickled whole to worker processes: the smoothed gain is an
    array subclass whose rings the array serialiser of ``distributed`` would drop."""

    gain_reference: np.ndarray | None
    divisor: np.ndarray | None
    known: np.ndarray
    smoothed_gain: np.ndarray


def _second_pass_block(images, scalars, paths, constants: _PassConstants, *, clean, seed, restore_method,
                       search=None, prior_window=None, descriptor_k=(), shell_edges=None, length=0,
                       ctf_rows=None):
    """The second pass over one chunk of micrographs, in one task: each micrograph cleaned
    in memory (gain reference, gain estimate, impulses and defects), its regions, its CTF
    fit, the rules' measurements and the noise model's, and its restored file written (at
    ``paths``, when given, unless there already). Returns a row of fields per micrograph
    (:func:`_pass_layout`).

    The CTF reaches the later kernels rounded to float32, as the stored CTF variables are.
    With ``ctf_rows`` (defocus u, v, angle and phase shift per micrograph, already fitted)
    only the cleaning and the restoration run, and the rows have no fields.
    """
    from cryodask.artifacts import DEFECT, HOT_PIXEL, XRAY
    from cryodask.causal import measure_noise
    from cryodask.clean import clean_one
    from cryodask.ctf import frame_transform
    from cryodask.regions import CONTAMINATION, REGION_CODES, VACUUM, classify_regions
    from cryodask.restore import SpectralGrid, phase_flip, wiener_filter
    from cryodask.score import MEASUREMENTS, measure_micrograph

    layout, n_fields = _pass_layout(clean, len(descriptor_k), length) if ctf_rows is None else ({}, 0)
    out = np.full((images.shape[0], n_fields), np.nan)
    shape = images.shape[1:]
    gain_reference, divisor, known = constants.gain_reference, constants.divisor, constants.known
    defects = known > 0 if known.ndim == 2 else None
    smoothed = constants.smoothed_gain if constants.smoothed_gain.ndim == 2 else None
    restore = phase_flip if restore_method == "phaseflip" else wiener_filter
    for i in range(images.shape[0]):
        index, pixel, voltage, cs, ac, dose, centre = (scalars[i, j:j + 1] for j in range(len(_PASS_SCALARS)))
        image = images[i:i + 1]
        raw = image if gain_reference is None else image * gain_reference
        exclude = None
        if clean:
            # The gain reference is applied once, for the raw image and the cleaning alike.
            work, mask = clean_one(raw[0], None, divisor, defects, int(index[0]), seed=seed)
        else:
            work = raw[0]
        if ctf_rows is None:
            if clean:
                regions = classify_regions(work).mask  # regions_dataset's tiles
                exclude = np.isin(regions, (VACUUM, CONTAMINATION))
                out[i, layout["extra"]] = ([np.count_nonzero(mask == code) for code in (HOT_PIXEL, XRAY, DEFECT)]
                                           + [np.mean(regions == code) for code in REGION_CODES])
            left_out = np.zeros(1, bool) if exclude is None else exclude[None]
            # One transform for the CTF fit, the sector check and the refit of the rules.
            transform = frame_transform(work, exclude=exclude, clip_sigma=6.0)
            fit = _ctf_block(work[None], pixel, voltage, cs, ac, left_out, centre, search=search, clip_sigma=6.0,
                             prior_window=prior_window, transforms=[transform])[0]
            out[i, layout["ctf"]] = fit
            # The later kernels take the CTF as it is stored (float32).
            u, v, angle, phase = (float(np.float32(fit[j])) for j in range(4))
        else:
            u, v, angle, phase = (float(x) for x in ctf_rows[i, :4])
        params = grid = None
        if np.isfinite(u):
            params = _ctf_params((u, v, angle, voltage[0], cs[0], ac[0], phase))
            # One CTF grid and one set of the spectral fit's bins for the three fits below.
            grid = SpectralGrid(shape, params, float(pixel[0]))
        if ctf_rows is None:
            # The ΔRepro refit searches the whole range even where a prior confined the fit:
            # a prior that forced a fit shows as irreproducible.
            found, descriptor = measure_micrograph(raw[0], work, params, pixel_size_A=float(pixel[0]), search=search,
                                                   exclude=exclude, defects=defects, descriptor_k=descriptor_k,
                                                   grid=grid, transform=transform)
            del transform
            out[i, layout["measure"]] = [found[name] for name in MEASUREMENTS] + list(descriptor)
            if params is not None:
                out[i, layout["noise"]] = measure_noise(
                    raw[0], params, pixel_size_A=float(pixel[0]), gain_estimate=smoothed, defects=defects,
                    dose_e_per_A2=float(dose[0]), shell_edges=shell_edges, grid=grid).to_vector(length)
        if paths is not None and not os.path.isfile(paths[i]):
            # No CTF, no restoration: NaN says so rather than a guess.
            restored = (np.full(shape, np.nan, np.float32) if params is None
                        else restore(work, params, pixel_size_A=float(pixel[0]), grid=grid))
            _write_restored(restored[None], paths[i:i + 1], pixel)
    return out


def _second_pass(ds, first, scalars, shared, *, clean, seed, search, prior_window, descriptor_k, shell_edges,
                 length, checkpoint, paths, restore_method):
    """One batch of :func:`score_dataset`'s second pass (``ds`` holds its micrographs, the
    first being the dataset's ``first``), computed one task per chunk
    (:func:`_second_pass_block`): its fields (micrograph, pass_field). ``shared``: the
    :class:`_PassConstants` as one Delayed, one key for every task. Writes the restored
    files at ``paths`` (None: none)."""
    import dask
    import dask.array as da

    from cryodask.checkpoint import compute_by_chunk

    n_fields = _pass_layout(clean, len(descriptor_k), length)[1]
    image = ds["image"].data
    options = dict(clean=clean, seed=seed, search=search, prior_window=prior_window, descriptor_k=descriptor_k,
                   shell_edges=shell_edges, length=length, restore_method=restore_method)
    bounds = np.concatenate([[0], np.cumsum(image.chunks[0])]).astype(int)
    blocks = image.to_delayed().ravel()
    tasks = []
    for block, a, b in zip(blocks, bounds[:-1], bounds[1:]):
        task = dask.delayed(_second_pass_block, pure=True)(
            block, scalars[first + a:first + b], None if paths is None else paths[a:b], shared, **options)
        tasks.append(da.from_delayed(task, shape=(b - a, n_fields), dtype=np.float64))
    fields = xr.DataArray(da.concatenate(tasks), dims=("micrograph", "pass_field"),
                          coords={"micrograph": ds["micrograph"]} if "micrograph" in ds.coords else {})
    if checkpoint is not None:
        fields = checkpoint.compute("second_pass", fields, offset=first)
    else:
        fields = compute_by_chunk(fields)
    if paths is not None:
        # A chunk read back from the checkpoint wrote its files before it was saved; a file
        # missing since is restored again from the fitted CTF, without refitting.
        ctf_rows = np.asarray(fields)[:, :4].astype(np.float32).astype(np.float64)
        progress.compute_each(_restore_tasks(ds, first, scalars, shared, ctf_rows, paths, clean=clean, seed=seed,
                                             restore_method=restore_method))
    return fields


def _restore_tasks(ds, first, scalars, shared, ctf_rows, paths, **options) -> list:
    """One task per chunk of ``ds`` (the dataset's micrographs from ``first`` on) with a
    micrograph whose restored file is missing at ``paths``: cleans and restores them with
    their CTF (``ctf_rows``: defocus u, v, angle and phase shift; :func:`_second_pass_block`)."""
    import dask

    image = ds["image"].data
    bounds = np.concatenate([[0], np.cumsum(image.chunks[0])]).astype(int)
    missing = np.asarray([not os.path.isfile(path) for path in paths])
    return [dask.delayed(_second_pass_block, pure=False)(block, scalars[first + a:first + b], paths[a:b], shared,
                                                         ctf_rows=ctf_rows[a:b], **options)
            for block, a, b in zip(image.to_delayed().ravel(), bounds[:-1], bounds[1:]) if missing[a:b].any()]


def restore_files(ds: xr.Dataset, paths, *, method: str = "wiener", clean: bool = True, gain_reference=None,
                  defects=None) -> int:
    """Restore the micrographs of a scored dataset that have no file at their ``paths`` and
    write them there (computes): each cleaned as :func:`score_dataset` cleans it (after
    the dataset pass when ``clean``) and restored with its stored CTF, one task per chunk
    of micrographs, a batch at a time. Returns how many were written."""
    from cryodask.clean import MIN_DATASET_MICROGRAPHS, measure_defects

    _check_restore_method(method)
    paths = list(paths)
    todo = sum(not os.path.isfile(path) for path in paths)
    if todo == 0:
        return 0
    n = ds.sizes["micrograph"]
    measured = None
    if clean and n >= MIN_DATASET_MICROGRAPHS:
        measured = measure_defects(ds, gain_reference=gain_reference, defects=defects)
    known = defects if measured is None else measured.defects
    shared, scalars = _pass_inputs(ds, gain_reference, known, measured, clean, None)
    ctf_rows = np.stack([np.asarray(ds[name], np.float64) for name in
                         ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg")], axis=1)
    for a, b in second_pass_batches(ds):
        progress.compute_each(_restore_tasks(ds.isel(micrograph=slice(a, b)), a, scalars, shared, ctf_rows[a:b],
                                             paths[a:b], clean=clean, seed=0, restore_method=method))
    return todo


def _pass_inputs(ds, gain_reference, known, measured, clean, ctf_prior):
    """What every task of the second pass shares (:class:`_PassConstants`, one Delayed) and
    the per-micrograph numbers (:data:`_PASS_SCALARS`, one row each) for the whole dataset."""
    import dask

    from cryodask.causal import smooth_gain_pattern
    from cryodask.clean import MIN_GAIN_MICROGRAPHS

    n = ds.sizes["micrograph"]
    shape = (ds.sizes["y"], ds.sizes["x"])
    gain = None if gain_reference is None else np.asarray(gain_reference, np.float32)
    known = np.zeros(0, np.uint8) if known is None else np.asarray(known, np.uint8)
    for name, arr in (("gain_reference", gain), ("defects", known)):
        if arr is not None and arr.ndim == 2 and arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}; the micrographs are {shape}")
    # The gain estimate divides every micrograph of a dataset large enough to have one.
    applied = clean and measured is not None and n >= MIN_GAIN_MICROGRAPHS
    divisor = np.asarray(measured.gain, np.float32) if applied else None
    smoothed = np.zeros(0) if measured is None else smooth_gain_pattern(measured)
    shared = dask.delayed(_PassConstants(gain, divisor, known, smoothed), pure=True)
    if ctf_prior is None:
        centre = np.full(n, np.nan)
    else:
        from cryodask.io.ctf_results import prior_defocus

        centre = prior_defocus([str(name) for name in ds["micrograph_name"].values], ctf_prior)
    dose = np.asarray(ds["dose_e_per_A2"], np.float64) if "dose_e_per_A2" in ds else np.full(n, np.nan)
    columns = [np.arange(n, dtype=np.float64)] + [np.asarray(ds[name], np.float64) for name in _PASS_SCALARS[1:5]]
    scalars = np.stack(columns + [dose, np.asarray(centre, np.float64)], axis=1)
    return shared, scalars


def _pass_results(fields, ds, *, clean, search, descriptor_k, length):
    """The CTF (with the artifact counts and region fractions), the rule measurements and
    the noise measurement vectors from the second pass's fields."""
    from cryodask.regions import REGION_CODES

    layout, _ = _pass_layout(clean, len(descriptor_k), length)
    fields = xr.DataArray(np.asarray(fields), dims=("micrograph", "pass_field"),
                          coords={"micrograph": ds["micrograph"]} if "micrograph" in ds.coords else {})
    ctf = _ctf_variables(fields.isel(pass_field=layout["ctf"]).rename(pass_field="ctf_field"), search, None)
    if clean:
        extra = fields.isel(pass_field=layout["extra"])
        for j, name in enumerate(("n_hot_pixels", "n_xray_pixels", "n_defect_pixels")):
            ctf[name] = extra.isel(pass_field=j, drop=True).astype(np.int32)
        for j, name in enumerate(REGION_CODES.values()):
            ctf[f"region_fraction_{name}"] = extra.isel(pass_field=3 + j, drop=True).astype(np.float32)
    measurements = _measurement_variables(
        fields.isel(pass_field=layout["measure"]).rename(pass_field="measure_field"), descriptor_k)
    return ctf, measurements, np.asarray(fields.isel(pass_field=layout["noise"]))


def score_dataset(ds: xr.Dataset, *, search: CTFSearch = CTFSearch(), limits=None, weights=None,
                  gain_reference=None, defects=None, clean: bool = True, reference: dict | None = None,
                  particle_density_per_um2: float = 100.0, n_neighbours: int = 1, n_bootstrap: int = 32,
                  seed: int = 0, checkpoint=None, ctf_prior=None, prior_window: float = 0.25,
                  restore_to=None, restore_method: str = "wiener"):
    """Score every micrograph (computes: two passes over the dataset).

    Pass 1 finds the dataset's defects and gain (:func:`cryodask.clean.measure_defects`).
    Pass 2 reads each micrograph once and, in one task per chunk of micrographs, cleans it
    in memory, finds its regions, fits its CTF, measures what the rules need (as
    :func:`score_measurements`) and what the noise model needs (as
    :func:`noise_measurements`) and writes its restored file, a batch of micrographs at a
    time (:func:`second_pass_batches`). Then, without the images: the noise decomposed
    under the dataset's priors (:func:`noise_dataset`), the reductions -- novelty over a
    faiss index, the prior's bootstrap stability -- and V and HyperScore
    (:mod:`cryodask.score`).

    Parameters
    ----------
    ds : xarray.Dataset
    search : CTFSearch
    limits : cryodask.score.RuleLimits, optional
        Default: :class:`~cryodask.score.RuleLimits` with ``search``'s defocus range.
    weights : cryodask.score.ScoreWeights, optional
        Default: :func:`cryodask.score.default_weights`.
    gain_reference, defects : (y, x) arrays, optional
        A user's gain reference and known defects.
    clean : bool
        Correct artifacts and leave out excluded regions first (the default).
    reference : dict, optional
        A novelty library saved from an earlier run.
    particle_density_per_um2 : float
        Nominal particle density for ImpactFore when the dataset holds no picks.
    n_neighbours, n_bootstrap, seed : int
        Novelty's neighbours; the prior's bootstrap resamples and their seed.
    ctf_prior, prior_window :
        Earlier CTF results to search near (see :func:`estimate_ctf_dataset`).
    restore_to : path, optional
        Also restore each micrograph in the second pass (``restore_method``, see
        :func:`restore_dataset`) and write it to ``restore_to/<stem>.mrc`` (float32, under a
        temporary name until whole); micrographs with a file there already are left alone.
    checkpoint : cryodask.checkpoint.Checkpoint, optional
        Keeps each pass's per-micrograph results on disk as they complete; a run started
        again after an interruption reads them back instead of recomputing them (the
        dataset's defect statistics, one reduction, are kept once complete).

    Returns
    -------
    scores : xarray.Dataset
        Per micrograph: the CTF, noise and measurement variables, ``rule_<name>`` (1 pass,
        0 fail, NaN not applicable) and ``reason_<name>``, ``failed_rules``, ``logic``,
        ``novelty``, ``impact``, ``repro``, ``meta``, ``V``, ``hyperscore``, ``top_cause``,
        ``ice_thickness_A`` and ``pixel_size_estimate_A``.
    library : dict
        The novelty library of this dataset (see :func:`cryodask.score.novelty`).
    """
    from cryodask.causal import NOISE_CAUSES, dataset_quality, measured_spectrum, measurement_length
    from cryodask.clean import MIN_DATASET_MICROGRAPHS
    from cryodask.io.export import output_paths
    from cryodask.score import (COMPONENTS, ICE_MEAN_FREE_PATH_A, RULES, RuleLimits, combine, default_weights,
                                evaluate_rules, hyperscore, impact_forecast, logic_score, novelty,
                                prior_stability)

    if restore_to is not None:
        _check_restore_method(restore_method)
    limits = limits or RuleLimits.from_search(search)
    weights = weights or default_weights()
    n = ds.sizes["micrograph"]
    measured = None
    if clean and n >= MIN_DATASET_MICROGRAPHS:
        measured = _resumable_defects(ds, gain_reference, defects, checkpoint)
    known = defects if measured is None else measured.defects
    prior = n >= MIN_DATASET_MICROGRAPHS
    paths = None
    if restore_to is not None:
        os.makedirs(restore_to, exist_ok=True)
        paths = output_paths(ds, restore_to)  # checked across the whole dataset
    shared, scalars = _pass_inputs(ds, gain_reference, known, measured, clean, ctf_prior)
    finest = 0.5 / float(np.max(np.asarray(ds["pixel_size_A"])))
    options = dict(clean=clean, search=search, prior_window=prior_window, restore_method=restore_method,
                   seed=0,  # the fill noise's, as clean_dataset's default
                   descriptor_k=np.geomspace(1.0 / 100.0, 0.9 * finest, 24),
                   shell_edges=np.linspace(0.0, finest, N_SHELLS + 1),
                   length=measurement_length(ds["image"].shape[1:], N_SHELLS))
    # The second pass: one task per chunk of micrographs reads them, cleans them in memory,
    # fits their CTF, measures for the rules and the noise model and writes their restored
    # files; a batch of micrographs at a time, so that the results in flight stay bounded.
    parts = [_second_pass(ds.isel(micrograph=slice(a, b)), a, scalars, shared, checkpoint=checkpoint,
                          paths=None if paths is None else paths[a:b], **options)
             for a, b in second_pass_batches(ds)]
    fields = np.concatenate([np.asarray(part) for part in parts])
    ctf, measurements, vectors = _pass_results(fields, ds, clean=clean, search=search,
                                               descriptor_k=options["descriptor_k"], length=options["length"])
    if ctf_prior is not None:
        ctf.attrs["ctf_prior"] = _prior_message(int(np.isfinite(scalars[:, -1]).sum()), n, prior_window)
    noise = noise_dataset(ds, ctf, prior=prior, measured=vectors)  # from what was measured: no image read
    out = xr.merge([ctf, noise.drop_vars([v for v in noise.data_vars if v.startswith("band_share_")]),
                    measurements])
    shape = (ds.sizes["y"], ds.sizes["x"])
    pixel = np.asarray(ds["pixel_size_A"], np.float64)
    dose = (np.asarray(ds["dose_e_per_A2"], np.float64) if "dose_e_per_A2" in ds else np.full(n, np.nan))
    if clean:
        artifact_fraction = (np.asarray(ctf["n_hot_pixels"]) + np.asarray(ctf["n_xray_pixels"])) / float(
            shape[0] * shape[1])
        excluded = np.asarray(ctf["region_fraction_vacuum"]) + np.asarray(ctf["region_fraction_contamination"])
        usable = np.asarray(ctf["region_fraction_ice"]) * (1.0 - artifact_fraction)
    else:
        artifact_fraction = excluded = np.full(n, np.nan)
        usable = np.ones(n)
    rows = {name: np.asarray(out[name]) for name in out.data_vars if out[name].dims == ("micrograph",)}
    rule_values = {name: np.full(n, np.nan) for name in RULES}
    reasons = {name: [""] * n for name in RULES}
    logic = np.full(n, np.nan)
    failed = []
    for i in range(n):
        row = {name: values[i] for name, values in rows.items()}
        row.update(artifact_fraction=artifact_fraction[i], excluded_fraction=excluded[i])
        results = evaluate_rules(row, limits, pixel_size_A=float(pixel[i]), dose_e_per_A2=float(dose[i]))
        for name, (passed, reason) in results.items():
            rule_values[name][i] = np.nan if passed is None else float(passed)
            reasons[name][i] = reason
        logic[i] = logic_score(results)
        failed.append(";".join(name for name, (passed, _) in results.items() if passed is False))
    # Reductions over the dataset.
    shares = np.stack([np.asarray(out[f"share_{c}"]) for c in NOISE_CAUSES], axis=1)
    fractions = np.stack([np.asarray(ctf[name]) for name in ctf.data_vars if name.startswith("region_fraction_")],
                         axis=1) if clean else np.zeros((n, 0))
    mean_defocus = 0.5 * (np.asarray(ctf["defocus_u_A"]) + np.asarray(ctf["defocus_v_A"]))
    descriptors = np.concatenate([np.asarray(out["descriptor"], np.float64), shares, fractions,
                                  np.stack([mean_defocus / 1e4, np.asarray(ctf["ctf_fit_resolution_A"]) / 10.0],
                                           axis=1)], axis=1)
    novel, library = novelty(descriptors, k=n_neighbours, reference=reference)
    particles = None
    if "particle_micrograph" in ds:
        particles = np.bincount(np.asarray(ds["particle_micrograph"], np.int64), minlength=n)[:n]
    # The sample node across the dataset: each micrograph's expected restoration quality from
    # its shells and the particles' spectrum (its own fit's when the dataset is too small).
    power, ctf2 = np.asarray(out["shell_power"]), np.asarray(out["shell_ctf2"])
    scale, shell_k = np.asarray(out["shell_scale"]), np.asarray(out["shell_k"])
    quality = np.asarray(out["quality_predicted"])
    if "particle_spectrum" in out:
        spectrum = measured_spectrum(out["particle_spectrum"], out["particle_spectrum_error"])
        quality = dataset_quality(power, ctf2, scale, spectrum, shell_k)
    out["quality_expected"] = ("micrograph", quality, {
        "meaning": "expected correlation of the Wiener restoration with the CTF-free truth"})
    area = shape[0] * shape[1] * pixel**2
    # The information restored up to the CTF fit's resolution as the causal model predicts it
    # (its noise per cause, the dataset's particle spectrum): it ranked the true restored
    # quality better than the shells' prediction above (bench_score, Spearman 0.88 and 0.80
    # for ImpactFore alone on 64 unseen micrographs).
    impact = impact_forecast(usable, area, np.asarray(out["quality_predicted_to_fit"]), particles=particles,
                             density_per_um2=particle_density_per_um2)
    repro = 1.0 / (1.0 + np.clip(np.nan_to_num(np.asarray(out["deviance_excess"]), nan=1.0), 0.0, None) / 0.05
                   + np.nan_to_num(np.asarray(out["refit_defocus_change"]), nan=1.0) / 0.01)
    instability, drift = np.zeros(n), 0.0
    for name in ("white", "ice_scale"):
        unstable, moved = prior_stability(np.asarray(out[f"measured_{name}"]),
                                          np.asarray(out[f"measured_{name}_error"]), n_bootstrap=n_bootstrap,
                                          seed=seed)
        instability = np.fmax(instability, np.nan_to_num(unstable, nan=0.0))
        drift = max(drift, 0.0 if not np.isfinite(moved) else moved)
    meta = 1.0 / (1.0 + drift + instability)
    components = {"logic": logic, "novelty": novel, "impact": impact, "repro": repro, "meta": meta}
    v = combine(components, weights)
    gains = np.stack([np.asarray(out[f"gain_{c}"]) for c in NOISE_CAUSES if c != "dose"], axis=1)
    causes = [c for c in NOISE_CAUSES if c != "dose"]
    top = [causes[int(np.nanargmax(g))] if np.isfinite(g).any() else "" for g in gains]
    # Thickness from attenuation only where the pixels are electron counts and the dose is
    # consistent with them.
    counting = rule_values["dose_matches_metadata"] == 1
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(out["mean_counts"]) / (dose * pixel**2)
        thickness = np.where(counting & np.isfinite(ratio) & (ratio > 0),
                             ICE_MEAN_FREE_PATH_A * np.log(np.clip(1.0 / ratio, 1.0, None)), np.nan)
        ring_ok = np.asarray(out["ice_ring_significance"]) >= limits.min_ring_significance
        pixel_estimate = np.where(ring_ok, pixel / np.asarray(out["ice_ring_scale"]), np.nan)
    dims = ("micrograph",)
    for name in RULES:
        out[f"rule_{name}"] = (dims, rule_values[name], {"description": RULES[name]})
        out[f"reason_{name}"] = (dims, np.asarray(reasons[name], dtype=object))
    out["failed_rules"] = (dims, np.asarray(failed, dtype=object))
    for name, values in components.items():
        out[name] = (dims, np.asarray(values, np.float64))
    out["V"] = (dims, v, {"weights": repr(weights.w)})
    out["hyperscore"] = (dims, hyperscore(v, weights), {"beta": weights.beta, "gamma": weights.gamma,
                                                        "kappa": weights.kappa})
    out["top_cause"] = (dims, np.asarray(top, dtype=object))
    out["ice_thickness_A"] = (dims, thickness, {"units": "Å", "method": "attenuation of the counts (dose known), "
                                                "mean free path 3200 Å; NaN where the pixels are not counts"})
    out["pixel_size_estimate_A"] = (dims, pixel_estimate, {"units": "Å", "method": "ice ring at 3.66 Å"})
    if measured is not None:
        from cryodask.clean import MIN_GAIN_MICROGRAPHS

        out["defect_map"] = (("y", "x"), measured.defects.astype(np.uint8), {"codes": "1 defect"})
        out["gain_estimate"] = (("y", "x"), measured.gain.astype(np.float32),
                                {"applied": int(n >= MIN_GAIN_MICROGRAPHS)})
    out.attrs.update(components=", ".join(COMPONENTS), prior_drift=drift)
    return out, library
