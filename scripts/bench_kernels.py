"""Kernel benchmarks on a CUDA GPU: ``slmkit bench kernels`` (see slmkit/bench/kernels.py)."""

import sys

from slmkit.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
