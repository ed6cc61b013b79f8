"""Kernel benchmarks on a CUDA GPU, each beside its baseline in the same run (BENCHMARKS.md):
prefill attention vs torch SDPA's flash backend (TFLOP/s, causal, GQA), paged decode attention vs SDPA
on a contiguous cache (GB/s at long context), and the fused RMSNorm+residual,
SwiGLU and rotary kernels vs the eager PyTorch ops they replace (GB/s). Every kernel is first checked
against its reference (relative error). Times are medians of ``triton.testing.do_bench``.
Prints tables and writes JSON + Markdown. Exits 2 without a CUDA GPU.

Usage:
    slmkit bench kernels --out benchmarks/results/h100 [--overwrite]
    python scripts/bench_kernels.py --out benchmarks/results/h100   # the same
"""

from __future__ import annotations

import sys

import torch

from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.errors import SlmkitError


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_attention(dtype: torch.dtype) -> list[dict]:
    """Causal prefill attention, ours vs SDPA flash, equal-length sequences so both do the same work."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slmkit.kernels.attention import prefill_attention, prefill_attention_ref

    rows = []
    for batch, length, heads, kv_heads, dim in [(8, 1024, 32, 8, 64), (4, 2048, 32, 8, 64), (4, 2048, 32, 8, 128),
                                                (1, 8192, 32, 8, 128)]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        tokens = batch * length
        q = torch.randn(tokens, heads, dim, device="cuda", generator=gen).to(dtype)
        k = torch.randn(tokens, kv_heads, dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(tokens, kv_heads, dim, device="cuda", generator=gen).to(dtype)
        cu = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)
        check = slice(0, min(tokens, 2 * length))  # reference on two sequences (it loops in Python)
        error = _relative_error(prefill_attention(q[check], k[check], v[check], cu[:3], causal=True),
                                prefill_attention_ref(q[check], k[check], v[check], cu[:3], causal=True))
        qs, ks, vs = (t.view(batch, length, -1, dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

        ours_ms = triton.testing.do_bench(lambda: prefill_attention(q, k, v, cu, max_seqlen=length), return_mode="median")
        sdpa_ms = triton.testing.do_bench(sdpa, return_mode="median")
        flops = 4 * batch * heads * length * length * dim / 2  # causal: half the score matrix
        rows.append({"batch": batch, "length": length, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                     "relative_error": error, "ours_ms": ours_ms, "sdpa_flash_ms": sdpa_ms,
                     "ours_tflops": flops / ours_ms / 1e9, "sdpa_flash_tflops": flops / sdpa_ms / 1e9,
                     "ratio": sdpa_ms / ours_ms})
    return rows


def bench_decode(dtype: torch.dtype) -> list[dict]:
    """Paged decode attention at long context: achieved GB/s of the K/V bytes read, vs SDPA on a contiguous cache."""
    import triton.testing

    from slmkit.kernels.decode_attention import decode_attention, decode_attention_ref

    rows = []
    heads, kv_heads, dim, block_size = 32, 8, 128, 16
    for batch, context in [(1, 8192), (4, 8192), (1, 32768), (16, 4096)]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        blocks = context // block_size
        q = torch.randn(batch, heads, dim, device="cuda", generator=gen).to(dtype)
        k_cache = torch.randn(batch * blocks, block_size, kv_heads, dim, device="cuda", generator=gen).to(dtype)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(batch * blocks, device="cuda", generator=gen).view(batch, blocks).int()
        lengths = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        error = _relative_error(decode_attention(q, k_cache, v_cache, table, lengths),
                                decode_attention_ref(q, k_cache, v_cache, table, lengths))
        keys = k_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()  # (B, Hkv, T, D), contiguous copy
        values = v_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
        ours_ms = triton.testing.do_bench(lambda: decode_attention(q, k_cache, v_cache, table, lengths),
                                          return_mode="median")
        sdpa_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], keys, values, enable_gqa=True), return_mode="median")
        nbytes = 2 * batch * context * kv_heads * dim * q.element_size()
        rows.append({"batch": batch, "context": context, "relative_error": error, "ours_ms": ours_ms,
                     "sdpa_contiguous_ms": sdpa_ms, "ours_gb_s": nbytes / ours_ms / 1e6,
                     "sdpa_gb_s": nbytes / sdpa_ms / 1e6, "ratio": sdpa_ms / ours_ms})
    return rows


def bench_fused(dtype: torch.dtype) -> list[dict]:
    """Fused element-wise kernels vs eager, by achieved GB/s (bytes each op must read and write)."""
    import triton.testing
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from slmkit.kernels.rmsnorm import rmsnorm, rmsnorm_ref
    from slmkit.kernels.rotary import rotary, rotary_ref
    from slmkit.kernels.swiglu import swiglu, swiglu_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, inter = 16384, 4096, 14336
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
    residual, weight = torch.randn_like(x), torch.rand(hidden, device="cuda", generator=gen).to(dtype)
    gate = torch.randn(tokens, inter, device="cuda", generator=gen).to(dtype)
    up = torch.randn_like(gate)
    q = torch.randn(4, 32, 4096, 128, device="cuda", generator=gen).to(dtype)
    angles = torch.rand(4, 4096, 64, device="cuda", generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    size = x.element_size()

    def eager_rmsnorm():
        h = x + residual
        h32 = h.float()
        return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * weight, h

    cases = [
        ("rmsnorm + residual", lambda: rmsnorm(x, weight, 1e-6, residual=residual), eager_rmsnorm,
         rmsnorm(x, weight, 1e-6, residual=residual)[0], rmsnorm_ref(x, weight, 1e-6, residual=residual)[0],
         4 * x.numel() * size),
        ("swiglu", lambda: swiglu(gate, up), lambda: torch.nn.functional.silu(gate) * up,
         swiglu(gate, up), swiglu_ref(gate, up), 3 * gate.numel() * size),
        ("rotary (one of q/k)", lambda: rotary(q, cos, sin), lambda: apply_rotary_pos_emb(q, q, cos, sin)[0],
         rotary(q, cos, sin), rotary_ref(q, cos, sin), 2 * q.numel() * size + 2 * cos.numel() * size),
    ]
    rows = []
    for name, ours, eager, out, ref, nbytes in cases:
        ours_ms = triton.testing.do_bench(ours, return_mode="median")
        eager_ms = triton.testing.do_bench(eager, return_mode="median")
        rows.append({"op": name, "relative_error": _relative_error(out, ref), "ours_ms": ours_ms, "eager_ms": eager_ms,
                     "ours_gb_s": nbytes / ours_ms / 1e6, "eager_gb_s": nbytes / eager_ms / 1e6,
                     "ratio": eager_ms / ours_ms})
    return rows


def main(argv=None) -> int:
    """``slmkit bench kernels``: every kernel beside its baseline on a CUDA GPU; JSON + Markdown."""
    parser = script_parser(__doc__)
    parser.prog = "slmkit bench kernels"
    parser.set_defaults(out="benchmarks/results/gpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU (the kernels' CPU correctness tests are in "
              "tests/kernels; `slmkit bench generate` runs on CPU)", file=sys.stderr)
        return 2
    try:
        files = result_files(args.out, "kernels", args.overwrite)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    attention, decode, fused = bench_attention(dtype), bench_decode(dtype), bench_fused(dtype)
    result = {**environment(), "dtype": args.dtype, "attention": attention, "decode": decode, "fused": fused}
    lines = markdown_header(result, f"Kernels vs baselines ({args.dtype})")
    lines += ["Causal prefill attention vs torch SDPA (flash backend), equal-length sequences:", ""]
    lines += markdown_table(
        ["B × T", "Hq / Hkv", "D", "rel. error", "ours TFLOP/s", "SDPA flash TFLOP/s", "ours / SDPA"],
        [[f"{r['batch']} × {r['length']}", f"{r['heads']} / {r['kv_heads']}", str(r["head_dim"]),
          f"{r['relative_error']:.1e}", f"{r['ours_tflops']:.0f}", f"{r['sdpa_flash_tflops']:.0f}", f"{r['ratio']:.2f}×"]
         for r in attention])
    lines += ["", "Paged decode attention (32 / 8 heads, D 128, 16-token blocks) vs SDPA on a contiguous cache; "
              "GB/s of the K/V bytes read:", ""]
    lines += markdown_table(
        ["B", "context", "rel. error", "ours GB/s", "SDPA GB/s", "ours / SDPA"],
        [[str(r["batch"]), f"{r['context']:,}", f"{r['relative_error']:.1e}", f"{r['ours_gb_s']:,.0f}",
          f"{r['sdpa_gb_s']:,.0f}", f"{r['ratio']:.2f}×"] for r in decode])
    lines += ["", "Fused ops vs the eager PyTorch ops they replace (GB/s of the bytes each must move):", ""]
    lines += markdown_table(
        ["op", "rel. error", "ours GB/s", "eager GB/s", "speed-up"],
        [[r["op"], f"{r['relative_error']:.1e}", f"{r['ours_gb_s']:,.0f}", f"{r['eager_gb_s']:,.0f}", f"{r['ratio']:.2f}×"]
         for r in fused])
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
