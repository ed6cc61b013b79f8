"""Distillation training throughput (tokens/s) of a few trainer settings, side by side in one run:
full-vocabulary forward KL (fused), top-k teacher logits, gradient checkpointing, and on GPU bf16 vs
fp32. Student = the model with 25% of its FFN channels pruned, teacher = the model. Prints a table and
writes JSON + Markdown.

Usage:
    python scripts/bench_distill.py [--model smollm2-135m] [--steps 6] [--seq-len 256] [--batch 8]
                                    [--out benchmarks/results/cpu] [--overwrite]
    python scripts/bench_distill.py --out benchmarks/results/h100      # on a GPU box
"""

from __future__ import annotations

import copy
import sys

import torch

import slmkit
from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.errors import SlmkitError


def variants(cuda: bool) -> list[tuple[str, dict]]:
    """(label, DistillConfig fields) of the settings compared."""
    rows = [("forward KL, full vocabulary (fused)", {}),
            ("forward KL, teacher top-64", {"top_k": 64}),
            ("JSD (autograd path)", {"loss": "jsd"}),
            ("forward KL + gradient checkpointing", {"gradient_checkpointing": True})]
    if cuda:
        rows = [(f"{label}, bf16", {**fields, "mixed_precision": "bf16"}) for label, fields in rows]
        rows.append(("forward KL, full vocabulary, fp32", {"mixed_precision": "no"}))
    return rows


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="any load_model source")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed per setting (after 1 warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    args = parser.parse_args(argv)
    try:
        if min(args.steps, args.seq_len, args.batch) < 1:
            raise SlmkitError("--steps, --seq-len and --batch must be positive")
        files = result_files(args.out, "distill-throughput", args.overwrite)
        teacher = slmkit.load_model(args.model)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    calib = slmkit.calib_data(teacher, n=max(64, args.batch * (args.steps + 1)), seq_len=args.seq_len)
    pruned = copy.deepcopy(teacher)
    slmkit.prune(pruned, slmkit.WidthPruneConfig(ffn=0.25), calib=calib[:32])
    eval_data = calib[:1]
    measured = []
    for label, fields in variants(cuda):
        student = copy.deepcopy(pruned)
        base = dict(steps=args.steps + 1, batch_size=args.batch, micro_batch_size=args.batch, warmup_steps=0,
                    eval_every=0, log_every=1)
        config = slmkit.DistillConfig(**{**base, **fields})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        slmkit.distill(student, teacher, config, data=calib, eval_data=eval_data)
        run = student.slmkit.metrics["distill"]
        measured.append({"setting": label, "fields": fields, "tokens_per_s": run["tokens_per_s"],
                         "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None})
        del student
    result = {**environment(), "model": args.model, "seq_len": args.seq_len, "batch": args.batch,
              "steps": args.steps, "results": measured}
    lines = markdown_header(result, "Distillation training throughput")
    lines += [f"Student: {args.model} with 25% of FFN channels pruned; teacher: {args.model}. "
              f"{args.batch} × {args.seq_len} tokens per step; tokens/s over {args.steps + 1} steps "
              "(the first includes warm-up), teacher forward included, evaluation excluded.", ""]
    base = measured[0]["tokens_per_s"]
    rows = [[m["setting"], f"{m['tokens_per_s']:,.0f}", f"{m['tokens_per_s'] / base:.2f}×",
             f"{m['peak_memory_bytes'] / 2**30:.2f} GiB" if m["peak_memory_bytes"] else "—"] for m in measured]
    lines += markdown_table(["setting", "tokens/s", "vs first row", "peak GPU memory"], rows)
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
