"""The causal noise model (Module 4), first part: the graph, and each cause's share.

The graph (DESIGN.md) as data: causes, what each one adds to the observed spectrum, and
the edges between them. :func:`causal_graph` returns it as a ``networkx.DiGraph`` a user
can inspect or extend.

Per micrograph, :func:`decompose_noise` splits the image's noise variance among the causes
that add noise, from direct measurements where they exist and from the spectrum where not:

* ``artifacts``: the excess energy of the impulses found (hot pixels, X-rays) over their
  local reference;
* ``dose``: shot noise, the mean count for counting data (Poisson); for other data it
  cannot be told from white detector noise and takes the whole white level;
* ``detector``: the white level of the cleaned spectrum beyond the shot noise (pixel gain
  errors, read noise), the smooth part of the dataset's gain estimate times the counts, and
  the defects' excess energy;
* ``ice``: the low-frequency power below 1/200 Å^-1 not explained by the gain pattern
  (thickness variation), plus the amorphous-ice structure measured from its ring at
  1/3.66 Å^-1 where the pixel size shows it.

The white level and the CTF-modulated signal come from regressing each shell's power on
the CTF² of its Fourier pixels (:func:`cryodask.restore.fit_signal_noise`).

Counterfactual gains predict what restoration (which works on the cleaned image) would
gain in quality -- the correlation a Wiener restoration is expected to reach with the
CTF-free truth -- with a cause at its ideal: twice the dose, no ice (its noise, and the
electrons it stopped), a perfect detector, no artifacts. Impulses and defects cost the
signal of the pixels they cover. The gains weigh the noise the restoration faces: where
the micrographs are divided by the dataset's gain estimate, the detector's part is the
read noise and the estimate's error, not the gain pattern the division removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from cryodask.artifacts import DEFECT, HOT_PIXEL, XRAY, find_impulses, correct_pixels
from cryodask.physics import CTFParams, ctf_2d, electron_wavelength_A, frequency_grid
from cryodask.restore import SpectralGrid, fit_signal_noise

__all__ = [
    "BANDS_A",
    "NOISE_CAUSES",
    "NoiseDecomposition",
    "causal_graph",
    "decompose_noise",
    "fit_envelope",
    "explain_noise",
    "fit_ice_damping",
    "fit_ice_scale",
    "measure_noise",
    "measurement_length",
    "NoiseMeasurement",
    "dataset_quality",
    "ice_on_shells",
    "ice_signal",
    "measured_spectrum",
    "particle_spectrum",
    "smooth_gain_pattern",
    "spectrum_shells",
]

#: The causes that add noise, in the order of every table.
NOISE_CAUSES = ("dose", "ice", "detector", "artifacts")
#: Frequency bands of the per-band shares, as (low, high) resolution in Å (inf: Nyquist).
BANDS_A = ((200.0, 20.0), (20.0, 8.0), (8.0, 0.0))

_NODES = {
    "dose": ("shot noise (white, proportional to dose) and signal power (proportional to dose^2)", []),
    "motion": ("envelope E(k) (B-factor)", []),
    "coherence": ("envelope E(k) (B-factor)", []),
    "aberrations": ("CTF(k): defocus, astigmatism, Cs, phase shift", []),
    "ice": ("smooth low-frequency background and CTF-modulated structural noise", []),
    "sample": ("signal power: particle density and heterogeneity", []),
    "detector": ("MTF, gain pattern, read noise, defects", []),
    "artifacts": ("impulse noise: hot pixels, X-rays", []),
    "spectrum": ("PS(k) = MTF^2 [E^2 CTF^2 S + B_ice] + N_shot NPS + N_det + N_imp",
                 ["dose", "motion", "coherence", "aberrations", "ice", "sample", "detector", "artifacts"]),
}


def causal_graph():
    """The causal graph of a micrograph's spectrum as a ``networkx.DiGraph``.

    Each node has ``description`` and ``adds_noise`` (True for :data:`NOISE_CAUSES`);
    edges point from causes to the observed ``spectrum``. Add a node with
    ``graph.add_node(name, description=...)`` and an edge to ``"spectrum"``.
    """
    import networkx as nx

    graph = nx.DiGraph()
    for name, (description, parents) in _NODES.items():
        graph.add_node(name, description=description, adds_noise=name in NOISE_CAUSES)
        for parent in parents:
            graph.add_edge(parent, name)
    return graph


@dataclass
class NoiseDecomposition:
    """Each cause's noise variance (image units squared) and what removing it would gain."""

    variance: dict = field(default_factory=dict)
    gain: dict = field(default_factory=dict)
    counting: bool = False
    band_shares: dict = field(default_factory=dict)  # cause -> tuple, one share per band of BANDS_A
    parameters: dict = field(default_factory=dict)  # node value -> (measured value, standard error)
    #: The correlation a Wiener restoration of the cleaned image is expected to reach with the
    #: CTF-free truth; ``quality_model(k_max)`` gives it when only the shells up to ``k_max``
    #: (1/Å) restore.
    quality: float = float("nan")
    quality_model: object = field(default=None, repr=False)
    #: The cleaned image's mean periodogram and mean CTF² in shells (:func:`spectrum_shells`),
    #: and its mean count (1 for data that are not counts): for :func:`particle_spectrum`.
    shells: object = field(default=None, repr=False)
    scale: float = 1.0

    @property
    def total(self) -> float:
        return float(sum(self.variance.values()))

    @property
    def shares(self) -> dict:
        total = self.total
        return {c: (v / total if total > 0 else float("nan")) for c, v in self.variance.items()}

    @property
    def top_cause(self) -> str:
        """The cause whose ideal gains the most, dose excluded (it is a budget, not a flaw)."""
        candidates = {c: g for c, g in self.gain.items() if c != "dose"}
        return max(candidates, key=candidates.get) if candidates else ""


def _excess(image, reference, where):
    n = image.size
    return float(((image[where] - reference[where]).astype(np.float64) ** 2).sum() / n)


def decompose_noise(image, params: CTFParams, *, pixel_size_A: float, gain_estimate=None,
                    defects=None, fixed: dict | None = None, dose_e_per_A2: float | None = None,
                    particle_power=None, shell_edges=None) -> NoiseDecomposition:
    """Split one micrograph's noise variance among dose, ice, detector and artifacts.

    Parameters
    ----------
    image : (ny, nx) array
        The raw micrograph (NumPy), artifacts and all.
    params : CTFParams
        Its CTF (e.g. from :func:`cryodask.ctf.estimate_ctf`).
    pixel_size_A : float
    gain_estimate : (ny, nx) array, optional
        The dataset's gain estimate (:func:`cryodask.clean.measure_defects`); its smooth
        part is detector noise, not ice.
    defects : (ny, nx) bool array, optional
        Known fixed defects.
    fixed : dict, optional
        Node values to use instead of measuring them: ``"white"`` (the white noise level,
        image units² per pixel) and ``"ice_scale"`` (the amount of amorphous ice, see
        :func:`fit_ice_scale`), e.g. from a dataset prior or a known detector.
    dose_e_per_A2 : float, optional
        The exposure's dose (metadata). With counting data it gives the ice's attenuation
        ``a`` (mean counts over electrons per pixel): thin ice would let ``1/a`` times the
        electrons through, which the ice's counterfactual gain includes.
    particle_power : (shell_k, T) or (shell_k, T, error), optional
        The dataset's particle spectrum (:func:`particle_spectrum`, relative to the mean
        count squared, on shells ``shell_k`` in 1/Å), with its standard error: the expected
        quality and the gains then weigh the frequencies as the particles do, the lowest
        included, where it is measured (:func:`measured_spectrum`).
    shell_edges : (s + 1,) array, optional
        The shells of ``shells`` in the result (default: 96 up to Nyquist).

    Returns
    -------
    NoiseDecomposition
        With ``parameters``: the measured ``white``, ``ice_scale`` and, given
        ``particle_power``, ``b_factor`` (the motion and coherence envelope relative to the
        dataset's, :func:`fit_envelope`) as ``(value, standard error)``.
    """
    measured = measure_noise(image, params, pixel_size_A=pixel_size_A, gain_estimate=gain_estimate,
                             defects=defects, dose_e_per_A2=dose_e_per_A2, shell_edges=shell_edges)
    return explain_noise(measured, params, fixed=fixed, particle_power=particle_power)


#: The scalars of a :class:`NoiseMeasurement`, in the order of its vector.
_MEASURED_SCALARS = ("n_fit", "counting", "mean", "pixel_size_A", "dose_e_per_A2", "has_gain", "smooth_gain",
                     "artifacts_var", "defect_var", "low_power", "low_pixels", "ice_unit_variance",
                     "ice_damping", "gain_white", "divided",
                     "lost_artifacts", "lost_detector", "n_shells")


@dataclass
class NoiseMeasurement:
    """What one micrograph's image tells the noise model (:func:`measure_noise`): a few
    numbers and spectra on shells, from which :func:`explain_noise` decomposes the noise
    under any node values and priors without reading the image again.

    ``k``, ``signal``, ``fit_noise``: the spectral fit (:func:`cryodask.restore.fit_signal_noise`);
    ``gain_power``: the smooth gain pattern's power per Fourier pixel on ``k`` per unit mean
    count squared; ``low_power``/``low_pixels``: the periodogram's sum and the Fourier pixels
    (over the image size) below 1/200 Å^-1; ``ice_unit_variance``: the image variance of
    amorphous ice of unit :func:`fit_ice_scale` through this CTF, damped by the envelope
    ``ice_damping`` (:func:`fit_ice_damping`); ``shells``: for
    :func:`particle_spectrum`.
    """

    counting: bool
    mean: float
    pixel_size_A: float
    dose_e_per_A2: float
    k: np.ndarray
    signal: np.ndarray
    fit_noise: np.ndarray
    gain_power: np.ndarray
    gain_error: np.ndarray
    has_gain: bool
    smooth_gain: float
    artifacts_var: float
    defect_var: float
    low_power: float
    low_pixels: float
    ice_unit_variance: float
    ice_damping: float
    gain_white: float
    divided: bool
    lost_artifacts: float
    lost_detector: float
    shells: np.ndarray

    def to_vector(self, length: int) -> np.ndarray:
        """The measurement as one float vector of ``length`` (:func:`measurement_length`)."""
        n_fit, n_shells = self.k.size, self.shells.shape[1]
        scalars = {"n_fit": n_fit, "n_shells": n_shells}
        head = [float(scalars.get(name, getattr(self, name, np.nan))) for name in _MEASURED_SCALARS]
        body = np.concatenate([head, self.k, self.signal, self.fit_noise, self.gain_power, self.gain_error,
                               self.shells.ravel()])
        if body.size > length:
            raise ValueError(f"noise measurement of {body.size} values does not fit {length}")
        return np.concatenate([body, np.full(length - body.size, np.nan)])

    @classmethod
    def from_vector(cls, vector) -> NoiseMeasurement:
        v = np.asarray(vector, np.float64)
        head = dict(zip(_MEASURED_SCALARS, v[:len(_MEASURED_SCALARS)]))
        n_fit, n_shells = int(head.pop("n_fit")), int(head.pop("n_shells"))
        at = len(_MEASURED_SCALARS)
        arrays = []
        for _ in range(5):
            arrays.append(v[at:at + n_fit])
            at += n_fit
        shells = v[at:at + 2 * n_shells].reshape(2, n_shells)
        flags = {name: bool(head[name]) for name in ("counting", "has_gain", "divided")}
        return cls(**{**head, **flags}, k=arrays[0], signal=arrays[1], fit_noise=arrays[2], gain_power=arrays[3],
                   gain_error=arrays[4], shells=shells)


def measurement_length(shape, n_shells: int) -> int:
    """The length of :meth:`NoiseMeasurement.to_vector` for images of ``shape`` (or smaller)."""
    return len(_MEASURED_SCALARS) + 5 * _fit_shells(shape) + 2 * n_shells


def _log_interp(x, xp, fp):
    """``np.interp`` of the logarithm: between ring centres a power that falls by an order
    of magnitude per ring (the gain estimate's error at the lowest frequencies) is not a
    straight line; zeros stay zeros."""
    fp = np.asarray(fp, np.float64)
    positive = fp > 0
    if not positive.any():
        return np.zeros(np.shape(x))
    tiny = 1e-300
    out = np.exp(np.interp(x, xp, np.log(np.maximum(fp, tiny))))
    return np.where(out > 1e3 * tiny, out, 0.0)


def _fit_shells(shape) -> int:
    return max(16, min(shape) // 8)  # fit_signal_noise's default


def measure_noise(image, params: CTFParams, *, pixel_size_A: float, gain_estimate=None, defects=None,
                  dose_e_per_A2: float | None = None, shell_edges=None, grid=None) -> NoiseMeasurement:
    """The image half of :func:`decompose_noise` (same parameters): impulses, cleaning, one
    transform, the spectral fit and the sums the decomposition needs. ``grid``: the
    micrograph's :class:`cryodask.restore.SpectralGrid` when the caller has it."""
    x = np.asarray(image, dtype=np.float32)
    found = find_impulses(x, defects=defects)
    impulse = (found.mask == HOT_PIXEL) | (found.mask == XRAY)
    clean = correct_pixels(x, found.mask, found.reference, found.sigma, counting=found.counting,
                           fano=found.fano, seed=0)
    mean = float(clean.mean())
    # One transform and one CTF² grid serve the spectral fit, the background, the ice and
    # the shells.
    f = scipy.fft.rfft2(clean - mean)
    power = (f.real**2 + f.imag**2) / clean.size**2
    del f
    if grid is None:
        grid = SpectralGrid(clean.shape, params, pixel_size_A)
    ky, kx, ctf2, kk = grid.check(clean.shape, params, pixel_size_A).ky, grid.kx, grid.ctf2, grid.k
    k, signal, noise = fit_signal_noise(clean, params, pixel_size_A=pixel_size_A, power=power * clean.size,
                                        grid=grid, n_shells=_fit_shells(clean.shape))
    weight = np.where(kx == 0, 1.0, 2.0) + 0 * ky  # the half plane counts its mirror once more
    low = (kk > 0) & (kk < 1.0 / 200.0)
    smooth_gain, gain_power, gain_error, gain_white = 0.0, np.zeros_like(k), np.zeros_like(k), 0.0
    divided = False
    if gain_estimate is not None:
        smoothed = smooth_gain_pattern(gain_estimate)
        smooth_gain = smoothed.variance * mean**2
        gain_power = smoothed.shell_power(k, pixel_size_A)
        if smoothed.rings is not None:
            # The restoration divides by the estimate: what it leaves, per unit mean count.
            centres, pattern, error = smoothed.rings
            cycles = k * pixel_size_A
            gain_error = _log_interp(cycles, centres, error)
            high = (centres > 0.55 * 0.5) & (centres < 0.95 * 0.5)
            gain_white = float(np.mean(pattern[high]))
            divided = True
    damping = fit_ice_damping(k, signal)
    unit = np.interp(kk, k, _ice_shape(k, damping)) * ctf2
    return NoiseMeasurement(
        counting=bool(found.counting), mean=mean, pixel_size_A=float(pixel_size_A),
        dose_e_per_A2=float("nan") if dose_e_per_A2 is None else float(dose_e_per_A2),
        k=k, signal=signal, fit_noise=noise, gain_power=gain_power, gain_error=gain_error, gain_white=gain_white,
        divided=divided, has_gain=gain_estimate is not None,
        smooth_gain=float(smooth_gain), artifacts_var=_excess(x, found.reference, impulse),
        defect_var=_excess(x, found.reference, found.mask == DEFECT),
        low_power=float((weight * power)[low].sum()), low_pixels=float(weight[low].sum()) / clean.size,
        ice_unit_variance=float((unit * weight).sum() / clean.size), ice_damping=damping,
        lost_artifacts=float(impulse.mean()), lost_detector=float((found.mask == DEFECT).mean()),
        shells=spectrum_shells(clean, params, pixel_size_A=pixel_size_A, shell_edges=shell_edges,
                               power=power * clean.size, ctf2=ctf2))


def explain_noise(measured: NoiseMeasurement, params: CTFParams, *, fixed: dict | None = None,
                  particle_power=None) -> NoiseDecomposition:
    """The spectral half of :func:`decompose_noise`: each cause's noise, the counterfactual
    gains and the expected quality from a :class:`NoiseMeasurement`, under node values
    ``fixed`` and the dataset's ``particle_power`` (as in :func:`decompose_noise`). Cheap:
    one-dimensional spectra only."""
    m = measured
    k, signal, pixel_size_A, mean, counting = m.k, m.signal, m.pixel_size_A, m.mean, m.counting
    nyquist = 0.5 / pixel_size_A
    fixed = fixed or {}
    unknown = sorted(set(fixed) - {"white", "ice_scale"})
    if unknown:
        raise ValueError(f"fixed: unknown node value(s) {unknown}; known: ['ice_scale', 'white']")
    high = (k > 0.55 * nyquist) & (k < 0.95 * nyquist)
    white_measured = float(np.median(m.fit_noise[high]))
    white_error = 1.2533 * float(np.std(m.fit_noise[high])) / np.sqrt(max(int(high.sum()), 1))
    white = float(fixed.get("white", white_measured))
    ice_scale, ice_error = fit_ice_scale(k, signal, m.ice_damping)
    variance = {"artifacts": m.artifacts_var}
    shot = mean if counting else white
    variance["dose"] = shot
    variance["detector"] = max(white - shot, 0.0) + m.smooth_gain + m.defect_var
    # Low-frequency power above the white level: thickness background (and smooth gain).
    background = m.low_power - white * m.low_pixels
    scale_used = fixed.get("ice_scale", ice_scale)
    ice = ice_signal(k, signal, scale_used, m.ice_damping)
    ice_structure = float(scale_used) * m.ice_unit_variance if ice.any() else 0.0
    variance["ice"] = max(background - m.smooth_gain, 0.0) + ice_structure
    # Each cause's noise power per Fourier pixel on the shells (impulses are white).
    spectra = {"dose": np.full_like(k, shot), "detector": np.full_like(k, max(white - shot, 0.0)),
               "artifacts": np.full_like(k, variance["artifacts"]), "ice": ice * _mean_ctf2(k, params)}
    if m.has_gain:
        # The smooth gain pattern is low-frequency detector noise; below the first Thon ring
        # the spectral fit took it for signal, so it moves from there to the noise.
        gain_power = m.gain_power * mean**2
        spectra["detector"] = spectra["detector"] + gain_power
        signal = np.clip(signal - gain_power / np.maximum(_mean_ctf2(k, params), 0.05), 0.0, None)
    # The noise restoration faces: where the micrographs are divided by the dataset's gain
    # estimate, the detector leaves the read noise (the white excess less the pattern's
    # white part) and the estimate's error, not the pattern.
    restored = dict(spectra)
    if m.divided:
        restored["detector"] = max(white - shot - m.gain_white * mean**2, 0.0) + m.gain_error * mean**2
    # Restoration works on the cleaned image: impulses and defects cost the information of
    # the pixels they cover, not their energy.
    lost = {"artifacts": m.lost_artifacts, "detector": m.lost_detector}
    attenuation = 1.0
    dose = m.dose_e_per_A2
    if counting and np.isfinite(dose) and dose > 0:
        attenuation = float(np.clip(mean / (dose * pixel_size_A**2), 0.05, 1.0))
    truth = None
    envelope = (float("nan"), float("nan"))
    if particle_power is not None:
        shell_k, spectrum, *error = (np.asarray(v, np.float64) for v in particle_power)
        good = np.isfinite(spectrum)
        if good.sum() >= 2:
            scale = mean if counting else 1.0
            # The ice passes the same envelope; the particles alone, a difference of two
            # uncertain powers where the ice is strong, measure it less well (against the
            # simulator's B on test_causal's 16 micrographs: Spearman 0.46, whole signal 0.58).
            envelope = fit_envelope(k, signal, np.interp(k, shell_k[good], spectrum[good]) * scale**2)
            if error:
                spectrum = measured_spectrum(spectrum, error[0])
            truth = np.interp(k, shell_k[good], spectrum[good]) * scale**2
    gains = _counterfactual_gains(k, signal, {**restored, "artifacts": np.zeros_like(k)}, params,
                                  attenuation=attenuation, truth=truth, ice=ice)
    # A covered pixel carries no signal: quality scales with the square root of what is kept.
    kept = max(1.0 - lost["artifacts"] - lost["detector"], 1e-6)
    model = _quality_model(k, signal, params, truth, ice)
    noise = sum(restored.values()) - restored["artifacts"]
    quality = model(noise)
    gains["artifacts"] = quality * (np.sqrt((kept + lost["artifacts"]) / kept) - 1.0)
    gains["detector"] += quality * (np.sqrt((kept + lost["detector"]) / kept) - 1.0)
    return NoiseDecomposition(variance={c: float(variance[c]) for c in NOISE_CAUSES}, gain=gains,
                              counting=counting, band_shares=_band_shares(k, spectra),
                              shells=m.shells, scale=mean if counting else 1.0,
                              parameters={"white": (white_measured, white_error),
                                          "ice_scale": (ice_scale, ice_error), "b_factor": envelope},
                              quality=quality * np.sqrt(kept),
                              quality_model=lambda k_max=None: model(noise, k_max) * np.sqrt(kept))


class _Smoothed(np.ndarray):
    """A gain estimate already smoothed by :func:`smooth_gain_pattern` (marks it as such),
    which keeps what every micrograph of the dataset asks of it: its variance and its
    pattern's power on the shells (per unit mean count, computed once); and, when the
    micrographs are divided by the estimate, its rings (``rings``: ring centres in cycles
    per pixel, the pattern's power and the estimate's error power per Fourier pixel of a
    unit-mean image; :class:`cryodask.defects.DatasetDefects`)."""

    rings = None

    def __array_finalize__(self, obj):
        self.rings = getattr(obj, "rings", None)

    def __reduce__(self):  # the rings travel to worker processes with the pixels
        constructor, args, state = super().__reduce__()
        return constructor, args, (state, self.rings)

    def __setstate__(self, state):
        pixels, self.rings = state
        super().__setstate__(pixels)

    @property
    def variance(self) -> float:
        if getattr(self, "_variance", None) is None:
            self._variance = float(np.var(np.asarray(self)))
        return self._variance

    def shell_power(self, k, pixel_size_A):
        key = (np.asarray(k, np.float64).tobytes(), float(pixel_size_A))
        cache = self.__dict__.setdefault("_shell_power", {})
        if key not in cache:
            cache[key] = _shell_power(np.asarray(self) - 1.0, k, pixel_size_A)
        return cache[key]


def smooth_gain_pattern(gain_estimate):
    """The smooth part of a dataset's gain estimate (Gaussian, σ = 8 pixels), the part that is
    low-frequency detector noise. Pass the result as ``gain_estimate`` to
    :func:`decompose_noise` to smooth it once for a whole dataset rather than per micrograph.

    ``gain_estimate`` may be the :class:`cryodask.defects.DatasetDefects` itself: where the
    dataset is large enough for the micrographs to be divided by its gain
    (:data:`cryodask.clean.MIN_GAIN_MICROGRAPHS`), the detector noise that restoration faces
    is then what the estimate leaves: its error and the read noise, not the pattern."""
    from scipy import ndimage

    from cryodask.defects import N_GAIN_RINGS, DatasetDefects

    if isinstance(gain_estimate, _Smoothed):
        return gain_estimate
    rings = None
    if isinstance(gain_estimate, DatasetDefects):
        from cryodask.clean import MIN_GAIN_MICROGRAPHS

        if (gain_estimate.n_micrographs >= MIN_GAIN_MICROGRAPHS
                and np.asarray(gain_estimate.gain_error_power).size == N_GAIN_RINGS):
            centres = (np.arange(N_GAIN_RINGS) + 0.5) / (2.0 * (N_GAIN_RINGS - 1))
            rings = (centres, np.asarray(gain_estimate.gain_pattern_power, np.float64),
                     np.asarray(gain_estimate.gain_error_power, np.float64))
        gain_estimate = gain_estimate.gain
    smoothed = ndimage.gaussian_filter(np.asarray(gain_estimate, dtype=np.float32), 8.0).view(_Smoothed)
    smoothed.rings = rings
    return smoothed


def _shell_power(pattern, k, pixel_size_A):
    """A pattern's power per Fourier pixel (variance units), averaged on the shells ``k``."""
    f = scipy.fft.rfft2(pattern - pattern.mean())
    power = (f.real**2 + f.imag**2) / pattern.size
    ky, kx = frequency_grid(pattern.shape, pixel_size_A, layout="rfft", dtype=np.float64)
    kk = (np.sqrt(ky**2 + kx**2) + 0 * kx).ravel()
    step = k[1] - k[0] if k.size > 1 else 0.5 / pixel_size_A
    index = np.clip(np.round((kk - k[0]) / step).astype(int), 0, k.size - 1)
    counts = np.bincount(index, minlength=k.size)
    return np.bincount(index, power.ravel(), k.size) / np.maximum(counts, 1)


def _band_shares(k, spectra):
    """Each cause's share of the noise power in each band of :data:`BANDS_A`."""
    weight = k  # shells hold Fourier pixels in proportion to k
    out = {c: [] for c in NOISE_CAUSES}
    for low_A, high_A in BANDS_A:
        band = (k >= 1.0 / low_A) & ((k < 1.0 / high_A) if high_A > 0 else np.ones_like(k, bool))
        power = {c: float((spectra[c] * weight)[band].sum()) for c in NOISE_CAUSES}
        total = sum(power.values())
        for c in NOISE_CAUSES:
            out[c].append(power[c] / total if total > 0 else float("nan"))
    return {c: tuple(v) for c, v in out.items()}


#: Envelope B-factors (Å²) tried for the damping of the ice's spectrum (:func:`fit_ice_damping`).
_ICE_DAMPING_GRID = np.arange(0.0, 205.0, 5.0)


def _ice_shape(k, damping: float = 0.0):
    """Amorphous ice's spectrum per unit scale on ``k``: the structure factor's shape
    (:func:`cryodask.simulate.micrograph.ice_power_spectrum`) times the envelope
    ``exp(-B (k² - k_ring²) / 2)`` of B-factor ``damping`` (1 at the ring)."""
    from cryodask.simulate.micrograph import ICE_RING_A, ice_power_spectrum

    k = np.asarray(k, np.float64)
    return ice_power_spectrum(k, 1.0) * np.exp(-0.5 * float(damping) * (k**2 - ICE_RING_A**-2))


def fit_ice_damping(k, signal) -> float:
    """The envelope B-factor (Å²) that damps the ice's spectrum in a CTF-modulated signal
    spectrum, from the shape of its ring.

    The ice passes the same envelope as the particles (motion, coherence, detector MTF):
    at its ring (1/3.66 Å^-1) it is damped many times more than at the low frequencies
    where the particles' information lies, so a ring fitted with the undamped structure
    factor makes the ice there far too weak (on simulated 768² micrographs with B = 50 Å²
    and the pixel's MTF, 5-8x; the Wiener filter then passed the ice as particles). Each
    ``B`` of :data:`_ICE_DAMPING_GRID` is tried in ``signal = a + b k + c k² + s ·
    ice(k) · exp(-B (k² - k_ring²) / 2)`` over 0.15-0.40 Å^-1; the least squares one is
    kept where its ring is measured (``s`` over twice its standard error), else 0, and
    lowered until the ice's power between 1/200 and 0.15 Å^-1 is below the signal's.
    """
    k = np.asarray(k, np.float64)
    signal = np.asarray(signal, np.float64)
    band = (k > 0.15) & (k < 0.40)
    if band.sum() < 8:
        return 0.0
    best = (np.inf, 0.0, 0.0, np.inf)
    for damping in _ICE_DAMPING_GRID:
        design = np.stack([np.ones(band.sum()), k[band], k[band] ** 2, _ice_shape(k[band], damping)], axis=1)
        coef, *_ = np.linalg.lstsq(design, signal[band], rcond=None)
        rss = float(((design @ coef - signal[band]) ** 2).sum())
        if rss < best[0]:
            cov = rss / max(band.sum() - 4, 1) * np.linalg.pinv(design.T @ design)
            best = (rss, float(damping), float(coef[3]), float(np.sqrt(max(cov[3, 3], 0.0))))
    _, damping, scale, error = best
    if not scale > 2.0 * error:
        return 0.0
    # Extrapolated from the ring, the ice's power grows fast with B at low frequencies; it
    # cannot exceed the signal measured there (where the Wiener filter would then see no
    # particles): the largest B that keeps it below, summed over the band's Fourier pixels
    # (shell by shell, single poorly measured shells decided), is kept.
    low = (k > 1.0 / 200.0) & (k < 0.15)
    for trial in _ICE_DAMPING_GRID[_ICE_DAMPING_GRID <= damping][::-1]:
        scale, _ = fit_ice_scale(k, signal, trial)
        if scale > 0 and np.sum(k[low] * scale * _ice_shape(k[low], trial)) <= np.sum(k[low] * signal[low]):
            return float(trial)
    return 0.0


def fit_ice_scale(k, signal, damping: float | None = None):
    """The amount of amorphous ice in a CTF-modulated signal spectrum, with its error.

    Fits ``signal = a + b k + c * ring(k)`` over 0.2-0.36 Å^-1, where the structure factor
    of amorphous ice peaks (1/3.66 Å^-1) and the particles' power is smooth; ``ring`` is
    the ice's shape damped by ``damping`` (by default :func:`fit_ice_damping`; the damping is
    1 at the ring's peak), so ``c`` keeps one meaning whatever the damping.

    Returns
    -------
    scale, error : float
        ``c`` (clipped at 0) and its standard error; NaN where the band is not sampled.
    """
    band = (k > 0.2) & (k < 0.36)
    if band.sum() < 5:
        return float("nan"), float("nan")
    if damping is None:
        damping = fit_ice_damping(k, signal)
    shape = _ice_shape(k, damping)
    ring = shape - np.interp(0.2, k, shape)
    design = np.stack([np.ones(band.sum()), k[band], ring[band]], axis=1)
    coef, residual, rank, _ = np.linalg.lstsq(design, signal[band], rcond=None)
    dof = max(band.sum() - 3, 1)
    rss = float(residual[0]) if residual.size else float(((design @ coef - signal[band]) ** 2).sum())
    cov = rss / dof * np.linalg.pinv(design.T @ design)
    return max(float(coef[2]), 0.0), float(np.sqrt(max(cov[2, 2], 0.0)))


def ice_signal(k, signal, scale: float | None = None, damping: float | None = None):
    """The amorphous-ice part of a CTF-modulated signal spectrum ``S(k)`` (before the CTF):
    ``scale`` (by default :func:`fit_ice_scale`) times the structure factor's shape
    (:func:`cryodask.simulate.micrograph.ice_power_spectrum`, the simulator's own physics)
    damped by the envelope ``damping`` (by default :func:`fit_ice_damping`); zeros where it
    cannot be measured."""
    if damping is None:
        damping = fit_ice_damping(k, signal)
    if scale is None:
        scale, _ = fit_ice_scale(k, signal, damping)
    return _ice_power(k, scale, damping)


def _ice_power(k, scale, damping):
    if not np.isfinite(scale) or scale <= 0:
        return np.zeros_like(np.asarray(k, np.float64))
    return scale * _ice_shape(k, damping)


def ice_on_shells(measured: NoiseMeasurement, k, scale: float | None = None):
    """A measured micrograph's amorphous-ice power on shells ``k`` (before the CTF), for
    :func:`particle_spectrum`: its ring's ``scale`` (by default fitted) and damping."""
    if scale is None:
        scale, _ = fit_ice_scale(measured.k, measured.signal, measured.ice_damping)
    return _ice_power(k, scale, measured.ice_damping)


#: The band in which a micrograph's envelope is measured against the dataset's particles (Å).
ENVELOPE_BAND_A = (25.0, 5.0)


def fit_envelope(k, particles, truth, *, band_A=ENVELOPE_BAND_A):
    """The motion and coherence nodes: a micrograph's envelope B-factor relative to the
    dataset's, with its standard error.

    The particles' power a micrograph shows, ``particles(k) = E²(k) · truth(k)`` with
    ``E = exp(-B k² / 4)`` relative to the dataset's particle spectrum ``truth`` (which
    carries the dataset's mean envelope), is regressed as ``ln(particles / truth) = a - B
    k² / 2`` over the shells in ``band_A`` (Å, up to 0.9 of Nyquist). Motion blur and
    partial coherence both act through ``E``; the spectrum tells their sum only. ``B`` is
    relative: 0 is the dataset's typical envelope, positive is blurrier.

    Returns
    -------
    (float, float)
        ``B`` in Å² and its standard error; NaN when fewer than 4 shells measure it.
    """
    k = np.asarray(k, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(particles, np.float64) / np.asarray(truth, np.float64)
    top = min(1.0 / band_A[1], 0.9 * float(k.max()))
    use = (k > 1.0 / band_A[0]) & (k < top) & np.isfinite(ratio) & (ratio > 0)
    if use.sum() < 4:
        return float("nan"), float("nan")
    x, y = k[use] ** 2, np.log(ratio[use])
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    spread = float(np.sum(residual**2) / max(use.sum() - 2, 1))
    slope_error = np.sqrt(spread / float(np.sum((x - x.mean()) ** 2)))
    return float(-2.0 * coef[1]), float(2.0 * slope_error)


def _mean_ctf2(k, params):
    """CTF² on shells ``k``, averaged over azimuth (astigmatism included)."""
    alpha = np.linspace(0.0, np.pi, 16, endpoint=False)[:, None]
    ky, kx = k[None, :] * np.sin(alpha), k[None, :] * np.cos(alpha)
    return (ctf_2d(ky, kx, params, with_envelope=False) ** 2).mean(axis=0)


def _quality_model(k, signal, params, truth=None, ice=None):
    """``q(N)``: the correlation a Wiener restoration is expected to reach with the CTF-free
    truth, given the noise power ``N`` on the shells ``k``.

    ``q = sqrt(sum_k S h / sum_k S)`` over 1/200 Å^-1 to Nyquist, shells weighted by their
    pixel counts, with ``h = CTF² S / (CTF² S + N)`` and ``S`` the particles' power (the
    ice's own structure left out). Below the CTF's first maximum the spectrum cannot tell
    the particles' power from other slowly varying power (thickness, gain), and the
    particles' power there is taken as at the first maximum. The envelope is not undone:
    what the micrograph does not carry is not counted as truth to be recovered. ``truth``
    (on the shells ``k``, image units) replaces ``S``, e.g. the dataset's particle spectrum
    (:func:`particle_spectrum`), which knows the lowest frequencies. ``ice``: the ice's part
    of ``signal`` (by default :func:`ice_signal`).
    """
    band = k > 1.0 / 200.0
    particles = np.clip(signal - (ice_signal(k, signal) if ice is None else ice), 0.0, None)
    lam = electron_wavelength_A(params.voltage_kV)
    mean_defocus = max(0.5 * (params.defocus_u_A + params.defocus_v_A), 1.0)
    first_maximum = np.sqrt(1.0 / (2.0 * lam * mean_defocus))
    if truth is None:
        j = min(int(np.searchsorted(k, first_maximum)), k.size - 1)
        truth = np.where(k < first_maximum, particles[j], particles)
    ctf2 = _mean_ctf2(k, params)
    s, t, c2, w = truth[band], truth[band], ctf2[band], k[band]
    denominator = float((w * t).sum())

    def quality(noise, k_max=None):
        """``q``; with ``k_max`` (1/Å) only the shells up to it restore (the rest count as
        lost), e.g. the information up to the CTF fit's resolution."""
        if denominator <= 0:
            return 0.0
        h = c2 * s / (c2 * s + np.maximum(noise[band], 1e-30))
        if k_max is not None:
            h = np.where(k[band] <= k_max, h, 0.0)
        return float(np.sqrt((w * t * h).sum() / denominator))

    return quality


def _counterfactual_gains(k, signal, spectra, params, attenuation=1.0, truth=None, ice=None):
    """Predicted gain in restoration quality (:func:`_quality_model`) with each cause at its
    ideal: ``q`` without its noise minus ``q`` with it; twice the dose for ``dose``; for
    ``ice`` also the electrons its attenuation ``a`` stopped (relative to the signal, shot
    noise then scales by ``a``).
    """
    quality = _quality_model(k, signal, params, truth, ice)
    total = sum(spectra.values())
    base = quality(total)
    ideal = {c: total - spectra[c] for c in NOISE_CAUSES}
    ideal["dose"] = total - 0.5 * spectra["dose"]
    ideal["ice"] = ideal["ice"] - (1.0 - attenuation) * spectra["dose"]
    return {c: quality(ideal[c]) - base for c in NOISE_CAUSES}


def spectrum_shells(image, params: CTFParams | None, *, pixel_size_A: float, shell_edges=None, power=None,
                    ctf2=None):
    """A micrograph's mean periodogram and mean CTF² in shells (for :func:`particle_spectrum`).

    Parameters
    ----------
    image : (ny, nx) array
    params : CTFParams or None
        Without a CTF the CTF² row is NaN.
    pixel_size_A : float
    shell_edges : (s + 1,) array, optional
        Shell edges in 1/Å; default 96 shells from 0 to Nyquist. Shells beyond Nyquist are NaN.
    power : (ny, nx // 2 + 1) array, optional
        The periodogram, ``|rfft2(image - mean)|² / size``, when the caller has it.
    ctf2 : (ny, nx // 2 + 1) array, optional
        ``CTF²`` (no envelope) on the same half plane, when the caller has it.

    Returns
    -------
    (2, s) array
    """
    x = np.asarray(image, dtype=np.float32)
    if power is None:
        f = scipy.fft.rfft2(x - x.mean())
        power = (f.real.astype(np.float64) ** 2 + f.imag.astype(np.float64) ** 2) / x.size
    ky, kx = frequency_grid(x.shape, pixel_size_A, layout="rfft", dtype=np.float64)
    kk = (np.sqrt(ky**2 + kx**2) + 0 * kx).ravel()
    if shell_edges is None:
        shell_edges = np.linspace(0.0, 0.5 / pixel_size_A, 97)
    shell_edges = np.asarray(shell_edges, np.float64)
    n_shells = shell_edges.size - 1
    out = np.full((2, n_shells), np.nan)
    index = np.searchsorted(shell_edges, kk, side="right") - 1
    inside = (index >= 0) & (index < n_shells)
    index = index[inside]  # the Fourier pixels within the shells, once
    counts = np.bincount(index, minlength=n_shells)
    filled = counts > 0
    out[0, filled] = (np.bincount(index, np.asarray(power).ravel()[inside], n_shells) / np.maximum(counts, 1))[filled]
    if params is not None:
        if ctf2 is None:
            ctf2 = ctf_2d(ky + 0 * kx, kx + 0 * ky, params, with_envelope=False) ** 2
        ctf2 = np.broadcast_to(ctf2, power.shape).ravel()
        out[1, filled] = (np.bincount(index, ctf2[inside], n_shells) / np.maximum(counts, 1))[filled]
    return out




def particle_spectrum(power, ctf2, scale, ice=None, *, with_error: bool = False):
    """The specimen's power spectrum shared by a dataset's micrographs (a reduction).

    Every micrograph of a dataset images the same specimen: in each shell its periodogram
    is ``P_i = scale_i² (b + T·CTF²_i) + scale_i·w`` -- the particles' power ``T`` through
    its own CTF, a slowly varying background ``b`` that does not follow the CTF
    (thickness, gain), and white shot noise ``w``, for counts with mean ``scale_i``. With
    defoci that differ, the regression of ``P_i / scale_i²`` on ``CTF²_i`` across the
    micrographs finds ``T`` even where a single micrograph's CTF is too weak to show it
    (at the lowest frequencies, where most of a particle's power lies). The amorphous ice
    also follows the CTF; with ``ice``, each micrograph's measured ice (:func:`ice_signal`
    on the shells) is taken out first, else it counts as particles in proportion to the
    dataset's mean thickness.

    Parameters
    ----------
    power, ctf2 : (n, s) arrays
        Each micrograph's mean periodogram and mean CTF² per shell (NaN: not measured).
    scale : (n,) array
        Each micrograph's mean count (1 for data that are not counts).
    ice : (n, s) array, optional
        Each micrograph's amorphous-ice power per shell before the CTF (image units, as
        ``power``; NaN counts as none).

    Returns
    -------
    (s,) array
        ``T`` per shell, >= 0, in (image units / scale)² per Fourier pixel; NaN where fewer
        than 3 micrographs measure the shell. With ``with_error``, also its standard error
        per shell (see :func:`measured_spectrum`).
    """
    power = np.asarray(power, np.float64)
    ctf2 = np.asarray(ctf2, np.float64)
    scale = np.asarray(scale, np.float64)
    if ice is not None:
        power = power - np.nan_to_num(np.asarray(ice, np.float64)) * ctf2
    out = np.full(power.shape[1], np.nan)
    errors = np.full(power.shape[1], np.nan)
    for j in range(power.shape[1]):
        ok = np.isfinite(power[:, j]) & np.isfinite(ctf2[:, j]) & (scale > 0)
        if ok.sum() < 3 or np.ptp(ctf2[ok, j]) <= 0:
            continue
        y = power[ok, j] / scale[ok] ** 2
        design = np.column_stack([np.ones(ok.sum()), ctf2[ok, j], 1.0 / scale[ok]])
        if np.ptp(scale[ok]) == 0:
            design = design[:, :2]
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        dof = ok.sum() - design.shape[1]
        if dof >= 1:
            spread = float(np.sum((y - design @ coef) ** 2)) / dof
            errors[j] = np.sqrt(max(spread * float(np.linalg.pinv(design.T @ design)[1, 1]), 0.0))
        out[j] = max(float(coef[1]), 0.0)
    return (out, errors) if with_error else out


def measured_spectrum(spectrum, error):
    """The particle spectrum where it is measured: 0 where under twice its standard error
    (NaN error: kept). Where the envelope has taken the particles' power, the regression of
    :func:`particle_spectrum` returns its noise, at times orders of magnitude above the
    power there (seen beyond 1/8 Å^-1 on 768² micrographs); counted as the particles'
    power, it made most of the power to restore out of reach (predicted qualities 0.2
    under those measured)."""
    spectrum = np.asarray(spectrum, np.float64)
    error = np.asarray(error, np.float64)
    return np.where(np.isfinite(error) & ~(spectrum > 2.0 * error), 0.0, spectrum)


def dataset_quality(power, ctf2, scale, spectrum, k, *, k_max=None, k_min: float = 1.0 / 200.0):
    """Each micrograph's expected restoration quality from the dataset's particle spectrum.

    In each shell the share of the micrograph's observed power that is particle signal,
    ``h_i = scale_i² T CTF²_i / P_i`` (clipped to [0, 1]), is what a Wiener filter
    recovers there; ``q_i = sqrt(Σ k T h_i / Σ k T)`` over ``k_min``-Nyquist is the
    correlation with the CTF-free truth it is expected to reach (shells weighted by their
    Fourier pixels and the truth's power). With ``k_max`` (per micrograph, 1/Å) only the
    shells up to it count as restored.
    """
    power = np.asarray(power, np.float64)
    ctf2 = np.asarray(ctf2, np.float64)
    scale = np.asarray(scale, np.float64)[:, None]
    t = np.where(np.isfinite(spectrum), spectrum, 0.0)[None, :]
    k = np.asarray(k, np.float64)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.clip(scale**2 * t * ctf2 / power, 0.0, 1.0)
    h = np.where(np.isfinite(h), h, 0.0)
    band = np.broadcast_to(k > k_min, h.shape)
    if k_max is not None:
        band = band & (k <= np.asarray(k_max, np.float64)[:, None])
    weight = k * t * (k > k_min)
    denominator = weight.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.sqrt((weight * h * band).sum(axis=1) / denominator)
    return np.where((denominator > 0) & np.isfinite(power).any(axis=1) & np.isfinite(ctf2).any(axis=1), q, np.nan)
