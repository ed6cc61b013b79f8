"""Quantized matmul kernels against cuBLAS bf16 (``torch.matmul``), ``torch._int_mm`` and bitsandbytes, on a
CUDA GPU, side by side in one run (BENCHMARKS.md): SmolLM2-135M and Llama-3-8B layer shapes at
M in {1, 16, 128, 512, 2048, 8192} tokens. Prints tables of times and ratios, writes JSON + Markdown.

Rows per (shape, M), each time a median of ``triton.testing.do_bench`` and each result first checked
against its reference (relative error):
- bf16: ``x @ Wᵀ`` (cuBLAS), the baseline of every ratio;
- int_mm: ``torch._int_mm`` on pre-quantized int8 x and W (the int8 GEMM alone, no quantization);
- W8A8 fused: our kernel (per-token activation quantization + int8 GEMM + dequant epilogue);
- W8A16 / W4A16 g128 kernel: our dequantize-in-GEMM kernel (split-K at M <= 16);
- W4A16 module: ``WeightOnlyLinear.forward``, the path the module really picks at this M (kernel up to
  ``kernel_max_tokens``, dequantize + cuBLAS above);
- bnb int8 / nf4: bitsandbytes' ``Linear8bitLt`` (LLM.int8(), threshold 6) and ``Linear4bit`` NF4, when installed.

Targets (issue 7): W8A8 >= 1.6x bf16 at M >= 512; W4A16 >= 3x bf16 at M = 1 on 4096×14336; the module
path never slower than bf16.

Usage:
    python scripts/bench_matmul.py --out benchmarks/results/h100 [--overwrite] [--shapes llama3-8b]
Exits 2 without a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from slmkit.bench import environment, finish, markdown_header, markdown_table, result_files, script_parser
from slmkit.errors import SlmkitError

TOKENS = (1, 16, 128, 512, 2048, 8192)
SHAPES = {  # name: [(layer, in K, out N)]
    "smollm2-135m": [("q/o", 576, 576), ("gate/up", 576, 1536), ("down", 1536, 576)],
    "llama3-8b": [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)],
}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(model: str, layer: str, k: int, n: int, have_bnb: bool) -> list[dict]:
    """Every method at every M for one (K, N) weight."""
    import triton.testing

    from slmkit.kernels.w8a8_matmul import w8a8_matmul
    from slmkit.kernels.wo_matmul import wo_matmul
    from slmkit.quantize.groupwise import group_params, pack_int4, quantize_codes
    from slmkit.quantize.linear import WeightOnlyLinear, quantize_per_channel, quantize_per_token

    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
    w8, w8_scale = quantize_per_channel(weight.float())
    codes = {}
    for bits, group in ((8, None), (4, 128)):
        scale, _ = group_params(weight.float(), bits, group, True)
        q = quantize_codes(weight.float(), scale, None, bits, group)
        codes[bits] = (pack_int4(q) if bits == 4 else q, scale, group)
    module = WeightOnlyLinear.from_codes(quantize_codes(weight.float(), codes[4][1], None, 4, 128), codes[4][1], None,
                                         4, 128, None)
    bnb_layers = {}
    if have_bnb:
        import bitsandbytes as bnb

        int8 = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        int8.weight = bnb.nn.Int8Params(weight.cpu().half(), requires_grad=False, has_fp16_weights=False)
        nf4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        bnb_layers = {"bnb_int8": int8.cuda(), "bnb_nf4": nf4.cuda()}
    rows = []
    for m in TOKENS:
        x = (torch.randn(m, k, device="cuda", generator=gen)).to(torch.bfloat16)
        reference = x @ weight.t()
        x_q, _ = quantize_per_token(x)
        methods = {
            "bf16": lambda: x @ weight.t(),
            "w8a8_fused": lambda: w8a8_matmul(x, w8, w8_scale),
            "w8a16_kernel": lambda: wo_matmul(x, codes[8][0], codes[8][1], None, 8, None, k),
            "w4a16_kernel": lambda: wo_matmul(x, codes[4][0], codes[4][1], None, 4, 128, k),
            "w4a16_module": lambda: module(x),
        }
        if m > 16 and k % 8 == 0 and n % 8 == 0:  # cuBLASLt int8 shape rules
            methods["int_mm"] = lambda: torch._int_mm(x_q, w8.t())
        for name, layer_module in bnb_layers.items():
            methods[name] = (lambda mod: (lambda: mod(x)))(layer_module)
        row = {"model": model, "layer": layer, "k": k, "n": n, "m": m}
        for name, fn in methods.items():
            with torch.no_grad():
                out = fn()
                if name != "int_mm":
                    row[f"{name}_error"] = _relative_error(out, reference)
                row[f"{name}_ms"] = triton.testing.do_bench(fn, return_mode="median")
        for name in methods:
            row[f"{name}_speedup"] = row["bf16_ms"] / row[f"{name}_ms"]
        rows.append(row)
        print(f"{model} {layer} M={m}: " + ", ".join(f"{n_} {row[f'{n_}_speedup']:.2f}x" for n_ in methods if n_ != "bf16"),
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    args = parser.parse_args(argv)
    try:
        shapes = [s for s in args.shapes.split(",") if s]
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise SlmkitError(f"unknown shape set {unknown[0]!r}; choose from {', '.join(SHAPES)}")
        if not torch.cuda.is_available():
            raise SlmkitError("bench_matmul needs a CUDA GPU (none found)")
        files = result_files(args.out, "quantized-matmul", args.overwrite)
    except SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    rows = [row for model in shapes for layer, k, n in SHAPES[model] for row in bench_shape(model, layer, k, n, have_bnb)]
    result = {**environment(), "tokens": list(TOKENS), "bitsandbytes": have_bnb, "rows": rows}
    methods = ["int_mm", "w8a8_fused", "w8a16_kernel", "w4a16_kernel", "w4a16_module"] + (["bnb_int8", "bnb_nf4"] if have_bnb else [])
    lines = markdown_header(result, "Quantized matmuls vs cuBLAS bf16 (speed-up = bf16 time / method time)")
    header = ["weights", "M", "bf16 ms"] + methods
    table = []
    for row in rows:
        cells = [f"{row['model']} {row['layer']} {row['k']}→{row['n']}", str(row["m"]), f"{row['bf16_ms']:.4f}"]
        cells += [f"{row[f'{m}_speedup']:.2f}×" if f"{m}_speedup" in row else "—" for m in methods]
        table.append(cells)
    lines += markdown_table(header, table)
    if not have_bnb:
        lines += ["", "bitsandbytes is not installed: its rows are missing."]
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
