"""Time loading the embedded model: first load (empty cache: GGUF dequantization + caching) and cached
loads, each in a fresh Python process; print a table and write JSON + Markdown.

Usage:
    python scripts/bench_load.py [--repeats 3] [--out benchmarks/results/cpu] [--overwrite]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from slmkit.bench import environment, result_files, script_parser, write_results
from slmkit.errors import SlmkitError

PROBE = """
import time
start = time.perf_counter()
import slmkit
imported = time.perf_counter()
model = slmkit.load_model("smollm2-135m")
loaded = time.perf_counter()
again = slmkit.load_model("smollm2-135m")
print(f"{imported - start:.3f} {loaded - imported:.3f} {time.perf_counter() - loaded:.3f}")
"""


def run_probe(cache: str) -> tuple[float, float, float]:
    """(import slmkit, first load_model in the process, a second load_model) in seconds."""
    env = dict(os.environ, SLMKIT_CACHE=cache, TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    import_s, load_s, again_s = result.stdout.strip().splitlines()[-1].split()
    return float(import_s), float(load_s), float(again_s)


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1:
            raise SlmkitError(f"--repeats must be positive, got {args.repeats}")
        files = result_files(args.out, "load-times", args.overwrite)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        first = run_probe(cache)
        cached = [run_probe(cache) for _ in range(args.repeats)]
    result = {
        **environment(),
        "first_load_seconds": first[1],
        "cached_load_seconds": [c[1] for c in cached],
        "cached_load_median_seconds": statistics.median(c[1] for c in cached),
        "import_slmkit_median_seconds": statistics.median(c[0] for c in cached),
        "cached_load_in_warm_process_median_seconds": statistics.median(c[2] for c in cached),
    }
    table = "\n".join([
        "# Loading the embedded SmolLM2-135M-Instruct (CPU, fresh process each)", "",
        f"{result['date']}, torch {result['versions']['torch']}, transformers {result['versions']['transformers']}.", "",
        "| load | seconds |", "| --- | --- |",
        f"| first (empty cache: read GGUF, dequantize, write safetensors cache) | {first[1]:.2f} |",
        f"| cached, first call in a fresh process (includes transformers' one-time lazy imports), median of {args.repeats} | {result['cached_load_median_seconds']:.2f} |",
        f"| cached, a second call in the same process, median | {result['cached_load_in_warm_process_median_seconds']:.2f} |",
        f"| `import slmkit` (not included above), median | {result['import_slmkit_median_seconds']:.2f} |",
    ]) + "\n"
    print(table)
    write_results(files, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
