"""Prompt-lookup speculative decoding in the engine: speed and forward passes with and without, one run.

Two kinds of chat request, greedy, one request at a time (batch 1, where decoding is latency-bound):
"copy" asks the model to repeat a passage of the embedded corpus's held-out works (the drafts come from
the prompt), "free" asks open questions (little to look up). For each draft length k (0 = off) a fresh
engine runs every prompt after one warm-up; the table gives output tokens/s, forward passes per output
token, the share of drafted tokens accepted, and checks that every output equals the k = 0 output
(speculation must not change a token).

Usage:
    python scripts/bench_speculative.py [--model smollm2-135m] [--draft-tokens 0,4,8] [--max-tokens 96]
        [--device cpu] [--out benchmarks/results/cpu] [--overwrite]
"""

from __future__ import annotations

import sys
import time

import torch

import slmkit
from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.data import load_texts
from slmkit.engine import Engine, EngineConfig, SamplingParams
from slmkit.errors import SlmkitError

FREE = ["What is the capital of France?", "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue.", "Give three tips for learning to code."]


def copy_prompts(count: int, words: int = 70) -> list[str]:
    """Requests to repeat passages (``words`` long) of the embedded corpus's held-out works."""
    corpus = load_texts("embedded", split="eval")[0].split()
    step = len(corpus) // (count + 1)
    passages = [" ".join(corpus[i * step: i * step + words]) for i in range(1, count + 1)]
    return [f"Repeat the following text exactly, word for word:\n\n{p}" for p in passages]


def run(engine: Engine, prompts: list[str], max_tokens: int) -> dict:
    """Every prompt alone through ``engine``; output tokens/s and forward passes (prefill and decode)."""
    passes, depth = [], [0]

    def counted(method):  # a decode without a CUDA graph runs forward inside: one pass, counted once
        def wrapper(batch):
            if not depth[0]:
                passes.append(1)
            depth[0] += 1
            try:
                return method(batch)
            finally:
                depth[0] -= 1

        return wrapper

    runner = engine.runner  # counting on this instance only
    runner.forward, runner.decode = counted(runner.forward), counted(runner.decode)
    params = SamplingParams(max_tokens=max_tokens)
    engine.generate(prompts[0], SamplingParams(max_tokens=4), chat=True, progress=False)  # warm-up
    engine.allocator.reset_prefix_cache()
    passes.clear()
    proposed, accepted = engine.speculative_proposed, engine.speculative_accepted
    start = time.perf_counter()
    outs = [engine.generate(p, params, chat=True, progress=False)[0] for p in prompts]
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    proposed, accepted = engine.speculative_proposed - proposed, engine.speculative_accepted - accepted
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "forward_passes": len(passes), "passes_per_token": len(passes) / tokens,
            "drafted_tokens": proposed, "accepted_tokens": accepted,
            "acceptance": accepted / proposed if proposed else None, "outputs": [o.token_ids for o in outs]}


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="any load_model source")
    parser.add_argument("--draft-tokens", default="0,4,8", help="draft lengths k to compare (0: off, the baseline)")
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per request at most")
    parser.add_argument("--prompts", type=int, default=4, help="requests of each kind")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        ks = [int(k) for k in args.draft_tokens.split(",") if k]
        if 0 not in ks:
            ks = [0, *ks]
        # room for the longest prompt (a 70-word passage with its instruction, about 150 tokens) and the output
        room = max(1024, 512 + args.max_tokens)
        configs = {k: EngineConfig(max_batch_size=1, max_model_len=room, speculative_tokens=k) for k in ks}
        if not 1 <= args.prompts <= len(FREE):
            raise SlmkitError(f"--prompts must be in 1..{len(FREE)} (the open questions there are), got {args.prompts}")
        if args.max_tokens < 1:
            raise SlmkitError(f"--max-tokens must be positive, got {args.max_tokens}")
        files = result_files(args.out, f"speculative-{args.model.replace('/', '--')}", args.overwrite)
        model = slmkit.load_model(args.model, dtype="bfloat16" if args.device == "cuda" else "float32",
                                  device=args.device)
    except (SlmkitError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kinds = {"copy": copy_prompts(args.prompts), "free": FREE[: args.prompts]}
    rows = []
    try:
        for kind, prompts in kinds.items():
            baseline = None
            for k in ks:
                engine = Engine(model, configs[k])  # refuses a max_model_len above the model's context
                result = run(engine, prompts, args.max_tokens)
                outputs = result.pop("outputs")
                baseline = outputs if k == 0 else baseline
                rows.append({"kind": kind, "draft_tokens": k, **result, "same_tokens_as_k0": outputs == baseline})
                print(f"{kind} k={k}: {result['tokens_per_s']:.1f} tok/s, {result['passes_per_token']:.2f} "
                      "passes/token", flush=True)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    base = {row["kind"]: row for row in rows if row["draft_tokens"] == 0}
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base[row["kind"]]["tokens_per_s"]
    result = {**environment(), "model": args.model, "max_tokens": args.max_tokens, "rows": rows}
    lines = markdown_header(result, f"Prompt-lookup speculative decoding, {args.model}, batch 1, greedy")
    lines += [f"{args.prompts} chat requests of each kind, {args.max_tokens} new tokens at most, one at a time; "
              "copy = repeat a passage of the held-out corpus, free = open questions. Passes = model forward "
              "passes (prefill and decode) per output token.", ""]
    lines += markdown_table(
        ["requests", "draft k", "tokens/s", "speed-up", "passes / token", "drafts accepted", "same tokens as k=0"],
        [[r["kind"], str(r["draft_tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}×",
          f"{r['passes_per_token']:.2f}", "" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
          str(r["same_tokens_as_k0"])] for r in rows])
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
