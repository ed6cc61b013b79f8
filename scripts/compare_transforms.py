"""Compare architecture transforms on SmolLM2: right after the transform and after a short distillation.

Variants: shared FFN (pairs of consecutive blocks share one FFN) for each initialisation (the most
important block's FFN, the average, the calibrated merge) and the merge with rank-32 per-block
corrections; and, at one parameter budget (default 75% of the parameters), uniform FFN width pruning
against two OpenELM layer-wise schedules (FFN widths ramping over depth with all heads kept; and
OpenELM's own ranges, heads 0.5..1 and FFN 0.5..4 × hidden, scaled to the budget). Every variant sees the
same calibration blocks, the same distillation data and steps, and the same evaluation windows. For
each: parameters, weights-file bytes, transform time, and perplexity / KL / top-1 agreement against the
original on held-out text before and after distillation from the original.

Usage:
    python scripts/compare_transforms.py [--budget 0.75] [--distill-steps 40] [--only shared2-merge,...]
        [--out benchmarks/results/cpu] [--overwrite] [--update]

``--update`` re-measures only the ``--only`` rows and keeps the others of the existing result; it is refused
when the float model here does not score the held-out text as the result recorded (other text, tokenizer or
model).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import slmkit
from slmkit import DataConfig, DistillConfig, EvalConfig, LayerwiseScalingConfig, SharedFFNConfig, WidthPruneConfig
from slmkit.bench import (check_same_reference, data_note, environment, finish, markdown_header, markdown_runs,
                          markdown_table, merge_rows, previous_rows, quality_inputs, result_files, run_record,
                          script_parser, selected_variants)
from slmkit.eval.report import parameter_count
from slmkit.models.checkpoint import WEIGHTS


def variants(budget: float) -> dict[str, tuple[str, object]]:
    """Variant key → (label, step config)."""
    percent = f"{100 * budget:.0f}%"
    return {
        "shared2-important": ("shared FFN per 2 blocks, init: most important block",
                              SharedFFNConfig(group_size=2, init="important")),
        "shared2-average": ("shared FFN per 2 blocks, init: average", SharedFFNConfig(group_size=2, init="average")),
        "shared2-merge": ("shared FFN per 2 blocks, init: calibrated merge",
                          SharedFFNConfig(group_size=2, init="merge")),
        "shared2-merge-r32": ("shared FFN per 2 blocks, merge + rank-32 corrections",
                              SharedFFNConfig(group_size=2, init="merge", rank=32)),
        "uniform": (f"uniform FFN width prune, {percent} of parameters",
                    WidthPruneConfig(param_budget=budget, budget_dims=["ffn"])),
        "openelm-ffn": (f"layer-wise FFN 1.0..2.67 × hidden (all heads), {percent}",
                        LayerwiseScalingConfig(alpha_min=1.0, alpha_max=1.0, beta_min=1.0, beta_max=2.67,
                                               param_budget=budget)),
        "openelm": (f"layer-wise OpenELM ranges (heads 0.5..1, FFN 0.5..4), {percent}",
                    LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=0.5, beta_max=4.0,
                                           param_budget=budget)),
    }


def apply(model, config, calib):
    """Run a step config through the public function of its category."""
    return slmkit.prune(model, config, calib=calib) if config.category == "prune" else \
        slmkit.transform(model, config, calib=calib)


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    parser.add_argument("--budget", type=float, default=0.75, help="parameter budget of the width comparison")
    parser.add_argument("--distill-steps", type=int, default=40, help="distillation steps per variant (0: none)")
    parser.add_argument("--only", default="", help="comma-separated variant keys")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the --only variants and replace their rows in the existing result")
    args = parser.parse_args(argv)
    table_variants = variants(args.budget)
    try:
        keys = selected_variants(args.only, table_variants)
        files = result_files(args.out, "smollm2-transforms-comparison", args.overwrite or args.update)
        previous = previous_rows(
            files[0], args.update,
            {"--model": args.model, "--budget": args.budget, "--distill-steps": args.distill_steps},
            lambda old: {"--model": old["model"], "--budget": old["budget"],
                         "--distill-steps": old["distill"]["steps"]})
        reference, calib, eval_config = quality_inputs(args)
        check_same_reference(files[0], previous, reference, {"eval": eval_config},
                             lambda row: {"eval": row["after_transform"]})
        run = run_record(environment())  # each new row records the run that measured it
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    distill_config = DistillConfig(
        steps=args.distill_steps, batch_size=8, micro_batch_size=8, learning_rate=2e-4, warmup_steps=5,
        data=DataConfig(source="embedded", split="calib", num_blocks=4096, block_len=128, seed=1),
        eval=EvalConfig(max_tokens=2048, seq_len=512), eval_every=0, log_every=10)

    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = (slmkit.save(reference, Path(tmp) / "dense") / WEIGHTS).stat().st_size
        rows = []
        for key in keys:
            label, config = table_variants[key]
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            apply(model, config, calib)
            seconds = time.perf_counter() - start
            before = slmkit.evaluate(model, reference=reference, config=eval_config)
            file_bytes = (slmkit.save(model, Path(tmp) / key) / WEIGHTS).stat().st_size
            row = {"key": key, "variant": label, "config": {config.name: config.to_dict()}, "transform_seconds": seconds,
                   "params": parameter_count(model), "file_bytes": file_bytes, "metrics": dict(model.slmkit.metrics),
                   "after_transform": before.to_dict(), "measured": run}
            print(f"{label}: ppl {before.perplexity:.3f}, {row['params'] / 1e6:.1f} M params, {seconds:.0f} s", flush=True)
            if args.distill_steps:
                start = time.perf_counter()
                slmkit.distill(model, reference, distill_config, device="cpu")
                row["distill_seconds"] = time.perf_counter() - start
                after = slmkit.evaluate(model, reference=reference, config=eval_config)
                row["after_distill"] = after.to_dict()
                print(f"  after {args.distill_steps} distillation steps: ppl {after.perplexity:.3f}", flush=True)
            rows.append(row)
            del model

    if previous:  # keep the earlier rows of the variants not re-measured, in the table's order
        rows = merge_rows(previous, rows)
    reference_ppl = rows[0]["after_transform"]["reference_perplexity"]
    result = {**environment(), "model": args.model, "reference_params": parameter_count(reference),
              "reference_file_bytes": dense_bytes, "budget": args.budget,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "evaluation": eval_config.to_dict(), "distill": distill_config.to_dict(), "rows": rows}
    if previous:
        result["updated_rows"] = keys  # measured by this command; the other rows by an earlier run
    lines = markdown_header(result, f"Architecture transforms of {args.model}: shared FFN and layer-wise scaling")
    if previous:
        lines += [f"Rows re-measured by this command: {', '.join(keys)}; the others come from earlier runs.", ""]
    lines += markdown_runs(rows, result)
    lines += [data_note(rows[0]["after_transform"]["tokens"], eval_config, args.calib_blocks)
              + f" Distillation: {args.distill_steps} steps × 8 × 128 tokens from the original (forward KL, lr 2e-4)"
              " on the calib split.", ""]
    header = ["model", "parameters", "file", "transform time", "perplexity", "Δ", "KL", "top-1",
              "ppl distilled", "Δ distilled", "KL distilled", "top-1 distilled"]
    table = [["original float32", f"{parameter_count(reference) / 1e6:.1f} M", f"{dense_bytes / 1e6:.1f} MB", "—",
              f"{reference_ppl:.3f}", "—", "—", "—", "—", "—", "—", "—"]]
    for row in rows:
        cells = [row["variant"], f"{row['params'] / 1e6:.1f} M", f"{row['file_bytes'] / 1e6:.1f} MB",
                 f"{row['transform_seconds']:.0f} s"]
        for stage in ("after_transform", "after_distill"):
            report = row.get(stage)
            if report is None:
                cells += ["—"] * 4
                continue
            cells += [f"{report['perplexity']:.3f}", f"{100 * (report['perplexity'] / reference_ppl - 1):+.1f}%",
                      f"{report['kl_mean']:.4f}", f"{100 * report['top1_agreement']:.2f}%"]
        table.append(cells)
    return finish(files, result, lines + markdown_table(header, table))


if __name__ == "__main__":
    sys.exit(main())
