"""python -m benchmarks [ARGS]: the CTF benchmark (``benchmarks.bench_ctf``, with its
arguments). Each benchmark of the suite runs as ``python -m benchmarks.bench_<name>``:
ctf, ctf_peers, robust, artifacts, restore, causes, prior, score, codecs, kernels (the
kernels' ``time_*`` and ``peakmem_*``); the end-to-end benchmark is ``cryodask bench``."""

import sys

from benchmarks import bench_ctf

if __name__ == "__main__":
    sys.exit(bench_ctf.main(sys.argv[1:]))
