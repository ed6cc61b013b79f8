"""Dense vs 2:4 semi-structured sparse on a CUDA GPU: linear layers and whole-model prefill/decode.

Everything runs in one process, side by side, on the same shapes and inputs; the table reports the
dense/sparse time ratio (> 1: sparse is faster). Needs an Ampere-or-newer NVIDIA GPU (sm80+).

1. Linear layers: ``F.linear`` with a dense fp16/bf16 weight (cuBLAS) vs the same weight as a PyTorch
   semi-structured sparse tensor (cuSPARSELt or CUTLASS), for the model's linear shapes and several
   token counts. Each sparse result is first checked against the dense one.
2. Whole model: the model pruned 2:4 (magnitude; speed does not depend on which weights are kept),
   prefill of batch×prompt tokens and greedy decode with HF ``generate`` (fixed output length, EOS
   ignored), dense vs after :func:`slmkit.prune.to_semi_structured`.

Times are medians of CUDA-event-timed runs after warm-up (``triton.testing.do_bench`` for the linears).
At batch-1 decode (M = 1 token) sparse kernels often lose: the result reports what it measures.

Usage:
    python scripts/bench_sparse.py [--model smollm2-135m] [--dtype float16] [--tokens 1,16,128,2048]
        [--shapes 4096x4096,4096x11008,11008x4096] [--out benchmarks/results/h100] [--overwrite]
"""

from __future__ import annotations

import sys
import time

import torch

import slmkit
from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.bench.models import load_bench_model
from slmkit.models.arch import block_linears, blocks, weight_out_in
from slmkit.prune import MagnitudePruneConfig, prune, to_semi_structured


def _median_ms(fn, warmup: int = 3, runs: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_linears(shapes: list[tuple[int, int]], tokens: list[int], dtype: torch.dtype) -> list[dict]:
    """Dense vs semi-structured ``F.linear`` for (in, out) shapes and token counts."""
    from torch.sparse import to_sparse_semi_structured
    from triton.testing import do_bench

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for in_features, out_features in shapes:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=gen)
        mask = torch.tensor([0, 0, 1, 1], device="cuda", dtype=torch.bool).tile(out_features, in_features // 4)
        weight = weight.masked_fill(mask, 0)
        sparse = to_sparse_semi_structured(weight)
        for count in tokens:
            x = torch.randn(count, in_features, device="cuda", dtype=dtype, generator=gen)
            dense_out = torch.nn.functional.linear(x, weight)
            sparse_out = torch.nn.functional.linear(x, sparse)
            error = float((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm())
            if error > 1e-2:
                raise slmkit.SlmkitError(f"sparse linear differs from dense: relative error {error:.3g}")
            dense_ms = do_bench(lambda: torch.nn.functional.linear(x, weight), return_mode="median")
            sparse_ms = do_bench(lambda: torch.nn.functional.linear(x, sparse), return_mode="median")
            flops = 2 * count * in_features * out_features
            rows.append({"in": in_features, "out": out_features, "tokens": count, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "rel_error": error,
                         "dense_tflops": flops / dense_ms / 1e9})
            print(f"linear {in_features}x{out_features} M={count}: dense {dense_ms:.4f} ms, "
                  f"2:4 {sparse_ms:.4f} ms, ×{dense_ms / sparse_ms:.2f}", flush=True)
    return rows


def bench_model(model, batch: int, prompt: int, new_tokens: int) -> dict:
    """Prefill time (one forward of batch×prompt) and decode tokens/s (HF generate, greedy)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        prefill_ms = _median_ms(lambda: model(input_ids=ids, use_cache=False))
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
        model.generate(ids, **kwargs)  # warm-up
        torch.cuda.synchronize()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
    seconds = sorted(runs)[1]
    return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "prefill_ms": prefill_ms,
            "generate_s": seconds, "decode_tokens_per_s": batch * new_tokens / seconds, "output": out[:, prompt:].cpu()}


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.set_defaults(out="benchmarks/results/h100")
    parser.add_argument("--model", default="smollm2-135m",
                        help="any load_model source, or random:smollm2-135m / random:llama-1b (random weights)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--tokens", default="1,16,128,2048", help="token counts (M) for the linear benchmark")
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096",
                        help="extra (in x out) linear shapes besides the model's own")
    parser.add_argument("--batches", default="1,16", help="batch sizes for the whole-model benchmark")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        if not torch.cuda.is_available():
            raise slmkit.SlmkitError("bench_sparse.py needs a CUDA GPU (2:4 sparse tensor cores); none is visible")
        files = result_files(args.out, "sparse-2of4", args.overwrite)
        tokens = [int(t) for t in args.tokens.split(",") if t]
        extra = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    except (slmkit.SlmkitError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype)
    model = load_bench_model(args.model, dtype, "cuda")
    prune(model, MagnitudePruneConfig(n_m="2:4"))
    own = sorted({tuple(weight_out_in(m).shape[::-1]) for _, m in block_linears(model, blocks(model)[0])})
    linear_rows = bench_linears(list(own) + [s for s in extra if s not in own], tokens, dtype)

    model_rows = []
    dense = {b: bench_model(model, b, args.prompt, args.new_tokens) for b in (int(x) for x in args.batches.split(","))}
    converted = to_semi_structured(model)
    for batch, before in dense.items():
        after = bench_model(model, batch, args.prompt, args.new_tokens)
        same = bool(torch.equal(before.pop("output"), after.pop("output")))
        model_rows.append({"batch": batch, "dense": before, "sparse": after, "same_greedy_tokens": same,
                           "prefill_speedup": before["prefill_ms"] / after["prefill_ms"],
                           "decode_speedup": after["decode_tokens_per_s"] / before["decode_tokens_per_s"]})
    result = {**environment(), "model": args.model, "dtype": args.dtype,
              "converted": sum(v == "2:4 sparse" for v in converted.values()), "linears": len(converted),
              "linear_rows": linear_rows, "model_rows": model_rows}
    lines = markdown_header(result, f"2:4 sparse vs dense on {result['device']['name']} ({args.dtype})")
    lines += ["## Linear layers (F.linear, median)", ""]
    lines += markdown_table(
        ["in × out", "tokens", "dense (cuBLAS) ms", "2:4 ms", "speedup", "dense TFLOP/s"],
        [[f"{r['in']} × {r['out']}", str(r["tokens"]), f"{r['dense_ms']:.4f}", f"{r['sparse_ms']:.4f}",
          f"×{r['speedup']:.2f}", f"{r['dense_tflops']:.1f}"] for r in linear_rows])
    lines += ["", f"## Whole model: {args.model}, {result['converted']}/{result['linears']} block linears 2:4 sparse", "",
              f"Prompt {args.prompt} tokens, {args.new_tokens} new tokens, HF generate greedy.", ""]
    lines += markdown_table(
        ["batch", "prefill dense ms", "prefill 2:4 ms", "prefill speedup", "decode dense tok/s", "decode 2:4 tok/s",
         "decode speedup", "same tokens"],
        [[str(r["batch"]), f"{r['dense']['prefill_ms']:.2f}", f"{r['sparse']['prefill_ms']:.2f}",
          f"×{r['prefill_speedup']:.2f}", f"{r['dense']['decode_tokens_per_s']:.0f}",
          f"{r['sparse']['decode_tokens_per_s']:.0f}", f"×{r['decode_speedup']:.2f}", str(r["same_greedy_tokens"])]
         for r in model_rows])
    return finish(files, result, lines)

if __name__ == "__main__":
    sys.exit(main())
