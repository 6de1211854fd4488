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
