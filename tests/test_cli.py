import subprocess
import sys

import numpy as np
import pandas as pd

from cryodask.cli import main
from cryodask.io.store import open_dataset


def test_help_everywhere():
    for command in ([], ["simulate"], ["ingest"], ["info"], ["demo"], ["score"], ["report"], ["run"]):
        result = subprocess.run([sys.executable, "-m", "cryodask.cli", *command, "--help"],
                                capture_output=True, text=True, check=True)
        assert "usage: cryodask" in result.stdout
    assert "--cluster" in subprocess.run([sys.executable, "-m", "cryodask.cli", "ingest", "--help"],
                                         capture_output=True, text=True).stdout


def test_simulate_ingest_info(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", str(out), "--count", "3", "--size", "128", "--pixel-size", "1.5",
                 "--artifacts", "--truth-images", "--seed", "4"]) == 0
    truth = pd.read_csv(out / "truth.csv")
    assert len(truth) == 3 and (truth["n_hot_pixels"] >= 100).all()
    assert (out / "truth" / "mic_0000_projection.mrc").is_file()
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(out / "mic_*.mrc"), "--out", str(store), "--dose", "33"]) == 0
    ds = open_dataset(store)
    assert ds.sizes["micrograph"] == 3
    np.testing.assert_allclose(ds["dose_e_per_A2"].values, 33.0)
    np.testing.assert_allclose(ds["pixel_size_A"].values, 1.5)
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    assert "micrograph=3" in text and "dose_e_per_A2        33 .. 33" in text


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing.mrc"), "--out", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cryodask ingest: error: ") and "missing.mrc: no such file" in err
    assert main(["info", str(tmp_path / "nothing.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err
    assert main(["ingest", "x.mrc", "--out", "s.zarr", "--cluster", "nonsense"]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_demo_runs_on_a_local_cluster(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--count", "2", "--size", "256"]) == 0
    text = capsys.readouterr().out
    assert "demo finished" in text
    ds = open_dataset(tmp_path / "demo" / "demo.zarr")
    assert {"power_spectrum", "image_mean", "image_std"} <= set(ds.data_vars)
    assert ds["power_spectrum"].shape == (2, 256, 129)


def test_bench_reports_the_floor_and_every_stage(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "256", "--count", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("floor_mb_per_s", "pipeline_mb_per_s", "ratio_to_floor", "peak_rss_bytes", "stages",
                "pipeline_seconds", "stages_seconds"):
        assert key in result
    assert result["ratio_to_floor"] > 1.0  # the pipeline does more than the floor
    assert result["stages"]["floor"]["ratio_to_floor"] == 1.0
    assert {"clean + regions + CTF", "noise model", "clean + restore + write"} <= set(result["stages"])
    # Peaks: each stage's and the pipeline's sampled within the process's own high-water
    # mark (the kernel's counters may lag the sampled size a little); the simulation of
    # the test data, in a child process, reported apart.
    process = 1.05 * result["peak_rss_process_bytes"]
    assert 0 < result["peak_rss_bytes"] <= process
    assert all(0 < stage["peak_rss_bytes"] <= process for stage in result["stages"].values())
    assert result["simulation_peak_rss_bytes"] > 0
    text = capsys.readouterr().out
    assert "x floor" in text and "pipeline (2 passes, as run)" in text and "simulation" in text


def test_bench_over_several_counts_runs_each_in_its_own_process(tmp_path, capsys):
    import json

    out = tmp_path / "scaling.json"
    assert main(["bench", "--size", "256", "--count", "4", "8", "--no-stages", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [run["count"] for run in result["runs"]] == [4, 8]
    assert all(run["peak_rss_bytes"] > 0 and run["ratio_to_floor"] > 1.0 for run in result["runs"])
    # --no-stages: the floor and the pipeline, no stage timed apart.
    assert all(set(run["stages"]) == {"ingest", "floor"} and run["stages_seconds"] == 0 for run in result["runs"])
    text = capsys.readouterr().out
    assert "pipeline s / micrograph" in text and "pipeline peak GB" in text


def _allocator_log(tmp_path, environ):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(environ)
    result = subprocess.run([sys.executable, "-m", "cryodask.cli", "-v", "simulate", str(tmp_path / "sim"),
                             "--count", "1", "--size", "256"], capture_output=True, text=True, env=env, check=True)
    return [line for line in result.stderr.splitlines() if "C allocator settings" in line]


def test_a_computing_command_runs_with_the_allocator_settings_from_its_start(tmp_path):
    import platform

    from cryodask.progress import ALLOCATOR_ENVIRON

    (line,) = _allocator_log(tmp_path, {})
    expected = ALLOCATOR_ENVIRON if platform.libc_ver()[0] == "glibc" else {}
    for name in ALLOCATOR_ENVIRON:
        assert f"{name}={expected.get(name, '(unset)')}" in line
    # A user's own setting is kept, and no other is added.
    (line,) = _allocator_log(tmp_path, {"MALLOC_ARENA_MAX": "4"})
    assert "MALLOC_ARENA_MAX=4" in line and "MALLOC_MMAP_MAX_=(unset)" in line
