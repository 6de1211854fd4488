"""The ``cryodask`` command line: simulate, ingest, info, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import dask.config

__all__ = ["main"]

logger = logging.getLogger(__name__)


class CLIError(Exception):
    """An error to report to the user in one line, without a traceback."""


def _add_cluster(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--cluster", default=default, metavar="SPEC",
        help="where to run: 'threads', 'local' (worker processes here), 'cuda', a scheduler "
             "address such as tcp://127.0.0.1:8786, or a YAML file (see docs/scaling.md); "
             "default: CRYODASK_CLUSTER or Dask config 'cryodask.cluster', else threads",
    )


def _add_file_acquisition(parser) -> None:
    """Acquisition options for commands that take micrograph files or a store."""
    g = parser.add_argument_group("acquisition (for files; a store has its own)")
    g.add_argument("--pixel-size", type=float, metavar="Å", help="pixel size in Å (default: MRC header)")
    g.add_argument("--voltage", type=float, metavar="kV", help="kV (default: metadata, else 300)")
    g.add_argument("--cs", type=float, metavar="mm", help="spherical aberration in mm (default: metadata, else 2.7)")
    g.add_argument("--amplitude-contrast", type=float, metavar="Q0", help="(default: metadata, else 0.07)")
    g.add_argument("--stack", choices=("auto", "micrographs", "sum", "error"), default="auto",
                   help="multi-image files: a stack of micrographs or a movie to sum")


def _add_gain_options(group) -> None:
    group.add_argument("--gain", metavar="FILE", help="gain reference (MRC/TIFF) to multiply each micrograph by")
    group.add_argument("--gain-rotate", type=int, default=0, choices=(0, 1, 2, 3),
                       help="quarter turns of the gain reference from +x towards +y (MotionCor2 -RotGain)")
    group.add_argument("--gain-flip", type=int, default=0, choices=(0, 1, 2),
                       help="flip the gain reference after rotating: 1 upside down, 2 left-right")
    group.add_argument("--defects", metavar="FILE",
                       help="defect file: 'x y width height' per line (MotionCor2)")


def _gain_and_defects(args, shape):
    from cryodask.defects import read_defect_file, read_gain_reference

    gain = (read_gain_reference(args.gain, rotate=args.gain_rotate, flip=args.gain_flip, shape=shape)
            if args.gain else None)
    known = read_defect_file(args.defects, shape) if args.defects else None
    return gain, known


def _add_ingest_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("acquisition (override headers and metadata files)")
    g.add_argument("--pixel-size", type=float, metavar="Å", help="pixel size in Å (default: MRC header)")
    g.add_argument("--voltage", type=float, metavar="kV", help="accelerating voltage in kV (default: metadata, else 300)")
    g.add_argument("--cs", type=float, metavar="mm", help="spherical aberration in mm (default: metadata, else 2.7)")
    g.add_argument("--amplitude-contrast", type=float, metavar="Q0", help="amplitude contrast (default: metadata, else 0.07)")
    g.add_argument("--dose", type=float, metavar="e/Å²", help="total dose in e/Å² (default: metadata)")
    g.add_argument("--metadata", nargs="+", default=None, metavar="FILE",
                   help="RELION micrograph STAR, EPU XML or SerialEM mdoc files, matched by name")
    g.add_argument("--coordinates", nargs="+", default=None, metavar="FILE",
                   help="particle coordinates (RELION .star, .box, Topaz .txt)")
    g.add_argument("--stack", choices=("auto", "micrographs", "sum", "error"), default="auto",
                   help="a multi-image file is a stack of micrographs, or a movie to sum "
                        "(default auto: .mrcs are stacks, other multi-image files are an error)")


def _ingest_kwargs(args) -> dict:
    return dict(pixel_size_A=args.pixel_size, voltage_kV=args.voltage, cs_mm=args.cs,
                amplitude_contrast=args.amplitude_contrast, dose_e_per_A2=args.dose,
                metadata=args.metadata, coordinates=args.coordinates, stack=args.stack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryodask",
        description="Restore cryo-EM micrographs at any scale (Zarr/xarray stores, Dask).",
    )
    parser.add_argument("--version", action="version", version=f"cryodask {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a dataset of micrographs with ground truth",
                       description="Simulate micrographs by the causal process (particles, ice, "
                                   "CTF, dose, detector, artifacts) and write them as MRC files, "
                                   "with truth.csv beside them.")
    p.add_argument("out_dir", help="folder for the MRC files and truth.csv")
    p.add_argument("--count", type=int, default=16, help="number of micrographs (default 16)")
    p.add_argument("--size", type=int, default=1024, help="micrograph width and height in pixels (default 1024)")
    p.add_argument("--pixel-size", type=float, default=1.0, metavar="Å", help="pixel size in Å (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--artifacts", action="store_true",
                   help="add a gain pattern, dead lines, hot pixels and X-ray clusters")
    p.add_argument("--truth-images", action="store_true",
                   help="also write each micrograph's projection, clean image and mask")
    _add_cluster(p)

    p = sub.add_parser("ingest", help="ingest micrograph files into a store",
                       description="Read MRC/MRCS/TIFF micrographs and their metadata into a "
                                   "new Zarr store. Input files are never modified.")
    p.add_argument("files", nargs="+", help="micrograph files or glob patterns")
    p.add_argument("--out", required=True, help="the new store (a directory, e.g. micrographs.zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _add_ingest_options(p)
    _add_cluster(p)

    p = sub.add_parser("ctf", help="estimate the CTF of micrographs; write RELION STAR",
                       description="Estimate defocus U/V, astigmatism angle (and phase shift) of "
                                   "each micrograph from its power spectrum; write a RELION 3.1 "
                                   "micrographs_ctf.star and optionally a CTFFIND-style table and "
                                   "diagnostic pictures. Given a store, results are also added to it.")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_STORE",
                   help="micrograph files / globs, or one cryodask store")
    p.add_argument("--out", default="micrographs_ctf.star", help="STAR file to write (default micrographs_ctf.star)")
    p.add_argument("--ctffind-txt", metavar="FILE", help="also write a CTFFIND-style text table")
    p.add_argument("--diagnostics", metavar="DIR", help="write <name>_ctf.png per micrograph into DIR")
    _add_file_acquisition(p)
    g = p.add_argument_group("search")
    g.add_argument("--min-res", type=float, default=30.0, metavar="Å", help="low-resolution limit of the fit (default 30)")
    g.add_argument("--max-res", type=float, default=5.0, metavar="Å", help="high-resolution limit of the fit (default 5)")
    g.add_argument("--min-defocus", type=float, default=3000.0, metavar="Å", help="default 3000 (0.3 µm)")
    g.add_argument("--max-defocus", type=float, default=50000.0, metavar="Å", help="default 50000 (5 µm)")
    g.add_argument("--max-astigmatism", type=float, default=3000.0, metavar="Å", help="default 3000")
    g.add_argument("--phase-shift", action="store_true", help="also fit a phase-plate phase shift")
    p.add_argument("--compare", metavar="FILE",
                   help="compare with another program's results: RELION .star, CTFFIND .txt or cryoSPARC .cs")
    g.add_argument("--prior", metavar="FILE",
                   help="earlier CTF results (RELION .star, CTFFIND .txt, cryoSPARC .cs): search each matched "
                        "micrograph's mean defocus near its value there")
    g.add_argument("--prior-window", type=float, default=0.25, metavar="FRACTION",
                   help="half-width of that search as a fraction of the prior defocus (default 0.25)")
    g.add_argument("--box-size", type=int, metavar="PX",
                   help="spectrum sampling as an equivalent tile size (default: from the search range)")
    g = p.add_argument_group("cleaning (on by default, in memory: nothing is written)")
    g.add_argument("--no-clean", action="store_true",
                   help="fit the raw images: no impulse, defect or region handling")
    _add_gain_options(g)
    _add_cluster(p)

    p = sub.add_parser("clean", help="correct hot pixels, X-rays and detector defects",
                       description="Find impulse artifacts (hot pixels, X-ray clusters) in each "
                                   "micrograph and fixed defects and the residual gain pattern "
                                   "across all of them; write DIR/<name>.mrc (corrected, float32, "
                                   "same shape and voxel size) and DIR/<name>_mask.mrc (8-bit, MRC mode 0: "
                                   "0 good, 1 hot pixel, 2 X-ray, 3 defect). Inputs are not modified.")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_STORE",
                   help="micrograph files / globs, or one cryodask store")
    p.add_argument("--out-dir", required=True, help="folder for the corrected micrographs and masks")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_gain_options(p)
    p.add_argument("--no-dataset", action="store_true",
                   help="judge each micrograph alone: no dataset defect map or gain estimate")
    p.add_argument("--no-gain-estimate", action="store_true",
                   help="find defects across the dataset but do not divide by its gain estimate")
    p.add_argument("--seed", type=int, default=0, help="seed of the fill noise (default 0)")
    p.add_argument("--regions", action="store_true",
                   help="also classify ice / vacuum / carbon / contamination and write "
                        "DIR/<name>_regions.mrc (codes 0-3)")
    p.add_argument("--tile-size", type=int, default=64, metavar="PX", help="region tile size (default 64)")
    _add_file_acquisition(p)
    _add_cluster(p)

    p = sub.add_parser("restore", help="restore micrographs: CTF correction by Wiener filter or phase flip",
                       description="Clean each micrograph in memory, estimate its CTF, and write "
                                   "DIR/<name>.mrc: the CTF-corrected image (float32, same shape "
                                   "and voxel size, protein bright) and DIR/micrographs_ctf.star. "
                                   "Given a store, image_restored and the CTF are added to it.")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_STORE",
                   help="micrograph files / globs, or one cryodask store")
    p.add_argument("--out-dir", required=True, help="folder for the restored micrographs")
    p.add_argument("--method", choices=("wiener", "phaseflip"), default="wiener",
                   help="Wiener filter with the micrograph's own signal and noise spectra (default), "
                        "or phase flipping")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-clean", action="store_true", help="restore the raw images (no artifact handling)")
    _add_gain_options(p)
    _add_file_acquisition(p)
    _add_cluster(p)

    p = sub.add_parser("noise", help="say which physical causes make each micrograph noisy",
                       description="Estimate the CTF, then split each micrograph's noise variance "
                                   "among dose (shot noise), ice, detector and artifacts, and rank "
                                   "what setting each cause to its ideal would gain. Writes a CSV: "
                                   "micrograph, share_<cause>, gain_<cause>, top_cause.")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_STORE",
                   help="micrograph files / globs, or one cryodask store")
    p.add_argument("--out", default="noise.csv", help="CSV to write (default noise.csv)")
    p.add_argument("--no-prior", action="store_true",
                   help="judge each micrograph alone (default: dataset priors of the white noise "
                        "level and the amount of ice, from 4 micrographs on)")
    p.add_argument("--uncertainty", action="store_true",
                   help="add standard errors share_<cause>_se and gain_<cause>_se (each micrograph's two "
                        "halves decomposed alone; twice the work)")
    _add_gain_options(p)
    _add_file_acquisition(p)
    _add_cluster(p)

    p = sub.add_parser("score", help="score micrographs: consistency rules, novelty, forecasts, V and HyperScore",
                       description="Score each micrograph (DESIGN.md's V and HyperScore) and say why the bad "
                                   "ones are bad: one CSV row per micrograph; --select writes a RELION STAR "
                                   "file of those that pass a threshold. Artifacts are corrected in memory first.")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_STORE",
                   help="micrograph files (MRC/TIFF) or one store made by 'cryodask ingest'")
    p.add_argument("--out", default="scores.csv", help="CSV to write (default scores.csv)")
    p.add_argument("--select", metavar="EXPR",
                   help="keep the micrographs that pass, e.g. \"hyperscore > 140 and logic >= 0.8\" "
                        "(columns of the CSV; and/or); writes --star")
    p.add_argument("--star", metavar="FILE",
                   help="STAR file of the selected micrographs, with their CTF and rlnMicrographIceThickness "
                        "(default: selected_micrographs_ctf.star beside --out)")
    p.add_argument("--weights", metavar="FILE", help="weights of V and HyperScore (JSON, from learn_weights); "
                                                     "default: those shipped with cryodask")
    p.add_argument("--reference", metavar="LIBRARY.npz", help="novelty against this saved library too")
    p.add_argument("--save-library", metavar="LIBRARY.npz", help="save this dataset's novelty library")
    p.add_argument("--dose", type=float, metavar="e/Å²", help="total dose (for files; default: metadata)")
    g = p.add_argument_group("rule limits")
    g.add_argument("--min-defocus", type=float, default=3000.0, metavar="Å", help="default 3000")
    g.add_argument("--max-defocus", type=float, default=50000.0, metavar="Å", help="default 50000")
    g.add_argument("--max-astigmatism", type=float, default=1500.0, metavar="Å",
                   help="plausible astigmatism (default 1500)")
    g = p.add_argument_group("cleaning (on by default, in memory: nothing is written)")
    g.add_argument("--no-clean", action="store_true", help="score the raw images (no artifact handling)")
    _add_gain_options(g)
    _add_file_acquisition(p)
    _add_cluster(p)

    p = sub.add_parser("bench", help="time the pipeline against the floor (read, rfft2, irfft2, write)",
                       description="Simulate micrographs, ingest them, and time the floor and each pipeline "
                                   "stage on the same store in one run; print seconds per micrograph, MB/s, "
                                   "the ratio to the floor and peak memory.")
    p.add_argument("--size", type=int, default=1024, help="pixels per side (default 1024)")
    p.add_argument("--count", type=int, nargs="+", default=[8], metavar="N",
                   help="micrographs (default 8); several counts run one after another, each in a fresh "
                        "process, and are compared: time per micrograph and peak memory against the count")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--no-stages", action="store_true",
                   help="time the floor and the pipeline only, not each stage apart (for large counts, "
                        "e.g. a dataset several times the workers' memory limit)")
    _add_cluster(p)

    p = sub.add_parser("run", help="the whole pipeline from one YAML configuration",
                       description="Ingest, clean, fit CTFs, decompose the noise, score, restore, select and "
                                   "report, as the configuration says (see cryodask.run for every key). Stages "
                                   "whose results exist are not run again: start it again after an interruption.")
    p.add_argument("config", help="the YAML configuration")
    p.add_argument("--dry-run", action="store_true", help="print the plan; compute and write nothing")

    p = sub.add_parser("report", help="write a self-contained HTML report of a store",
                       description="Plots of the dataset (CTF, causes of noise, scores) and of its best, worst "
                                   "and named micrographs (raw, cleaned, restored; spectrum and CTF fit; artifact "
                                   "mask; failed rules), embedded in one HTML file. Run 'cryodask score STORE' "
                                   "first for the scores.")
    p.add_argument("store")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--micrograph", nargs="+", default=(), metavar="NAME",
                   help="also show these micrographs (names or their ends)")
    p.add_argument("--best", type=int, default=2, help="how many of the best to show (default 2)")
    p.add_argument("--worst", type=int, default=2, help="how many of the worst to show (default 2)")
    p.add_argument("--threshold", type=float, default=140.0, help="HyperScore threshold to draw (default 140)")

    p = sub.add_parser("info", help="say what a store holds",
                       description="Print a store's dimensions, variables and acquisition values.")
    p.add_argument("store")

    p = sub.add_parser("demo", help="simulate a small dataset and run every stage on it",
                       description="Simulate micrographs, ingest them on a local Dask cluster, "
                                   "run the pipeline stages and say where the results are.")
    p.add_argument("--out", default="demo-output", help="working folder (default demo-output)")
    p.add_argument("--count", type=int, default=16, help="micrographs (default 16)")
    p.add_argument("--size", type=int, default=768, help="pixels per side (default 768)")
    _add_cluster(p, default="local")
    return parser


def _version() -> str:
    from cryodask import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cryodask.progress import ALLOCATOR_ENVIRON, keep_large_blocks

    keep_large_blocks()  # before Dask's threads start (each would take its own arena)
    logger.info("C allocator settings in the environment: %s",
                ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in ALLOCATOR_ENVIRON))
    handler = {"simulate": cmd_simulate, "ingest": cmd_ingest, "info": cmd_info,
               "demo": cmd_demo, "ctf": cmd_ctf, "clean": cmd_clean,
               "restore": cmd_restore, "noise": cmd_noise, "score": cmd_score,
               "report": cmd_report, "run": cmd_run, "bench": cmd_bench}[args.command]
    try:
        with dask.config.set({"cryodask.progress": sys.stderr.isatty()}):
            handler(args)
    except (CLIError, ValueError, FileExistsError, FileNotFoundError, KeyError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cryodask {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _has_dashboard() -> bool:
    """Dask serves its dashboard only when bokeh is installed."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _with_cluster(spec):
    from cryodask.cluster import cluster_client, describe, load_cluster_config

    config = load_cluster_config(spec)
    if config.kind != "threads":
        print(f"running on {describe(config)}", file=sys.stderr)
    return cluster_client(config)


def cmd_simulate(args) -> None:
    from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset

    if args.count < 1 or args.size < 64:
        raise CLIError("--count must be >= 1 and --size >= 64")
    ranges = DatasetRanges(n_hot_pixels=(100, 400), n_xrays=(5, 30)) if args.artifacts else DatasetRanges()
    detector = (Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=2, n_stuck_pixels=20, seed=args.seed)
                if args.artifacts else Detector(seed=args.seed))
    params = draw_micrograph_params(args.count, shape=(args.size, args.size),
                                    pixel_size_A=args.pixel_size, ranges=ranges, seed=args.seed)
    with _with_cluster(args.cluster):
        table = write_simulated_dataset(args.out_dir, params, detector=detector, seed=args.seed,
                                        save_truth_images=args.truth_images)
    print(f"wrote {len(table)} micrographs of {args.size}x{args.size} to {args.out_dir}/ "
          f"(truth in {os.path.join(args.out_dir, 'truth.csv')})")


def cmd_ingest(args) -> None:
    from cryodask.ingest import ingest

    with _with_cluster(args.cluster):
        ds = ingest(args.files, args.out, overwrite=args.overwrite, **_ingest_kwargs(args))
    print(f"ingested {ds.sizes['micrograph']} micrographs of {ds.sizes['y']}x{ds.sizes['x']} "
          f"into {args.out}")


def _is_store(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "zarr.json"))


def _open_inputs(args):
    """A lazy dataset of the inputs: one store, or micrograph files (nothing written)."""
    from cryodask.ingest import micrographs_dataset
    from cryodask.io.store import open_dataset

    if len(args.inputs) == 1 and _is_store(args.inputs[0]):
        return open_dataset(args.inputs[0]), args.inputs[0]
    stores = [p for p in args.inputs if _is_store(p)]
    if stores:
        raise CLIError(f"give one store, or micrograph files, not both ({stores[0]})")
    ds = micrographs_dataset(args.inputs, pixel_size_A=args.pixel_size, voltage_kV=args.voltage,
                             cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast, stack=args.stack,
                             dose_e_per_A2=getattr(args, "dose", None))
    return ds, None


def cmd_ctf(args) -> None:
    import dask
    import xarray as xr

    from cryodask import pipeline, progress
    from cryodask.ctf import CTFSearch
    from cryodask.io.export import output_stem
    from cryodask.io.star import write_ctf_star, write_ctffind_table
    from cryodask.io.store import write_variables

    search = CTFSearch(min_resolution_A=args.min_res, max_resolution_A=args.max_res,
                       min_defocus_A=args.min_defocus, max_defocus_A=args.max_defocus,
                       max_astigmatism_A=args.max_astigmatism, fit_phase_shift=args.phase_shift,
                       box_size=args.box_size)
    if not 0.0 < args.prior_window < 1.0:
        raise CLIError(f"--prior-window: expected a fraction in (0, 1), got {args.prior_window}")
    prior = None
    if args.prior:
        from cryodask.io.ctf_results import read_ctf_results

        try:
            prior = read_ctf_results(args.prior)
        except ValueError as err:
            raise CLIError(f"--prior {err}") from None
    with _with_cluster(args.cluster):
        ds, store = _open_inputs(args)
        start = time.perf_counter()
        if args.no_clean:
            lazy = pipeline.estimate_ctf_dataset(ds, search=search, prior=prior, prior_window=args.prior_window)
        else:
            from cryodask.clean import estimate_ctf_cleaned

            gain, known = _gain_and_defects(args, (ds.sizes["y"], ds.sizes["x"]))
            lazy = estimate_ctf_cleaned(ds, search=search, gain_reference=gain, defects=known, prior=prior,
                                        prior_window=args.prior_window)
        (results,) = progress.compute(lazy)
        elapsed = time.perf_counter() - start
        if store is not None:
            write_variables(results, store, overwrite=True)
        if args.diagnostics:

            os.makedirs(args.diagnostics, exist_ok=True)
            tasks = [dask.delayed(_plot_one)(ds["image"].data[i], results.isel(micrograph=i),
                                             ds.isel(micrograph=i), search,
                                             os.path.join(args.diagnostics,
                                                          output_stem(str(name)) + "_ctf.png"))
                     for i, name in enumerate(ds["micrograph_name"].values)]
            progress.compute(*tasks)
    table = xr.merge([ds[["micrograph_name", "pixel_size_A", "voltage_kV", "cs_mm",
                          "amplitude_contrast"]].compute(), results])
    write_ctf_star(table, args.out, phase_shift=args.phase_shift or None)
    if args.ctffind_txt:
        write_ctffind_table(table, args.ctffind_txt, search=search)
    n = table.sizes["micrograph"]
    print(f"{'micrograph':<40} {'defocus U':>10} {'defocus V':>10} {'angle':>7} {'cc':>7} {'res (Å)':>8}")
    for i in range(n):
        row = table.isel(micrograph=i)
        flag = "" if bool(row["ctf_reliable"]) else "  UNRELIABLE"
        print(f"{str(row['micrograph_name'].values)[-40:]:<40} {float(row['defocus_u_A']):>10.0f} "
              f"{float(row['defocus_v_A']):>10.0f} {float(row['defocus_angle_deg']):>7.1f} "
              f"{float(row['ctf_cc']):>7.3f} {float(row['ctf_fit_resolution_A']):>8.2f}{flag}")
    _report_cleaning(table, n)
    if "ctf_prior" in results.attrs:
        print(f"prior {args.prior}: {results.attrs['ctf_prior']}")
    if args.compare:
        _print_comparison(table, args.compare)
    bad = int((~table["ctf_reliable"]).sum())
    if bad:
        print(f"warning: {bad} of {n} micrographs show no significant Thon rings; their CTF "
              "values are not to be trusted (rlnCtfFigureOfMerit is low)", file=sys.stderr)
    print(f"estimated {n} CTFs in {elapsed:.1f} s ({elapsed / n:.2f} s per micrograph) -> {args.out}"
          + (f" and {store}" if store else ""))


def _print_comparison(table, path) -> None:
    import numpy as np
    import pandas as pd

    from cryodask.io.ctf_results import compare_ctf, read_ctf_results

    ours = pd.DataFrame({"micrograph_name": [str(v) for v in table["micrograph_name"].values],
                         **{k: table[k].values for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg")}})
    both = compare_ctf(ours, read_ctf_results(path))
    if both.empty:
        raise CLIError(f"--compare {path}: no micrograph matches by file name")
    d = np.abs(both["mean_defocus_difference_pct"].to_numpy())
    a = np.abs(both["angle_difference_deg"].to_numpy())
    print(f"against {path} ({len(both)} micrographs matched): mean defocus differs by median {np.nanmedian(d):.3f} %, "
          f"worst {np.nanmax(d):.3f} %; astigmatism angle by median {np.nanmedian(a):.1f}°")


def _report_cleaning(table, n) -> None:
    """Say what the in-memory cleaning did, and warn about micrographs that are mostly excluded."""
    if "n_hot_pixels" not in table:
        return
    print(f"cleaned in memory: hot pixels {int(table['n_hot_pixels'].sum())}, X-ray pixels "
          f"{int(table['n_xray_pixels'].sum())}, defect pixels {int(table['n_defect_pixels'].sum())} "
          f"over {n} micrographs (--no-clean turns this off)")
    excluded = (table["region_fraction_vacuum"] + table["region_fraction_contamination"]).values
    for name, fraction in zip(table["micrograph_name"].values, excluded):
        if fraction > 0.5:
            print(f"warning: {name}: {100 * fraction:.0f} % of it is vacuum or contamination, "
                  "left out of its spectrum", file=sys.stderr)


def cmd_clean(args) -> None:
    import numpy as np

    from cryodask import progress
    from cryodask.clean import clean_dataset
    from cryodask.io.export import export_mrc
    from cryodask.io.store import write_variables

    with _with_cluster(args.cluster):
        ds, store = _open_inputs(args)
        gain, known = _gain_and_defects(args, (ds.sizes["y"], ds.sizes["x"]))
        start = time.perf_counter()
        cleaned = clean_dataset(ds, gain_reference=gain, defects=known,
                                dataset_defects=not args.no_dataset,
                                gain_correction=False if args.no_gain_estimate else None, seed=args.seed)
        out = cleaned.assign(micrograph_name=ds["micrograph_name"], pixel_size_A=ds["pixel_size_A"])
        tasks = (export_mrc(out, args.out_dir, variable="image_clean", dtype="float32",
                            overwrite=args.overwrite, compute=False)
                 + export_mrc(out, args.out_dir, variable="artifact_mask", dtype="int8", suffix="_mask",
                              overwrite=args.overwrite, compute=False))
        if args.regions:
            from cryodask import pipeline

            regions = pipeline.regions_dataset(cleaned.assign(image=cleaned["image_clean"]),
                                               tile_px=args.tile_size)
            cleaned = cleaned.merge(regions)
            tasks += export_mrc(out.assign(region_mask=regions["region_mask"]), args.out_dir,
                                variable="region_mask", dtype="int8", suffix="_regions",
                                overwrite=args.overwrite, compute=False)
        counts = cleaned[["n_hot_pixels", "n_xray_pixels", "n_defect_pixels"]]
        *_, counts = progress.compute(*tasks, counts)
        if store is not None:
            write_variables(cleaned, store, overwrite=True)
        elapsed = time.perf_counter() - start
    n = ds.sizes["micrograph"]
    print(f"{'micrograph':<40} {'hot px':>8} {'X-ray px':>9} {'defect px':>10}")
    for i, name in enumerate(ds["micrograph_name"].values):
        print(f"{str(name)[-40:]:<40} {int(counts['n_hot_pixels'][i]):>8} "
              f"{int(counts['n_xray_pixels'][i]):>9} {int(counts['n_defect_pixels'][i]):>10}")
    if "defect_map" in cleaned:
        applied = bool(cleaned["gain_estimate"].attrs["applied"])
        print(f"dataset: {int(np.asarray(cleaned['defect_map']).sum())} defective pixels found across {n} "
              f"micrographs; residual gain estimate {'applied' if applied else 'not applied'}")
    print(f"cleaned {n} micrographs in {elapsed:.1f} s -> {args.out_dir}/" + (f" and {store}" if store else ""))


def cmd_restore(args) -> None:
    import xarray as xr

    from cryodask import pipeline, progress
    from cryodask.io.export import export_mrc
    from cryodask.io.star import write_ctf_star

    with _with_cluster(args.cluster):
        ds, store = _open_inputs(args)
        start = time.perf_counter()
        if args.no_clean:
            work, ctf = ds, pipeline.estimate_ctf_dataset(ds)
        else:
            from cryodask.clean import clean_for_fitting

            gain, known = _gain_and_defects(args, (ds.sizes["y"], ds.sizes["x"]))
            work, exclude, extra = clean_for_fitting(ds, gain_reference=gain, defects=known)
            ctf = xr.merge([pipeline.estimate_ctf_dataset(work, exclude=exclude), extra])
        # The CTF is computed first (small); restoring then reads each micrograph once more.
        (ctf,) = progress.compute(ctf)
        restored = pipeline.restore_dataset(work, ctf, method=args.method)
        if store is not None:
            # Into the store first (one pass); the MRC files are then read back from it.
            from cryodask.io.store import open_dataset, write_variables

            write_variables(xr.merge([ctf, restored.to_dataset()]), store, overwrite=True)
            restored = open_dataset(store)["image_restored"]
        out = ds[["micrograph_name", "pixel_size_A"]].assign(image_restored=restored)
        tasks = export_mrc(out, args.out_dir, variable="image_restored", dtype="float32",
                           overwrite=args.overwrite, compute=False)
        progress.compute(*tasks)
        elapsed = time.perf_counter() - start
    table = xr.merge([ds[["micrograph_name", "pixel_size_A", "voltage_kV", "cs_mm",
                          "amplitude_contrast"]].compute(), ctf])
    write_ctf_star(table, os.path.join(args.out_dir, "micrographs_ctf.star"))
    n = ds.sizes["micrograph"]
    _report_cleaning(table, n)
    bad = int((~ctf["ctf_reliable"]).sum())
    if bad:
        print(f"warning: {bad} of {n} micrographs have no reliable CTF fit; check them before use",
              file=sys.stderr)
    print(f"restored {n} micrographs ({args.method}) in {elapsed:.1f} s -> {args.out_dir}/"
          + (f" and {store} (image_restored)" if store else ""))


def cmd_noise(args) -> None:
    import numpy as np
    import pandas as pd
    import xarray as xr

    from cryodask import pipeline, progress
    from cryodask.causal import NOISE_CAUSES
    from cryodask.clean import MIN_DATASET_MICROGRAPHS, estimate_ctf_cleaned, measure_defects

    with _with_cluster(args.cluster):
        ds, _ = _open_inputs(args)
        start = time.perf_counter()
        gain, known = _gain_and_defects(args, (ds.sizes["y"], ds.sizes["x"]))
        found = None
        if ds.sizes["micrograph"] >= MIN_DATASET_MICROGRAPHS:
            found = measure_defects(ds, gain_reference=gain, defects=known)
        work = ds if gain is None else ds.assign(image=ds["image"] * gain)
        # Pass 1 (defects, gain) is shared by the CTF fit and the noise decomposition.
        (ctf,) = progress.compute(estimate_ctf_cleaned(ds, gain_reference=gain, defects=known,
                                                       measured=found))
        use_prior = not args.no_prior and ds.sizes["micrograph"] >= MIN_DATASET_MICROGRAPHS
        lazy = pipeline.noise_dataset(work, ctf, gain_estimate=found,
                                      defects=known if found is None else found.defects, prior=use_prior,
                                      uncertainty=args.uncertainty)
        (noise,) = progress.compute(lazy)
        elapsed = time.perf_counter() - start
    rows = []
    for i, name in enumerate(ds["micrograph_name"].values):
        row = {"micrograph": str(name)}
        row.update({f"share_{c}": float(noise[f"share_{c}"][i]) for c in NOISE_CAUSES})
        row.update({f"gain_{c}": float(noise[f"gain_{c}"][i]) for c in NOISE_CAUSES})
        gains = {c: row[f"gain_{c}"] for c in NOISE_CAUSES if c != "dose"}
        finite = {c: g for c, g in gains.items() if np.isfinite(g)}
        row["top_cause"] = max(finite, key=finite.get) if finite else ""
        for name in ("n_hot_pixels", "n_xray_pixels", "n_defect_pixels"):
            row[name] = int(ctf[name][i])
        row["ctf_reliable"] = bool(ctf["ctf_reliable"][i])
        if "b_factor_relative_A2" in noise:
            row["b_factor_relative_A2"] = float(noise["b_factor_relative_A2"][i])
            row["b_factor_relative_A2_se"] = float(noise["b_factor_relative_A2_error"][i])
        if args.uncertainty:
            row.update({f"{kind}_{c}_se": float(noise[f"{kind}_{c}_se"][i])
                        for kind in ("share", "gain") for c in NOISE_CAUSES})
        rows.append(row)
    table = pd.DataFrame(rows)
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(args.out)}.partial")
    table.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, args.out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    _report_cleaning(xr.merge([ds[["micrograph_name"]], ctf]), len(table))
    unreliable = int((~ctf["ctf_reliable"]).sum())
    if unreliable:
        print(f"warning: {unreliable} of {len(table)} micrographs have no reliable CTF fit; their "
              "decomposition is not to be trusted", file=sys.stderr)
    if "particle_spectrum" in noise:
        print("the particles' power spectrum was learned from the whole dataset (the sample node)")
    for name in ("white", "ice_scale"):
        if f"prior_{name}" in noise:
            a = noise[f"prior_{name}"].attrs
            print(f"prior of {name}: centre {a['prior_mean']:.4g}, spread {a['prior_spread']:.3g}; "
                  f"{a['iterations']} iterations, last move {a['drift_in_standard_errors']:.3g} "
                  f"standard errors" + ("" if a["converged"] else " (NOT converged)"))
    bands = noise["band"].values
    print("\nmean share of the noise power per frequency band:")
    print(f"{'cause':<10} " + " ".join(f"{b:>16}" for b in bands))
    for cause in NOISE_CAUSES:
        values = np.nanmean(noise[f"band_share_{cause}"].values, axis=0)
        print(f"{cause:<10} " + " ".join(f"{v:>16.3f}" for v in values))
    print(f"noise of {len(table)} micrographs in {elapsed:.1f} s -> {args.out} "
          "(share_*: of the noise variance; gain_*: predicted change in restoration quality with the cause at its ideal, "
          "dose = twice the dose)")


def cmd_score(args) -> None:
    import numpy as np

    from cryodask import pipeline
    from cryodask.ctf import CTFSearch
    from cryodask.score import RULES, RuleLimits, ScoreWeights, scores_table, select, write_selection, write_table

    search = CTFSearch(min_defocus_A=args.min_defocus, max_defocus_A=args.max_defocus,
                       max_astigmatism_A=max(3000.0, 2 * args.max_astigmatism))
    limits = RuleLimits.from_search(search, max_astigmatism_A=args.max_astigmatism)
    weights = ScoreWeights.load(args.weights) if args.weights else None
    reference = None
    if args.reference:
        with np.load(args.reference) as lib:
            reference = {name: lib[name] for name in lib.files}
    with _with_cluster(args.cluster):
        ds, store = _open_inputs(args)
        start = time.perf_counter()
        gain, known = (None, None) if args.no_clean else _gain_and_defects(args, (ds.sizes["y"], ds.sizes["x"]))
        scores, library = pipeline.score_dataset(ds, search=search, limits=limits, weights=weights,
                                                 gain_reference=gain, defects=known, clean=not args.no_clean,
                                                 reference=reference)
        elapsed = time.perf_counter() - start
        if store is not None:
            from cryodask.io.store import write_variables

            write_variables(scores, store, overwrite=True)
    table = scores_table(scores.assign(micrograph_name=ds["micrograph_name"]))
    write_table(table, args.out)
    directory = os.path.dirname(os.path.abspath(args.out))
    if args.save_library:
        np.savez(args.save_library, **library)
    shown = table[["micrograph", "logic", "novelty", "impact", "V", "hyperscore", "top_cause", "failed_rules"]].copy()
    shown["micrograph"] = shown["micrograph"].str[-36:]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"scored {len(table)} micrographs in {elapsed:.1f} s -> {args.out}")
    for rule in RULES:
        failed = int((table[f"rule_{rule}"] == 0).sum())
        if failed:
            print(f"  {rule}: {failed} failed ({RULES[rule]})")
    if args.select:
        keep = select(table, args.select)
        star = args.star or os.path.join(directory, "selected_micrographs_ctf.star")
        if not keep.any():
            raise CLIError(f"--select {args.select!r}: no micrograph passes; nothing written")
        acquisition = ds[["micrograph_name", "pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"]].compute()
        write_selection(acquisition.merge(scores[["defocus_u_A", "defocus_v_A", "defocus_angle_deg",
                                                  "phase_shift_deg", "ctf_cc", "ctf_fit_resolution_A",
                                                  "ice_thickness_A"]]), keep, star)
        print(f"selected {int(keep.sum())} of {len(table)} ({args.select}) -> {star}")


def cmd_bench(args) -> None:
    from cryodask.bench import run_benchmark, run_scaling, write_json

    if len(args.count) > 1:
        result = run_scaling(size=args.size, counts=args.count, cluster=args.cluster, stages=not args.no_stages)
    else:
        with _with_cluster(args.cluster):
            result = run_benchmark(size=args.size, count=args.count[0], stages=not args.no_stages)
    if args.json:
        write_json(result, args.json)
        print(f"-> {args.json}")


def cmd_run(args) -> None:
    from cryodask.run import run

    run(args.config, dry_run=args.dry_run)


def cmd_report(args) -> None:
    from cryodask.io.store import open_dataset
    from cryodask.report import write_report

    if not _is_store(args.store):
        raise CLIError(f"{args.store}: not a store (make one with 'cryodask ingest')")
    ds = open_dataset(args.store)
    path = write_report(ds, args.out, micrographs=args.micrograph, n_best=args.best, n_worst=args.worst,
                        threshold=args.threshold, title=f"cryodask report: {os.path.basename(os.path.abspath(args.store))}")
    print(f"report of {ds.sizes['micrograph']} micrographs -> {path}")


def _plot_one(image, result, meta, search, path):
    from cryodask.ctf import CTFFit
    from cryodask.ctf_plot import plot_ctf_fit

    fit = CTFFit(**{name: float(result[var]) for name, var in (
        ("defocus_u_A", "defocus_u_A"), ("defocus_v_A", "defocus_v_A"),
        ("defocus_angle_deg", "defocus_angle_deg"), ("phase_shift_deg", "phase_shift_deg"),
        ("cc", "ctf_cc"), ("fit_resolution_A", "ctf_fit_resolution_A"))},
        reliable=bool(result["ctf_reliable"]))
    plot_ctf_fit(image, fit, path, pixel_size_A=float(meta["pixel_size_A"]),
                 voltage_kV=float(meta["voltage_kV"]), cs_mm=float(meta["cs_mm"]),
                 amplitude_contrast=float(meta["amplitude_contrast"]), search=search,
                 title=os.path.basename(path))
    return path


def describe_store(path) -> str:
    """A plain-text summary of a store."""
    import numpy as np

    from cryodask.io.store import open_dataset

    ds = open_dataset(path)
    lines = [f"store: {path}",
             "dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items())]
    lines.append("variables:")
    for name, var in sorted(ds.data_vars.items()):
        units = var.attrs.get("units", "")
        chunks = "" if var.chunks is None else f" chunks {tuple(c[0] for c in var.chunks)}"
        lines.append(f"  {name:<26} {str(var.dims):<30} {str(var.dtype):<12}{units and ' [' + units + ']'}{chunks}")
    n = ds.sizes["micrograph"]
    small = {name: ds[name].values for name in ("pixel_size_A", "voltage_kV", "cs_mm",
                                                "amplitude_contrast", "dose_e_per_A2") if name in ds}
    lines.append("acquisition (min .. max over micrographs):")
    for name, values in small.items():
        finite = values[np.isfinite(values)]
        text = f"{finite.min():.5g} .. {finite.max():.5g}" if finite.size else "unknown"
        lines.append(f"  {name:<20} {text}")
    names = [str(v) for v in ds["micrograph_name"].values]
    lines.append(f"micrographs: {names[0]}" + (f" ... {names[-1]} ({n})" if n > 1 else ""))
    return "\n".join(lines)


def cmd_info(args) -> None:
    print(describe_store(args.store))


def cmd_demo(args) -> None:
    import numpy as np
    import pandas as pd
    import xarray as xr

    from cryodask import pipeline
    from cryodask.clean import estimate_ctf_cleaned
    from cryodask.io.star import write_ctf_star
    from cryodask.io.store import open_dataset
    from cryodask.ingest import ingest
    from cryodask.io.store import write_variables
    from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset

    start = time.perf_counter()
    out = args.out
    sim_dir = os.path.join(out, "micrographs")
    store = os.path.join(out, "demo.zarr")
    params = draw_micrograph_params(args.count, shape=(args.size, args.size), pixel_size_A=1.0,
                                    ranges=DatasetRanges(n_hot_pixels=(100, 400), n_xrays=(5, 30)),
                                    seed=2026)
    detector = Detector(gain_std=0.03, n_dead_rows=1, n_dead_cols=2, n_stuck_pixels=20, seed=2026)
    with _with_cluster(args.cluster) as client:
        if client is not None and _has_dashboard():
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        t0 = time.perf_counter()
        write_simulated_dataset(sim_dir, params, detector=detector, seed=2026, save_truth_images=False)
        t1 = time.perf_counter()
        print(f"1. simulated {args.count} micrographs of {args.size}x{args.size} -> {sim_dir}/ "
              f"({t1 - t0:.1f} s)")
        ds = ingest(os.path.join(sim_dir, "*.mrc"), store, overwrite=True)
        t2 = time.perf_counter()
        print(f"2. ingested them into {store} ({t2 - t1:.1f} s)")
        stats = pipeline.image_statistics(ds)
        spectra = pipeline.power_spectra(ds, tile_size=min(512, args.size)).to_dataset()
        write_variables(xr.merge([stats, spectra]), store, overwrite=True)
        t3 = time.perf_counter()
        print(f"3. measured image statistics and power spectra -> {store} ({t3 - t2:.1f} s)")
        write_variables(estimate_ctf_cleaned(ds), store, overwrite=True)
        t4 = time.perf_counter()
        ds = open_dataset(store)
        star = os.path.join(out, "micrographs_ctf.star")
        write_ctf_star(ds, star)
        truth = pd.read_csv(os.path.join(sim_dir, "truth.csv"))
        true_mean = 0.5 * (truth["defocus_u_A"] + truth["defocus_v_A"]).to_numpy()
        fitted = 0.5 * (ds["defocus_u_A"].values + ds["defocus_v_A"].values)
        error = 100 * np.abs(fitted / true_mean - 1)
        print(f"4. cleaned artifacts, found regions and estimated {args.count} CTFs -> {store} and "
              f"{star} ({t4 - t3:.1f} s); mean-defocus "
              f"error against the simulator's truth: median {np.median(error):.2f} %, worst "
              f"{error.max():.2f} %; {int((~ds['ctf_reliable'].values).sum())} flagged unreliable")
        scores, _ = pipeline.score_dataset(ds)
        write_variables(scores, store, overwrite=True)
        table = pd.DataFrame({"micrograph": [os.path.basename(str(n)) for n in ds["micrograph_name"].values],
                              **{c: scores[c].values for c in ["hyperscore", "logic", "quality_expected",
                                                               "top_cause", "failed_rules"]}})
        table.to_csv(os.path.join(out, "scores.csv"), index=False, float_format="%.4g")
        t5 = time.perf_counter()
        ranked = table.sort_values("hyperscore", ascending=False)
        print(f"5. scored them (rules, novelty, forecasts, V, HyperScore) -> {out}/scores.csv ({t5 - t4:.1f} s); "
              "best and worst:")
        for _, row in pd.concat([ranked.head(2), ranked.tail(2)]).iterrows():
            print(f"   {row['micrograph']}: HyperScore {row['hyperscore']:.1f}, expected restored quality "
                  f"{row['quality_expected']:.2f}, top cause {row['top_cause']}"
                  + (f", failed {row['failed_rules']}" if row["failed_rules"] else ""))
        from cryodask.report import write_report

        report = write_report(open_dataset(store), os.path.join(out, "report.html"), title="cryodask demo")
        print(f"6. wrote the report -> {report} ({time.perf_counter() - t5:.1f} s)")
    print()
    print(describe_store(store))
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; results in {out}/")


#: Commands that compute over micrographs (see :func:`console`).
_COMPUTING = frozenset({"simulate", "ingest", "demo", "ctf", "clean", "restore", "noise", "score", "run", "bench"})


def console() -> int:
    """The installed ``cryodask`` command: :func:`main` on the command line's arguments.

    A computing command first starts its process once more, with the C allocator's
    settings of :data:`cryodask.progress.ALLOCATOR_ENVIRON` in the environment: set at
    run time they take less well (:func:`cryodask.progress.keep_large_blocks`); from the
    start, the pipeline on 8 micrographs of 4096² ran 3.72 s per micrograph rather than
    4.61 s (``cryodask bench --size 4096 --count 8``). Nothing is done when any of those
    variables is set already (a user's choice is kept), for help, or where the C library
    is not glibc.
    """
    from cryodask.progress import allocator_environ_to_set

    argv = sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    missing = allocator_environ_to_set() if command in _COMPUTING and not {"-h", "--help"} & set(argv) else {}
    if missing:
        os.environ.update(missing)
        os.execv(sys.executable, [sys.executable, "-m", "cryodask.cli", *argv])
    return main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
