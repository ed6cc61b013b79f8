"""Compare pruning methods against the dense model on held-out text of two domains; print a table, write JSON + Markdown.

Variants: 50% unstructured and 2:4 with magnitude, Wanda and SparseGPT (Wanda and SparseGPT also with mixed
calibration, SparseGPT also with its Hessian shrunk toward the diagonal, ``gram_shrink=0.25``); structured
width pruning to 90% and 75% of the parameters (heads, FFN and hidden size; and FFN only; activation
importance, and first-order Taylor for FFN only; FFN-only 75% also with mixed calibration); depth pruning of
10% and 20% of the blocks (block influence), and 20% chosen by measured loss effect.

Every variant is calibrated on the same blocks of the embedded corpus (Shakespeare and Milton), unless its
row says "mixed" (half those blocks, half text the model writes itself: ``embedded+generated``), and is
evaluated against the dense model on the same windows of (a) the corpus's held-out works (the calibration
domain) and (b) Python's reference documentation (modern English prose, ``python-docs``). For each:
perplexity, KL and top-1 agreement against the dense model in both, parameters, bytes of the saved
checkpoint's weights file, and pruning time. No healing (distillation) is applied: these are one-shot numbers.

Usage:
    python scripts/compare_pruning.py [--model smollm2-135m] [--calib-blocks 64] [--max-tokens 16384]
        [--only wanda-50,sparsegpt-2:4] [--update | --resume] [--out benchmarks/results/cpu] [--overwrite]

The result files are rewritten after every row; ``--resume`` continues an interrupted run, ``--update``
re-measures only the ``--only`` rows and keeps the others of the existing result. Adding rows to an existing
result is refused when the float model here does not score its held-out text as the result recorded (other
text, e.g. another Python version's ``python-docs``, another tokenizer, or another model).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import slmkit
from slmkit import DepthPruneConfig, MagnitudePruneConfig, SparseGPTConfig, WandaConfig, WidthPruneConfig
from slmkit.bench import (MIXED_CALIBRATION, QUALITY_DOMAINS, check_same_reference, domain_cells, domain_columns,
                          domain_evals, domains_note, environment, finish, keys_to_resume, markdown_header,
                          markdown_runs, markdown_table, merge_rows, previous_rows, reference_domain_cells,
                          result_files, run_record, script_parser, selected_variants)
from slmkit.eval.report import parameter_count
from slmkit.models.checkpoint import WEIGHTS
from slmkit.prune import linear_sparsity

ALL = ["heads", "ffn", "hidden"]
MIX = MIXED_CALIBRATION
# key: (label, config, calibration source)
VARIANTS = {
    "magnitude-50": ("magnitude, 50% unstructured", MagnitudePruneConfig(sparsity=0.5), "embedded"),
    "wanda-50": ("Wanda, 50% unstructured", WandaConfig(sparsity=0.5), "embedded"),
    "wanda-50-mix": ("Wanda, 50% unstructured, mixed calibration", WandaConfig(sparsity=0.5), MIX),
    "sparsegpt-50": ("SparseGPT, 50% unstructured", SparseGPTConfig(sparsity=0.5), "embedded"),
    "sparsegpt-50-mix": ("SparseGPT, 50% unstructured, mixed calibration", SparseGPTConfig(sparsity=0.5), MIX),
    "sparsegpt-50-shrink": ("SparseGPT, 50% unstructured, gram_shrink 0.25",
                            SparseGPTConfig(sparsity=0.5, gram_shrink=0.25), "embedded"),
    "magnitude-2:4": ("magnitude, 2:4", MagnitudePruneConfig(n_m="2:4"), "embedded"),
    "wanda-2:4": ("Wanda, 2:4", WandaConfig(n_m="2:4"), "embedded"),
    "wanda-2:4-mix": ("Wanda, 2:4, mixed calibration", WandaConfig(n_m="2:4"), MIX),
    "sparsegpt-2:4": ("SparseGPT, 2:4", SparseGPTConfig(n_m="2:4"), "embedded"),
    "sparsegpt-2:4-mix": ("SparseGPT, 2:4, mixed calibration", SparseGPTConfig(n_m="2:4"), MIX),
    "sparsegpt-2:4-shrink": ("SparseGPT, 2:4, gram_shrink 0.25", SparseGPTConfig(n_m="2:4", gram_shrink=0.25),
                             "embedded"),
    "width-10": ("width (heads, FFN, hidden), 90% of parameters",
                 WidthPruneConfig(param_budget=0.9, budget_dims=ALL), "embedded"),
    "width-25": ("width (heads, FFN, hidden), 75% of parameters",
                 WidthPruneConfig(param_budget=0.75, budget_dims=ALL), "embedded"),
    "width-10-ffn": ("width (FFN only), 90% of parameters", WidthPruneConfig(param_budget=0.9, budget_dims=["ffn"]),
                     "embedded"),
    "width-25-ffn": ("width (FFN only), 75% of parameters", WidthPruneConfig(param_budget=0.75, budget_dims=["ffn"]),
                     "embedded"),
    "width-25-ffn-mix": ("width (FFN only), 75% of parameters, mixed calibration",
                         WidthPruneConfig(param_budget=0.75, budget_dims=["ffn"]), MIX),
    "width-10-ffn-taylor": ("width (FFN only), 90% of parameters, Taylor importance",
                            WidthPruneConfig(param_budget=0.9, budget_dims=["ffn"], importance="taylor"), "embedded"),
    "width-25-ffn-taylor": ("width (FFN only), 75% of parameters, Taylor importance",
                            WidthPruneConfig(param_budget=0.75, budget_dims=["ffn"], importance="taylor"), "embedded"),
    "depth-10": ("depth, −10% of blocks (block influence)", DepthPruneConfig(ratio=0.1), "embedded"),
    "depth-20": ("depth, −20% of blocks (block influence)", DepthPruneConfig(ratio=0.2), "embedded"),
    "depth-20-loss": ("depth, −20% of blocks (loss effect)", DepthPruneConfig(ratio=0.2, importance="loss"),
                      "embedded"),
}


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    parser.add_argument("--only", default="", help="comma-separated variant keys: " + ", ".join(VARIANTS))
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the --only variants and replace their rows in the existing result")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep the rows the result already has, measure the rest")
    args = parser.parse_args(argv)
    try:
        keys = selected_variants(args.only, VARIANTS)
        files = result_files(args.out, "smollm2-pruning-comparison", args.overwrite or args.update or args.resume)
        previous = previous_rows(
            files[0], args.update or args.resume,
            {"--model": args.model, "--calib-blocks": args.calib_blocks, "--max-tokens": args.max_tokens,
             "domains": ", ".join(QUALITY_DOMAINS)},
            lambda old: {"--model": old["model"], "--calib-blocks": old["calibration"]["blocks"],
                         "--max-tokens": old["max_tokens"],
                         "domains": ", ".join(old.get("domains", ["shakespeare"]))})  # the one-domain format had none
        evals = domain_evals(args.max_tokens)
        reference = slmkit.load_model(args.model)
        calibrations = {"embedded": slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512)}
        check_same_reference(files[0], previous, reference, evals, lambda row: row)
        run = run_record(environment())  # each new row records the run that measured it
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.resume:  # rows already measured stay; the rest are measured now
        keys = keys_to_resume(keys, previous, files[0])
        if not keys:  # leave the finished result as it is
            return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = (slmkit.save(reference, Path(tmp) / "dense") / WEIGHTS).stat().st_size
        for key in keys:
            label, config, source = VARIANTS[key]
            if source not in calibrations:  # written by the model: made once, not timed
                calibrations[source] = slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512, source=source)
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            slmkit.prune(model, config, calib=calibrations[source])
            seconds = time.perf_counter() - start
            file_bytes = (slmkit.save(model, Path(tmp) / "pruned", overwrite=True) / WEIGHTS).stat().st_size
            row = {"key": key, "variant": label, "calibration_source": source, "config": {config.name: config.to_dict()},
                   "prune_seconds": seconds, "params": parameter_count(model), "file_bytes": file_bytes,
                   "linear_sparsity": linear_sparsity(model)["total"], "metrics": model.slmkit.metrics,
                   "measured": run}
            for domain, eval_config in evals.items():
                row[domain] = slmkit.evaluate(model, reference=reference, config=eval_config).to_dict()
            print(f"{label}: " + ", ".join(f"{d} ppl {row[d]['perplexity']:.3f}" for d in QUALITY_DOMAINS)
                  + f", {file_bytes / 1e6:.1f} MB, {seconds:.0f} s", flush=True)
            rows.append(row)
            del model
            write(files, args, evals, reference, dense_bytes, merge_rows(previous, rows), keys, bool(previous),
                  quiet=True)  # after every row: an interrupted run resumes from here
    return write(files, args, evals, reference, dense_bytes, merge_rows(previous, rows), keys, bool(previous))


def write(files, args, evals, reference, dense_bytes: int, rows, keys, partial_update: bool, quiet: bool = False) -> int:
    """Write (and unless ``quiet`` print) the result so far: JSON + Markdown, in the table's order."""
    order = list(VARIANTS)
    rows = sorted(rows, key=lambda row: order.index(row["key"]))
    result = {**environment(), "model": args.model, "max_tokens": args.max_tokens,
              "reference_params": parameter_count(reference), "reference_file_bytes": dense_bytes,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "domains": {d: {"source": s, "about": a} for d, (s, a) in QUALITY_DOMAINS.items()},
              "evaluation": {d: c.to_dict() for d, c in evals.items()}, "rows": rows}
    missing = [key for key in VARIANTS if key not in {row["key"] for row in rows}]
    if missing:
        result["not_measured"] = missing
    if partial_update:
        result["updated_rows"] = keys  # measured by this command; the other rows by an earlier run
    lines = markdown_header(result, f"Pruning {args.model}: quality against the dense float32 model in two domains "
                                    "(one-shot, no healing)")
    if partial_update:
        lines += [f"Rows measured by this command: {', '.join(keys)}; the others come from earlier runs.", ""]
    lines += markdown_runs(rows, result)
    first = rows[0]
    lines += [f"Calibration: {args.calib_blocks} × 512 tokens of the embedded corpus's calib split (Shakespeare and "
              f"Milton), except \"mixed\" rows: half those, half text the model wrote itself "
              f"(`calib_data(source=\"{MIX}\")`). " + domains_note(first)
              + " File = the checkpoint's weights file (sparse tensors stored as values + bitmask).", ""]
    header = ["model", *domain_columns(), "parameters", "nonzero in linears", "file", "prune time"]
    table = [["dense float32 (reference)", *reference_domain_cells(first),
              f"{parameter_count(reference) / 1e6:.1f} M", "100%", f"{dense_bytes / 1e6:.1f} MB", "—"]]
    for row in rows:
        table.append([row["variant"], *domain_cells(row, rise_digits=1), f"{row['params'] / 1e6:.1f} M",
                      f"{100 * (1 - row['linear_sparsity']):.0f}%", f"{row['file_bytes'] / 1e6:.1f} MB",
                      f"{row['prune_seconds']:.0f} s"])
    lines += markdown_table(header, table)
    if missing:
        lines += ["", f"Not measured (yet): {', '.join(missing)}."]
    return finish(files, result, lines, quiet)


if __name__ == "__main__":
    sys.exit(main())
