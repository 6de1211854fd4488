"""Scoring: every rule passes on a good micrograph and fails for its own reason on a bad one;
novelty flags a duplicate; the learned weights repeat; V, HyperScore and --select."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cryodask.artifacts import HOT_PIXEL, XRAY, clean_micrograph
from cryodask.ctf import estimate_ctf
from cryodask.physics import CTFParams
from cryodask.regions import classify_regions, exclusion_mask
from cryodask.score import (COMPONENTS, RULES, RuleLimits, ScoreWeights, combine, default_weights,
                            evaluate_rules, hyperscore, learn_weights, measure_micrograph, novelty,
                            prior_stability, select)
from cryodask.simulate import MicrographParams, simulate_micrograph


def _judge(raw, *, pixel_size_A=1.0, dose=40.0, limits=RuleLimits()):
    """The rules for one micrograph, as the pipeline judges it (cleaned, regions, CTF)."""
    cleaned, mask = clean_micrograph(raw)
    exclude = exclusion_mask(classify_regions(cleaned))
    fit = estimate_ctf(cleaned, pixel_size_A=pixel_size_A, exclude=exclude, warn=False)
    params = (CTFParams(fit.defocus_u_A, fit.defocus_v_A, fit.defocus_angle_deg)
              if np.isfinite(fit.defocus_u_A) else None)
    found, _ = measure_micrograph(raw, cleaned, params, pixel_size_A=pixel_size_A, exclude=exclude)
    row = dict(found, defocus_u_A=fit.defocus_u_A, defocus_v_A=fit.defocus_v_A, ctf_reliable=fit.reliable,
               ctf_cc=fit.cc, artifact_fraction=float(((mask == HOT_PIXEL) | (mask == XRAY)).mean()),
               excluded_fraction=float(exclude.mean()))
    return evaluate_rules(row, limits, pixel_size_A=pixel_size_A, dose_e_per_A2=dose)


def _sim(shape=(512, 512), seed=1, **changes):
    values = dict(shape=shape, defocus_u_A=15200.0, defocus_v_A=14800.0, ice_thickness_A=400.0)
    values.update(changes)
    return simulate_micrograph(MicrographParams(**values), seed=seed).image


@pytest.fixture(scope="module")
def good():
    return _sim()


@pytest.fixture(scope="module")
def good_rules(good):
    return _judge(good)


def _fails(results, rule):
    passed, reason = results[rule]
    assert passed is False, f"{rule} should fail: {results[rule]}"
    assert reason
    return reason


def test_a_good_micrograph_passes_every_rule_that_applies(good_rules):
    assert set(good_rules) == set(RULES)
    for rule, (passed, reason) in good_rules.items():
        assert passed in (True, None), f"{rule}: {reason}"
    judged = [rule for rule, (passed, _) in good_rules.items() if passed is not None]
    assert len(judged) >= 9  # all but the ice ring, too faint in 400 Å of ice to judge


def test_no_thon_rings_fails_the_fit_rule():
    noise = np.random.default_rng(0).poisson(40.0, (512, 512)).astype(np.float32)
    assert "Thon rings" in _fails(_judge(noise), "ctf_fit_reliable")


def test_defocus_outside_the_requested_range(good):
    reason = _fails(_judge(good, limits=RuleLimits(min_defocus_A=20000.0)), "defocus_in_range")
    assert "20000" in reason


def test_implausible_astigmatism():
    astigmatic = _sim(defocus_u_A=16500.0, defocus_v_A=13500.0, defocus_angle_deg=40.0)
    assert "exceeds 1500" in _fails(_judge(astigmatic), "astigmatism_plausible")


def test_directional_drift_breaks_ring_consistency(good):
    drifted = ndimage.uniform_filter1d(good, 20, axis=1)  # motion blur along x
    assert "sectors" in _fails(_judge(drifted), "thon_rings_consistent")


def test_ring_consistency_fails_with_a_wrong_astigmatism_angle():
    from cryodask.ctf import check_sectors

    image = _sim(shape=(768, 768), defocus_u_A=16000.0, defocus_v_A=14000.0, defocus_angle_deg=30.0,
                 ice_thickness_A=500.0)
    right = CTFParams(16000.0, 14000.0, 30.0)
    wrong = CTFParams(16000.0, 14000.0, 120.0)
    ok = check_sectors(image, right, pixel_size_A=1.0)
    bad = check_sectors(image, wrong, pixel_size_A=1.0)
    assert np.all(ok.agrees) and np.all(ok.significant)
    assert not np.all(bad.agrees)


def test_scaled_counts_fail_poisson_and_leave_the_dose_unjudged(good):
    results = _judge(good * 3.0)
    assert "Poisson" in _fails(results, "poisson_counts")
    assert results["dose_matches_metadata"] == (None, "the pixel values are not electron counts (see poisson_counts)")


def test_dose_inconsistent_with_metadata(good):
    assert "of the stated 100" in _fails(_judge(good, dose=100.0), "dose_matches_metadata")


def test_rules_that_need_counts_do_not_apply_to_normalised_images(good):
    results = _judge((good - good.mean()) / good.std())
    assert results["poisson_counts"][0] is None
    assert results["dose_matches_metadata"][0] is None


def test_saturation(good):
    clipped = np.minimum(good, np.percentile(good, 99.5))
    assert "maximum value" in _fails(_judge(clipped), "no_saturation")


def test_too_many_artifacts():
    hit = _sim(n_hot_pixels=2000, n_xrays=40)
    assert "X-rays" in _fails(_judge(hit), "artifacts_below_limit")


def test_too_much_excluded_area(good_rules):
    broken = _sim(vacuum_fraction=0.5, n_contamination=3)
    reason = _fails(_judge(broken, limits=RuleLimits(max_excluded_fraction=0.3)), "excluded_below_limit")
    assert "vacuum or contamination" in reason
    assert good_rules["excluded_below_limit"][0] is True


@pytest.fixture(scope="module")
def thick_ice():
    # A strong ice ring: thick ice and a weak envelope.
    return _sim(shape=(768, 768), ice_thickness_A=2500.0, dose_e_per_A2=60.0, b_motion_A2=10.0,
                b_coherence_A2=10.0)


def test_ice_ring_confirms_the_right_pixel_size(thick_ice):
    assert _judge(thick_ice, dose=60.0)["ice_ring_at_3_66"] == (True, "")


def test_ice_ring_catches_a_wrong_pixel_size(thick_ice):
    reason = _fails(_judge(thick_ice, pixel_size_A=1.15, dose=60.0), "ice_ring_at_3_66")
    assert "stated 1.15" in reason
    estimate = float(reason.split("pixel size at ")[1].split(" Å")[0])
    assert abs(estimate - 1.0) < 0.05


def test_novelty_flags_a_duplicate_and_an_outlier():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 6))
    x[5] = x[4]  # a duplicate
    x[9] += 12.0  # unusual conditions
    score, library = novelty(x)
    assert score[4] < 0.05 and score[5] < 0.05
    assert score[9] > 3.0
    assert 0.5 < np.median(score) < 2.0
    # Against the saved library, a copy of a library micrograph is not novel.
    again, _ = novelty(x[[0, 9]] + 1e-6, reference=library)
    assert again[0] < 0.05


def test_prior_stability_is_low_for_well_measured_micrographs():
    rng = np.random.default_rng(0)
    truth = rng.normal(10.0, 1.0, 40)
    errors = np.full(40, 0.05)
    errors[0] = 5.0  # one poorly measured micrograph leans on the prior
    unstable, drift = prior_stability(truth + rng.normal(0, errors), errors, seed=1)
    assert np.median(unstable[1:]) < 0.2
    assert drift < 0.05
    assert np.isfinite(unstable).all()


def test_v_and_hyperscore_follow_the_formula():
    weights = ScoreWeights(w=(0.1, 0.2, 0.3, 0.4, 0.5), beta=2.0, gamma=-1.0, kappa=0.5)
    comps = {"logic": np.array([0.9]), "novelty": np.array([1.1]), "impact": np.array([3.0]),
             "repro": np.array([0.8]), "meta": np.array([0.7])}
    v = combine(comps, weights)
    expected = 0.1 * 0.9 + 0.2 * 1.1 + 0.3 * np.log(4.0) + 0.4 * 0.8 + 0.5 * 0.7
    assert v[0] == pytest.approx(expected)
    sigma = 1.0 / (1.0 + np.exp(-(2.0 * np.log(expected) - 1.0)))
    assert hyperscore(v, weights)[0] == pytest.approx(100.0 * (1.0 + sigma**0.5))


def test_weights_are_validated_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="weights >= 0"):
        ScoreWeights(w=(1.0, -1.0, 0.0, 0.0, 0.0))
    shipped = default_weights()
    assert len(shipped.w) == len(COMPONENTS) and shipped.provenance
    path = tmp_path / "w.json"
    shipped.save(path)
    assert ScoreWeights.load(path) == shipped
    path.write_text('{"w": [1, 2, 3]}')
    with pytest.raises(ValueError, match="missing field"):
        ScoreWeights.load(path)


def test_learned_weights_repeat_from_a_seed_and_rank_by_quality():
    pytest.importorskip("optuna")
    rng = np.random.default_rng(5)
    n = 40
    quality = rng.uniform(0.3, 0.9, n)
    comps = {"logic": rng.uniform(0.8, 1.0, n), "novelty": rng.uniform(0.5, 1.5, n),
             "impact": 30 * quality**2 + rng.normal(0, 1.0, n).clip(-3, 3) + 3,
             "repro": rng.uniform(0.5, 1.0, n), "meta": rng.uniform(0.5, 1.0, n)}
    first = learn_weights(comps, quality, n_trials=60, seed=7)
    second = learn_weights(comps, quality, n_trials=60, seed=7)
    assert first == second
    assert first.provenance["spearman"] > 0.8
    # The other four are noise: the one-standard-error rule leaves them (nearly) out, where
    # the best of the trials alone gave 'logic' a fifth of the weight.
    assert first.w[COMPONENTS.index("impact")] > 0.9
    assert first.provenance["spearman"] >= first.provenance["spearman_best"] - first.provenance[
        "spearman_standard_error"]


def test_select_expressions():
    table = pd.DataFrame({"hyperscore": [150.0, 120.0, 170.0], "logic": [1.0, 1.0, 0.5],
                          "top_cause": ["ice", "dose", "ice"]})
    assert select(table, "hyperscore > 140").tolist() == [True, False, True]
    assert select(table, "hyperscore > 140 and logic >= 0.8").tolist() == [True, False, False]
    assert select(table, "logic < 0.8 or hyperscore < 130").tolist() == [False, True, True]
    assert select(table, "top_cause == 'ice'").tolist() == [True, False, True]
    with pytest.raises(ValueError, match="no column 'hyper'"):
        select(table, "hyper > 1")
    with pytest.raises(ValueError, match="cannot read"):
        select(table, "hyperscore >> 1")


def test_score_command_flags_the_duplicate_and_selects(tmp_path, capsys):
    import hashlib
    import shutil

    import starfile

    from cryodask.cli import main
    from cryodask.simulate import draw_micrograph_params, write_simulated_dataset

    params = draw_micrograph_params(8, shape=(512, 512), seed=3, dose_e_per_A2=40.0)
    write_simulated_dataset(tmp_path / "sim", params, seed=3)
    files = sorted(str(p) for p in (tmp_path / "sim").glob("mic_*.mrc"))
    duplicate = str(tmp_path / "sim" / "copy_of_mic_0002.mrc")
    shutil.copy(files[2], duplicate)
    files.append(duplicate)
    digests = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]
    out = tmp_path / "scores.csv"
    star = tmp_path / "good.star"
    assert main(["score", *files, "--out", str(out), "--dose", "40", "--select", "logic >= 0.8",
                 "--star", str(star), "--save-library", str(tmp_path / "lib.npz")]) == 0
    table = pd.read_csv(out)
    for column in ("micrograph", "logic", "novelty", "impact", "repro", "meta", "V", "hyperscore",
                   "failed_rules", "top_cause", "quality_expected", "ice_thickness_A"):
        assert column in table.columns
    assert table["micrograph"].tolist() == files
    novel = table.set_index("micrograph")["novelty"]
    assert novel[files[2]] < 0.05 and novel[duplicate] < 0.05
    others = novel.drop([files[2], duplicate])
    assert (others > 0.2).all()
    assert table["hyperscore"].between(100, 200).all()
    assert table["logic"].between(0, 1).all()
    chosen = starfile.read(star)["micrographs"]
    assert len(chosen) == int((table["logic"] >= 0.8).sum())
    thickness = chosen["rlnMicrographIceThickness"].to_numpy()
    truth = pd.read_csv(tmp_path / "sim" / "truth.csv").set_index("micrograph")["ice_thickness_A"]
    expected = truth.reindex(chosen["rlnMicrographName"]).to_numpy()
    have = ~np.isnan(expected)
    # Thickness from the attenuation of the counts: within 30 % where the ice is > 300 Å.
    thick = have & (expected > 300)
    assert thick.any()
    np.testing.assert_allclose(thickness[thick], expected[thick], rtol=0.3)
    assert (tmp_path / "lib.npz").is_file()
    # The inputs are untouched.
    assert digests == [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]
    capsys.readouterr()
    # Against the saved library, the same micrographs are all duplicates.
    assert main(["score", *files, "--out", str(tmp_path / "again.csv"), "--dose", "40",
                 "--reference", str(tmp_path / "lib.npz")]) == 0
    assert (pd.read_csv(tmp_path / "again.csv")["novelty"] < 0.05).all()


def test_scoring_and_restoring_fit_each_micrograph_once(sim_dir, tmp_path, monkeypatch):
    # The second pass is one graph: the CTF fit, the noise model's and the rules'
    # measurements and the restored file of a micrograph share its read and cleaning.
    import dask
    import mrcfile

    from cryodask import pipeline
    from cryodask.ingest import ingest

    ds = ingest(str(sim_dir / "*.mrc"), str(tmp_path / "s.zarr"))
    fits = []
    original = pipeline.estimate_ctf
    monkeypatch.setattr(pipeline, "estimate_ctf", lambda *a, **k: fits.append(1) or original(*a, **k))
    with dask.config.set(scheduler="threads"):
        scores, _ = pipeline.score_dataset(ds, restore_to=str(tmp_path / "restored"))
    n = ds.sizes["micrograph"]
    assert len(fits) == n
    files = sorted((tmp_path / "restored").glob("*.mrc"))
    assert len(files) == n
    with mrcfile.open(files[0]) as mrc:
        assert mrc.data.shape == (ds.sizes["y"], ds.sizes["x"]) and mrc.data.dtype == np.float32
        assert np.isfinite(mrc.data).all() and float(np.std(mrc.data)) > 0
    assert np.isfinite(np.asarray(scores["hyperscore"])).all()


def test_information_is_counted_to_the_fit_band_edge_where_no_rings_showed():
    import xarray as xr

    from cryodask.pipeline import _information_resolution

    # Fitted with rings to 8 Å; fitted, no window of rings; no fit at all.
    ctf = xr.Dataset({"defocus_u_A": ("micrograph", [12000.0, 25000.0, np.nan]),
                      "defocus_v_A": ("micrograph", [11000.0, 24000.0, np.nan]),
                      "ctf_fit_resolution_A": ("micrograph", [8.0, np.nan, np.nan], {"fit_band_low_A": 40.0})})
    out = np.asarray(_information_resolution(ctf))
    assert out[0] == 8.0 and out[1] == 40.0 and np.isnan(out[2])
    del ctf["ctf_fit_resolution_A"].attrs["fit_band_low_A"]  # a store written without it: the default band
    assert float(_information_resolution(ctf)[1]) == 30.0


def test_the_second_pass_in_batches_gives_what_it_gives_whole(tmp_path, monkeypatch):
    # Built and computed a batch of micrographs at a time, the second pass must give every
    # score and restored pixel it gives whole: nine micrographs, enough for the dataset's
    # gain estimate to divide every one of them (the last batch holds one micrograph), with
    # impulses whose fill noise is drawn from each micrograph's index in the dataset.
    import dask
    import mrcfile

    from cryodask import pipeline
    from cryodask.ingest import ingest
    from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset

    params = draw_micrograph_params(9, shape=(256, 256), pixel_size_A=1.2, seed=8,
                                    ranges=DatasetRanges(n_hot_pixels=(20, 40), n_xrays=(1, 2)))
    write_simulated_dataset(tmp_path / "sim", params, detector=Detector(gain_std=0.05, seed=8), seed=8)
    ds = ingest(str(tmp_path / "sim" / "*.mrc"), str(tmp_path / "s.zarr"))
    n = ds.sizes["micrograph"]
    assert pipeline.second_pass_batches(ds) == [(0, n)]
    assert pipeline.second_pass_batches(ds, 4) == [(0, 4), (4, 8), (8, n)]
    assert pipeline.second_pass_batches(ds, 1) == [(i, i + 1) for i in range(n)]
    with dask.config.set({"cryodask.second-pass-batch": 5}):
        assert pipeline.second_pass_batches(ds) == [(0, 5), (5, n)]
    with pytest.raises(ValueError, match="at least 1"):
        pipeline.second_pass_batches(ds, 0)
    # Earlier CTF results for two of the micrographs: the note counts them over all batches.
    prior = pd.DataFrame({"micrograph_name": [str(v) for v in ds["micrograph_name"].values[:2]],
                          "defocus_u_A": [15500.0, 15500.0], "defocus_v_A": [14500.0, 14500.0]})
    results = {}
    for size in (pipeline.SECOND_PASS_BATCH, 4):
        monkeypatch.setattr(pipeline, "SECOND_PASS_BATCH", size)
        calls = []
        original = pipeline._second_pass
        monkeypatch.setattr(pipeline, "_second_pass", lambda *a, **k: calls.append(1) or original(*a, **k))
        with dask.config.set(scheduler="threads"):
            scores, _ = pipeline.score_dataset(ds, restore_to=str(tmp_path / f"restored{size}"), ctf_prior=prior)
        monkeypatch.setattr(pipeline, "_second_pass", original)
        assert scores.attrs["ctf_prior"].startswith(f"2 of {n} micrographs searched within")
        assert len(calls) == (1 if size > 4 else 3)
        assert scores["n_hot_pixels"].min() > 0
        restored = []
        for path in sorted((tmp_path / f"restored{size}").glob("*.mrc")):
            with mrcfile.open(path) as mrc:
                restored.append(mrc.data.copy())
        results[size] = scores, restored
    (whole, whole_files), (batched, batched_files) = results.values()
    assert sorted(whole.data_vars) == sorted(batched.data_vars)
    for name in whole.data_vars:
        a, b = np.asarray(whole[name]), np.asarray(batched[name])
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a.tolist() == b.tolist(), name
    assert len(whole_files) == len(batched_files) == n
    for a, b in zip(whole_files, batched_files):
        np.testing.assert_array_equal(a, b)


def test_a_restored_file_lost_after_its_chunk_was_kept_is_restored_again(sim_dir, tmp_path):
    # A resumed second pass reads its chunks back from the checkpoint; a restored file
    # missing since is written again from the kept CTF, the same as it was.
    import mrcfile

    from cryodask import pipeline
    from cryodask.checkpoint import Checkpoint
    from cryodask.ingest import ingest

    ds = ingest(str(sim_dir / "*.mrc"), str(tmp_path / "s.zarr"))
    n = ds.sizes["micrograph"]
    out = tmp_path / "restored"
    first, _ = pipeline.score_dataset(ds, restore_to=str(out), checkpoint=Checkpoint(tmp_path / "ck", {"k": 1}))
    files = sorted(out.glob("*.mrc"))
    assert len(files) == n
    lost = mrcfile.read(files[1]).copy()
    files[1].unlink()
    again = Checkpoint(tmp_path / "ck", {"k": 1})
    second, _ = pipeline.score_dataset(ds, restore_to=str(out), checkpoint=again)
    assert again.resumed["second_pass"] == n  # nothing measured again
    np.testing.assert_array_equal(mrcfile.read(files[1]), lost)
    np.testing.assert_array_equal(second["V"], first["V"])
    # The same file restored by the restore-only pass of `cryodask run`.
    files[1].unlink()
    scored = ds.assign({name: second[name] for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg",
                                                        "phase_shift_deg")})
    assert pipeline.restore_files(scored, [str(f) for f in files]) == 1
    np.testing.assert_array_equal(mrcfile.read(files[1]), lost)


def test_an_unknown_restoration_method_is_refused_before_any_work(sim_dir, tmp_path):
    from cryodask import pipeline
    from cryodask.ingest import ingest

    ds = ingest(str(sim_dir / "*.mrc"), str(tmp_path / "s.zarr"))
    with pytest.raises(ValueError, match="method must be one of 'wiener', 'phaseflip', got 'phase_flip'"):
        pipeline.score_dataset(ds, restore_to=str(tmp_path / "restored"), restore_method="phase_flip")
    assert not (tmp_path / "restored").exists()
