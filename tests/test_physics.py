import math

import numpy as np
import pytest

from cryodask.physics import (
    CTFParams,
    ctf_2d,
    defocus_at_azimuth,
    electron_wavelength_A,
    frequency_grid,
    normalize_astigmatism,
)


def test_wavelength_known_values():
    # Published relativistic wavelengths: 0.02508 Å at 200 kV, 0.01969 Å at 300 kV.
    assert electron_wavelength_A(300) == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength_A(200) == pytest.approx(0.025079, abs=1e-6)
    with pytest.raises(ValueError, match="voltage_kV"):
        electron_wavelength_A(0)


def test_normalize_astigmatism_swaps_and_turns_by_90():
    assert normalize_astigmatism(1e4, 1.2e4, 30) == (1.2e4, 1e4, 120.0)
    assert normalize_astigmatism(1.2e4, 1e4, -10) == (1.2e4, 1e4, 170.0)
    p = CTFParams(defocus_u_A=1e4, defocus_v_A=1.5e4, defocus_angle_deg=100)
    assert (p.defocus_u_A, p.defocus_v_A, p.defocus_angle_deg) == (1.5e4, 1e4, 10.0)


def test_ctf_params_validate():
    with pytest.raises(ValueError, match="amplitude_contrast"):
        CTFParams(1e4, 1e4, amplitude_contrast=1.5)
    with pytest.raises(ValueError, match="defocus_u_A"):
        CTFParams(float("nan"), 1e4)


def test_frequency_grid_layouts():
    ky, kx = frequency_grid((6, 8), 2.0, layout="rfft")
    assert ky.shape == (6, 1) and kx.shape == (1, 5) and ky.dtype == np.float32
    assert kx[0, -1] == pytest.approx(0.25)  # Nyquist = 1 / (2 * 2 Å)
    ky, kx = frequency_grid((6, 8), 2.0, layout="full")
    assert kx.shape == (1, 8)
    with pytest.raises(ValueError, match="layout"):
        frequency_grid((6, 8), 2.0, layout="shifted")


@pytest.mark.parametrize("angle", [20.0, 70.0, 110.0, 160.0])
def test_ctf_follows_the_convention_in_every_quadrant(angle):
    """Along +x rotated by `angle` towards +y the defocus is U; at 90 degrees more it is V."""
    p = CTFParams(defocus_u_A=20000, defocus_v_A=15000, defocus_angle_deg=angle, cs_mm=2.7,
                  amplitude_contrast=0.1)
    lam = electron_wavelength_A(300)
    k = 0.1
    for alpha_deg, df in ((angle, 20000), (angle + 90, 15000), (angle + 180, 20000)):
        a = math.radians(alpha_deg)
        ky = np.array([[k * math.sin(a)]], dtype=np.float64)
        kx = np.array([[k * math.cos(a)]], dtype=np.float64)
        chi = math.pi * lam * df * k**2 - 0.5 * math.pi * 2.7e7 * lam**3 * k**4
        expected = -math.sin(chi + math.asin(0.1))
        assert float(ctf_2d(ky, kx, p)[0, 0]) == pytest.approx(expected, abs=1e-9)


def test_ctf_sign_at_low_frequency_is_dark_for_positive_potential():
    p = CTFParams(15000, 15000, amplitude_contrast=0.07)
    ky, kx = frequency_grid((64, 64), 1.0, dtype=np.float64)
    ctf = ctf_2d(ky, kx, p)
    assert ctf[0, 0] == pytest.approx(-0.07)
    assert ctf[0, 2] < 0  # first lobe: negative, so protein (positive) images dark


def test_phase_shift_and_envelope():
    ky, kx = frequency_grid((32, 32), 1.0, dtype=np.float64)
    plain = ctf_2d(ky, kx, CTFParams(1e4, 1e4, amplitude_contrast=0.0, phase_shift_deg=90))
    assert plain[0, 0] == pytest.approx(-1.0)
    env = ctf_2d(ky, kx, CTFParams(1e4, 1e4, b_factor_A2=100.0))
    bare = ctf_2d(ky, kx, CTFParams(1e4, 1e4))
    k2 = ky**2 + kx**2
    np.testing.assert_allclose(env, bare * np.exp(-25.0 * k2), rtol=1e-12, atol=1e-15)


def test_ctf_runs_on_any_array_namespace(xp):
    ky, kx = frequency_grid((16, 24), 1.5, xp=xp)
    out = ctf_2d(ky, kx, CTFParams(12000, 11000, 45.0))
    ref_ky, ref_kx = frequency_grid((16, 24), 1.5)
    ref = ctf_2d(ref_ky, ref_kx, CTFParams(12000, 11000, 45.0))
    assert out.shape == (16, 13) and out.dtype == xp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)


def test_defocus_at_azimuth():
    a = np.radians(np.array([30.0, 120.0, 75.0]))
    df = defocus_at_azimuth(a, 2e4, 1e4, 30.0)
    np.testing.assert_allclose(df, [2e4, 1e4, 1.5e4])
