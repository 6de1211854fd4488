"""Run every benchmark: python -m benchmarks [--quick]."""

import sys

from benchmarks import bench_ctf

if __name__ == "__main__":
    sys.exit(bench_ctf.main(sys.argv[1:]))
