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
            ({"inputs": ["a.mrc"], "out_dir": "o", "clean": "yes"}, "clean: expected true or false")):
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

    assert main(["run", str(config)]) == 0
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
