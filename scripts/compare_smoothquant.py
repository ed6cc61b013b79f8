"""Compare W8A8 variants against the float model on held-out text; print a table, write JSON + Markdown.

Variants: no smoothing (round-to-nearest W8A8), straightforward SmoothQuant (norm→qkv and norm→gate/up
only, alpha 0.5), all fold sites at alpha 0.5, and all fold sites with the per-site alpha search (the
default recipe). Every variant sees the same calibration blocks and the same evaluation windows.

Usage:
    python scripts/compare_smoothquant.py [--model smollm2-135m] [--calib-blocks 64] [--max-tokens 16384]
        [--out benchmarks/results/cpu] [--overwrite]
"""

from __future__ import annotations

import copy
import sys
import time

import slmkit
from slmkit import SmoothQuantConfig
from slmkit.bench import (data_note, environment, finish, markdown_header, markdown_table, quality_inputs,
                          result_files, script_parser)

GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
VARIANTS = {
    "W8A8, no smoothing": SmoothQuantConfig(smoothing=False),
    "SmoothQuant norm sites, alpha 0.5": SmoothQuantConfig(alpha=0.5, fold_sites=["attn_norm->qkv", "mlp_norm->gate_up"]),
    "SmoothQuant all sites, alpha 0.5": SmoothQuantConfig(alpha=0.5),
    "SmoothQuant all sites, alpha search": SmoothQuantConfig(alpha_grid=GRID),
}


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    args = parser.parse_args(argv)
    try:
        files = result_files(args.out, "smollm2-w8a8-comparison", args.overwrite)
        reference, calib, eval_config = quality_inputs(args)
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    rows = []
    for name, config in VARIANTS.items():
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        slmkit.quantize(model, config, calib=calib)
        seconds = time.perf_counter() - start
        report = slmkit.evaluate(model, reference=reference, config=eval_config)
        rows.append({"variant": name, "config": config.to_dict(), "quantize_seconds": seconds, **report.to_dict()})
        del model

    result = {**environment(), "model": args.model, "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "evaluation": eval_config.to_dict(), "rows": rows}
    reference_ppl = rows[0]["reference_perplexity"]
    lines = markdown_header(result, f"W8A8 on {args.model}: quality against the float32 model")
    lines += [data_note(rows[0]["tokens"], eval_config, args.calib_blocks), ""]
    header = ["model", "perplexity", "Δ vs fp32", "KL mean (nats)", "KL p99", "top-1 agreement", "weights",
              "quantize time"]
    table = [["float32 (reference)", f"{reference_ppl:.3f}", "—", "—", "—", "—",
              f"{rows[0]['reference_weight_bytes'] / 1e6:.1f} MB", "—"]]
    for row in rows:
        table.append([row["variant"], f"{row['perplexity']:.3f}", f"{100 * (row['perplexity'] / reference_ppl - 1):+.2f}%",
                      f"{row['kl_mean']:.4f}", f"{row['kl_p99']:.4f}", f"{100 * row['top1_agreement']:.2f}%",
                      f"{row['weight_bytes'] / 1e6:.1f} MB", f"{row['quantize_seconds']:.0f} s"])
    return finish(files, result, lines + markdown_table(header, table))

if __name__ == "__main__":
    sys.exit(main())
