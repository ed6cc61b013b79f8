"""Compare quantization methods on held-out text of two domains; print a table, write JSON + Markdown.

Every variant is calibrated on the same blocks of the embedded corpus (Shakespeare and Milton) and
evaluated against the float model on the same windows of (a) the corpus's held-out works (the
calibration domain) and (b) Python's reference documentation (modern English prose, ``python-docs``).
Rows: W8A8 (plain, SmoothQuant alpha 0.5, SmoothQuant with the per-site alpha search + GPTQ), W8A16,
W4A16 at group 128 and 64 by RTN, GPTQ and AWQ, GPTQ calibrated on the model's own generated text, and
the bitsandbytes baselines LLM.int8() and NF4 (via transformers' BitsAndBytesConfig; rows skipped with a
note when bitsandbytes is not installed). When ``llmcompressor`` is installed its W8A8 and W4A16 recipes
run too.

"bits/weight" counts everything stored for the block linears (codes, scales, zero points) per weight;
"size" is all model tensors in memory (embeddings stay float32 in every row).

Usage:
    python scripts/compare_quant.py [--model smollm2-135m] [--calib-blocks 64] [--max-tokens 4096]
        [--only rtn-g64,gptq-g64] [--update | --resume] [--out benchmarks/results/cpu] [--overwrite]

The result files are rewritten after every row; ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time

import torch

import slmkit
from slmkit import AWQConfig, EvalConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
from slmkit.bench import (environment, finish, markdown_header, markdown_table, merge_rows, previous_rows, result_files,
                          script_parser, selected_variants, write_results)
from slmkit.models.arch import block_linears, blocks

GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
DOMAINS = {"shakespeare": ("embedded", "held-out works of the calibration corpus (Hamlet, Paradise Regained)"),
           "python-docs": ("python-docs", "Python's reference documentation: modern English prose")}
VARIANTS = {
    "w8a8-plain": ("W8A8, no smoothing", SmoothQuantConfig(smoothing=False)),
    "w8a8-sq": ("W8A8 SmoothQuant alpha 0.5", SmoothQuantConfig(alpha=0.5)),
    "w8a8-sq-search-gptq": ("W8A8 SmoothQuant alpha search + GPTQ", SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq")),
    "w8a16-rtn": ("W8A16 RTN per channel", RTNConfig(scheme="W8A16", group_size=None)),
    "rtn-g128": ("W4A16 g128 RTN", RTNConfig(group_size=128)),
    "gptq-g128": ("W4A16 g128 GPTQ", GPTQConfig(group_size=128)),
    "awq-g128": ("W4A16 g128 AWQ", AWQConfig(group_size=128)),
    "rtn-g64": ("W4A16 g64 RTN", RTNConfig(group_size=64)),
    "gptq-g64": ("W4A16 g64 GPTQ", GPTQConfig(group_size=64)),
    "awq-g64": ("W4A16 g64 AWQ", AWQConfig(group_size=64)),
    "rtn-g64-asym": ("W4A16 g64 RTN, asymmetric", RTNConfig(group_size=64, symmetric=False)),
    "gptq-g64-asym": ("W4A16 g64 GPTQ, asymmetric", GPTQConfig(group_size=64, symmetric=False)),
    "gptq-g64-generated": ("W4A16 g64 GPTQ, calibrated on generated text", GPTQConfig(group_size=64)),
    "bnb-int8": ("bitsandbytes LLM.int8()", None),
    "bnb-nf4": ("bitsandbytes NF4 (blocksize 64)", None),
}


def linear_bits_per_weight(model) -> float:
    """Bits stored for the block linears (weights/codes, scales, zero points; not biases) per weight."""
    bits = weights = 0
    for block in blocks(model):
        for _, module in block_linears(model, block):
            count = module.in_features * module.out_features if hasattr(module, "in_features") else module.weight.numel()
            weights += count
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                if name != "bias" and tensor is not None:
                    bits += tensor.numel() * tensor.element_size() * 8
            quant_state = getattr(getattr(module, "weight", None), "quant_state", None)  # bnb 4-bit absmax etc.
            if quant_state is not None:
                bits += quant_state.absmax.numel() * quant_state.absmax.element_size() * 8
            row_scales = getattr(getattr(module, "weight", None), "SCB", None)  # bnb int8 row scales
            if row_scales is not None:
                bits += row_scales.numel() * row_scales.element_size() * 8
    return bits / weights


def bnb_model(model_path: str, key: str):
    """The float model loaded through transformers with a bitsandbytes quantization_config (CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if key == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config, dtype=torch.float32,
                                                device_map="cpu").eval()


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    parser.set_defaults(max_tokens=4096)
    parser.add_argument("--only", default="", help="comma-separated variant keys: " + ", ".join(VARIANTS))
    parser.add_argument("--update", action="store_true",
                        help="measure only the --only variants and replace or add their rows in the existing result")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep the rows the result already has, measure the rest")
    args = parser.parse_args(argv)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    try:
        keys = selected_variants(args.only, VARIANTS)
        files = result_files(args.out, "smollm2-quantization-comparison", args.overwrite or args.update or args.resume)
        previous = previous_rows(
            files[0], args.update or args.resume,
            lambda old: (old["model"], old["calibration"]["blocks"], old["max_tokens"]) == (args.model, args.calib_blocks, args.max_tokens),
            "model, calibration or evaluation length")
        evals = {name: EvalConfig(source=source, max_tokens=args.max_tokens, seq_len=1024)
                 for name, (source, _) in DOMAINS.items()}
        reference = slmkit.load_model(args.model)
        calib = slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512)
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.resume:  # rows already measured stay; the rest are measured now
        keys = [key for key in keys if key not in {row["key"] for row in previous}]
    rows, notes = [], []
    generated = None
    for key in keys:
        label, config = VARIANTS[key]
        if config is None and not have_bnb:
            notes.append(f"{label}: skipped, bitsandbytes is not installed (pip install 'slmkit[bnb]').")
            continue
        start = time.perf_counter()
        if config is None:
            model = bnb_model(str(reference.config._name_or_path), key)
        else:
            model = copy.deepcopy(reference)
            data = calib
            if key.endswith("-generated"):
                if generated is None:
                    generated = slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512, source="generated")
                data = generated
            slmkit.quantize(model, config, calib=data)
        seconds = time.perf_counter() - start
        row = {"key": key, "variant": label, "config": None if config is None else {config.name: config.to_dict()},
               "quantize_seconds": seconds, "bits_per_weight": linear_bits_per_weight(model)}
        for index, (domain, eval_config) in enumerate(evals.items()):
            if config is None and index:  # bitsandbytes 0.50's CPU 4-bit weights break once state_dict() ran
                model = bnb_model(str(reference.config._name_or_path), key)
            row[domain] = slmkit.evaluate(model, reference=reference, config=eval_config).to_dict()
        print(f"{label}: " + ", ".join(f"{d} ppl {row[d]['perplexity']:.3f}" for d in DOMAINS), flush=True)
        rows.append(row)
        del model
        write(files, args, evals, merge_rows(previous, rows), notes, keys, bool(previous), quiet=True)  # after every row
    if importlib.util.find_spec("llmcompressor") is None:
        notes.append("llm-compressor is not installed here, so its recipes are not in this table (pip install "
                     "llmcompressor and re-run to add them).")
    return write(files, args, evals, merge_rows(previous, rows), notes, keys, bool(previous))


def write(files, args, evals, rows, notes, keys, partial_update: bool, quiet: bool = False) -> int:
    """Write (and unless ``quiet`` print) the result so far: JSON + Markdown, in the table's order."""
    order = list(VARIANTS)
    rows = sorted(rows, key=lambda row: order.index(row["key"]))
    if not rows:
        return 0
    result = {**environment(), "model": args.model, "max_tokens": args.max_tokens,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "domains": {d: {"source": s, "about": a} for d, (s, a) in DOMAINS.items()},
              "evaluation": {d: c.to_dict() for d, c in evals.items()}, "rows": rows, "notes": notes}
    missing = [key for key in VARIANTS if key not in {row["key"] for row in rows}]
    if missing:
        result["not_measured"] = missing
    if partial_update:
        result["updated_rows"] = keys
    lines = markdown_header(result, f"Quantization of {args.model}: quality against the float32 model in two domains")
    if partial_update:
        lines += [f"Rows measured by this command: {', '.join(keys)}; the others come from the earlier run.", ""]
    first = rows[0]
    lines += [f"Calibration: {args.calib_blocks} × 512 tokens of the embedded corpus's calib split. Held-out: "
              + "; ".join(f"{first[d]['tokens']:,} tokens of {a} ({d})" for d, (_, a) in DOMAINS.items())
              + ", in 1024-token windows.", ""]
    header = ["model", "bits/weight", "size", "time"]
    for domain in DOMAINS:
        header += [f"ppl {domain}", "Δ", "KL", "top-1"]
    table = [["float32 (reference)", "32", f"{first['shakespeare']['reference_weight_bytes'] / 1e6:.1f} MB", "—"]
             + [cell for d in DOMAINS for cell in (f"{first[d]['reference_perplexity']:.3f}", "—", "—", "—")]]
    for row in rows:
        cells = [row["variant"], f"{row['bits_per_weight']:.2f}", f"{row['shakespeare']['weight_bytes'] / 1e6:.1f} MB",
                 f"{row['quantize_seconds']:.0f} s"]
        for domain in DOMAINS:
            report = row[domain]
            cells += [f"{report['perplexity']:.3f}", f"{100 * (report['perplexity'] / report['reference_perplexity'] - 1):+.2f}%",
                      f"{report['kl_mean']:.4f}", f"{100 * report['top1_agreement']:.2f}%"]
        table.append(cells)
    lines += markdown_table(header, table)
    if missing:
        notes = notes + [f"Not measured (yet): {', '.join(missing)}."]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    if quiet:
        write_results(files, result, "\n".join(lines) + "\n")
        return 0
    return finish(files, result, lines)


if __name__ == "__main__":
    sys.exit(main())
