"""CTF estimation from one micrograph: pure array kernels (NumPy, CuPy, array-API).

The method
----------
1. **Spectrum.** One real FFT of the whole micrograph; the power in the disc the fit needs
   is averaged in ``b x b`` blocks (a smoothed periodogram). ``b`` is chosen so that a Thon
   ring at the highest fitted frequency and the largest searched defocus still spans four
   bins, unless ``box_size`` fixes it (``b = n // box_size``, as a tile size would).
2. **Matched background filter.** The log-spectrum is ``background + r(k)·CTF²``; a linear
   filter ``F`` (subtract the polynomial fit, in ``k``, of the rotational average) removes
   the background. The *same* ``F`` is applied to every model ``CTF²`` before comparing, so
   nothing of the rings that ``F`` removes biases the fit. Shells are equalised by the RMS
   of the filtered data.
3. **Search.** A 1D search over mean defocus (and phase shift when asked) on the
   rotational average; 1D searches per angular sector give the astigmatism by a
   least-squares fit of ``df(alpha) = mean + a·cos 2alpha + b·sin 2alpha``; a Nelder-Mead
   refinement of ``(mean, a, b[, phase])`` maximises the normalised cross-correlation
   with the 2D spectrum.
4. **Fit resolution.** The highest frequency up to which the correlation between the
   filtered spectrum and the fitted ``CTF²`` stays significant (3 sigma) in shells one ring
   wide.

References
----------
Rohou & Grigorieff (2015), CTFFIND4. J. Struct. Biol. 192, 216-221.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from cryodask.backend import fft_module, namespace, to_numpy
from cryodask.physics import CTFParams, electron_wavelength_A

__all__ = [
    "CTFFit",
    "CTFFitWarning",
    "CTFSearch",
    "FitSpectrum",
    "FrameTransform",
    "SectorCheck",
    "check_sectors",
    "clip_outliers",
    "estimate_ctf",
    "fill_excluded",
    "fit_spectrum",
    "frame_transform",
]

_POLY_DEGREE = 6
_N_SECTORS = 6
#: Shells between these resolutions (Å) hold the amorphous-ice ring (3.66 Å).
_ICE_RING_BAND_A = (3.95, 3.4)


class CTFFitWarning(UserWarning):
    """The spectrum shows no significant Thon rings: the fit is not to be trusted."""


@dataclass(frozen=True)
class CTFSearch:
    """What to search, with CTFFIND's defaults: fit band 30-5 Å, defocus 0.3-5 µm.

    Attributes
    ----------
    min_resolution_A, max_resolution_A : float
        The fit band, low and high resolution limits in Å.
    min_defocus_A, max_defocus_A : float
        Mean-defocus search range in Å (positive = underfocus).
    max_astigmatism_A : float
        Largest ``defocus_u - defocus_v`` considered.
    fit_phase_shift : bool
        Also fit an additional phase shift (phase plate), in [0, 180) degrees.
    box_size : int or None
        Spectrum sampling as the equivalent tile size (the spectrum's bins are
        ``n // box_size`` FFT pixels wide); None chooses it from the search range.
    """

    min_resolution_A: float = 30.0
    max_resolution_A: float = 5.0
    min_defocus_A: float = 3000.0
    max_defocus_A: float = 50000.0
    max_astigmatism_A: float = 3000.0
    fit_phase_shift: bool = False
    box_size: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_resolution_A < self.min_resolution_A:
            raise ValueError("need 0 < max_resolution_A < min_resolution_A (Å), got "
                             f"{self.max_resolution_A!r} and {self.min_resolution_A!r}")
        if not 0 < self.min_defocus_A < self.max_defocus_A:
            raise ValueError("need 0 < min_defocus_A < max_defocus_A (Å), got "
                             f"{self.min_defocus_A!r} and {self.max_defocus_A!r}")
        if not self.max_astigmatism_A >= 0:
            raise ValueError(f"max_astigmatism_A must be >= 0, got {self.max_astigmatism_A!r}")
        if self.box_size is not None and self.box_size < 64:
            raise ValueError(f"box_size must be >= 64 or None, got {self.box_size!r}")


@dataclass(frozen=True)
class CTFFit:
    """The result of :func:`estimate_ctf` (RELION/CTFFIND conventions and units)."""

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float
    phase_shift_deg: float
    cc: float
    fit_resolution_A: float
    reliable: bool

    @property
    def mean_defocus_A(self) -> float:
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)


@dataclass
class FitSpectrum:
    """The binned, centred half-plane spectrum a fit used (for diagnostics and plots).

    ``power[i, j]`` is the mean power at frequencies ``(ky[i], kx[j])`` (1/Å); ``ky`` runs
    from negative to positive, ``kx`` from 0.
    """

    power: object
    ky: object
    kx: object
    pixel_size_A: float


def _bin_factor(n: int, pixel_size_A: float, search: CTFSearch, lam: float) -> int:
    if search.box_size is not None:
        return max(1, n // search.box_size)
    k_max = 1.0 / search.max_resolution_A
    dk_target = 1.0 / (3.0 * lam * (search.max_defocus_A + search.max_astigmatism_A) * k_max)
    return max(1, int(dk_target * n * pixel_size_A))


def clip_outliers(image, n_sigma: float = 6.0):
    """The image with pixels more than ``n_sigma`` robust standard deviations from the
    median set to the median (both tails: hot pixels and X-rays, dead lines and dropouts).

    Median and spread (1.4826 x the median absolute deviation) come from a regular sample
    of about 65,000 pixels. A guard for the power spectrum only, not an artifact correction.
    """
    xp = namespace(image)
    step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / 65536)))
    sample = xp.reshape(image[::step, ::step], (-1,))
    ordered = xp.sort(sample)
    median = float(ordered[ordered.shape[0] // 2])
    deviation = xp.sort(xp.abs(sample - median))
    sigma = 1.4826 * float(deviation[deviation.shape[0] // 2])
    if not sigma > 0:
        return image
    bad = (image > median + n_sigma * sigma) | (image < median - n_sigma * sigma)
    return xp.where(bad, xp.asarray(median, dtype=image.dtype), image)


def fill_excluded(image, exclude, *, sigma_px: float = 8.0):
    """Replace excluded pixels by the Gaussian-weighted mean of the included ones nearby.

    Where no included pixel is near, the global mean of the included pixels is used. The
    weighted means are computed on the image binned by ``sigma_px / 2`` (the Gaussian then
    ``2`` binned pixels wide) and read at each excluded pixel's bin: a fill is smooth on the
    scale of ``sigma_px`` whatever it is, and at 4096² binning makes it ~7x faster (the
    fill differs from the unbinned one by ~1 % of the counting noise; 0.05 against a
    spread of 4.5 counts at 20 counts a pixel).
    """
    import array_api_compat

    xp = namespace(image)
    if array_api_compat.is_cupy_array(image):
        import cupyx.scipy.ndimage as ndi
    else:
        import scipy.ndimage as ndi
    x = xp.astype(image, xp.float32)
    keep = xp.astype(~xp.astype(exclude, xp.bool), xp.float32)
    if keep.shape != x.shape:
        raise ValueError(f"exclude has shape {tuple(keep.shape)}, the image {tuple(x.shape)}")
    if float(xp.min(keep)) == 1.0:
        return x
    total = float(xp.sum(keep))
    if total == 0:
        raise ValueError("exclude covers the whole image: nothing is left to fit")
    weighted = x * keep
    mean = float(xp.sum(weighted)) / total
    ny, nx = x.shape
    b = max(1, min(int(sigma_px // 2), ny, nx))
    my, mx = ny // b, nx // b

    def binned(a):
        return xp.sum(xp.reshape(a[:my * b, :mx * b], (my, b, mx, b)), axis=(1, 3))

    num = ndi.gaussian_filter(binned(weighted), sigma_px / b)
    den = ndi.gaussian_filter(binned(keep), sigma_px / b)
    local = xp.where(den > 1e-3 * b * b, num / xp.clip(den, 1e-3, None), xp.asarray(mean, dtype=xp.float32))
    # Each pixel reads its bin (the last bin also serves the rows and columns past it).
    rows = xp.clip(xp.arange(ny) // b, 0, my - 1)
    cols = xp.clip(xp.arange(nx) // b, 0, mx - 1)
    local = xp.take(xp.take(xp.astype(local, xp.float32), rows, axis=0), cols, axis=1)
    return xp.where(keep > 0, x, local)


@dataclass(frozen=True)
class FrameTransform:
    """The ``rfftn`` of a micrograph as the CTF's spectra see it (:func:`frame_transform`):
    every spectrum of the micrograph, whatever the search's sampling, is binned from it,
    so one serves all its fits (``transform=`` of :func:`fit_spectrum`,
    :func:`estimate_ctf` and :func:`check_sectors`)."""

    f: object  # (ny, nx // 2 + 1) complex, in the image's array namespace
    shape: tuple
    clip_sigma: float | None

    def check(self, shape, clip_sigma):
        """The transform, when made for an image of ``shape`` with this outlier guard."""
        if tuple(shape) != self.shape or clip_sigma != self.clip_sigma:
            raise ValueError(f"the transform is of a {self.shape} image clipped at {self.clip_sigma} sigma; "
                             f"asked for a {tuple(shape)} image clipped at {clip_sigma} sigma")
        return self.f


def frame_transform(image, *, exclude=None, clip_sigma: float | None = 6.0) -> FrameTransform:
    """The micrograph's excluded pixels filled (:func:`fill_excluded`), its outliers
    clipped (:func:`clip_outliers`; ``clip_sigma`` None: not), and one ``rfftn``: what
    :func:`fit_spectrum` bins. A caller that fits one micrograph more than once makes it
    once and passes it on."""
    xp = namespace(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2D (y, x), got shape {tuple(image.shape)}")
    if exclude is not None:
        image = fill_excluded(image, exclude)
    image = xp.astype(image, xp.float32, copy=False)
    # Only the zero frequency depends on the image's mean, and the fit never uses it.
    if clip_sigma is not None:
        image = clip_outliers(image, clip_sigma)
    return FrameTransform(fft_module(image).rfftn(image, axes=(0, 1)), tuple(image.shape), clip_sigma)


def fit_spectrum(image, *, pixel_size_A: float, search: CTFSearch = CTFSearch(),
                 voltage_kV: float = 300.0, k_limit: float | None = None,
                 clip_sigma: float | None = 6.0, transform: FrameTransform | None = None) -> FitSpectrum:
    """The block-averaged power spectrum of a micrograph over the disc ``|k| <= k_limit``.

    One ``rfftn`` of the image; the power is computed only inside the disc's bounding box
    and averaged in blocks (see the module notes). Pixels further than ``clip_sigma``
    robust standard deviations from the median are first set to the median
    (:func:`clip_outliers`); ``None`` turns that off. ``transform``: the image's
    :func:`frame_transform` (made with the same ``clip_sigma``) when the caller has it.
    """
    xp = namespace(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2D (y, x), got shape {tuple(image.shape)}")
    ny, nx = image.shape
    nyquist = 0.5 / pixel_size_A
    if k_limit is None:
        k_limit = min(nyquist, 1.0 / search.max_resolution_A)
    k_limit = min(k_limit, nyquist)
    lam = electron_wavelength_A(voltage_kV)
    by = _bin_factor(ny, pixel_size_A, search, lam)
    bx = _bin_factor(nx, pixel_size_A, search, lam)
    if transform is None:
        transform = frame_transform(image, clip_sigma=clip_sigma)
    f = transform.check(image.shape, clip_sigma)
    my = min(int(math.ceil(k_limit * ny * pixel_size_A)) + by, ny // 2)
    mx = min(int(math.ceil(k_limit * nx * pixel_size_A)) + bx, nx // 2)
    ry = (2 * my // by) * by
    cx = ((mx + 1) // bx) * bx
    rows = xp.concat([f[ny - ry // 2 :, :cx], f[: ry - ry // 2, :cx]], axis=0)
    power = xp.real(rows) ** 2 + xp.imag(rows) ** 2
    power = xp.mean(xp.reshape(power, (ry // by, by, cx // bx, bx)), axis=(1, 3))
    fy = (np.arange(-(ry // 2), ry - ry // 2) / (ny * pixel_size_A)).reshape(-1, by).mean(1)
    fx = (np.arange(cx) / (nx * pixel_size_A)).reshape(-1, bx).mean(1)
    device = _device(f)
    ky = xp.asarray(fy.astype(np.float32).reshape(-1, 1), device=device)
    kx = xp.asarray(fx.astype(np.float32).reshape(1, -1), device=device)
    power = power / float(ny * nx)
    return FitSpectrum(power=power, ky=ky, kx=kx, pixel_size_A=pixel_size_A)


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


class _Shells:
    """Pixels of a spectrum annulus, their radial bins, and the matched filter on them."""

    def __init__(self, spec: FitSpectrum, k_lo: float, k_hi: float, n_bins: int):
        xp = namespace(spec.power)
        device = _device(spec.power)
        ky, kx = spec.ky, spec.kx
        k = xp.sqrt(ky * ky + kx * kx)
        keep = (k >= k_lo) & (k <= k_hi)
        # Each row of the half plane at kx = 0 repeats (-ky) = (ky): keep one of the pair.
        keep = keep & ((kx > 0) | (ky >= 0))
        self.xp = xp
        self.keep = keep
        self.k = k[keep]
        self.alpha = xp.atan2(ky + 0.0 * kx, kx + 0.0 * ky)[keep]
        self.cos2 = xp.cos(2.0 * self.alpha)
        self.sin2 = xp.sin(2.0 * self.alpha)
        self.k2 = self.k * self.k
        self.k4 = self.k2 * self.k2
        self.values = None
        edges = np.linspace(k_lo, k_hi, n_bins + 1)
        kk = to_numpy(self.k).astype(np.float64)
        index = np.clip(np.searchsorted(edges, kk, side="right") - 1, 0, n_bins - 1)
        order = np.argsort(index, kind="stable")
        counts = np.bincount(index, minlength=n_bins)
        nonempty = counts > 0
        self.n_bins = int(nonempty.sum())
        remap = np.cumsum(nonempty) - 1
        index = remap[index]
        counts = counts[nonempty]
        self.k_bins = (np.bincount(index, weights=kk, minlength=self.n_bins) / counts)
        self.counts = counts
        self.order = xp.asarray(order, device=device)
        self.index = xp.asarray(index, device=device)
        self.bounds = xp.asarray(np.concatenate([[0], np.cumsum(counts)]) .astype(np.int64), device=device)
        projector = _projector(self.k_bins, counts)
        self.projector_np = projector
        self.projector = xp.asarray(np.ascontiguousarray(projector.T, dtype=np.float32), device=device)
        self.counts_dev = xp.asarray(counts.astype(np.float32), device=device)

    def select(self, array2d):
        """The annulus' pixels of a 2D array on the spectrum's grid, flattened."""
        return array2d[self.keep]

    def radial_mean(self, v):
        xp = self.xp
        sorted_v = xp.take(v, self.order, axis=-1)
        c = xp.cumulative_sum(sorted_v, axis=-1, include_initial=True)
        sums = xp.take(c, self.bounds[1:], axis=-1) - xp.take(c, self.bounds[:-1], axis=-1)
        return sums / self.counts_dev

    def filter(self, v):
        """Subtract the polynomial fit of the rotational average (the matched filter)."""
        xp = self.xp
        background = xp.matmul(self.radial_mean(v), self.projector)  # projector is symmetric in W
        return v - xp.take(background, self.index, axis=-1)


def _ctf2(shells, mean, a, b, phase_deg, lam, cs_A, w):
    """CTF^2 on the annulus' pixels; ``df(alpha) = mean + a·cos 2alpha + b·sin 2alpha``."""
    xp = shells.xp
    df = mean + a * shells.cos2 + b * shells.sin2
    chi = (math.pi * lam) * df * shells.k2 - (0.5 * math.pi * cs_A * lam**3) * shells.k4
    s = xp.sin(chi + (math.radians(phase_deg) + w))
    return s * s


def _ctf2_profiles(k_bins, defoci, phases, lam, cs_A, w):
    """CTF^2 on radial bins for every (defocus, phase) pair: shape (n_df, n_phase, n_bins)."""
    k2 = k_bins[None, None, :] ** 2
    chi = (np.pi * lam * defoci[:, None, None] * k2 - 0.5 * np.pi * cs_A * lam**3 * k2**2
           + np.radians(phases)[None, :, None] + w)
    return np.sin(chi) ** 2


def _ncc_1d(profile, weights, models, projector):
    """NCC between a filtered, weighted 1D profile and each filtered model row."""
    filtered = models - models @ projector.T
    data = (profile - projector @ profile) * weights
    num = filtered @ (data * weights)
    den = np.sqrt((filtered**2 @ (weights**2)) * float(data @ data)) + 1e-30
    return num / den


def estimate_ctf(image, *, pixel_size_A: float, voltage_kV: float = 300.0, cs_mm: float = 2.7,
                 amplitude_contrast: float = 0.07, search: CTFSearch = CTFSearch(),
                 clip_sigma: float | None = 6.0, exclude=None, warn: bool = True,
                 return_spectrum: bool = False, transform: FrameTransform | None = None):
    """Estimate the CTF of one micrograph.

    Parameters
    ----------
    image : (ny, nx) array
        The micrograph (NumPy, CuPy or any array-API array), any real dtype.
    pixel_size_A, voltage_kV, cs_mm, amplitude_contrast : float
        Acquisition parameters.
    search : CTFSearch
        Fit band and search ranges.
    clip_sigma : float or None
        Outlier guard before the FFT (see :func:`clip_outliers`); None turns it off.
    exclude : (ny, nx) bool array, optional
        Pixels to leave out of the spectrum (vacuum, contamination...): they are replaced
        by the smoothed level of the pixels around them, so they add no structure and no
        sharp edge. Shells near the amorphous-ice ring (3.4-3.95 Å) always get no weight.
    warn : bool
        Warn (:class:`CTFFitWarning`) when the fit is unreliable; batch callers that record
        ``reliable`` turn it off (warning filters are not thread-safe).
    return_spectrum : bool
        Also return the :class:`FitSpectrum` the fit used.
    transform : FrameTransform, optional
        The image's :func:`frame_transform` (same ``exclude`` and ``clip_sigma``), when the
        caller has it: fits of one micrograph under other searches share it.

    Returns
    -------
    CTFFit (and FitSpectrum)
        ``defocus_u_A >= defocus_v_A``, the angle in [0, 180) from +x towards +y, the
        normalised cross-correlation ``cc`` in the fit band and the fit resolution in Å.

    Warns
    -----
    CTFFitWarning
        When the spectrum shows no significant Thon rings; ``reliable`` is then False.

    Notes
    -----
    See the module notes for the method. The score is the normalised cross-correlation
    ``sum(D·M) / sqrt(sum(D²)·sum(M²))`` between the filtered, shell-equalised
    log-spectrum ``D`` and the filtered model ``M = F(CTF²)``.
    """
    xp = namespace(image)
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be > 0, got {pixel_size_A!r}")
    lam = electron_wavelength_A(voltage_kV)
    cs_A = cs_mm * 1e7
    w = math.asin(amplitude_contrast)
    nyquist = 0.5 / pixel_size_A
    k_lo = 1.0 / search.min_resolution_A
    k_hi = min(1.0 / search.max_resolution_A, 0.98 * nyquist)
    if k_hi <= k_lo * 1.5:
        raise ValueError(f"the fit band {search.min_resolution_A}-{search.max_resolution_A} Å does not "
                         f"fit below Nyquist ({2 * pixel_size_A:.2f} Å) at {pixel_size_A} Å/pixel")
    k_res = min(0.98 * nyquist, max(k_hi, 1.0 / 3.0))
    if transform is None:
        transform = frame_transform(image, exclude=exclude, clip_sigma=clip_sigma)
    spec = fit_spectrum(image, pixel_size_A=pixel_size_A, search=search, voltage_kV=voltage_kV,
                        k_limit=k_res, clip_sigma=clip_sigma, transform=transform)
    if not float(xp.max(spec.power)) > 0:
        return _unreliable(search, "the image has no variance", return_spectrum, spec, warn)
    log_power = xp.log(spec.power + 1e-6 * xp.mean(spec.power))
    dk = float(to_numpy(spec.kx[0, 1] - spec.kx[0, 0])) if spec.kx.shape[1] > 1 else k_hi
    n_bins = max(8, int((k_hi - k_lo) / dk))
    shells = _Shells(spec, k_lo, k_hi, n_bins)
    data = shells.select(log_power)
    fdata = shells.filter(data)
    rms = to_numpy(xp.sqrt(shells.radial_mean(fdata * fdata))).astype(np.float64)
    rms = _smooth(rms, 3.0)
    empty = not np.all(np.isfinite(rms)) or rms.max() <= 0
    weights = 1.0 / np.maximum(rms, 1e-12 * max(rms.max(), 1e-30))
    # The amorphous-ice ring is no Thon ring: its shells get no say in the fit.
    weights[(shells.k_bins > 1.0 / _ICE_RING_BAND_A[0]) & (shells.k_bins < 1.0 / _ICE_RING_BAND_A[1])] = 0.0
    wdata = fdata * xp.take(xp.asarray(weights.astype(np.float32), device=_device(fdata)),
                            shells.index, axis=0)
    wnorm = float(xp.sum(wdata * wdata))
    n_pix = int(shells.counts.sum())

    def score(mean, a, b, phase):
        m = shells.filter(_ctf2(shells, mean, a, b, phase, lam, cs_A, w))
        return float(xp.sum(wdata * m)) / (math.sqrt(wnorm * float(xp.sum(m * m))) + 1e-30)

    if empty or wnorm == 0:
        return _unreliable(search, "the image has no variance", return_spectrum, spec, warn)

    # 1. Mean defocus (and phase) from the rotational average.
    profile = to_numpy(shells.radial_mean(data)).astype(np.float64)
    step = 1.0 / (8.0 * lam * k_hi**2)
    defoci = np.arange(search.min_defocus_A, search.max_defocus_A + step, step)
    phases = np.arange(0.0, 180.0, 10.0) if search.fit_phase_shift else np.zeros(1)
    models = _ctf2_profiles(shells.k_bins, defoci, phases, lam, cs_A, w)
    ncc = _ncc_1d(profile, weights, models.reshape(-1, shells.n_bins), shells.projector_np)
    best = int(np.argmax(ncc))
    mean0, phase0 = defoci[best // len(phases)], phases[best % len(phases)]

    # 2. Astigmatism from sector profiles.
    a0, b0 = _sector_astigmatism(shells, data, weights, mean0, phase0, search, lam, cs_A, w, step)

    # 3. Refine in 2D.
    def cost(p):
        p = [float(v) for v in p]
        return -score(p[0], p[1], p[2], p[3] if search.fit_phase_shift else float(phase0))

    x0 = [mean0, a0, b0] + ([phase0] if search.fit_phase_shift else [])
    simplex_step = [2 * step, step + 50, step + 50] + ([10.0] if search.fit_phase_shift else [])
    simplex = np.array([x0] + [np.add(x0, np.eye(len(x0))[i] * simplex_step[i]) for i in range(len(x0))])
    res = minimize(cost, x0, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "xatol": 2.0, "fatol": 1e-6, "maxfev": 400})
    best_x, best_f = res.x, res.fun
    mean, a, b = (float(v) for v in best_x[:3])
    phase = float(best_x[3]) % 180.0 if search.fit_phase_shift else float(phase0)
    half = math.hypot(a, b)
    angle = (0.5 * math.degrees(math.atan2(b, a))) % 180.0
    cc = -best_f

    resolution, significant = _fit_resolution(spec, log_power, (mean, a, b, phase), lam, cs_A, w,
                                              k_lo, k_hi)
    params = CTFParams(defocus_u_A=mean + half, defocus_v_A=mean - half, defocus_angle_deg=angle,
                       voltage_kV=voltage_kV, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                       phase_shift_deg=phase)
    threshold = 5.0 / math.sqrt(max(n_pix, 1))
    # The optimiser may leave the searched astigmatism; such a fit is reported, not clamped,
    # and is not to be trusted.
    inside = 2.0 * half <= 1.5 * search.max_astigmatism_A and search.min_defocus_A <= mean <= search.max_defocus_A
    reliable = bool(cc > threshold and significant and inside)
    if not reliable and warn:
        why = (f"no significant Thon rings (cc {cc:.3f}, threshold {threshold:.3f})" if inside else
               f"the fit left the search range (mean defocus {mean:.0f} Å, astigmatism {2 * half:.0f} Å)")
        warnings.warn(f"{why}: the CTF fit is not reliable", CTFFitWarning, stacklevel=2)
    fit = CTFFit(defocus_u_A=params.defocus_u_A, defocus_v_A=params.defocus_v_A,
                 defocus_angle_deg=params.defocus_angle_deg, phase_shift_deg=phase, cc=float(cc),
                 fit_resolution_A=resolution, reliable=reliable)
    return (fit, spec) if return_spectrum else fit


def _smooth(values: np.ndarray, sigma_bins: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(values, sigma_bins, mode="nearest")


def _projector(k_bins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    x = (k_bins - k_bins.mean()) / max(np.ptp(k_bins), 1e-12) * 2.0
    basis = np.polynomial.legendre.legvander(x, min(_POLY_DEGREE, max(len(k_bins) - 2, 0)))
    w = counts.astype(np.float64)
    gram = basis.T @ (basis * w[:, None])
    return basis @ np.linalg.lstsq(gram, (basis * w[:, None]).T, rcond=None)[0]


def _sector_astigmatism(shells, data, weights, mean0, phase0, search, lam, cs_A, w, step):
    """Astigmatism ``(a, b)`` from 1D defocus searches in angular sectors."""
    if search.max_astigmatism_A <= 0:
        return 0.0, 0.0
    values = to_numpy(data).astype(np.float64)
    alpha = to_numpy(shells.alpha).astype(np.float64) % np.pi
    index = to_numpy(shells.index)
    sector = np.minimum((alpha / np.pi * _N_SECTORS).astype(int), _N_SECTORS - 1)
    half = 0.6 * search.max_astigmatism_A
    defoci = np.arange(max(search.min_defocus_A * 0.5, mean0 - half), mean0 + half + step, step / 2)
    models = _ctf2_profiles(shells.k_bins, defoci, np.array([phase0]), lam, cs_A, w)[:, 0, :]
    rows, targets, weights_fit = [], [], []
    for s in range(_N_SECTORS):
        sel = sector == s
        counts = np.bincount(index[sel], minlength=shells.n_bins)
        ok = counts > 0
        if ok.sum() < 10:
            continue
        profile = np.bincount(index[sel], weights=values[sel], minlength=shells.n_bins)[ok] / counts[ok]
        projector = _projector(shells.k_bins[ok], counts[ok])
        ncc = _ncc_1d(profile, weights[ok], models[:, ok], projector)
        best = int(np.argmax(ncc))
        centre = (s + 0.5) * np.pi / _N_SECTORS
        rows.append([1.0, np.cos(2 * centre), np.sin(2 * centre)])
        targets.append(defoci[best])
        weights_fit.append(max(float(ncc[best]), 1e-3))
    if len(rows) < 3:
        return 0.0, 0.0
    wts = np.sqrt(np.asarray(weights_fit))
    coef = np.linalg.lstsq(np.asarray(rows) * wts[:, None], np.asarray(targets) * wts, rcond=None)[0]
    # A sector averages df over its width: the cos/sin amplitudes shrink by sinc(width).
    width = np.pi / _N_SECTORS
    shrink = np.sin(width) / width
    return float(coef[1] / shrink), float(coef[2] / shrink)


def _fit_resolution(spec, log_power, params, lam, cs_A, w, k_lo, k_hi):
    """Highest frequency up to which the fitted CTF^2 correlates significantly (3 sigma),
    and whether any window shows rings at 4 sigma."""
    mean, a, b, phase = params
    xp = namespace(log_power)
    k_max = float(to_numpy(xp.max(xp.sqrt(spec.ky**2 + 0.0 * spec.kx) + 0.0 * spec.kx)))
    k_max = min(k_max, float(to_numpy(xp.max(spec.kx))), 0.5 / spec.pixel_size_A)
    dk = float(to_numpy(spec.kx[0, 1] - spec.kx[0, 0]))
    n_bins = max(8, int((k_max - k_lo) / dk))
    shells = _Shells(spec, k_lo, k_max, n_bins)
    d = shells.filter(shells.select(log_power))
    m = shells.filter(_ctf2(shells, mean, a, b, phase, lam, cs_A, w))
    counts = shells.counts.astype(np.float64)
    sdm = to_numpy(shells.radial_mean(d * m)).astype(np.float64) * counts
    sdd = to_numpy(shells.radial_mean(d * d)).astype(np.float64) * counts
    smm = to_numpy(shells.radial_mean(m * m)).astype(np.float64) * counts
    k_bins = shells.k_bins
    resolution = float("nan")
    significant = False
    failures = 0
    i = 0
    while i < len(k_bins):
        k = k_bins[i]
        slope = abs(lam * mean * k - cs_A * lam**3 * k**3)
        width = 2.0 / (2.0 * max(slope, 1e-9))  # two ring periods
        j = max(i + 3, int(np.searchsorted(k_bins, k + width)))
        j = min(j, len(k_bins))
        n = counts[i:j].sum()
        corr = sdm[i:j].sum() / (math.sqrt(sdd[i:j].sum() * smm[i:j].sum()) + 1e-30)
        if corr > 3.0 / math.sqrt(max(n, 1.0)):
            resolution = 1.0 / k_bins[j - 1]
            # Rings exist when a window passes 4 sigma (over ~50 windows, noise alone does
            # so about once in 600 micrographs).
            significant = significant or corr > 4.0 / math.sqrt(max(n, 1.0))
            failures = 0
        elif significant:
            # Weak low-resolution shells (thin ice, few rings) do not end the scan; two
            # failing windows after the rings have shown do.
            failures += 1
            if failures >= 2:
                break
        i = j
    return resolution, significant


def _unreliable(search: CTFSearch, why: str, return_spectrum: bool, spec, warn: bool = True):
    if warn:
        warnings.warn(f"no CTF fit: {why}", CTFFitWarning, stacklevel=3)
    nan = float("nan")
    fit = CTFFit(defocus_u_A=nan, defocus_v_A=nan, defocus_angle_deg=nan, phase_shift_deg=nan,
                 cc=0.0, fit_resolution_A=nan, reliable=False)
    return (fit, spec) if return_spectrum else fit


@dataclass(frozen=True)
class SectorCheck:
    """Thon rings sector by sector against one CTF (:func:`check_sectors`).

    Arrays have one entry per angular sector; ``centres_deg`` from +x towards +y.
    """

    centres_deg: np.ndarray
    cc: np.ndarray  # correlation of the sector's filtered spectrum with the CTF's
    threshold: np.ndarray  # 4 / sqrt(pixels in the sector): rings are significant above it
    n_pixels: np.ndarray  # spectrum pixels in each sector (the standard error of cc is 1/sqrt(n))
    defocus_A: np.ndarray  # the sector's own best defocus (1D search)
    model_defocus_A: np.ndarray  # the CTF's defocus averaged over the sector
    tolerance_A: float  # how far the two may differ for the rings to agree

    @property
    def significant(self) -> np.ndarray:
        return self.cc > self.threshold

    @property
    def agrees(self) -> np.ndarray:
        return np.abs(self.defocus_A - self.model_defocus_A) <= self.tolerance_A


def check_sectors(image, params: CTFParams, *, pixel_size_A: float, search: CTFSearch = CTFSearch(),
                  exclude=None, clip_sigma: float | None = 6.0, n_sectors: int = _N_SECTORS,
                  tolerance: float = 0.03, transform: FrameTransform | None = None) -> SectorCheck:
    """Whether the Thon rings of every angular sector agree with one CTF.

    The spectrum (as :func:`estimate_ctf` sees it) is split into ``n_sectors`` sectors over
    180°; in each, the correlation of its filtered log-spectrum with the CTF's filtered
    CTF² over the fit band says whether its rings are there (directional drift or a
    wrong astigmatism leave sectors without them), and a 1D defocus search says where its
    zeros are, to be compared with the CTF's defocus in that direction.

    Parameters
    ----------
    image : (ny, nx) array
    params : CTFParams
    pixel_size_A : float
    search : CTFSearch
        The fit band and spectrum sampling.
    exclude : (ny, nx) bool array, optional
    clip_sigma : float or None
    n_sectors : int
    tolerance : float
        Allowed defocus disagreement as a fraction of the mean defocus (at least 1.5 steps
        of the search grid).
    transform : FrameTransform, optional
        The image's :func:`frame_transform` (same ``exclude`` and ``clip_sigma``), when the
        caller has it.
    """
    if n_sectors < 3:
        raise ValueError(f"n_sectors must be >= 3, got {n_sectors!r}")
    xp = namespace(image)
    lam = electron_wavelength_A(params.voltage_kV)
    cs_A = params.cs_mm * 1e7
    w = math.asin(params.amplitude_contrast)
    nyquist = 0.5 / pixel_size_A
    k_lo = 1.0 / search.min_resolution_A
    k_hi = min(1.0 / search.max_resolution_A, 0.98 * nyquist)
    if transform is None:
        transform = frame_transform(image, exclude=exclude, clip_sigma=clip_sigma)
    spec = fit_spectrum(image, pixel_size_A=pixel_size_A, search=search, voltage_kV=params.voltage_kV,
                        k_limit=k_hi, clip_sigma=clip_sigma, transform=transform)
    log_power = xp.log(spec.power + 1e-6 * xp.mean(spec.power))
    dk = float(to_numpy(spec.kx[0, 1] - spec.kx[0, 0])) if spec.kx.shape[1] > 1 else k_hi
    shells = _Shells(spec, k_lo, k_hi, max(8, int((k_hi - k_lo) / dk)))
    data = shells.select(log_power)
    fdata = shells.filter(data)
    rms = _smooth(to_numpy(xp.sqrt(shells.radial_mean(fdata * fdata))).astype(np.float64), 3.0)
    weights = 1.0 / np.maximum(rms, 1e-12 * max(float(rms.max()), 1e-30))
    weights[(shells.k_bins > 1.0 / _ICE_RING_BAND_A[0]) & (shells.k_bins < 1.0 / _ICE_RING_BAND_A[1])] = 0.0
    mean = 0.5 * (params.defocus_u_A + params.defocus_v_A)
    half = 0.5 * (params.defocus_u_A - params.defocus_v_A)
    theta = math.radians(params.defocus_angle_deg)
    model = shells.filter(_ctf2(shells, mean, half * math.cos(2 * theta), half * math.sin(2 * theta),
                                params.phase_shift_deg, lam, cs_A, w))
    index = to_numpy(shells.index)
    pw = weights[index]
    d = to_numpy(fdata).astype(np.float64) * pw
    m = to_numpy(model).astype(np.float64) * pw
    values = to_numpy(data).astype(np.float64)
    alpha = to_numpy(shells.alpha).astype(np.float64) % np.pi
    sector = np.minimum((alpha / np.pi * n_sectors).astype(int), n_sectors - 1)
    step = 1.0 / (8.0 * lam * k_hi**2)
    span = max(0.15 * mean, 4 * step) + abs(half)
    defoci = np.arange(max(search.min_defocus_A * 0.5, mean - span), mean + span + step, step / 2)
    profiles = _ctf2_profiles(shells.k_bins, defoci, np.array([params.phase_shift_deg]), lam, cs_A, w)[:, 0, :]
    width = np.pi / n_sectors
    shrink = math.sin(width) / width
    centres = (np.arange(n_sectors) + 0.5) * width
    cc = np.full(n_sectors, np.nan)
    threshold = np.full(n_sectors, np.nan)
    n_pixels = np.zeros(n_sectors, dtype=np.int64)
    best = np.full(n_sectors, np.nan)
    for s in range(n_sectors):
        sel = sector == s
        n = int(sel.sum())
        if n < 10:
            continue
        cc[s] = float((d[sel] * m[sel]).sum() / (math.sqrt((d[sel] ** 2).sum() * (m[sel] ** 2).sum()) + 1e-30))
        threshold[s] = 4.0 / math.sqrt(n)
        n_pixels[s] = n
        counts = np.bincount(index[sel], minlength=shells.n_bins)
        ok = counts > 0
        if ok.sum() < 10:
            continue
        profile = np.bincount(index[sel], weights=values[sel], minlength=shells.n_bins)[ok] / counts[ok]
        ncc = _ncc_1d(profile, weights[ok], profiles[:, ok], _projector(shells.k_bins[ok], counts[ok]))
        best[s] = defoci[int(np.argmax(ncc))]
    model_defocus = mean + half * shrink * np.cos(2 * (centres - theta))
    return SectorCheck(centres_deg=np.degrees(centres), cc=cc, threshold=threshold, n_pixels=n_pixels,
                       defocus_A=best,
                       model_defocus_A=model_defocus, tolerance_A=max(tolerance * mean, 1.5 * step))
