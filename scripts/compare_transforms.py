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
        [--out benchmarks/results/cpu] [--overwrite] [--update | --resume]

``--update`` re-measures only the ``--only`` rows and keeps the others of the existing result; ``--resume``
continues an interrupted run (the result is written after every row) with the rows it lacks. Both are
refused when the float model here does not score the held-out text as the result recorded (other text,
tokenizer or model), or when the result was measured with other settings.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import slmkit
from slmkit import DataConfig, DistillConfig, EvalConfig, LayerwiseScalingConfig, SharedFFNConfig, WidthPruneConfig
from slmkit.bench import (check_same_reference, data_note, environment, finish, keys_to_resume, markdown_header,
                          markdown_runs, markdown_table, merge_rows, previous_rows, quality_inputs, result_files,
                          run_record, script_parser, selected_variants)
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
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep the rows the result already has, measure the rest")
    args = parser.parse_args(argv)
    if not 0 < args.budget < 1:
        print(f"error: --budget is the fraction of the parameters kept, in (0, 1); got {args.budget:g}",
              file=sys.stderr)
        return 2
    table_variants = variants(args.budget)
    try:
        keys = selected_variants(args.only, table_variants)
        distill_config = DistillConfig(
            steps=args.distill_steps, batch_size=8, micro_batch_size=8, learning_rate=2e-4, warmup_steps=5,
            data=DataConfig(source="embedded", split="calib", num_blocks=4096, block_len=128, seed=1),
            eval=EvalConfig(max_tokens=2048, seq_len=512), eval_every=0, log_every=10) if args.distill_steps else None
        files = result_files(args.out, "smollm2-transforms-comparison", args.overwrite or args.update or args.resume)
        previous = previous_rows(
            files[0], args.update or args.resume,
            {"--model": args.model, "--budget": args.budget, "--distill-steps": args.distill_steps,
             "--calib-blocks": args.calib_blocks, "--max-tokens": args.max_tokens},
            lambda old: {"--model": old["model"], "--budget": old["budget"],
                         "--distill-steps": (old["distill"] or {}).get("steps", 0),  # None: run without distilling
                         "--calib-blocks": old["calibration"]["blocks"],
                         "--max-tokens": old["evaluation"]["max_tokens"]})
        reference, calib, eval_config = quality_inputs(args)
        check_same_reference(files[0], previous, reference, {"eval": eval_config},
                             lambda row: {"eval": row["after_transform"]})
        run = run_record(environment())  # each new row records the run that measured it
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.resume:  # rows already measured stay; the rest are measured now
        keys = keys_to_resume(keys, previous, files[0])
        if not keys:  # leave the finished result as it is
            return 0
    settings = {"reference": reference, "eval_config": eval_config, "distill_config": distill_config,
                "order": list(table_variants), "keys": keys, "partial": bool(previous)}
    with tempfile.TemporaryDirectory() as tmp:
        settings["dense_bytes"] = (slmkit.save(reference, Path(tmp) / "dense") / WEIGHTS).stat().st_size
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
            write(files, args, settings, merge_rows(previous, rows), quiet=True)  # an interrupted run resumes here
    return write(files, args, settings, merge_rows(previous, rows))


def write(files, args, settings: dict, rows: list[dict], quiet: bool = False) -> int:
    """Write (and unless ``quiet`` print) the result so far: JSON + Markdown, rows in the table's order."""
    rows = sorted(rows, key=lambda row: settings["order"].index(row["key"]))
    reference, eval_config, dense_bytes = settings["reference"], settings["eval_config"], settings["dense_bytes"]
    reference_ppl = rows[0]["after_transform"]["reference_perplexity"]
    result = {**environment(), "model": args.model, "reference_params": parameter_count(reference),
              "reference_file_bytes": dense_bytes, "budget": args.budget,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "evaluation": eval_config.to_dict(), "rows": rows,
              "distill": settings["distill_config"] and settings["distill_config"].to_dict()}
    missing = [key for key in settings["order"] if key not in {row["key"] for row in rows}]
    if missing:
        result["not_measured"] = missing
    if settings["partial"]:
        result["updated_rows"] = settings["keys"]  # measured by this command; the other rows by earlier runs
    lines = markdown_header(result, f"Architecture transforms of {args.model}: shared FFN and layer-wise scaling")
    if settings["partial"]:
        lines += [f"Rows measured by this command: {', '.join(settings['keys'])}; the others come from earlier runs.",
                  ""]
    lines += markdown_runs(rows, result)
    distilled = (f" Distillation: {args.distill_steps} steps × 8 × 128 tokens from the original (forward KL, lr 2e-4)"
                 " on the calib split." if args.distill_steps else " No distillation (--distill-steps 0).")
    lines += [data_note(rows[0]["after_transform"]["tokens"], eval_config, args.calib_blocks) + distilled, ""]
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
    lines += markdown_table(header, table)
    if missing:
        lines += ["", f"Not measured (yet): {', '.join(missing)}."]
    return finish(files, result, lines, quiet)


if __name__ == "__main__":
    sys.exit(main())
