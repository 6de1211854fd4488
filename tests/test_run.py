"""cryodask run: one configuration, every stage, checked keys, a dry run, resumption."""

from __future__ import annotations

import os

import pytest
import starfile
import yaml

from cryodask.cli import main
from cryodask.run import ConfigError, load_config


def _config(tmp_path, **changes):
    config = {"inputs": [str(tmp_path / "sim" / "mic_*.mrc")], "out_dir": str(tmp_path / "out"),
              "acquisition": {"dose_e_per_A2": 40.0}, "score": {"select": "logic >= 0.5"}}
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_configurations_name_the_key(tmp_path, capsys):
    for given, message in (
            ({"inputs": ["a.mrc"], "out_dir": "o", "ctf": {"min_res": 30}}, "ctf.min_res: unknown key"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "colour": 1}, "colour: unknown key"),
            ({"out_dir": "o"}, "inputs: required"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "acquisition": {"voltage_kV": -3}},
             "acquisition.voltage_kV: expected a number in [10, 1000]"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "ctf": {"max_resolution_A": 40}},
             "ctf.max_resolution_A (40) must be below"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "restore": {"method": "magic"}}, "restore.method"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "score": {"select": "colour > 1"}}, "score.select"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "clean": "yes"}, "clean: expected true or false"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "ctf": {"prior": "none.star"}},
             "ctf.prior: none.star: no such file"),
            ({"inputs": ["a.mrc"], "out_dir": "o", "ctf": {"prior_window": 2}},
             "ctf.prior_window: expected a number in [0.01, 0.99]")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(given)
    path = tmp_path / "bad.yaml"
    path.write_text("inputs: [a.mrc]\nout_dir: o\nctf:\n  min_res: 30\n")
    assert main(["run", str(path)]) == 2
    assert f"{path}: ctf.min_res: unknown key" in capsys.readouterr().err


def test_run_dry_run_then_run_then_resume(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "sim"), "--count", "5", "--size", "512", "--seed", "8"]) == 0
    config = _config(tmp_path)
    capsys.readouterr()
    assert main(["run", str(config), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would ingest: 5 file(s)" in text and "would report" in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    text = capsys.readouterr().out
    # Restored in the scoring pass, each micrograph read and cleaned once for both.
    assert "restored 5 (wiener)" in text and "restore: all 5 micrographs have their file" in text
    out = tmp_path / "out"
    restored = sorted((out / "restored").glob("*.mrc"))
    assert len(restored) == 5
    for name in ("dataset.zarr", "micrographs_ctf.star", "scores.csv", "report.html",
                 "selected_micrographs_ctf.star"):
        assert (out / name).exists(), name
    selected = starfile.read(out / "selected_micrographs_ctf.star")["micrographs"]
    assert "rlnMicrographIceThickness" in selected.columns

    # Interrupted after two restored files: a new run restores the rest only.
    kept = {p: os.stat(p).st_mtime_ns for p in restored[:2]}
    for p in restored[2:]:
        p.unlink()
    capsys.readouterr()
    assert main(["run", str(config), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "ingest: skip" in text and "scores: skip" in text
    assert main(["run", str(config)]) == 0
    text = capsys.readouterr().out
    assert "restored 3 micrographs" in text and "2 were done already" in text
    assert "scored" not in text  # the scores were in the store
    assert {p: os.stat(p).st_mtime_ns for p in restored[:2]} == kept
    assert len(list((out / "restored").glob("*.mrc"))) == 5


def test_a_killed_run_resumes_its_scoring_micrograph_by_micrograph(tmp_path, capsys):
    """A real interruption (SIGKILL) in the middle of the scoring passes; the second run reads
    the finished micrographs back and ends with the results of an uninterrupted run."""
    import re
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pandas as pd

    assert main(["simulate", str(tmp_path / "sim"), "--count", "6", "--size", "384", "--seed", "4"]) == 0
    base = {"inputs": [str(tmp_path / "sim" / "mic_*.mrc")], "acquisition": {"dose_e_per_A2": 40.0},
            "report": False, "restore": {"method": "none"}, "cluster": "threads"}
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump({**base, "out_dir": str(tmp_path / "whole")}))
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump({**base, "out_dir": str(tmp_path / "cut")}))
    assert main(["run", str(tmp_path / "whole.yaml")]) == 0
    assert not (tmp_path / "whole" / "scoring.partial").exists()  # removed once the scores are stored

    partial = tmp_path / "cut" / "scoring.partial"

    def kept_chunks():  # whole files only, not one being written (``*.partial.npz``)
        return [p for p in (partial / "second_pass").glob("*.npz") if not p.name.endswith(".partial.npz")]

    process = subprocess.Popen([sys.executable, "-m", "cryodask.cli", "run", str(tmp_path / "cut.yaml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # Killed once the scoring pass (CTF, noise and rule measurements) has kept a chunk.
        while not kept_chunks() and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert kept_chunks()
    assert not (tmp_path / "cut" / "scores.csv").exists()

    capsys.readouterr()
    assert main(["run", str(tmp_path / "cut.yaml"), "--dry-run"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "cut.yaml")]) == 0
    text = capsys.readouterr().out
    resumed = re.search(r"second_pass: (\d) of 6 micrographs read back", text)
    assert resumed and int(resumed.group(1)) >= 1, text
    assert "dataset defects and gain read back" in text
    assert not partial.exists()
    whole = pd.read_csv(tmp_path / "whole" / "scores.csv")
    cut = pd.read_csv(tmp_path / "cut" / "scores.csv")
    pd.testing.assert_frame_equal(whole, cut)
    from cryodask.io.store import open_dataset

    a, b = open_dataset(tmp_path / "whole" / "dataset.zarr"), open_dataset(tmp_path / "cut" / "dataset.zarr")
    for name in ("defocus_u_A", "share_ice", "quality_expected", "hyperscore", "descriptor"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_a_checkpoint_of_other_settings_is_not_reused(tmp_path):
    from cryodask.checkpoint import Checkpoint

    first = Checkpoint(tmp_path / "ck", {"ctf": {"min_defocus_A": 3000}})
    (tmp_path / "ck" / "ctf").mkdir()
    (tmp_path / "ck" / "ctf" / "0000000-0000001.npz").write_bytes(b"x")
    Checkpoint(tmp_path / "ck", {"ctf": {"min_defocus_A": 3000}})
    assert (tmp_path / "ck" / "ctf" / "0000000-0000001.npz").exists()
    Checkpoint(tmp_path / "ck", {"ctf": {"min_defocus_A": 5000}})
    assert not (tmp_path / "ck" / "ctf").exists()
    first.remove()
    assert not (tmp_path / "ck").exists()


def test_inputs_of_two_shapes_become_two_stores_reported_together(tmp_path, capsys):
    """Like the two EPU micrographs of different sizes: one store per shape, one table, one
    STAR file, one restored folder and one report over both."""
    import pandas as pd

    assert main(["simulate", str(tmp_path / "a"), "--count", "3", "--size", "384", "--seed", "2"]) == 0
    assert main(["simulate", str(tmp_path / "b"), "--count", "2", "--size", "320", "--seed", "3"]) == 0
    inputs = [str(tmp_path / "a" / "mic_*.mrc"), str(tmp_path / "b" / "mic_*.mrc")]
    config = {"inputs": inputs, "out_dir": str(tmp_path / "out"), "acquisition": {"dose_e_per_A2": 40.0}}
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "clash.yaml")]) == 2
    assert "would both be restored to restored/mic_0000.mrc" in capsys.readouterr().err
    for path in sorted((tmp_path / "b").glob("mic_*.mrc")):
        path.rename(path.with_name("other" + path.name[3:]))
    inputs[1] = str(tmp_path / "b" / "other_*.mrc")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**config, "inputs": inputs}))
    assert main(["run", str(tmp_path / "two.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "ingest: 3 file(s)" in text and "dataset_384x384.zarr" in text
    assert "ingest: 2 file(s)" in text and "dataset_320x320.zarr" in text
    assert main(["run", str(tmp_path / "two.yaml")]) == 0
    assert "2 micrograph shapes" in capsys.readouterr().out
    out = tmp_path / "out"
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 5 and table["hyperscore"].notna().all()
    assert len(starfile.read(out / "micrographs_ctf.star")["micrographs"]) == 5
    assert len(list((out / "restored").glob("*.mrc"))) == 5
    import mrcfile

    with mrcfile.open(out / "restored" / "other_0001.mrc") as mrc:
        assert mrc.data.shape == (320, 320)
    page = (out / "report.html").read_text()
    assert "5 micrographs" in page


def test_the_whole_pipeline_is_identical_on_threads_processes_and_an_external_scheduler(tmp_path,
                                                                                     external_scheduler):
    """Scores, STAR files and restored micrographs of `cryodask run`: the same values whether
    the work runs in threads, in a LocalCluster's processes, or on a separate `dask
    scheduler` with two `dask worker` processes (the files differ only in the time stamps
    their headers carry)."""
    import mrcfile
    import numpy as np
    import pandas as pd

    assert main(["simulate", str(tmp_path / "sim"), "--count", "5", "--size", "384", "--seed", "9",
                 "--artifacts"]) == 0
    tables = {}
    for cluster in ("threads", "local", external_scheduler):
        name = "external" if cluster.startswith("tcp://") else cluster
        config = {"inputs": [str(tmp_path / "sim" / "mic_*.mrc")], "out_dir": str(tmp_path / name),
                  "acquisition": {"dose_e_per_A2": 40.0}, "report": False, "cluster": cluster}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        assert main(["run", str(tmp_path / f"{name}.yaml")]) == 0
        tables[name] = pd.read_csv(tmp_path / name / "scores.csv")
    assert tables["threads"]["defocus_u_A"].notna().all()
    reference = tmp_path / "threads"
    for name in ("local", "external"):
        pd.testing.assert_frame_equal(tables[name], tables["threads"])
        for star in ("micrographs_ctf.star", "restored/micrographs_ctf.star"):
            ours, theirs = starfile.read(reference / star), starfile.read(tmp_path / name / star)
            for block in ("optics", "micrographs"):
                pd.testing.assert_frame_equal(theirs[block], ours[block])
        restored = sorted(p.name for p in (reference / "restored").glob("*.mrc"))
        assert len(restored) == 5
        for file in restored:
            with mrcfile.open(reference / "restored" / file) as a, mrcfile.open(tmp_path / name / "restored" / file) as b:
                np.testing.assert_array_equal(b.data, a.data)
                assert b.voxel_size == a.voxel_size
