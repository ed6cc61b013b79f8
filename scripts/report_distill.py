"""Turn a distillation recipe's output into a result: the held-out curve (perplexity, KL and top-1
agreement against the teacher at every evaluation), how much of the pruned model's perplexity gap to the
teacher it recovered, the final full evaluation and the training throughput. Prints a table and writes
JSON + Markdown.

Usage:
    slmkit run recipes/smollm2-ffn25-distill.yaml --output out/smollm2-ffn25-distill
    python scripts/report_distill.py out/smollm2-ffn25-distill [--out benchmarks/results/cpu] [--overwrite]
"""

from __future__ import annotations

import sys
from pathlib import Path

from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.errors import SlmkitError
from slmkit.models.checkpoint import read_manifest


def recovered_fraction(before: float, after: float, teacher: float) -> float:
    """Share of the perplexity gap to the teacher that training closed: (before − after) / (before − teacher)."""
    return (before - after) / (before - teacher) if before != teacher else float("nan")


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("checkpoint", help="output directory of a recipe with a distill step")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.checkpoint)
        if "distill" not in manifest["metrics"]:
            raise SlmkitError(f"{args.checkpoint}: no distillation in this checkpoint's manifest")
        files = result_files(args.out, f"{Path(args.checkpoint).name}", args.overwrite)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = manifest["metrics"]["distill"]
    evals, final = run["evals"], manifest["metrics"].get("eval")
    first, last = evals[0], evals[-1]
    teacher = last["teacher_perplexity"]
    recipe = manifest["metrics"].get("recipe")
    result = {**environment(), "checkpoint": str(args.checkpoint), "recipe": recipe, "steps": manifest["steps"],
              "distill": run,
              "final_eval": final, "recovered_fraction": recovered_fraction(first["perplexity"], last["perplexity"], teacher)}
    rows = [[str(e["step"]), f"{e['tokens']:,}", f"{e['perplexity']:.3f}", f"{e['kl']:.4f}", f"{e['top1_agreement']:.2%}"]
            for e in evals]
    lines = markdown_header(result, f"Distillation: {Path(args.checkpoint).name}")
    distill_step = next(s["distill"] for s in manifest["steps"] if "distill" in s)
    held_out = distill_step["eval"]
    lines += [f"Steps: {', '.join(next(iter(s)) for s in manifest['steps'])}"
              + (" (a recipe run: `slmkit run RECIPE --output CHECKPOINT`; the recipe is in the JSON)" if recipe else "")
              + f". Evaluations during training: {held_out['max_tokens']:,} held-out tokens in "
              f"{held_out['seq_len']}-token windows; the teacher (original model) has perplexity {teacher:.3f} on them.", ""]
    lines += markdown_table(["step", "training tokens", "held-out perplexity", "KL vs teacher (nats)", "top-1 agreement"], rows)
    lines += ["", f"Recovered {result['recovered_fraction']:.1%} of the pruned model's perplexity gap to the teacher "
              f"({first['perplexity']:.3f} → {last['perplexity']:.3f}, teacher {teacher:.3f}).",
              f"Training: {run['steps']} steps, {run['tokens']:,} tokens in {run['train_seconds']:.0f} s = "
              f"{run['tokens_per_s']:,.0f} tokens/s on {run['device']} ({run['processes']} process(es), "
              f"mixed precision {run['mixed_precision']}; evaluation and checkpoint time excluded)."]
    if final:
        lines += ["", f"Final evaluation ({final['tokens']:,} held-out tokens, {final['data']['seq_len']}-token windows): "
                  f"perplexity {final['reference_perplexity']:.3f} → {final['perplexity']:.3f}, KL {final['kl_mean']:.4f}, "
                  f"top-1 agreement {final['top1_agreement']:.2%}, weights {final['reference_weight_bytes'] / 1e6:.1f} MB → "
                  f"{final['weight_bytes'] / 1e6:.1f} MB."]
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
