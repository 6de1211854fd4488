import os
import threading
import time

import dask
import numpy as np
import psutil
import pytest

from cryodask import ingest
from cryodask.cluster import ClusterConfig, ClusterError, cluster_client, load_cluster_config, make_cluster
from cryodask.progress import ALLOCATOR_ENVIRON


def test_spec_parsing():
    assert load_cluster_config("threads").kind == "threads"
    assert load_cluster_config("local").kind == "local"
    config = load_cluster_config("tcp://127.0.0.1:8786")
    assert (config.kind, config.address) == ("address", "tcp://127.0.0.1:8786")
    with pytest.raises(ClusterError, match="expected one of"):
        load_cluster_config("bogus")
    with pytest.raises(ClusterError, match="needs an address"):
        ClusterConfig(kind="address")
    with pytest.raises(ClusterError, match="n_workers"):
        ClusterConfig(kind="local", n_workers=0)


def test_yaml_env_and_dask_config(tmp_path, monkeypatch):
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster:\n  kind: local\n  n_workers: 3\n  memory_limit: 2GB\n")
    config = load_cluster_config(str(path))
    assert (config.kind, config.n_workers, config.memory_limit) == ("local", 3, "2GB")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: local\nworkers: 3\n")
    with pytest.raises(ClusterError, match=r"bad.yaml: unknown cluster option\(s\) \['workers'\]"):
        load_cluster_config(str(bad))
    with dask.config.set({"cryodask.cluster": {"kind": "local", "threads_per_worker": 2}}):
        assert load_cluster_config().threads_per_worker == 2
        monkeypatch.setenv("CRYODASK_THREADS_PER_WORKER", "4")
        monkeypatch.setenv("CRYODASK_CLUSTER", "tcp://10.0.0.1:8786")
        config = load_cluster_config()
        assert (config.kind, config.threads_per_worker) == ("address", 4)
        # An explicit spec wins over the environment.
        assert load_cluster_config("threads").kind == "threads"
    monkeypatch.setenv("CRYODASK_N_WORKERS", "two")
    with pytest.raises(ClusterError, match="n_workers must be an integer"):
        load_cluster_config()


def test_cuda_without_gpu_is_a_clear_error():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present; this checks the error without one")
    except Exception:
        pass
    with pytest.raises(ClusterError, match="cuda"):
        make_cluster(ClusterConfig(kind="cuda"))


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    config = ClusterConfig(kind="slurm", threads_per_worker=8, memory_limit="32GB",
                           jobqueue={"queue": "gpu", "walltime": "02:00:00",
                                     "job_extra_directives": ["--gres=gpu:1"],
                                     "scheduler_options": {"host": "127.0.0.1"}})
    cluster = make_cluster(config)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH -t 02:00:00" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "--nthreads 8" in script or "--nworkers 1 --nthreads 8" in script
    assert "#SBATCH --mem=30G" in script  # 32 GB, in GiB


def _children():
    """Child processes, less multiprocessing's own helpers (they live as long as this one)."""
    out = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" not in cmdline and "forkserver" not in cmdline:
            out.add(proc.pid)
    return out


def _ingest_values(sim_dir, path):
    ds = ingest(str(sim_dir / "*.mrc"), path)
    return ds["image"].values, ds["pixel_size_A"].values


def _profiling(dask_worker):
    return "profile" in dask_worker.periodic_callbacks


def _allocator_environ():
    return {name: os.environ.get(name) for name in (*ALLOCATOR_ENVIRON, "MALLOC_TRIM_THRESHOLD_")}


def test_keep_large_blocks_takes_on_glibc():
    import platform

    from cryodask.progress import keep_large_blocks

    assert keep_large_blocks() is (platform.libc_ver()[0] == "glibc")


def test_local_cluster_matches_threads_and_leaves_no_process(sim_dir, tmp_path):
    reference = _ingest_values(sim_dir, tmp_path / "threads.zarr")
    before = _children()
    with cluster_client(ClusterConfig(kind="local", n_workers=2)) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        # Without the dashboard, the workers keep no statistical profile (memory).
        assert not any(client.run(_profiling).values())
        # Each worker's C allocator reuses freed micrograph-sized arrays (speed), and
        # Dask's own settings for the workers are kept.
        environ = client.run(_allocator_environ).values()
        trim = str(dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"])
        assert all(e == {**ALLOCATOR_ENVIRON, "MALLOC_TRIM_THRESHOLD_": trim} for e in environ)
        result = _ingest_values(sim_dir, tmp_path / "local.zarr")
    np.testing.assert_array_equal(result[0], reference[0])
    np.testing.assert_array_equal(result[1], reference[1])
    deadline = time.time() + 20
    while _children() - before and time.time() < deadline:
        time.sleep(0.2)
    assert not (_children() - before)


def test_external_scheduler_and_two_workers(sim_dir, tmp_path, external_scheduler):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    address = external_scheduler
    assert address.startswith("tcp://127.0.0.1:")
    reference = _ingest_values(sim_dir, tmp_path / "threads.zarr")
    with cluster_client(address) as client:
        client.wait_for_workers(2, timeout=60)
        worker_pids = set(client.run(os.getpid).values())
        assert os.getpid() not in worker_pids and len(worker_pids) == 2
        result = _ingest_values(sim_dir, tmp_path / "external.zarr")
    np.testing.assert_array_equal(result[0], reference[0])


def test_results_are_gathered_as_they_complete_and_released():
    import time

    import dask
    import numpy as np
    from distributed import Client, LocalCluster

    from cryodask.progress import compute_each

    def chunk(i):
        return np.full(100_000, i, np.float64)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        tasks = [dask.delayed(chunk, pure=False)(i) for i in range(12)]
        out = compute_each(tasks)
        assert [int(x[0]) for x in out] == list(range(12))
        # In the tasks' order, and nothing is left on the workers afterwards.
        deadline = time.monotonic() + 10
        while any(client.has_what().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(client.has_what().values())


_STREAM = {"shared_calls": 0, "running": 0, "peak": 0}
_STREAM_LOCK = threading.Lock()


def _shared_value():
    with _STREAM_LOCK:
        _STREAM["shared_calls"] += 1
    return np.arange(3.0)


def _counted_chunk(i, base):
    with _STREAM_LOCK:
        _STREAM["running"] += 1
        _STREAM["peak"] = max(_STREAM["peak"], _STREAM["running"])
    time.sleep(0.05)
    with _STREAM_LOCK:
        _STREAM["running"] -= 1
    return base + i


@pytest.mark.parametrize("where", ["threads", "distributed"])
def test_compute_each_streams_a_window_at_a_time_and_computes_shared_inputs_once(where):
    """What is in flight is bounded by the window, not by the number of tasks; a value that
    every task needs (e.g. the dataset's gain) is computed once; each task's ``also`` item
    runs with it."""
    from distributed import Client, LocalCluster

    from cryodask.progress import compute_each

    _STREAM.update(shared_calls=0, running=0, peak=0)
    base = dask.delayed(_shared_value, pure=False)()
    tasks = [dask.delayed(_counted_chunk, pure=False)(i, base) for i in range(12)]
    also = [dask.delayed(_counted_chunk, pure=False)(100 + i, base) for i in range(12)]
    if where == "threads":
        with dask.config.set(scheduler="threads", num_workers=3):
            out = compute_each(tasks, also)
        # Three threads, each running one task and then its item.
        assert 1 < _STREAM["peak"] <= 3
        _STREAM.update(shared_calls=0, running=0, peak=0)
        with dask.config.set(scheduler="threads", num_workers=3):
            assert len(compute_each(tasks, also, window=1)) == 12
        assert _STREAM["peak"] == 1
    else:
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
                Client(cluster):
            out = compute_each(tasks, also, window=1)
        # Four threads, but one task and its item in flight at a time (all at once: four).
        assert _STREAM["peak"] <= 2
    assert [float(x[0]) for x in out] == [float(i) for i in range(12)]
    assert _STREAM["shared_calls"] == 1
