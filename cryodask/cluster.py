"""One factory from a configuration to a Dask client; nothing else knows the cluster.

Kinds
-----
``threads``  no cluster: Dask's threaded scheduler in this process (no client).
``local``    a ``distributed.LocalCluster`` of worker processes on this machine.
``cuda``     a ``dask_cuda.LocalCUDACluster``, one worker per GPU (needs ``cryodask[gpu]``).
``address``  an existing scheduler, e.g. ``tcp://127.0.0.1:8786``.
``slurm``, ``pbs``  a dask-jobqueue cluster (needs ``cryodask[hpc]``).

Where the configuration comes from, later entries winning: defaults, Dask's config under
``cryodask.cluster`` (e.g. ``~/.config/dask/cryodask.yaml``), ``CRYODASK_*`` environment
variables, a YAML file, and the arguments of the call.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, fields

import dask.config
import yaml

__all__ = [
    "ClusterConfig",
    "ClusterError",
    "cluster_client",
    "describe",
    "load_cluster_config",
    "make_cluster",
]

KINDS = ("threads", "local", "cuda", "address", "slurm", "pbs")
_ENV = {
    "CRYODASK_CLUSTER": "kind",
    "CRYODASK_N_WORKERS": "n_workers",
    "CRYODASK_THREADS_PER_WORKER": "threads_per_worker",
    "CRYODASK_MEMORY_LIMIT": "memory_limit",
    "CRYODASK_SCHEDULER_ADDRESS": "address",
}


class ClusterError(ValueError):
    """A cluster configuration that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ClusterConfig:
    """Validated cluster configuration.

    Attributes
    ----------
    kind : {"threads", "local", "cuda", "address", "slurm", "pbs"}
    n_workers : int or None
        Worker processes (``local``), jobs (``slurm``/``pbs``); default: one per core for
        ``local``, one per GPU for ``cuda``.
    threads_per_worker : int
    memory_limit : str or None
        Per worker, in Dask's notation (``"4GB"``); ``None`` lets Dask decide.
    address : str or None
        Scheduler address for ``address``.
    dashboard : bool
        Serve the Dask dashboard (``local``/``cuda``).
    jobqueue : dict
        Keyword arguments passed to the dask-jobqueue cluster (``cores``, ``memory``,
        ``queue``, ``walltime``, ``job_extra_directives``...).
    """

    kind: str = "threads"
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    address: str | None = None
    dashboard: bool = False
    jobqueue: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ClusterError(f"cluster kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_workers is not None and int(self.n_workers) < 1:
            raise ClusterError(f"n_workers must be >= 1, got {self.n_workers!r}")
        if int(self.threads_per_worker) < 1:
            raise ClusterError(f"threads_per_worker must be >= 1, got {self.threads_per_worker!r}")
        if self.kind == "address" and not self.address:
            raise ClusterError("cluster kind 'address' needs an address, e.g. tcp://127.0.0.1:8786")
        if not isinstance(self.jobqueue, dict):
            raise ClusterError(f"jobqueue must be a mapping, got {type(self.jobqueue).__name__}")


def _from_mapping(mapping: dict, source: str) -> dict:
    known = {f.name for f in fields(ClusterConfig)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ClusterError(f"{source}: unknown cluster option(s) {unknown}; known: {sorted(known)}")
    out = dict(mapping)
    for name in ("n_workers", "threads_per_worker"):
        if out.get(name) is not None:
            try:
                out[name] = int(out[name])
            except (TypeError, ValueError):
                raise ClusterError(f"{source}: {name} must be an integer, got {out[name]!r}") from None
    return out


def _parse_spec(spec: str) -> dict:
    """A ``--cluster`` value: a kind, a scheduler address, or a YAML file."""
    if spec in KINDS:
        return {"kind": spec}
    if "://" in spec:
        return {"kind": "address", "address": spec}
    if spec.endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise ClusterError(f"{spec}: no such cluster configuration file")
        with open(spec, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ClusterError(f"{spec}: expected a mapping of cluster options")
        data = data.get("cluster", data)
        if isinstance(data.get("kind"), str) and "://" in data["kind"]:
            data = {**data, "kind": "address", "address": data["kind"]}
        return _from_mapping(data, spec)
    raise ClusterError(
        f"--cluster {spec!r}: expected one of {KINDS[:3]}, a scheduler address such as "
        "tcp://127.0.0.1:8786, or a YAML file"
    )


def load_cluster_config(spec: str | None = None, **overrides) -> ClusterConfig:
    """Build a :class:`ClusterConfig` from defaults, Dask config, environment, ``spec``.

    Parameters
    ----------
    spec : str, optional
        ``"threads"``, ``"local"``, ``"cuda"``, a scheduler address, or a YAML file path.
    **overrides
        Field values that win over everything else.

    Examples
    --------
    >>> load_cluster_config("tcp://127.0.0.1:8786").kind
    'address'
    """
    merged: dict = {}
    merged.update(_from_mapping(dict(dask.config.get("cryodask.cluster", default={}) or {}),
                                "dask config 'cryodask.cluster'"))
    env = {}
    for var, name in _ENV.items():
        if os.environ.get(var):
            env[name] = os.environ[var]
    if "kind" in env:
        env.update(_parse_spec(env.pop("kind")))
    merged.update(_from_mapping(env, "CRYODASK_* environment"))
    if spec:
        merged.update(_parse_spec(str(spec)))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterConfig(**_from_mapping(merged, "arguments"))


def make_cluster(config: ClusterConfig):
    """Start (or connect to) the cluster a config names; ``None`` for ``threads``.

    Returns the cluster object (``LocalCluster``, ``LocalCUDACluster``, a jobqueue cluster)
    or, for ``address``, the address string. Jobqueue clusters are created without jobs;
    ``n_workers`` jobs are requested when a client is made by :func:`cluster_client`.
    """
    if config.kind == "threads":
        return None
    if config.kind == "address":
        return config.address
    if config.kind == "local":
        from distributed import LocalCluster

        n = config.n_workers or max(1, (os.cpu_count() or 1) // config.threads_per_worker)
        with _worker_settings(config):
            return LocalCluster(
                n_workers=n,
                threads_per_worker=config.threads_per_worker,
                memory_limit=config.memory_limit or "auto",
                processes=True,
                dashboard_address=":0" if config.dashboard else None,
            )
    if config.kind == "cuda":
        return _cuda_cluster(config)
    return _jobqueue_cluster(config)


def _worker_settings(config: ClusterConfig):
    """The Dask settings the workers of a cluster cryodask starts are made with (each
    nanny keeps them, also for a worker it restarts). Without the dashboard, which shows
    it, the workers' statistical profiler is off: its history (the last 1000 one-second
    cycles, overall and per task) pickled to ~40 MB per worker, held as small Python
    objects, while each worker's unmanaged memory rose from ~0.27 to ~0.45 GB during the
    second pass over 1907 micrographs of 1024² (the kernels, run 80 micrographs again in
    one process, leave no objects behind). Each worker process starts with the C
    allocator set to reuse freed micrograph-sized arrays
    (:func:`cryodask.progress.keep_large_blocks`)."""
    import importlib

    import dask

    from cryodask.progress import ALLOCATOR_ENVIRON

    importlib.import_module("distributed")  # its configuration's defaults, kept here
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ALLOCATOR_ENVIRON}
    return dask.config.set({"distributed.worker.profile.enabled": bool(config.dashboard),
                            "distributed.nanny.pre-spawn-environ": environ})


def _cuda_cluster(config: ClusterConfig):
    try:
        import dask_cuda
    except ImportError as exc:
        raise ClusterError(
            "cluster 'cuda' needs dask-cuda and CuPy: pip install 'cryodask[gpu]'"
        ) from exc
    try:
        import cupy

        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or no device
        raise ClusterError(f"cluster 'cuda' found no usable GPU: {exc}") from exc
    if n_gpus < 1:
        raise ClusterError("cluster 'cuda' found no GPU on this machine")
    kwargs = {"threads_per_worker": config.threads_per_worker}
    if config.n_workers:
        kwargs["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(min(config.n_workers, n_gpus)))
    if config.memory_limit:
        kwargs["memory_limit"] = config.memory_limit
    with _worker_settings(config):
        return dask_cuda.LocalCUDACluster(**kwargs)


def _jobqueue_cluster(config: ClusterConfig):
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterError(
            f"cluster '{config.kind}' needs dask-jobqueue: pip install 'cryodask[hpc]'"
        ) from exc
    options = {"cores": config.threads_per_worker, "processes": 1,
               "memory": config.memory_limit or "8GB"}
    options.update(config.jobqueue)
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(**options)


@contextlib.contextmanager
def cluster_client(config: ClusterConfig | str | None = None):
    """A context manager yielding a ``distributed.Client`` (``None`` for ``threads``).

    The cluster it started (not an external scheduler) is closed on exit, with its worker
    processes.

    Examples
    --------
    >>> with cluster_client("threads") as client:
    ...     client is None
    True
    """
    if not isinstance(config, ClusterConfig):
        config = load_cluster_config(config)
    cluster = make_cluster(config)
    if cluster is None:
        yield None
        return
    from distributed import Client

    owned = not isinstance(cluster, str)
    try:
        if owned and config.kind in ("slurm", "pbs"):
            cluster.scale(jobs=config.n_workers or 1)
        with Client(cluster) as client:
            yield client
    finally:
        if owned:
            cluster.close()


def describe(config: ClusterConfig) -> str:
    """One line for logs and the command line."""
    if config.kind == "address":
        return f"scheduler at {config.address}"
    if config.kind == "threads":
        return "threads in this process"
    return f"{config.kind} cluster ({config.n_workers or 'auto'} workers x {config.threads_per_worker} threads)"

