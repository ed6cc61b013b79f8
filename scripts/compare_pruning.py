"""Compare pruning methods against the dense model on held-out text; print a table, write JSON + Markdown.

Variants: 50% unstructured and 2:4 with magnitude, Wanda and SparseGPT; structured width pruning to 90%
and 75% of the parameters (heads, FFN and hidden size; and FFN only; activation importance, and first-order Taylor
for FFN only); depth pruning of 10% and 20% of the blocks (block influence), and 20% chosen by measured loss effect. Every variant sees the same
calibration blocks and evaluation windows. For each: perplexity, KL and top-1 agreement against the
dense model, parameters, bytes of the saved checkpoint's weights file, and pruning time. No healing
(distillation) is applied: these are one-shot numbers.

Usage:
    python scripts/compare_pruning.py [--model smollm2-135m] [--calib-blocks 64] [--max-tokens 16384]
        [--only wanda-50,sparsegpt-2:4] [--update] [--out benchmarks/results/cpu] [--overwrite]

``--update`` re-measures only the ``--only`` rows and keeps the others of the existing result.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import slmkit
from slmkit import DepthPruneConfig, MagnitudePruneConfig, SparseGPTConfig, WandaConfig, WidthPruneConfig
from slmkit.bench import (data_note, environment, finish, markdown_header, markdown_table, merge_rows, previous_rows,
                          quality_inputs, result_files, script_parser, selected_variants)
from slmkit.eval.report import parameter_count
from slmkit.models.checkpoint import WEIGHTS
from slmkit.prune import linear_sparsity

ALL = ["heads", "ffn", "hidden"]
VARIANTS = {
    "magnitude-50": ("magnitude, 50% unstructured", MagnitudePruneConfig(sparsity=0.5)),
    "wanda-50": ("Wanda, 50% unstructured", WandaConfig(sparsity=0.5)),
    "sparsegpt-50": ("SparseGPT, 50% unstructured", SparseGPTConfig(sparsity=0.5)),
    "magnitude-2:4": ("magnitude, 2:4", MagnitudePruneConfig(n_m="2:4")),
    "wanda-2:4": ("Wanda, 2:4", WandaConfig(n_m="2:4")),
    "sparsegpt-2:4": ("SparseGPT, 2:4", SparseGPTConfig(n_m="2:4")),
    "width-10": ("width (heads, FFN, hidden), 90% of parameters", WidthPruneConfig(param_budget=0.9, budget_dims=ALL)),
    "width-25": ("width (heads, FFN, hidden), 75% of parameters", WidthPruneConfig(param_budget=0.75, budget_dims=ALL)),
    "width-10-ffn": ("width (FFN only), 90% of parameters", WidthPruneConfig(param_budget=0.9, budget_dims=["ffn"])),
    "width-25-ffn": ("width (FFN only), 75% of parameters", WidthPruneConfig(param_budget=0.75, budget_dims=["ffn"])),
    "width-10-ffn-taylor": ("width (FFN only), 90% of parameters, Taylor importance",
                            WidthPruneConfig(param_budget=0.9, budget_dims=["ffn"], importance="taylor")),
    "width-25-ffn-taylor": ("width (FFN only), 75% of parameters, Taylor importance",
                            WidthPruneConfig(param_budget=0.75, budget_dims=["ffn"], importance="taylor")),
    "depth-10": ("depth, −10% of blocks (block influence)", DepthPruneConfig(ratio=0.1)),
    "depth-20": ("depth, −20% of blocks (block influence)", DepthPruneConfig(ratio=0.2)),
    "depth-20-loss": ("depth, −20% of blocks (loss effect)", DepthPruneConfig(ratio=0.2, importance="loss")),
}


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    parser.add_argument("--only", default="", help="comma-separated variant keys: " + ", ".join(VARIANTS))
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the --only variants and replace their rows in the existing result")
    args = parser.parse_args(argv)
    try:
        keys = selected_variants(args.only, VARIANTS)
        files = result_files(args.out, "smollm2-pruning-comparison", args.overwrite or args.update)
        previous = previous_rows(
            files[0], args.update,
            lambda old: (old["model"], old["calibration"]["blocks"], old["evaluation"]["max_tokens"])
            == (args.model, args.calib_blocks, args.max_tokens),
            "model, calibration or evaluation length")
        reference, calib, eval_config = quality_inputs(args)
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = (slmkit.save(reference, Path(tmp) / "dense") / WEIGHTS).stat().st_size
        rows = []
        for key in keys:
            label, config = VARIANTS[key]
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            slmkit.prune(model, config, calib=calib)
            seconds = time.perf_counter() - start
            report = slmkit.evaluate(model, reference=reference, config=eval_config)
            file_bytes = (slmkit.save(model, Path(tmp) / key) / WEIGHTS).stat().st_size
            sparsity = linear_sparsity(model)["total"]
            rows.append({"key": key, "variant": label, "config": {config.name: config.to_dict()},
                         "prune_seconds": seconds, "params": parameter_count(model), "file_bytes": file_bytes,
                         "linear_sparsity": sparsity, "metrics": model.slmkit.metrics, **report.to_dict()})
            print(f"{label}: ppl {report.perplexity:.3f}, {file_bytes / 1e6:.1f} MB, {seconds:.0f} s", flush=True)
            del model

    if previous:  # keep the earlier rows of the variants not re-measured, in the table's order
        rows = sorted(merge_rows(previous, rows), key=lambda row: list(VARIANTS).index(row["key"]))
    result = {**environment(), "model": args.model, "reference_params": parameter_count(reference),
              "reference_file_bytes": dense_bytes,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "evaluation": eval_config.to_dict(), "rows": rows}
    if previous:
        result["updated_rows"] = keys  # measured by this command; the other rows by an earlier run
    reference_ppl = rows[0]["reference_perplexity"]
    lines = markdown_header(result, f"Pruning {args.model}: quality against the dense float32 model (one-shot, no healing)")
    if previous:
        lines += [f"Rows re-measured by this command: {', '.join(keys)}; the others come from the earlier run.", ""]
    lines += [data_note(rows[0]["tokens"], eval_config, args.calib_blocks)
              + " File = the checkpoint's weights file (sparse tensors stored as values + bitmask).", ""]
    header = ["model", "perplexity", "Δ vs dense", "KL mean (nats)", "top-1 agreement", "parameters",
              "nonzero in linears", "file", "prune time"]
    table = [["dense float32 (reference)", f"{reference_ppl:.3f}", "—", "—", "—", f"{parameter_count(reference) / 1e6:.1f} M",
              "100%", f"{dense_bytes / 1e6:.1f} MB", "—"]]
    for row in rows:
        table.append([row["variant"], f"{row['perplexity']:.3f}", f"{100 * (row['perplexity'] / reference_ppl - 1):+.1f}%",
                      f"{row['kl_mean']:.4f}", f"{100 * row['top1_agreement']:.2f}%", f"{row['params'] / 1e6:.1f} M",
                      f"{100 * (1 - row['linear_sparsity']):.0f}%", f"{row['file_bytes'] / 1e6:.1f} MB",
                      f"{row['prune_seconds']:.0f} s"])
    return finish(files, result, lines + markdown_table(header, table))

if __name__ == "__main__":
    sys.exit(main())
