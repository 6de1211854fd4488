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


def test_real_micrograph_example_runs_the_pipeline_on_the_real_crop(tmp_path):
    import starfile

    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "real_micrograph.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "pixel size 0.6666 Å, 300 kV" in result.stdout  # from the file's own FEI header
    row = starfile.read(tmp_path / "micrographs_ctf.star")["micrographs"].iloc[0]
    # The whole 4096² micrograph fits 27216 Å (mean of U and V); a 1024² crop must agree.
    assert abs(0.5 * (row["rlnDefocusU"] + row["rlnDefocusV"]) / 27216.0 - 1) < 0.02
    assert "poisson_counts" in result.stdout  # EPU wrote scaled values, not counts
    assert (tmp_path / "restored" / "epu2.9_crop1024.mrc").is_file()
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_curate_example_ranks_explains_and_selects(tmp_path):
    import starfile

    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "curate.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "kept " in result.stdout and " of 8 (quality_expected >= " in result.stdout
    kept = int(result.stdout.split("kept ")[1].split(" of")[0])
    selected = starfile.read(tmp_path / "selected_micrographs_ctf.star")["micrographs"]
    assert 1 <= kept <= 4 and len(selected) == kept


def test_cluster_examples_are_valid_configurations():
    """Every example cluster file loads; the SLURM and PBS ones give the job scripts asked for."""
    import glob

    import pytest

    from cryodask.cluster import load_cluster_config, make_cluster

    kinds = {}
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "clusters", "*.yaml"))):
        config = load_cluster_config(path)
        kinds[os.path.basename(path)] = config.kind
    assert kinds == {"gpu-node.yaml": "cuda", "laptop.yaml": "local", "pbs.yaml": "pbs",
                     "scheduler.yaml": "address", "slurm.yaml": "slurm"}
    pytest.importorskip("dask_jobqueue")
    for name, expected in (("slurm.yaml", "#SBATCH -A my-project"), ("pbs.yaml", "#PBS -l select=1:ncpus=8")):
        cluster = make_cluster(load_cluster_config(os.path.join(EXAMPLES, "clusters", name)))
        try:
            assert expected in cluster.job_script()
        finally:
            cluster.close()
