import os
import warnings

import numpy as np
import pytest

from cryodask.ctf import CTFFitWarning, CTFSearch, check_sectors, estimate_ctf, fit_spectrum, frame_transform
from cryodask.simulate import MicrographParams, simulate_micrograph


def _angle_error(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


def _sim(seed=0, **kwargs):
    values = dict(shape=(1024, 1024), dose_e_per_A2=40, ice_thickness_A=500)
    values.update(kwargs)
    params = MicrographParams(**values)
    return params, simulate_micrograph(params, seed=seed).image


@pytest.mark.parametrize("u,v,angle", [(21000, 20000, 25.0), (21000, 20000, 65.0),
                                      (21000, 20000, 115.0), (21000, 20000, 155.0),
                                      (20000, 21000, 40.0)])  # U < V given: swapped, angle + 90
def test_astigmatism_angle_in_every_quadrant(u, v, angle):
    params, image = _sim(seed=7, defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=angle)
    fit = estimate_ctf(image, pixel_size_A=1.0)
    assert fit.reliable
    assert fit.mean_defocus_A == pytest.approx(params.ctf.mean_defocus_A, rel=0.005)
    assert _angle_error(fit.defocus_angle_deg, params.defocus_angle_deg) <= 3.0
    assert fit.defocus_u_A - fit.defocus_v_A == pytest.approx(1000.0, abs=150.0)
    assert fit.defocus_u_A >= fit.defocus_v_A and 0 <= fit.defocus_angle_deg < 180


@pytest.mark.parametrize("seed, mean", [(1, 8000.0), (2, 15000.0), (3, 22000.0), (4, 30000.0)])
def test_mean_defocus_across_the_range(seed, mean):
    params, image = _sim(seed=seed, defocus_u_A=mean + 150, defocus_v_A=mean - 150,
                         defocus_angle_deg=10.0 * seed, dose_e_per_A2=20 + 10 * seed)
    fit = estimate_ctf(image, pixel_size_A=1.0)
    assert abs(fit.mean_defocus_A / mean - 1) < 0.005
    assert 1.5 < fit.fit_resolution_A < 10.0
    assert fit.cc > 0.03


def test_result_does_not_depend_on_array_type(xp):
    params, image = _sim(seed=5, shape=(512, 640), defocus_u_A=15500, defocus_v_A=14500,
                         defocus_angle_deg=50)
    ref = estimate_ctf(image, pixel_size_A=1.0)
    out = estimate_ctf(xp.asarray(image), pixel_size_A=1.0)
    assert out.mean_defocus_A == pytest.approx(ref.mean_defocus_A, rel=1e-3)
    assert _angle_error(out.defocus_angle_deg, ref.defocus_angle_deg) < 1.0


def test_fits_sharing_one_frame_transform_give_what_each_gives_alone():
    params, image = _sim(seed=6, shape=(512, 512), defocus_u_A=15500, defocus_v_A=14500, defocus_angle_deg=30)
    exclude = np.zeros(image.shape, bool)
    exclude[:100, :150] = True
    transform = frame_transform(image, exclude=exclude)
    for search in (CTFSearch(), CTFSearch(box_size=128), CTFSearch(min_defocus_A=12000, max_defocus_A=18000)):
        alone = estimate_ctf(image, pixel_size_A=1.0, search=search, exclude=exclude)
        shared = estimate_ctf(image, pixel_size_A=1.0, search=search, exclude=exclude, transform=transform)
        assert shared == alone
    alone = check_sectors(image, params.ctf, pixel_size_A=1.0, exclude=exclude)
    shared = check_sectors(image, params.ctf, pixel_size_A=1.0, transform=transform)
    np.testing.assert_array_equal(shared.cc, alone.cc)
    np.testing.assert_array_equal(shared.defocus_A, alone.defocus_A)
    # A transform made for another image shape or outlier guard is refused.
    with pytest.raises(ValueError, match="clipped at 6.0 sigma; asked for a .* clipped at None"):
        estimate_ctf(image, pixel_size_A=1.0, clip_sigma=None, transform=transform)
    with pytest.raises(ValueError, match=r"\(512, 512\) image .* asked for a \(512, 256\) image"):
        fit_spectrum(image[:, :256], pixel_size_A=1.0, transform=transform)


def test_phase_shift_is_recovered():
    params, image = _sim(seed=9, defocus_u_A=8000, defocus_v_A=8000, phase_shift_deg=70.0)
    fit = estimate_ctf(image, pixel_size_A=1.0, search=CTFSearch(fit_phase_shift=True))
    assert fit.phase_shift_deg == pytest.approx(70.0, abs=8.0)
    assert fit.mean_defocus_A == pytest.approx(8000, rel=0.02)


def test_pure_noise_gives_a_low_score_and_a_warning():
    rng = np.random.default_rng(0)
    noise = rng.poisson(40.0, size=(1024, 1024)).astype(np.float32)
    with pytest.warns(CTFFitWarning, match="no significant Thon rings"):
        fit = estimate_ctf(noise, pixel_size_A=1.0)
    assert not fit.reliable
    assert fit.cc < 0.03


def test_empty_image_warns_and_does_not_crash():
    with pytest.warns(CTFFitWarning, match="no variance"):
        fit = estimate_ctf(np.zeros((512, 512), np.float32), pixel_size_A=1.0)
    assert not fit.reliable and fit.cc == 0.0 and np.isnan(fit.defocus_u_A)


def test_bad_search_arguments():
    with pytest.raises(ValueError, match="max_resolution_A"):
        CTFSearch(min_resolution_A=5, max_resolution_A=30)
    with pytest.raises(ValueError, match="min_defocus_A"):
        CTFSearch(min_defocus_A=0)
    with pytest.raises(ValueError, match="Nyquist"):
        estimate_ctf(np.ones((256, 256), np.float32), pixel_size_A=12.0)  # Nyquist 24 Å


def test_fit_spectrum_layout():
    image = np.random.default_rng(1).normal(size=(600, 800)).astype(np.float32)
    spec = fit_spectrum(image, pixel_size_A=1.0, search=CTFSearch(box_size=200), k_limit=0.2)
    assert spec.power.shape == (spec.ky.shape[0], spec.kx.shape[1])
    assert spec.ky[0, 0] < 0 < spec.ky[-1, 0] and spec.kx[0, 0] >= 0
    assert float(np.mean(spec.power)) == pytest.approx(1.0, rel=0.1)  # white noise: flat


SHARED_EPU = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real",
                          "mrcfile", "epu2.9_example.mrc")


@pytest.mark.skipif(not os.path.isfile(SHARED_EPU), reason="the 4096x4096 real EPU micrograph lies "
                    "outside the project (../shared/data/real)")
def test_real_micrograph_fit_is_stable_across_spectrum_sampling():
    import mrcfile

    image = mrcfile.read(SHARED_EPU)
    fits = [estimate_ctf(image, pixel_size_A=0.66655, search=CTFSearch(box_size=b)) for b in (512, 1024)]
    assert all(f.reliable for f in fits)
    assert fits[0].mean_defocus_A == pytest.approx(fits[1].mean_defocus_A, rel=0.01)
    assert 20000 < fits[0].mean_defocus_A < 35000  # EPU's nominal: 2.2 µm applied, 1.8 µm lens


def test_real_crop_is_fitted_without_error(data_path):
    import mrcfile

    image = mrcfile.read(data_path("epu2.9_crop512.mrc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CTFFitWarning)
        fit = estimate_ctf(image, pixel_size_A=0.66655)
    assert np.isfinite(fit.mean_defocus_A) and 0 <= fit.cc <= 1
