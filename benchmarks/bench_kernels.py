"""Micro-benchmarks of the kernels, in asv's style: ``time_<kernel>`` and ``peakmem_<kernel>``.

    python -m benchmarks.bench_kernels [--size 1024] [--repeat 5] [--only NAME ...] [--json FILE]

Every kernel runs on one simulated micrograph of ``size``² (counts at 40 e/Å², 1 Å per
pixel, 600 Å of ice, a detector with a gain pattern, a dead row and stuck pixels, hot
pixels and X-rays; the same micrograph in every run). The **floor** is the end-to-end
benchmark's per micrograph: one ``rfft2`` and one ``irfft2`` of it (``scipy.fft``).

* ``time_<kernel>``: timed ``repeat`` times after one untimed call; reported as the median
  and the fastest, and the median's ratio to the floor's median, measured the same way in
  the same run (the machine is shared: compare ratios between runs, not seconds).
* ``peakmem_<kernel>``: each in a fresh process that loads the kernel's inputs from a
  ``.npy`` file and calls it once; the process's peak resident memory (``VmHWM``) above
  what it held before the call, in MB and in float32 micrographs of the size.

The functions take the inputs :func:`setup` returns, so ``asv`` could run them as they are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["KERNELS", "main", "setup"]

PIXEL_A = 1.0


def setup(size: int = 1024, seed: int = 5) -> dict:
    """The inputs every kernel needs, from one simulated micrograph."""
    from cryodask.artifacts import find_impulses
    from cryodask.physics import CTFParams
    from cryodask.simulate import Detector, MicrographParams, simulate_micrograph

    params = MicrographParams(shape=(size, size), pixel_size_A=PIXEL_A, dose_e_per_A2=40.0, defocus_u_A=15300.0,
                              defocus_v_A=14700.0, defocus_angle_deg=30.0, ice_thickness_A=600.0,
                              n_hot_pixels=size // 8, n_xrays=max(1, size // 256))
    detector = Detector(gain_std=0.02, n_dead_rows=1, n_stuck_pixels=size // 64, seed=seed)
    sim = simulate_micrograph(params, detector=detector, seed=seed)
    image = np.asarray(sim.image, np.float32)
    defects = np.zeros(image.shape, bool)
    defects[image.shape[0] // 3, :] = True  # a dead row the dataset pass would have found
    mask = find_impulses(image, defects=defects).mask
    exclude = np.zeros(image.shape, bool)
    exclude[: size // 8, : size // 8] = True  # a patch of vacuum
    ctf = CTFParams(defocus_u_A=params.defocus_u_A, defocus_v_A=params.defocus_v_A,
                    defocus_angle_deg=params.defocus_angle_deg)
    return {"image": image, "defects": defects, "mask": mask, "exclude": exclude, "ctf": ctf}


def time_floor(inputs):
    import scipy.fft

    image = inputs["image"]
    return scipy.fft.irfft2(scipy.fft.rfft2(image), s=image.shape)


def time_box_sum(inputs):
    from cryodask.artifacts import box_sum

    return box_sum(inputs["image"], 5)


def time_find_impulses(inputs):
    from cryodask.artifacts import find_impulses

    return find_impulses(inputs["image"], defects=inputs["defects"])


def time_clean_micrograph(inputs):
    from cryodask.artifacts import clean_micrograph

    return clean_micrograph(inputs["image"], defects=inputs["defects"])


def time_micrograph_statistics(inputs):
    from cryodask.defects import micrograph_statistics

    return micrograph_statistics(inputs["image"], inputs["mask"])


def time_classify_regions(inputs):
    from cryodask.regions import classify_regions

    return classify_regions(inputs["image"], artifact_mask=inputs["mask"])


def time_power_spectrum(inputs):
    from cryodask.spectrum import power_spectrum

    return power_spectrum(inputs["image"], tile_size=512)


def time_fill_excluded(inputs):
    from cryodask.ctf import fill_excluded

    return fill_excluded(inputs["image"], inputs["exclude"])


def time_estimate_ctf(inputs):
    from cryodask.ctf import estimate_ctf

    return estimate_ctf(inputs["image"], pixel_size_A=PIXEL_A, exclude=inputs["exclude"], warn=False)


def time_ctf_2d(inputs):
    from cryodask.physics import ctf_2d, frequency_grid

    return ctf_2d(*frequency_grid(inputs["image"].shape, PIXEL_A, layout="rfft"), inputs["ctf"])


def time_fit_signal_noise(inputs):
    from cryodask.restore import fit_signal_noise

    return fit_signal_noise(inputs["image"], inputs["ctf"], pixel_size_A=PIXEL_A)


def time_measure_noise(inputs):
    from cryodask.causal import measure_noise

    return measure_noise(inputs["image"], inputs["ctf"], pixel_size_A=PIXEL_A, defects=inputs["defects"],
                         dose_e_per_A2=40.0)


def time_phase_flip(inputs):
    from cryodask.restore import phase_flip

    return phase_flip(inputs["image"], inputs["ctf"], pixel_size_A=PIXEL_A)


def time_wiener_filter(inputs):
    from cryodask.restore import wiener_filter

    return wiener_filter(inputs["image"], inputs["ctf"], pixel_size_A=PIXEL_A)


#: name -> the function; each ``peakmem_<name>`` is ``time_<name>`` run once in a fresh process.
KERNELS = {name[len("time_"):]: fn for name, fn in dict(globals()).items() if name.startswith("time_")}
globals().update({f"peakmem_{name}": fn for name, fn in KERNELS.items()})


def _time(fn, inputs, repeat: int) -> list:
    fn(inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - start)
    return times


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peakmem_child(name: str, folder: str) -> None:
    """In a fresh process: load the inputs, call the kernel once, print its peak above the
    memory held before the call (bytes)."""
    from cryodask.physics import CTFParams

    with open(os.path.join(folder, "ctf.json"), encoding="utf-8") as fh:
        ctf = CTFParams(**json.load(fh))
    inputs = {key: np.load(os.path.join(folder, f"{key}.npy")) for key in ("image", "defects", "mask", "exclude")}
    inputs["ctf"] = ctf
    for module in ("artifacts", "causal", "ctf", "defects", "physics", "regions", "restore", "spectrum"):
        importlib.import_module(f"cryodask.{module}")  # imports are no part of the peak
    # What the loads and imports freed goes back to the system first: left resident in the
    # allocator's heap, the kernel's arrays could reuse it unseen (box_sum at 512² once
    # measured 0.69 of the image it returns).
    from cryodask.progress import trim_memory

    trim_memory()
    before = _status_kb("VmRSS")
    if _status_kb("VmHWM") > before:  # the loads' own peak must not hide the kernel's
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset the high-water mark to the current resident size
    KERNELS[name](inputs)
    print((_status_kb("VmHWM") - before) * 1024)


def _peakmem(name: str, folder: str) -> int:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", "--peakmem-child", name, folder],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peakmem_{name} failed: {done.stderr.strip()[-2000:]}")
    return int(done.stdout.split()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=sorted(KERNELS), help="these kernels (and the floor)")
    parser.add_argument("--json")
    parser.add_argument("--peakmem-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peakmem_child:
        _peakmem_child(*args.peakmem_child)
        return 0
    if args.size < 256 or args.repeat < 1:
        parser.error("need --size >= 256 and --repeat >= 1")
    names = ["floor"] + [n for n in KERNELS if n != "floor" and (not args.only or n in args.only)]
    inputs = setup(args.size)
    micrograph = args.size * args.size * 4
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for key in ("image", "defects", "mask", "exclude"):
            np.save(os.path.join(folder, f"{key}.npy"), inputs[key])
        ctf = inputs["ctf"]
        with open(os.path.join(folder, "ctf.json"), "w", encoding="utf-8") as fh:
            json.dump({"defocus_u_A": ctf.defocus_u_A, "defocus_v_A": ctf.defocus_v_A,
                       "defocus_angle_deg": ctf.defocus_angle_deg}, fh)
        for name in names:
            times = _time(KERNELS[name], inputs, args.repeat)
            rows.append({"kernel": name, "median_s": statistics.median(times), "min_s": min(times),
                         "peakmem_bytes": _peakmem(name, folder)})
    floor = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_floor"] = row["median_s"] / floor
        row["peakmem_micrographs"] = row["peakmem_bytes"] / micrograph
    print(f"kernels on one simulated {args.size}² micrograph ({micrograph / 1e6:.1f} MB of float32), "
          f"{os.cpu_count()} CPUs, {args.repeat} timed calls each")
    print(f"{'kernel':<22} {'median s':>9} {'min s':>9} {'x floor':>8} {'peak MB':>8} {'micrographs':>12}")
    for row in rows:
        print(f"{row['kernel']:<22} {row['median_s']:>9.4f} {row['min_s']:>9.4f} {row['ratio_to_floor']:>8.2f} "
              f"{row['peakmem_bytes'] / 1e6:>8.1f} {row['peakmem_micrographs']:>12.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"size": args.size, "repeat": args.repeat, "kernels": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
