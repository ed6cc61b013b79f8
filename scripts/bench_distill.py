"""Distillation training throughput (tokens/s) of a few trainer settings, side by side in one run:
full-vocabulary forward KL (fused), top-k teacher logits, gradient checkpointing, bitsandbytes' 8-bit
AdamW (when installed), and on GPU bf16 vs fp32. Student = the model with 25% of its FFN channels pruned,
teacher = the model. Also the optimizer state each setting saves (its checkpoint's ``optimizer.bin``).
Prints a table and writes JSON + Markdown.

Usage:
    python scripts/bench_distill.py [--model smollm2-135m] [--steps 6] [--seq-len 256] [--batch 8]
                                    [--repeats 2] [--out benchmarks/results/cpu] [--overwrite]
    python scripts/bench_distill.py --out benchmarks/results/h100      # on a GPU box
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import slmkit
from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.distill import trainer
from slmkit.errors import SlmkitError


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version, or None."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def eight_bit_adamw_runs(device: str) -> bool:
    """Whether the 8-bit AdamW (bitsandbytes, a version that steps on ``device``) is available here."""
    try:
        slmkit.DistillConfig(optimizer="adamw_8bit").check_environment(device)
    except SlmkitError:
        return False
    return True


def variants(cuda: bool, eight_bit: bool = False) -> list[tuple[str, dict]]:
    """(label, DistillConfig fields) of the settings compared; with ``eight_bit``, bitsandbytes' 8-bit AdamW too."""
    rows = [("forward KL, full vocabulary (fused)", {}),
            ("forward KL, teacher top-64", {"top_k": 64}),
            ("JSD (autograd path)", {"loss": "jsd"}),
            ("forward KL + gradient checkpointing", {"gradient_checkpointing": True})]
    if eight_bit:
        rows.append(("forward KL, 8-bit AdamW (bitsandbytes)", {"optimizer": "adamw_8bit"}))
    if cuda:
        rows = [(f"{label}, bf16", {**fields, "mixed_precision": "bf16"}) for label, fields in rows]
        rows.append(("forward KL, full vocabulary, fp32", {"mixed_precision": "no"}))
    return rows


def time_setting(student, teacher, fields: dict, calib: torch.Tensor, eval_data: torch.Tensor, steps: int,
                 batch: int, cuda: bool) -> dict:
    """One timed run of a setting: tokens/s (median of the steps after the warm-up step), the optimizer state
    its checkpoint saves and, on CUDA, peak memory."""
    # one checkpoint, at the end (saving is not timed): its optimizer.bin is the optimizer state's size
    base = dict(steps=steps + 1, batch_size=batch, micro_batch_size=batch, warmup_steps=0, eval_every=0,
                log_every=1, save_every=steps + 1)
    config = slmkit.DistillConfig(**{**base, **fields})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        slmkit.distill(student, teacher, config, data=calib, eval_data=eval_data, output_dir=run)
        state_bytes = (trainer.checkpoint_dirs(run)[-1] / "optimizer.bin").stat().st_size
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    speeds = [entry["tokens_per_s"] for entry in log if entry.get("kind") == "train"][1:]
    return {"tokens_per_s": statistics.median(speeds), "step_tokens_per_s": speeds,
            "optimizer_state_bytes": state_bytes,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="any load_model source")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed per setting (after 1 warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all settings (interleaved, so drift hits every setting alike)")
    args = parser.parse_args(argv)
    try:
        if min(args.steps, args.seq_len, args.batch, args.repeats) < 1:
            raise SlmkitError("--steps, --seq-len, --batch and --repeats must be positive")
        files = result_files(args.out, "distill-throughput", args.overwrite)
        teacher = slmkit.load_model(args.model)
        context = getattr(teacher.config, "max_position_embeddings", None)
        if context and args.seq_len > context:
            raise SlmkitError(f"--seq-len {args.seq_len} is above the model's context ({context} tokens)")
        calib = slmkit.calib_data(teacher, n=max(64, args.batch * (args.steps + 1)), seq_len=args.seq_len)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    pruned = copy.deepcopy(teacher)
    slmkit.prune(pruned, slmkit.WidthPruneConfig(ffn=0.25), calib=calib[:32])
    eval_data = calib[:1]
    bnb_version = bitsandbytes_version()
    eight_bit = eight_bit_adamw_runs("cuda" if cuda else "cpu")
    settings = variants(cuda, eight_bit)
    runs: dict[str, list[dict]] = {label: [] for label, _ in settings}
    for _ in range(args.repeats):
        for label, fields in settings:
            runs[label].append(time_setting(copy.deepcopy(pruned), teacher, fields, calib, eval_data, args.steps,
                                            args.batch, cuda))
    measured = [{"setting": label, "fields": fields, "runs": runs[label],
                 "tokens_per_s": [run["tokens_per_s"] for run in runs[label]],
                 "optimizer_state_bytes": runs[label][0]["optimizer_state_bytes"],
                 "peak_memory_bytes": runs[label][0]["peak_memory_bytes"]} for label, fields in settings]
    result = {**environment(), "model": args.model, "seq_len": args.seq_len, "batch": args.batch,
              "steps": args.steps, "repeats": args.repeats, "bitsandbytes": bnb_version, "results": measured}
    lines = markdown_header(result, "Distillation training throughput")
    lines += [f"Student: {args.model} with 25% of FFN channels pruned; teacher: {args.model}. "
              f"{args.batch} × {args.seq_len} tokens per step, teacher forward included, evaluation and saving "
              f"excluded. Each setting ran {args.repeats} time(s), in interleaved rounds; each run's tokens/s is "
              f"the median of its {args.steps} steps after a warm-up step, and its ratio is against the first "
              "row of the same round. Optimizer state: the size of the checkpoint's optimizer.bin.", ""]
    first = measured[0]["tokens_per_s"]
    rows = [[m["setting"], " / ".join(f"{v:,.0f}" for v in m["tokens_per_s"]),
             " / ".join(f"{v / b:.2f}×" for v, b in zip(m["tokens_per_s"], first)),
             f"{m['optimizer_state_bytes'] / 1e6:,.1f} MB",
             f"{m['peak_memory_bytes'] / 2**30:.2f} GiB" if m["peak_memory_bytes"] else "—"] for m in measured]
    lines += markdown_table(["setting", "tokens/s (each run)", "vs first row", "optimizer state", "peak GPU memory"],
                            rows)
    if not eight_bit:
        lines += ["", f"No 8-bit AdamW row: bitsandbytes {bnb_version or 'is not installed'} "
                      f"(pip install -U 'slmkit[bnb]'; on the CPU it needs {trainer.BNB_CPU_MIN} or later)."]
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
