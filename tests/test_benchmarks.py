import json

from benchmarks import bench_ctf


def test_ctf_benchmark_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "ctf.json"
    assert bench_ctf.main(["--sizes", "512", "--count", "2", "--accuracy-size", "512",
                           "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["timing"][0]["size"] == 512 and data["timing"][0]["ratio_to_floor"] > 1
    assert len(data["accuracy"]) == 2
    assert "median" in capsys.readouterr().out


def test_the_correlation_splits_over_bands_and_the_parts_sum_to_it():
    import numpy as np

    from benchmarks.common import correlation, correlation_by_band

    rng = np.random.default_rng(4)
    truth = rng.normal(size=(64, 64))
    noisy = truth + rng.normal(size=(64, 64))
    parts = correlation_by_band(noisy, truth, [0.0, 0.05, 0.2, 1.0])
    assert len(parts) == 3 and np.isclose(sum(parts), correlation(noisy, truth))
    # An image that holds the low band alone correlates through that band alone.
    smooth = np.fft.ifft2(np.fft.fft2(truth) * (np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64),
                                                                        indexing="ij")) < 0.05)).real
    low = correlation_by_band(smooth, truth, [0.0, 0.05, 1.0])
    assert abs(low[1]) < 1e-12
    assert np.isclose(low[0], correlation(smooth, truth))


def test_kernel_benchmarks_time_against_the_floor_and_measure_peak_memory(tmp_path, capsys):
    from benchmarks import bench_kernels

    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--size", "512", "--repeat", "1", "--only", "box_sum", "find_impulses",
                               "--json", str(out)]) == 0
    rows = {row["kernel"]: row for row in json.loads(out.read_text())["kernels"]}
    assert list(rows) == ["floor", "box_sum", "find_impulses"]
    assert rows["floor"]["ratio_to_floor"] == 1.0 and rows["find_impulses"]["ratio_to_floor"] > 0
    # box_sum returns one float32 image: its peak above the loaded inputs is at least that
    # (the loads' own peak reset before the call), and detection holds several more.
    assert 0.8 < rows["box_sum"]["peakmem_micrographs"] < 3.0
    assert rows["find_impulses"]["peakmem_micrographs"] > rows["box_sum"]["peakmem_micrographs"]
    assert "find_impulses" in capsys.readouterr().out
    # asv's names, for every kernel.
    assert all(hasattr(bench_kernels, f"{kind}_{name}") for name in bench_kernels.KERNELS
               for kind in ("time", "peakmem"))


def test_cause_benchmark_takes_the_truth_as_the_mean_over_draws(tmp_path, capsys):
    import numpy as np

    from benchmarks import bench_causes

    out = tmp_path / "causes.json"
    assert bench_causes.main(["--count", "4", "--size", "256", "--realizations", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    for row in rows:
        gains = row["improvement"]
        # The truth's top cause is the mean gains' best, and its lead over the runner-up
        # is the mean's; the lead's error comes from two draws, so it is finite.
        assert row["true_top_cause"] == max(gains, key=gains.get)
        ranked = sorted(gains.values(), reverse=True)
        assert np.isclose(row["lead"], ranked[0] - ranked[1])
        assert np.isfinite(row["lead_error"]) and row["lead_error"] >= 0
        assert set(row["improvement_true_ctf_error"]) == set(gains)
    printed = capsys.readouterr().out
    assert "truth from 2 draw(s)" in printed and "against the first draw alone" in printed


def test_the_truths_lead_is_the_mean_of_each_draws_lead():
    import pytest

    from benchmarks.bench_causes import _margin, _mean_gains

    draws = [{"ice": 0.03, "detector": 0.02, "artifacts": 0.0}, {"ice": 0.01, "detector": 0.02, "artifacts": 0.0}]
    assert _mean_gains(draws) == pytest.approx({"ice": 0.02, "detector": 0.02, "artifacts": 0.0})
    top, lead, error = _margin(draws)
    assert top in ("ice", "detector") and abs(lead) < 1e-12
    # The draws' leads of the mean's top cause are +0.01 and -0.01: a standard error of 0.01.
    assert abs(error - 0.01) < 1e-12
