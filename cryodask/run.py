"""The whole pipeline from one YAML file: ingest, clean, CTF, causes, score, restore, report.

``cryodask run CONFIG.yaml`` and :func:`run` do the same. The configuration is checked
before anything runs: an unknown key or a bad value is an error that names the key. Each
stage leaves its results on disk (the store, STAR files, one MRC per restored micrograph),
and a stage whose results are there is not run again: after an interruption, ``run``
finishes what is missing, micrograph by micrograph. The scoring passes keep each finished
chunk of micrographs in ``OUT_DIR/scoring.partial/`` until the scores are in the store;
restored micrographs are one file each.

Inputs of several image shapes become one store per shape (``dataset_<ny>x<nx>.zarr``),
each scored as its own dataset (its own defect map, gain estimate and priors); the tables,
STAR files, restored micrographs and the report cover them all.

A configuration, with every key and its default::

    inputs: ["Micrographs/*.mrc"]     # files, glob patterns, or one store (required)
    out_dir: results                  # required
    cluster: null                     # threads, local, cuda, a scheduler address, a YAML file
    acquisition:                      # overrides of headers and metadata, all optional
      pixel_size_A: null
      voltage_kV: null
      cs_mm: null
      amplitude_contrast: null
      dose_e_per_A2: null
    metadata: []                      # RELION STAR, EPU XML, mdoc files
    clean: true                       # correct artifacts in memory first
    gain: null                        # a gain reference (MRC/TIFF) to multiply by
    defects: null                     # a MotionCor2 defect file
    ctf:
      min_resolution_A: 30.0
      max_resolution_A: 5.0
      min_defocus_A: 3000.0
      max_defocus_A: 50000.0
      max_astigmatism_A: 3000.0
      prior: null                     # earlier CTF results (RELION .star, CTFFIND .txt,
                                      # cryoSPARC .cs): search near each micrograph's defocus
      prior_window: 0.25              # ... within this fraction of it
    score:
      max_astigmatism_A: 1500.0       # the plausible astigmatism of the rules
      select: null                    # e.g. "hyperscore > 170 and logic >= 0.8"
    restore:
      method: wiener                  # wiener, phaseflip, or none
    report: true
"""

from __future__ import annotations

import copy
import os
import time

__all__ = ["DEFAULTS", "ConfigError", "load_config", "plan", "run"]


class ConfigError(ValueError):
    """A configuration key that is unknown, missing or has a bad value (the message names it)."""


DEFAULTS = {
    "inputs": None,
    "out_dir": None,
    "cluster": None,
    "acquisition": {"pixel_size_A": None, "voltage_kV": None, "cs_mm": None, "amplitude_contrast": None,
                    "dose_e_per_A2": None},
    "metadata": [],
    "clean": True,
    "gain": None,
    "defects": None,
    "ctf": {"min_resolution_A": 30.0, "max_resolution_A": 5.0, "min_defocus_A": 3000.0,
            "max_defocus_A": 50000.0, "max_astigmatism_A": 3000.0, "prior": None, "prior_window": 0.25},
    "score": {"max_astigmatism_A": 1500.0, "select": None},
    "restore": {"method": "wiener"},
    "report": True,
}

_RANGES = {
    "acquisition.pixel_size_A": (0.05, 100.0), "acquisition.voltage_kV": (10.0, 1000.0),
    "acquisition.cs_mm": (0.0, 10.0), "acquisition.amplitude_contrast": (0.0, 0.5),
    "acquisition.dose_e_per_A2": (0.0, 10000.0), "ctf.min_resolution_A": (1.0, 1000.0),
    "ctf.max_resolution_A": (0.5, 100.0), "ctf.min_defocus_A": (0.0, 200000.0),
    "ctf.max_defocus_A": (0.0, 200000.0), "ctf.max_astigmatism_A": (0.0, 50000.0),
    "ctf.prior_window": (0.01, 0.99),
    "score.max_astigmatism_A": (0.0, 50000.0),
}


def _merge(defaults, given, prefix=""):
    if not isinstance(given, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the configuration'}: expected a mapping of keys, got {given!r}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"{name}: unknown key; known here: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict):
            out[key] = _merge(defaults[key], value if value is not None else {}, f"{name}.")
        else:
            out[key] = value
    return out


def _check(config):
    if not config["inputs"]:
        raise ConfigError("inputs: required (micrograph files, glob patterns or one store)")
    if isinstance(config["inputs"], str):
        config["inputs"] = [config["inputs"]]
    if not isinstance(config["inputs"], list) or not all(isinstance(p, str) for p in config["inputs"]):
        raise ConfigError(f"inputs: expected a list of paths, got {config['inputs']!r}")
    if not isinstance(config["out_dir"], str) or not config["out_dir"]:
        raise ConfigError("out_dir: required (the folder for every result)")
    for key in ("clean", "report"):
        if not isinstance(config[key], bool):
            raise ConfigError(f"{key}: expected true or false, got {config[key]!r}")
    if isinstance(config["metadata"], str):
        config["metadata"] = [config["metadata"]]
    for name, (low, high) in _RANGES.items():
        section, key = name.split(".")
        value = config[section][key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    ctf = config["ctf"]
    if ctf["max_resolution_A"] >= ctf["min_resolution_A"]:
        raise ConfigError(f"ctf.max_resolution_A ({ctf['max_resolution_A']}) must be below "
                          f"ctf.min_resolution_A ({ctf['min_resolution_A']})")
    if ctf["min_defocus_A"] >= ctf["max_defocus_A"]:
        raise ConfigError(f"ctf.min_defocus_A ({ctf['min_defocus_A']}) must be below "
                          f"ctf.max_defocus_A ({ctf['max_defocus_A']})")
    if config["restore"]["method"] not in ("wiener", "phaseflip", "none", None):
        raise ConfigError(f"restore.method: expected wiener, phaseflip or none, got {config['restore']['method']!r}")
    select = config["score"]["select"]
    if select is not None:
        import pandas as pd

        from cryodask.score import select as parse

        columns = ["logic", "novelty", "impact", "repro", "meta", "V", "hyperscore", "top_cause",
                   "ice_thickness_A", "quality_expected"]
        try:
            parse(pd.DataFrame({c: [] for c in columns}), select)
        except ValueError as err:
            raise ConfigError(f"score.select: {err}") from None
    for key in ("gain", "defects"):
        if config[key] is not None and not os.path.isfile(config[key]):
            raise ConfigError(f"{key}: {config[key]}: no such file")
    if ctf["prior"] is not None:
        from cryodask.io.ctf_results import read_ctf_results

        try:
            read_ctf_results(ctf["prior"])
        except (ValueError, OSError) as err:
            raise ConfigError(f"ctf.prior: {err}") from None
    return config


def load_config(source) -> dict:
    """The checked configuration, with defaults filled in, from a YAML path or a dict."""
    import yaml

    if isinstance(source, dict):
        given, where = source, "the configuration"
    else:
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise ConfigError(f"{where}: no such file")
        with open(where, encoding="utf-8") as fh:
            try:
                given = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{where}: not valid YAML ({err})") from None
    try:
        return _check(_merge(DEFAULTS, given))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _paths(config):
    out = config["out_dir"]
    return {"store": os.path.join(out, "dataset.zarr"), "ctf_star": os.path.join(out, "micrographs_ctf.star"),
            "scores": os.path.join(out, "scores.csv"), "restored": os.path.join(out, "restored"),
            "selected": os.path.join(out, "selected_micrographs_ctf.star"), "report": os.path.join(out, "report.html"),
            "checkpoint": os.path.join(out, "scoring.partial")}


def _checkpoint_key(config, ds):
    """What the scores depend on: a checkpoint made with anything else is not reused."""
    def file_key(path):
        return None if path is None else [os.path.abspath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns]

    return {"micrographs": [str(n) for n in ds["micrograph_name"].values],
            "chunks": list(ds["image"].chunks[0]) if ds["image"].chunks else None,
            "clean": config["clean"], "ctf": config["ctf"], "score": config["score"]["max_astigmatism_A"],
            "gain": file_key(config["gain"]), "defects": file_key(config["defects"]),
            "prior": file_key(config["ctf"]["prior"])}


def _given_store(config):
    inputs = config["inputs"]
    path = inputs[0]
    is_store = os.path.isdir(path) and os.path.isfile(os.path.join(path, "zarr.json"))
    return path if len(inputs) == 1 and is_store else None


def _groups(config, paths):
    """[(store, files, checkpoint folder)]: one store per micrograph shape.

    A store holds micrographs of one shape; inputs of several shapes (e.g. two detectors,
    or micrographs cropped differently) become one store each, ``dataset_<ny>x<nx>.zarr``,
    scored as separate datasets and reported together.
    """
    given = _given_store(config)
    if given:
        return [(given, None, paths["checkpoint"])]
    from cryodask.ingest import expand_paths
    from cryodask.io.images import probe

    files = expand_paths(config["inputs"])
    if config["restore"]["method"] not in ("none", None):
        from cryodask.io.export import output_stem

        seen = {}
        for path in files:
            stem = output_stem(path)
            if stem in seen:
                raise ConfigError(f"inputs: {seen[stem]} and {path} would both be restored to "
                                  f"restored/{stem}.mrc; rename one, or set restore.method: none")
            seen[stem] = path
    shapes = {}
    for path in files:
        shapes.setdefault(tuple(probe(path).shape), []).append(path)
    if len(shapes) == 1:
        return [(paths["store"], files, paths["checkpoint"])]
    out = config["out_dir"]
    return [(os.path.join(out, f"dataset_{ny}x{nx}.zarr"), group, os.path.join(out, f"scoring_{ny}x{nx}.partial"))
            for (ny, nx), group in sorted(shapes.items())]


def plan(config, groups=None) -> list[str]:
    """The stages ``run`` would do now, one line each ("skip" where the results are there).

    ``groups`` are the stores and their files (:func:`_groups`), found here when not given.
    """
    from cryodask.io.store import open_dataset

    paths = _paths(config)
    lines = []
    for store, files, checkpoint in groups or _groups(config, paths):
        have = set()
        if os.path.isdir(store):
            have = set(open_dataset(store, incomplete="drop").data_vars)
            lines.append(f"ingest: skip ({store} is there)")
        else:
            lines.append(f"ingest: {len(files)} file(s) -> {store}")
        resumed = ""
        if "hyperscore" not in have and os.path.isdir(checkpoint):
            resumed = f" (resuming from {checkpoint} where its settings match)"
        lines.append("clean, CTF, causes of noise, rules, scores: "
                     + ("skip (in the store)" if "hyperscore" in have else f"-> {store}")
                     + ("" if config["clean"] else " (no cleaning)") + resumed)
    if config["ctf"]["prior"]:
        lines.append(f"CTF prior: defocus searched within {config['ctf']['prior_window']:.0%} of "
                     f"{config['ctf']['prior']}'s, where it names the micrograph")
    lines.append(f"scores table: -> {paths['scores']}")
    lines.append(f"CTF STAR: -> {paths['ctf_star']}")
    method = config["restore"]["method"]
    if method in ("none", None):
        lines.append("restore: off")
    else:
        lines.append(f"restore ({method}): the micrographs without a file in {paths['restored']}/")
    if config["score"]["select"]:
        lines.append(f"select ({config['score']['select']}): -> {paths['selected']}")
    lines.append(f"report: -> {paths['report']}" if config["report"] else "report: off")
    return lines


def run(config, *, dry_run: bool = False, echo=print) -> dict:
    """Run the pipeline of a configuration (a YAML path or a dict); return what it wrote.

    With ``dry_run`` only the plan is printed and nothing is computed or written.
    """
    config = load_config(config)
    paths = _paths(config)
    groups = _groups(config, paths)  # every input's header read once
    for line in plan(config, groups):
        echo(("would " if dry_run else "") + line)
    if dry_run:
        return {}
    from cryodask.cluster import cluster_client, load_cluster_config

    os.makedirs(config["out_dir"], exist_ok=True)
    with cluster_client(load_cluster_config(config["cluster"])) as client:
        if client is not None:
            echo(f"Dask dashboard: {client.dashboard_link}")
        return _run(config, paths, groups, echo)


def _run(config, paths, groups, echo):
    from cryodask.ctf import CTFSearch
    from cryodask.io.star import write_ctf_star
    from cryodask.io.store import per_micrograph
    from cryodask.score import scores_table, select, write_selection, write_table

    start = time.perf_counter()
    c = config["ctf"]
    search = CTFSearch(min_resolution_A=c["min_resolution_A"], max_resolution_A=c["max_resolution_A"],
                       min_defocus_A=c["min_defocus_A"], max_defocus_A=c["max_defocus_A"],
                       max_astigmatism_A=c["max_astigmatism_A"])
    if len(groups) > 1:
        echo(f"{len(groups)} micrograph shapes: one store each, scored as separate datasets")
    method = config["restore"]["method"]
    restore_to = None if method in ("none", None) else paths["restored"]
    datasets = [_scored(config, store, files, checkpoint, search, echo, restore_to)
                for store, files, checkpoint in groups]
    combined = per_micrograph([ds for ds, _, _ in datasets])
    table = scores_table(combined)
    write_table(table, paths["scores"])
    write_ctf_star(combined, paths["ctf_star"])
    written = {"store": groups[0][0] if len(groups) == 1 else [g[0] for g in groups],
               "scores": paths["scores"], "ctf_star": paths["ctf_star"]}
    if restore_to is not None:
        # Restored in the scoring pass; here only what that pass did not write (its scores
        # were in the store already when the run began).
        for ds, gain, known in datasets:
            _restore(ds, config, paths, method, gain, known, echo)
        write_ctf_star(combined, os.path.join(paths["restored"], "micrographs_ctf.star"))
        written["restored"] = paths["restored"]
    if config["score"]["select"]:
        keep = select(table, config["score"]["select"])
        if keep.any():
            write_selection(combined, keep, paths["selected"])
            written["selected"] = paths["selected"]
        echo(f"selected {int(keep.sum())} of {len(table)} ({config['score']['select']})")
    if config["report"]:
        from cryodask.report import write_report

        shown = [ds for ds, _, _ in datasets]
        written["report"] = write_report(shown[0] if len(shown) == 1 else shown, paths["report"],
                                         title=f"cryodask: {config['out_dir']}")
    echo(f"finished in {time.perf_counter() - start:.1f} s; results in {config['out_dir']}/")
    return written


def _scored(config, store, files, checkpoint_dir, search, echo, restore_to=None):
    """Ingest (unless the store is there) and score (unless the scores are), restoring to
    ``restore_to`` in the same pass; the dataset, and the gain reference and known defects
    read for its shape."""
    from cryodask import pipeline
    from cryodask.checkpoint import Checkpoint
    from cryodask.defects import read_defect_file, read_gain_reference
    from cryodask.ingest import ingest
    from cryodask.io.store import open_dataset, write_variables
    from cryodask.score import RuleLimits

    t = time.perf_counter()
    if os.path.isdir(store):
        # A store appears only once ingested completely; variables whose write was
        # interrupted are left out and computed again.
        ds = open_dataset(store, incomplete="drop")
    else:
        acquisition = {k: v for k, v in config["acquisition"].items() if v is not None}
        ds = ingest(files, store, metadata=config["metadata"] or None, **acquisition)
        echo(f"ingested {ds.sizes['micrograph']} micrographs -> {store} ({time.perf_counter() - t:.1f} s)")
    shape = (ds.sizes["y"], ds.sizes["x"])
    gain = read_gain_reference(config["gain"], shape=shape) if config["gain"] else None
    known = read_defect_file(config["defects"], shape) if config["defects"] else None
    if "hyperscore" not in ds:
        t = time.perf_counter()
        limits = RuleLimits.from_search(search, max_astigmatism_A=config["score"]["max_astigmatism_A"])
        # Each pass keeps its finished micrographs here until the scores are in the store.
        checkpoint = Checkpoint(checkpoint_dir, _checkpoint_key(config, ds), echo=echo)
        prior = None
        if config["ctf"]["prior"]:
            from cryodask.io.ctf_results import read_ctf_results

            prior = read_ctf_results(config["ctf"]["prior"])
        before = _restored_count(ds, restore_to)
        scores, _ = pipeline.score_dataset(ds, search=search, limits=limits, gain_reference=gain, defects=known,
                                           clean=config["clean"], checkpoint=checkpoint, ctf_prior=prior,
                                           prior_window=config["ctf"]["prior_window"], restore_to=restore_to,
                                           restore_method=config["restore"]["method"])
        write_variables(scores, store, overwrite=True)
        checkpoint.remove()
        ds = open_dataset(store)
        restored = "" if restore_to is None else (
            f", restored {_restored_count(ds, restore_to) - before} ({config['restore']['method']}) -> {restore_to}/")
        echo(f"cleaned, fitted CTFs, decomposed the noise and scored {ds.sizes['micrograph']} micrographs"
             f"{restored} ({time.perf_counter() - t:.1f} s)")
    return ds, gain, known


def _restored_count(ds, out_dir):
    from cryodask.io.export import output_paths

    return 0 if out_dir is None else sum(os.path.isfile(p) for p in output_paths(ds, out_dir))


def _restore(ds, config, paths, method, gain, known, echo):
    """Restore what the scoring pass did not (its scores were in the store already)."""
    from cryodask.io.export import output_paths
    from cryodask.pipeline import restore_files

    out_dir = paths["restored"]
    n = ds.sizes["micrograph"]
    done = _restored_count(ds, out_dir)
    if done < n:
        t = time.perf_counter()
        # Each file is written under a temporary name and renamed: a file that exists is whole.
        os.makedirs(out_dir, exist_ok=True)
        restore_files(ds, output_paths(ds, out_dir), method=method, clean=config["clean"], gain_reference=gain,
                      defects=known)
        echo(f"restored {n - done} micrographs ({method}) -> {out_dir}/ ({time.perf_counter() - t:.1f} s)"
             + (f"; {done} were done already" if done else ""))
    else:
        echo(f"restore: all {n} micrographs have their file")
