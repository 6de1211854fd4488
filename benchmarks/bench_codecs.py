"""Zarr codecs for micrographs, chosen by measurement: speed and ratio, lossless and lossy.

    python -m benchmarks.bench_codecs [--repeats 3] [--json FILE]

Three kinds of data, each as the store holds it (float32, one micrograph per chunk):
electron counts of a real EPU micrograph (a 1024² crop in ``examples/data``, or the whole
4096² one from ``../shared`` when it is there), simulated counts (1024², 40 e/Å²), and a
simulated micrograph after Wiener restoration (floats with no spare bits). For each
codec: the compression ratio and the MB/s of writing and reading the array on this
machine's disk (best of ``--repeats``), against the uncompressed bytes.

Lossy, for restored images only: rounding the float mantissa to ``k`` bits (``BitRound``)
changes each value by less than ``2^-(k+1)`` of it; the RMS change is reported in units of
the restored image's standard deviation, with the ratio and speeds it gives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_FULL = os.path.join(HERE, "..", "..", "shared", "data", "real", "mrcfile", "epu2.9_example.mrc")
REAL_CROP = os.path.join(HERE, "..", "examples", "data", "epu2.9_crop1024.mrc")


def _codecs():
    import zarr.codecs as zc

    shuffle = zc.BloscShuffle.bitshuffle
    return {
        "none": None,
        "zstd 0 (zarr's default)": [zc.ZstdCodec(level=0)],
        "zstd 3": [zc.ZstdCodec(level=3)],
        "blosc lz4 bitshuffle": [zc.BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)],
        "blosc zstd 1 bitshuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle=shuffle)],
        "blosc zstd 5 bitshuffle": [zc.BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)],
    }


def _data():
    import mrcfile

    from cryodask.restore import wiener_filter
    from cryodask.simulate import MicrographParams, simulate_micrograph

    real_path = REAL_FULL if os.path.isfile(REAL_FULL) else REAL_CROP
    real = np.asarray(mrcfile.read(real_path), np.float32)
    sim = simulate_micrograph(MicrographParams(shape=(1024, 1024), dose_e_per_A2=40.0), seed=1)
    counts = np.asarray(sim.image, np.float32)
    restored = wiener_filter(counts, sim.params.ctf, pixel_size_A=1.0)
    return {f"real counts ({os.path.basename(real_path)}, {real.shape[0]}x{real.shape[1]})": real[None],
            "simulated counts (1024², 40 e/Å²)": counts[None],
            "simulated, Wiener-restored (1024²)": np.asarray(restored, np.float32)[None]}


def _time_codec(array, compressors, folder, repeats, filters=None):
    import zarr

    best_write = best_read = np.inf
    size = 0
    for _ in range(repeats):
        path = os.path.join(folder, "a.zarr")
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        z = zarr.create_array(path, shape=array.shape, chunks=(1, *array.shape[1:]), dtype=array.dtype,
                              compressors=compressors, filters=filters, zarr_format=3)
        z[:] = array
        best_write = min(best_write, time.perf_counter() - start)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
                   if f != "zarr.json")
        start = time.perf_counter()
        back = zarr.open_array(path, mode="r")[:]
        best_read = min(best_read, time.perf_counter() - start)
    return back, size, best_write, best_read


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import zarr.codecs as zc

    results = {"lossless": [], "lossy": []}
    with tempfile.TemporaryDirectory() as folder:
        for name, array in _data().items():
            megabytes = array.nbytes / 1e6
            print(f"\n{name}: {megabytes:.1f} MB")
            print(f"  {'codec':<26} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
            for codec, compressors in _codecs().items():
                back, size, write, read = _time_codec(array, compressors, folder, args.repeats)
                assert np.array_equal(back, array), codec  # lossless
                row = {"data": name, "codec": codec, "ratio": array.nbytes / size,
                       "write_mb_per_s": megabytes / write, "read_mb_per_s": megabytes / read}
                results["lossless"].append(row)
                print(f"  {codec:<26} {row['ratio']:>6.2f} {row['write_mb_per_s']:>11.0f} "
                      f"{row['read_mb_per_s']:>10.0f}")
            if "restored" in name:
                spread = float(array.std())
                print("  lossy (BitRound, then blosc zstd 1 bitshuffle); error in units of the image's sd:")
                for keep in (16, 12, 10, 8, 6):
                    back, size, write, read = _time_codec(
                        array, _codecs()["blosc zstd 1 bitshuffle"], folder, args.repeats,
                        filters=[zc.numcodecs.BitRound(keepbits=keep)])
                    error = float(np.sqrt(np.mean((back.astype(np.float64) - array) ** 2))) / spread
                    row = {"keep_bits": keep, "ratio": array.nbytes / size, "rms_error_over_sd": error,
                           "write_mb_per_s": megabytes / write, "read_mb_per_s": megabytes / read}
                    results["lossy"].append(row)
                    print(f"    keep {keep:>2} bits: ratio {row['ratio']:.2f}, RMS error {error:.2e} sd, "
                          f"write {row['write_mb_per_s']:.0f} MB/s, read {row['read_mb_per_s']:.0f} MB/s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
