"""Restoration of one micrograph: phase flipping and Wiener deconvolution of the CTF.

Both estimate the CTF-free projected potential with protein positive (bright): the image
contrast is ``CTF(k)·P(k)`` with CTFFIND's sign (``CTF < 0`` at low frequency, protein
dark under focus), so multiplying by ``sign(CTF)`` or by the Wiener filter
``CTF·S / (CTF²·S + N)`` turns protein bright.

The Wiener filter's signal and noise come from the micrograph's own 2D spectrum: in each
thin shell ``|k|``, the power of every Fourier pixel is regressed on that pixel's
``CTF²`` (the CTF's astigmatism included): ``power = N(k) + S(k)·CTF²``. The intercept is
the power that does not follow the CTF (shot noise, detector), the slope the power that
does (the specimen: particles, and the ice's own structure). Both are smoothed across
shells and kept positive.

References
----------
Downing & Glaeser (2008) Ultramicroscopy 108, 921 (phase flipping, Wiener restoration).
"""

from __future__ import annotations



import numpy as np
import scipy.fft

from cryodask.backend import fft_module, namespace, to_numpy
from cryodask.physics import CTFParams, ctf_2d, frequency_grid

__all__ = ["SpectralGrid", "fit_signal_noise", "phase_flip", "wiener_filter", "wiener_gain"]


def _ctf_grid(shape, pixel_size_A, params, xp, device=None):
    ky, kx = frequency_grid(shape, pixel_size_A, layout="rfft", xp=xp, device=device)
    return ky, kx, ctf_2d(ky, kx, params, with_envelope=False)


class SpectralGrid:
    """One micrograph's ``rfft2`` half plane under its CTF, made once for the kernels that
    take it (:func:`fit_signal_noise`, :func:`wiener_filter`, :func:`phase_flip`,
    :func:`cryodask.causal.measure_noise`, :func:`cryodask.score.measure_micrograph`)
    instead of once by each: the frequencies ``ky``, ``kx`` and the ``ctf`` (no envelope;
    in the array namespace ``xp``); the CTF² in NumPy; the spectral fit's bins of shell
    and CTF² per number of shells; the Wiener filter's interpolation from the shells. The
    kernels give the same results with it as without.

    Parameters
    ----------
    shape : (ny, nx)
        The real-space micrograph's.
    params : CTFParams
    pixel_size_A : float
    """

    def __init__(self, shape, params: CTFParams, pixel_size_A: float, *, xp=np, device=None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = params
        self.pixel_size_A = float(pixel_size_A)
        self.ky, self.kx, self.ctf = _ctf_grid(self.shape, self.pixel_size_A, params, xp, device)
        self._ctf2 = self._k = None
        self._bins = {}
        self._interpolators = {}

    def check(self, shape, params: CTFParams, pixel_size_A: float) -> "SpectralGrid":
        """The grid itself, once it is checked to be that of ``shape``, ``params`` and
        ``pixel_size_A``; else ValueError."""
        if (tuple(int(n) for n in shape[:2]) != self.shape or params != self.params
                or float(pixel_size_A) != self.pixel_size_A):
            raise ValueError(f"grid: made for shape {self.shape}, pixel {self.pixel_size_A} Å and "
                             f"{self.params}; asked for {tuple(shape[:2])}, {pixel_size_A} Å and {params}")
        return self

    @property
    def ctf2(self) -> np.ndarray:
        """CTF² on the half plane (NumPy float32)."""
        if self._ctf2 is None:
            self._ctf2 = to_numpy(self.ctf * self.ctf)
        return self._ctf2

    @property
    def k(self) -> np.ndarray:
        """``|k|`` (1/Å) on the whole half plane (NumPy float32)."""
        if self._k is None:
            self._k = to_numpy(namespace(self.ky).sqrt(self.ky * self.ky + self.kx * self.kx) + 0.0 * self.kx)
        return self._k

    def bins(self, n_shells: int):
        """The spectral fit's bins for ``n_shells`` shells (see :func:`_shell_bins`)."""
        if n_shells not in self._bins:
            self._bins[n_shells] = _shell_bins(self.k, self.ctf2, self.pixel_size_A, n_shells)
        return self._bins[n_shells]

    def interpolator(self, k):
        """:func:`_shell_interpolator` from the shells ``k`` onto this half plane."""
        key = np.asarray(k, np.float64).tobytes()
        if key not in self._interpolators:
            self._interpolators[key] = _shell_interpolator(self.k, k)
        return self._interpolators[key]


def _without_plane(x, xp):
    """``x`` minus its least-squares plane: a gradient of ice thickness (a wedge) is no
    specimen, and through the periodic transform its edge-to-edge step would spread over
    every frequency along the axes, where the filter passes it. On the full grid the
    plane's slopes come from the row and column means alone."""
    ny, nx = x.shape[:2]
    rows, cols = xp.mean(x, axis=1), xp.mean(x, axis=0)
    y = xp.arange(ny, dtype=xp.float32) - xp.asarray((ny - 1) / 2, dtype=xp.float32)
    u = xp.arange(nx, dtype=xp.float32) - xp.asarray((nx - 1) / 2, dtype=xp.float32)
    slope_y = xp.sum(y * (rows - xp.mean(rows))) / xp.sum(y * y)
    slope_x = xp.sum(u * (cols - xp.mean(cols))) / xp.sum(u * u)
    return x - (xp.mean(rows) + slope_y * y[:, None] + slope_x * u[None, :])


def phase_flip(image, params: CTFParams, *, pixel_size_A: float, grid: SpectralGrid | None = None):
    """Multiply the image's transform by ``sign(CTF)``: protein comes out bright.

    Parameters
    ----------
    image : (ny, nx) array
    params : CTFParams
    pixel_size_A : float
    grid : SpectralGrid, optional
        The micrograph's, when the caller has it.

    Returns
    -------
    (ny, nx) float32 array, mean zero (its least-squares plane removed)
    """
    xp = namespace(image)
    fft = fft_module(image)
    x = xp.astype(image, xp.float32)
    f = fft.rfftn(_without_plane(x, xp), axes=(0, 1))
    ctf = (_ctf_grid(x.shape, pixel_size_A, params, xp)[2] if grid is None
           else grid.check(x.shape, params, pixel_size_A).ctf)
    flip = xp.where(ctf >= 0, xp.asarray(1.0, dtype=xp.float32), xp.asarray(-1.0, dtype=xp.float32))
    return xp.astype(fft.irfftn(f * flip, s=x.shape, axes=(0, 1)), xp.float32)


_WHITTLE_ITERATIONS = 2

#: The least mean CTF² by which the power below the first Thon ring is divided to give the
#: signal (the CTF there is near the amplitude contrast, CTF² ~0.005): the restoration
#: amplifies those frequencies at most tenfold in amplitude. (On 72 simulated micrographs a
#: floor of 0.005 or 0.02 changed the mean correlation with the truth by < 0.01.)
_LOW_CTF2_FLOOR = 0.01


#: CTF² bins within a shell: the regression's sums are taken once per bin, and the Whittle
#: reweighting, a function of a pixel's shell and CTF², weighs each bin at its mean CTF².
_CTF2_BINS = 128


def _shell_bins(k, ctf2, pixel_size_A, n_shells):
    """What the spectral fit's sums take from the grid alone (``k``: ``|k|`` on the whole
    half plane): each Fourier pixel's bin (of shell and CTF²), and per shell and CTF² bin
    the pixel count and the sums of ``c`` and ``c²`` (``c`` the CTF² in double precision),
    each ``(n_shells, _CTF2_BINS)``."""
    nyquist = 0.5 / pixel_size_A
    index = np.minimum((k / nyquist * n_shells).astype(int), n_shells - 1).ravel()
    c = _ctf2_values(ctf2, k.shape)
    key = index * _CTF2_BINS + np.minimum((c * _CTF2_BINS).astype(np.intp), _CTF2_BINS - 1)
    size = n_shells * _CTF2_BINS
    shape = (n_shells, _CTF2_BINS)
    return key, [np.bincount(key, v, size).reshape(shape) for v in (None, c, c * c)]


def _ctf2_values(ctf2, shape):
    """CTF² per Fourier pixel of the half plane ``shape``, flat, in double precision (made
    again where needed rather than kept: at 4096², 67 MB)."""
    return np.broadcast_to(ctf2, shape).ravel().astype(np.float64)


def _bin_sums(bins, c, p, n_shells):
    """Per shell and CTF² bin: pixel count and the sums of ``c``, ``c²``, ``p`` and ``c p``,
    each ``(n_shells, _CTF2_BINS)``, from :func:`_shell_bins`, the CTF² ``c`` and the power
    ``p`` (flat, double precision)."""
    key, grid_sums = bins
    size = n_shells * _CTF2_BINS
    shape = (n_shells, _CTF2_BINS)
    return grid_sums + [np.bincount(key, v, size).reshape(shape) for v in (p, c * p)]


def _shell_regression(sums, weight):
    """Per-shell weighted regression ``p = intercept + slope * c`` from :func:`_bin_sums`,
    each bin weighted by ``weight`` ``(n_shells, _CTF2_BINS)``; and the weighted variance
    of ``c`` in each shell."""
    n, sc, scc, sp, scp = sums
    w = (weight * n).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = (weight * sc).sum(axis=1) / w
        mp = (weight * sp).sum(axis=1) / w
        var_c = (weight * scc).sum(axis=1) / w - mc**2
        cov = (weight * scp).sum(axis=1) / w - mc * mp
        slope = cov / var_c
        intercept = mp - slope * mc
    return var_c, slope, intercept


def fit_signal_noise(image, params: CTFParams, *, pixel_size_A: float, n_shells: int | None = None,
                     smooth_shells: float = 2.0, power=None, ctf2=None, grid: SpectralGrid | None = None):
    """Signal and noise power per shell from the micrograph's own spectrum.

    In each shell the power of the Fourier pixels is regressed on their CTF² by the Whittle
    likelihood of periodogram values (iteratively reweighted least squares). A caller that
    has them passes the periodogram ``power`` (``|rfft2(image - mean)|² / size``) and the
    ``ctf2`` grid (``CTF²`` on the same half plane, no envelope), or the micrograph's
    :class:`SpectralGrid`, which are not computed again.

    Returns
    -------
    k : (n_shells,) array, 1/Å
    signal : (n_shells,) array
        ``S(k)``: power that follows ``CTF²`` (per Fourier pixel, before the CTF).
    noise : (n_shells,) array
        ``N(k)``: power that does not.
    """
    from scipy.ndimage import gaussian_filter1d

    ny, nx = image.shape[:2]
    if power is None:
        x = np.asarray(to_numpy(image), dtype=np.float32)
        f = scipy.fft.rfft2(x - x.mean())
        power = (f.real**2 + f.imag**2) / (ny * nx)
    nyquist = 0.5 / pixel_size_A
    n_shells = n_shells or max(16, min(ny, nx) // 8)
    if grid is not None:
        bins = grid.check((ny, nx), params, pixel_size_A).bins(n_shells)
        ctf2 = grid.ctf2
    else:
        ky, kx = frequency_grid((ny, nx), pixel_size_A, layout="rfft")
        if ctf2 is None:
            ctf2 = ctf_2d(ky, kx, params, with_envelope=False) ** 2
        bins = _shell_bins(np.sqrt(ky**2 + kx**2) + 0 * kx, ctf2, pixel_size_A, n_shells)
    p = power.ravel().astype(np.float64)
    sums = _bin_sums(bins, _ctf2_values(ctf2, power.shape), p, n_shells)
    counts = sums[0].sum(axis=1)
    sc = sums[1].sum(axis=1)
    sp = sums[3].sum(axis=1)
    var_c, slope, intercept = _shell_regression(sums, np.ones(sums[0].shape))
    # Periodogram values are exponentially distributed about the model: weighting each by
    # the inverse square of its model power turns least squares into the Whittle
    # likelihood (iteratively reweighted).
    floor = 1e-6 * max(float(np.median(p[:: max(1, p.size // 65536)])), 1e-30)  # a sample's median will do
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_c = np.where(sums[0] > 0, sums[1] / np.maximum(sums[0], 1), 0.0)
    for _ in range(_WHITTLE_ITERATIONS):
        model = (np.where(np.isfinite(slope), intercept, 0.0)[:, None]
                 + np.where(np.isfinite(slope), slope, 0.0)[:, None] * bin_c)
        var_c, slope, intercept = _shell_regression(sums, 1.0 / np.maximum(model, floor) ** 2)
    # Shells where CTF² hardly varies (the lowest) cannot separate the two: use neighbours.
    good = np.isfinite(slope) & (var_c > 0.02) & (counts > 8)
    centres = (np.arange(n_shells) + 0.5) * nyquist / n_shells
    if good.sum() < 2:
        total = np.where(counts > 0, sp / np.maximum(counts, 1), 0.0)
        return centres, np.zeros(n_shells), total
    # The noise is smooth: fitted where the rings separate it, carried flat to low k.
    intercept = np.interp(centres, centres[good], intercept[good])
    noise = np.clip(gaussian_filter1d(intercept, smooth_shells, mode="nearest"), 1e-12, None)
    # The signal: the regression slope where the rings separate it; below the first ring,
    # the shell's power above the noise over its mean CTF² (floored so that the low
    # frequencies are not amplified without bound).
    mean_c2 = np.where(counts > 0, sc / np.maximum(counts, 1), 0.0)
    total = np.where(counts > 0, sp / np.maximum(counts, 1), 0.0)
    excess = np.clip(total - noise, 0.0, None) / np.maximum(mean_c2, _LOW_CTF2_FLOOR)
    first = int(np.argmax(good))
    raw = np.where(np.arange(n_shells) < first, excess, np.interp(centres, centres[good], slope[good]))
    signal = np.clip(gaussian_filter1d(raw, smooth_shells, mode="nearest"), 0.0, None)
    # Up to just past the first ring the signal falls by orders of magnitude within a few
    # shells: smoothed linearly there, the lowest shells' power would leak upwards (measured
    # 3-5x too much signal at 1/55-1/30 Å^-1 and too little below). Below the first ring
    # each shell keeps its own excess (smoothed even in log space across the fall, the
    # lowest shells, which hold most of the particles' power, came out 1.6x too weak against
    # the simulator's truth); from the ring to three shells past it, smoothed in log space.
    steep = np.arange(n_shells) < first + 3
    tiny = 1e-6 * max(float(raw.max()), 1e-30)
    logged = np.exp(gaussian_filter1d(np.log(np.maximum(raw, tiny)), 1.0, mode="nearest"))
    signal = np.where(steep, logged, signal)
    signal = np.where(np.arange(n_shells) < first, raw, signal)
    return centres, *_below_background(centres, signal, noise, total, mean_c2)


def _below_background(centres, signal, noise, total, mean_c2):
    """Signal and noise of the shells below 1/200 Å^-1, where an ice-thickness background
    (not CTF-modulated) adds to the specimen's power.

    The particles' power is flat there (their form factor is, for particles under ~200 Å
    across) while the background rises steeply. Those shells are restored with the signal
    of the first shell above them, the power beyond it counted as noise, where that excess
    is no more than the particles' own power there (on simulated 768² micrographs: at
    most 0.31 of it in ice up to 150 Å, 3-7x from 800 Å); else the background rules and they are
    left out. (Left out always, thin-ice restorations lost 0.01-0.04 of correlation with
    the truth; restored always, thick-ice ones lost up to 0.06.)
    """
    below = centres < 1.0 / 200.0
    if not below.any() or below.all():
        return signal, noise
    cap = signal[int(np.argmin(below))]
    particles = cap * mean_c2[below]
    surplus = np.clip(total[below] - noise[below] - particles, 0.0, None)
    signal = signal.copy()
    if np.all(surplus <= particles):
        noise = noise.copy()
        noise[below] += surplus
        signal[below] = np.minimum(signal[below], cap)
    else:
        signal[below] = 0.0
    return signal, noise


def _shell_interpolator(kk, k):
    """Linear interpolation from the shells ``k`` (increasing, values held flat beyond
    their ends) onto the frequencies ``kk``: indices and weights found once, for several
    functions of the shells. Returns ``values -> float32 array of kk's shape``."""
    k = np.asarray(k, np.float64)
    step = np.diff(k)
    if k.size > 1 and np.all(np.abs(step - step[0]) <= 1e-9 * step[0]):
        # Evenly spaced (as fit_signal_noise's shells are): the index by arithmetic, in
        # float32 -- a search in double precision costs more than the rest.
        u = (np.asarray(kk, np.float32) - np.float32(k[0])) * np.float32(1.0 / step[0])
        base = np.clip(np.floor(u), 0, k.size - 2)
        at = base.astype(np.intp)
        t = np.clip(u - base, np.float32(0.0), np.float32(1.0))
    else:
        kk = np.asarray(kk, np.float64)
        at = np.clip(np.searchsorted(k, kk, side="right") - 1, 0, k.size - 2)
        t = np.clip((kk - k[at]) / (k[at + 1] - k[at]), 0.0, 1.0).astype(np.float32)
    after = at + 1

    def interp(values):
        values = np.asarray(values, np.float32)
        low = np.take(values, at)
        return low + (np.take(values, after) - low) * t

    return interp


def wiener_gain(shape, params: CTFParams, *, pixel_size_A: float, k, signal, noise, separate_ice: bool = True,
                xp=np, grid: SpectralGrid | None = None):
    """The Wiener filter ``CTF·S_p / (CTF²·S + N)`` on the ``rfft2`` half plane of ``shape``
    (see :func:`wiener_filter`, which applies it); ``grid``: the micrograph's
    :class:`SpectralGrid` when the caller has it (made in ``xp``)."""
    particles = signal
    if separate_ice:
        from cryodask.causal import ice_signal

        particles = np.clip(signal - ice_signal(k, signal), 0.0, None)
    grid = SpectralGrid(shape, params, pixel_size_A, xp=xp) if grid is None else grid.check(shape, params,
                                                                                           pixel_size_A)
    ctf, interp = grid.ctf, grid.interpolator(k)
    s = xp.asarray(interp(signal))
    sp = xp.asarray(interp(particles))
    n = xp.asarray(np.maximum(interp(noise), np.float32(1e-30)))
    return ctf * sp / (ctf * ctf * s + n)


def wiener_filter(image, params: CTFParams, *, pixel_size_A: float, signal=None, noise=None,
                  k=None, separate_ice: bool = True, grid: SpectralGrid | None = None):
    """Wiener estimate of the CTF-free image: ``F · CTF·S_p / (CTF²·S + N)``.

    Parameters
    ----------
    image : (ny, nx) array
    params : CTFParams
        The CTF (its envelope is not applied: ``S`` already carries it).
    pixel_size_A : float
    signal, noise, k : (n,) arrays, optional
        ``S(k)`` and ``N(k)`` on shells ``k`` (1/Å); by default fitted from the image
        itself (:func:`fit_signal_noise`).
    separate_ice : bool
        Count the amorphous-ice structure (measured from its ring, see
        :mod:`cryodask.causal`) as noise: it passes the CTF like the particles but is not
        what is restored. ``S_p = S - S_ice``.
    grid : SpectralGrid, optional
        The micrograph's, when the caller has it (made in the image's array namespace).

    Returns
    -------
    (ny, nx) float32 array, mean zero, protein positive (the image's least-squares plane,
    a thickness gradient, removed first)

    Notes
    -----
    With a unit CTF and no noise (``N -> 0``) the filter is the identity.
    """
    xp = namespace(image)
    fft = fft_module(image)
    x = xp.astype(image, xp.float32)
    # One transform and one CTF grid serve the spectral fit and the filter.
    f = fft.rfftn(_without_plane(x, xp), axes=(0, 1))
    grid = SpectralGrid(x.shape, params, pixel_size_A, xp=xp) if grid is None else grid.check(x.shape, params,
                                                                                             pixel_size_A)
    if signal is None or noise is None or k is None:
        power = to_numpy(xp.real(f) ** 2 + xp.imag(f) ** 2) / (x.shape[0] * x.shape[1])
        k, signal, noise = fit_signal_noise(image, params, pixel_size_A=pixel_size_A, power=power, grid=grid)
    gain = wiener_gain(x.shape, params, pixel_size_A=pixel_size_A, k=k, signal=signal, noise=noise,
                       separate_ice=separate_ice, xp=xp, grid=grid)
    return xp.astype(fft.irfftn(f * gain, s=x.shape, axes=(0, 1)), xp.float32)



