import numpy as np
import pytest

from cryodask.spectrum import power_spectrum, radial_average


def test_white_noise_has_flat_unit_power(xp):
    rng = np.random.default_rng(0)
    image = xp.asarray(rng.normal(scale=2.0, size=(300, 260)).astype(np.float32))
    ps = power_spectrum(image, tile_size=64, overlap=0.5)
    assert ps.shape == (64, 33) and ps.dtype == xp.float32
    ps = np.asarray(ps)
    assert ps[1:, 1:].mean() == pytest.approx(4.0, rel=0.05)


def test_sinusoid_peaks_at_its_frequency():
    y, x = np.mgrid[0:256, 0:256]
    image = np.sin(2 * np.pi * (8 * x / 64 + 4 * y / 64)).astype(np.float32)
    ps = power_spectrum(image, tile_size=64)
    iy, ix = np.unravel_index(np.argmax(ps), ps.shape)
    assert (iy, ix) in ((4, 8), (60, 8))


def test_same_on_numpy_and_strict(xp):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(130, 150)).astype(np.float32)
    ref = power_spectrum(image, tile_size=32, overlap=0.25)
    out = power_spectrum(xp.asarray(image), tile_size=32, overlap=0.25)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-6)


def test_radial_average(xp):
    n = 64
    ky = np.fft.fftfreq(n, d=2.0)[:, None]
    kx = np.fft.rfftfreq(n, d=2.0)[None, :]
    spectrum = xp.asarray(np.sqrt(ky**2 + kx**2).astype(np.float32))
    k, profile = radial_average(spectrum, 2.0)
    k, profile = np.asarray(k), np.asarray(profile)
    assert k.shape == (32,) and k[-1] < 0.25
    np.testing.assert_allclose(profile, k, atol=0.5 * (k[1] - k[0]))  # within half a bin


@pytest.mark.parametrize("kwargs, match", [({"tile_size": 15}, "tile_size"),
                                           ({"overlap": 0.95}, "overlap"),
                                           ({"tile_size": 512}, "smaller")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        power_spectrum(np.zeros((100, 100), np.float32), **kwargs)
