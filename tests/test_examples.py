import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_simulate_and_ingest_example_runs(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "simulate_and_ingest.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "power spectra: (4, 256, 129)" in result.stdout
    assert (tmp_path / "dataset.zarr").is_dir()
