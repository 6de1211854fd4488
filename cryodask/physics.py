"""The physics of image formation, in one place.

Every other module takes the electron wavelength, the contrast transfer function (CTF),
envelopes and frequency grids from here, so the conventions below are written once.

Conventions
-----------
* A micrograph is indexed ``[y, x]``; x is the column axis, y increases with the row index.
* Spatial frequencies are in 1/Å. ``frequency_grid`` returns them in FFT order (no shift);
  the caller states the layout: ``"rfft"`` (last axis halved, as ``rfftn``) or ``"full"``.
* Defocus is positive for underfocus. ``defocus_u_A >= defocus_v_A``; ``defocus_angle_deg``
  is the direction of ``defocus_u`` measured from +x towards +y, in [0, 180).
* ``chi(k) = pi*lambda*df(alpha)*k**2 - pi/2*Cs*lambda**3*k**4 + phase_shift`` and
  ``CTF(k) = -sin(chi(k) + arcsin(Q0))`` (CTFFIND's sign: positive projected potential is
  dark under focus). The envelope is ``E(k) = exp(-B*k**2/4)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_compat
import numpy as np

__all__ = [
    "CTFParams",
    "ctf_2d",
    "defocus_at_azimuth",
    "electron_wavelength_A",
    "envelope",
    "frequency_grid",
    "normalize_astigmatism",
]


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength.

    Parameters
    ----------
    voltage_kV : float
        Accelerating voltage in kV, > 0.

    Returns
    -------
    float
        Wavelength in Å.

    Notes
    -----
    ``lambda = 12.2643247 / sqrt(V * (1 + 0.978466e-6 * V))`` with V in volts.

    Examples
    --------
    >>> round(electron_wavelength_A(300.0), 5)
    0.01969
    """
    if not voltage_kV > 0:
        raise ValueError(f"voltage_kV must be > 0, got {voltage_kV!r}")
    volts = 1e3 * float(voltage_kV)
    return 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def normalize_astigmatism(
    defocus_u_A: float, defocus_v_A: float, defocus_angle_deg: float
) -> tuple[float, float, float]:
    """Return ``(u, v, angle)`` with ``u >= v`` and the angle in [0, 180).

    Swapping U and V turns the astigmatism axis by 90 degrees, so the same CTF is described.

    Examples
    --------
    >>> normalize_astigmatism(10000.0, 12000.0, 30.0)
    (12000.0, 10000.0, 120.0)
    """
    u, v, angle = float(defocus_u_A), float(defocus_v_A), float(defocus_angle_deg)
    if u < v:
        u, v, angle = v, u, angle + 90.0
    return u, v, angle % 180.0


@dataclass(frozen=True)
class CTFParams:
    """Parameters of a micrograph's CTF, in the units their names give.

    ``defocus_u_A`` and ``defocus_v_A`` are normalised on construction so that
    ``defocus_u_A >= defocus_v_A`` (see :func:`normalize_astigmatism`).
    """

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float = 0.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    phase_shift_deg: float = 0.0
    b_factor_A2: float = 0.0

    def __post_init__(self) -> None:
        for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "cs_mm",
                     "phase_shift_deg", "b_factor_A2"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not self.voltage_kV > 0:
            raise ValueError(f"voltage_kV must be > 0, got {self.voltage_kV!r}")
        if not 0.0 <= self.amplitude_contrast < 1.0:
            raise ValueError(
                f"amplitude_contrast must be in [0, 1), got {self.amplitude_contrast!r}"
            )
        u, v, angle = normalize_astigmatism(
            self.defocus_u_A, self.defocus_v_A, self.defocus_angle_deg
        )
        object.__setattr__(self, "defocus_u_A", u)
        object.__setattr__(self, "defocus_v_A", v)
        object.__setattr__(self, "defocus_angle_deg", angle)

    @property
    def mean_defocus_A(self) -> float:
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)

    @property
    def astigmatism_A(self) -> float:
        return self.defocus_u_A - self.defocus_v_A

    @property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.voltage_kV)


def frequency_grid(shape, pixel_size_A: float, *, layout: str = "rfft", xp=np, dtype=None,
                   device=None):
    """Spatial-frequency coordinates ``(ky, kx)`` of a 2D Fourier transform, in 1/Å.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the real-space image.
    pixel_size_A : float
        Pixel size in Å.
    layout : {"rfft", "full"}
        ``"rfft"`` gives the ``(ny, nx // 2 + 1)`` half plane of ``rfftn``; ``"full"`` the
        ``(ny, nx)`` plane of ``fftn``. Both in FFT order (zero frequency at ``[0, 0]``).
    xp : array namespace
        Where to allocate (NumPy, CuPy, ``array_api_strict``...).
    dtype : dtype, optional
        Default ``xp.float32``.

    Returns
    -------
    ky, kx : arrays of shape ``(ny, 1)`` and ``(1, nkx)``
        Broadcastable frequency coordinates along rows (y) and columns (x).
    """
    if layout not in ("rfft", "full"):
        raise ValueError(f"layout must be 'rfft' or 'full', got {layout!r}")
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be > 0, got {pixel_size_A!r}")
    ny, nx = (int(n) for n in shape)
    dtype = xp.float32 if dtype is None else dtype
    kwargs = {} if device is None else {"device": device}
    ky = xp.fft.fftfreq(ny, d=float(pixel_size_A), **kwargs)
    if layout == "rfft":
        kx = xp.fft.rfftfreq(nx, d=float(pixel_size_A), **kwargs)
    else:
        kx = xp.fft.fftfreq(nx, d=float(pixel_size_A), **kwargs)
    ky = xp.reshape(xp.astype(ky, dtype), (ny, 1))
    kx = xp.reshape(xp.astype(kx, dtype), (1, kx.shape[0]))
    return ky, kx


def defocus_at_azimuth(alpha_rad, defocus_u_A, defocus_v_A, defocus_angle_deg):
    """``df(alpha) = (u + v + (u - v) * cos(2 * (alpha - angle))) / 2``, in Å."""
    xp = array_api_compat.array_namespace(alpha_rad)
    angle = math.radians(float(defocus_angle_deg))
    mean = 0.5 * (float(defocus_u_A) + float(defocus_v_A))
    half = 0.5 * (float(defocus_u_A) - float(defocus_v_A))
    return mean + half * xp.cos(2.0 * (alpha_rad - angle))


def ctf_2d(ky, kx, params: CTFParams, *, with_envelope: bool = True):
    """The CTF on a frequency grid, DESIGN.md's convention.

    Parameters
    ----------
    ky, kx : arrays
        Broadcastable frequency coordinates in 1/Å (see :func:`frequency_grid`).
    params : CTFParams
    with_envelope : bool
        Multiply by ``exp(-B k^2 / 4)`` with ``B = params.b_factor_A2``.

    Returns
    -------
    array
        ``CTF(k)`` (times the envelope), broadcast shape of ``ky`` and ``kx``, their dtype.

    Notes
    -----
    ``chi = pi*lambda*df(alpha)*k^2 - pi/2*Cs*lambda^3*k^4 + phi``,
    ``CTF = -sin(chi + arcsin(Q0))`` with ``alpha = atan2(ky, kx)``.

    References
    ----------
    Rohou & Grigorieff (2015), CTFFIND4, J. Struct. Biol. 192, 216-221.
    """
    xp = array_api_compat.array_namespace(ky, kx)
    lam = params.wavelength_A
    cs_A = params.cs_mm * 1e7
    k2 = ky * ky + kx * kx
    alpha = xp.atan2(ky + 0.0 * kx, kx + 0.0 * ky)
    df = defocus_at_azimuth(alpha, params.defocus_u_A, params.defocus_v_A,
                            params.defocus_angle_deg)
    chi = (math.pi * lam) * df * k2 - (0.5 * math.pi * cs_A * lam**3) * (k2 * k2)
    offset = math.radians(params.phase_shift_deg) + math.asin(params.amplitude_contrast)
    ctf = -xp.sin(chi + offset)
    if with_envelope and params.b_factor_A2 != 0.0:
        ctf = ctf * envelope(k2, params.b_factor_A2)
    return ctf


def envelope(k2, b_factor_A2: float):
    """``E(k) = exp(-B * k^2 / 4)`` given ``k2 = k^2`` in 1/Å² and B in Å²."""
    xp = array_api_compat.array_namespace(k2)
    return xp.exp((-0.25 * float(b_factor_A2)) * k2)
