"""Compare quantization methods on held-out text of two domains; print a table, write JSON + Markdown.

Every variant is calibrated on the same blocks of the embedded corpus (Shakespeare and Milton), unless its
row says "mixed" (half those blocks, half text the model writes itself: ``embedded+generated``) or
"generated", and evaluated against the float model on the same windows of (a) the corpus's held-out works
(the calibration domain) and (b) Python's reference documentation (modern English prose, ``python-docs``).
Rows: W8A8 (plain, SmoothQuant alpha 0.5, SmoothQuant with the per-site alpha search + GPTQ, the same with
mixed and with generated calibration, and mixed with 2% and 4% of the weights kept float by measured
sensitivity), W8A16, W4A16 at group 128 and 64 by RTN, GPTQ and AWQ (symmetric, and asymmetric: an int8 zero
point per group; GPTQ and AWQ also with mixed calibration; AWQ also with two-sided clipping), GPTQ without its
clipping search and calibrated on generated text, AWQ's scales with GPTQ's rounding, and the bitsandbytes
baselines LLM.int8() and NF4 (via transformers' BitsAndBytesConfig; rows skipped with a note when bitsandbytes
is not installed). When ``llmcompressor`` is installed its recipes run on the same calibration blocks too
(SmoothQuant 0.8 + GPTQ W8A8, and W4A16 g64 by RTN, GPTQ and AWQ): each result is saved in llm-compressor's
compressed-tensors format and read back with ``slmkit.load_model``, so its size and bits are counted like
slmkit's. llm-compressor 0.14 pins transformers <= 5.17, so it runs in its own environment: ``pip install
llmcompressor==0.14.0.1 -e .`` in a fresh venv, then run this script there.

"bits/weight" counts everything stored for the block linears (codes, scales, zero points) per weight;
"size" is all model tensors in memory (embeddings stay float32 in every row).

Usage:
    python scripts/compare_quant.py [--model smollm2-135m] [--calib-blocks 64] [--max-tokens 4096]
        [--only rtn-g64,gptq-g64] [--update | --resume] [--out benchmarks/results/cpu] [--overwrite]

The result files are rewritten after every row; ``--resume`` continues an interrupted run. Adding rows to an
existing result is refused when the float model here does not score its held-out text as the result recorded
(other text, e.g. another Python version's ``python-docs``, another tokenizer, or another model).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
import time

import torch

import slmkit
from slmkit import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
from slmkit.bench import (MIXED_CALIBRATION, QUALITY_DOMAINS, check_same_reference, domain_cells, domain_columns,
                          domain_evals, domains_note, environment, finish, keys_to_resume, markdown_header,
                          markdown_runs, markdown_table, merge_rows, previous_rows, reference_domain_cells,
                          result_files, run_record, script_parser, selected_variants)
from slmkit.models.arch import block_linears, blocks

GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
MIX = MIXED_CALIBRATION
# key: (label, config or baseline library, calibration source)
VARIANTS = {
    "w8a8-plain": ("W8A8, no smoothing", SmoothQuantConfig(smoothing=False), "embedded"),
    "w8a8-sq": ("W8A8 SmoothQuant alpha 0.5", SmoothQuantConfig(alpha=0.5), "embedded"),
    "w8a8-sq-search-gptq": ("W8A8 SmoothQuant alpha search + GPTQ",
                            SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq"), "embedded"),
    "w8a8-sq-search-gptq-mix": ("W8A8 SmoothQuant alpha search + GPTQ, mixed calibration",
                                SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq"), MIX),
    "w8a8-sq-search-gptq-generated": ("W8A8 SmoothQuant alpha search + GPTQ, calibrated on generated text",
                                      SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq"), "generated"),
    "w8a8-sq-search-gptq-mix-fp2": ("W8A8 SmoothQuant alpha search + GPTQ, mixed calibration, 2% of weights float",
                                    SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq", float_budget=0.02), MIX),
    "w8a8-sq-search-gptq-mix-fp4": ("W8A8 SmoothQuant alpha search + GPTQ, mixed calibration, 4% of weights float",
                                    SmoothQuantConfig(alpha_grid=GRID, weight_method="gptq", float_budget=0.04), MIX),
    "w8a16-rtn": ("W8A16 RTN per channel", RTNConfig(scheme="W8A16", group_size=None), "embedded"),
    "rtn-g128": ("W4A16 g128 RTN", RTNConfig(group_size=128), "embedded"),
    "rtn-g128-maxabs": ("W4A16 g128 RTN, plain max-abs ranges", RTNConfig(group_size=128, widen=False), "embedded"),
    "gptq-g128": ("W4A16 g128 GPTQ", GPTQConfig(group_size=128), "embedded"),
    "gptq-g128-noclip": ("W4A16 g128 GPTQ, no clipping search", GPTQConfig(group_size=128, clip=False), "embedded"),
    "gptq-g128-mix": ("W4A16 g128 GPTQ, mixed calibration", GPTQConfig(group_size=128), MIX),
    "awq-g128": ("W4A16 g128 AWQ", AWQConfig(group_size=128), "embedded"),
    "awq-g128-mix": ("W4A16 g128 AWQ, mixed calibration", AWQConfig(group_size=128), MIX),
    "rtn-g64": ("W4A16 g64 RTN", RTNConfig(group_size=64), "embedded"),
    "rtn-g64-maxabs": ("W4A16 g64 RTN, plain max-abs ranges", RTNConfig(group_size=64, widen=False), "embedded"),
    "gptq-g64": ("W4A16 g64 GPTQ", GPTQConfig(group_size=64), "embedded"),
    "gptq-g64-mix": ("W4A16 g64 GPTQ, mixed calibration", GPTQConfig(group_size=64), MIX),
    "gptq-g64-generated": ("W4A16 g64 GPTQ, calibrated on generated text", GPTQConfig(group_size=64), "generated"),
    "awq-g64": ("W4A16 g64 AWQ", AWQConfig(group_size=64), "embedded"),
    "awq-g64-mix": ("W4A16 g64 AWQ, mixed calibration", AWQConfig(group_size=64), MIX),
    "rtn-g32": ("W4A16 g32 RTN", RTNConfig(group_size=32), "embedded"),
    "gptq-g32": ("W4A16 g32 GPTQ", GPTQConfig(group_size=32), "embedded"),
    "awq-g32": ("W4A16 g32 AWQ", AWQConfig(group_size=32), "embedded"),
    "rtn-g128-asym": ("W4A16 g128 RTN, asymmetric", RTNConfig(group_size=128, symmetric=False), "embedded"),
    "rtn-g128-asym-minmax": ("W4A16 g128 RTN, asymmetric, plain min/max ranges",
                            RTNConfig(group_size=128, symmetric=False, widen=False), "embedded"),
    "gptq-g128-asym": ("W4A16 g128 GPTQ, asymmetric", GPTQConfig(group_size=128, symmetric=False), "embedded"),
    "gptq-g128-mix-asym": ("W4A16 g128 GPTQ, asymmetric, mixed calibration",
                           GPTQConfig(group_size=128, symmetric=False), MIX),
    "awq-g128-asym": ("W4A16 g128 AWQ, asymmetric", AWQConfig(group_size=128, symmetric=False), "embedded"),
    "awq-g128-mix-asym": ("W4A16 g128 AWQ, asymmetric, mixed calibration",
                          AWQConfig(group_size=128, symmetric=False), MIX),
    "awq-g128-asym-two": ("W4A16 g128 AWQ, asymmetric, two-sided clipping",
                          AWQConfig(group_size=128, symmetric=False, clip_two_sided=True), "embedded"),
    "awq-g128-mix-asym-two": ("W4A16 g128 AWQ, asymmetric, mixed calibration, two-sided clipping",
                              AWQConfig(group_size=128, symmetric=False, clip_two_sided=True), MIX),
    "awq-g128-mix-asym-two-fine": ("W4A16 g128 AWQ, asymmetric, mixed calibration, two-sided clipping, 20×20 ratios",
                                   AWQConfig(group_size=128, symmetric=False, clip_two_sided=True, clip_grid=40), MIX),
    "rtn-g64-asym": ("W4A16 g64 RTN, asymmetric", RTNConfig(group_size=64, symmetric=False), "embedded"),
    "rtn-g64-asym-minmax": ("W4A16 g64 RTN, asymmetric, plain min/max ranges",
                            RTNConfig(group_size=64, symmetric=False, widen=False), "embedded"),
    "gptq-g64-asym": ("W4A16 g64 GPTQ, asymmetric", GPTQConfig(group_size=64, symmetric=False), "embedded"),
    "gptq-g64-mix-asym": ("W4A16 g64 GPTQ, asymmetric, mixed calibration",
                          GPTQConfig(group_size=64, symmetric=False), MIX),
    "awq-g64-asym": ("W4A16 g64 AWQ, asymmetric", AWQConfig(group_size=64, symmetric=False), "embedded"),
    "awq-g64-mix-asym": ("W4A16 g64 AWQ, asymmetric, mixed calibration",
                         AWQConfig(group_size=64, symmetric=False), MIX),
    "awq-g64-asym-two": ("W4A16 g64 AWQ, asymmetric, two-sided clipping",
                         AWQConfig(group_size=64, symmetric=False, clip_two_sided=True), "embedded"),
    "awq-gptq-g128": ("W4A16 g128 AWQ + GPTQ rounding", AWQConfig(group_size=128, weight_method="gptq"), "embedded"),
    "awq-gptq-g128-mix": ("W4A16 g128 AWQ + GPTQ rounding, mixed calibration",
                          AWQConfig(group_size=128, weight_method="gptq"), MIX),
    "awq-gptq-g128-mix-asym": ("W4A16 g128 AWQ + GPTQ rounding, asymmetric, mixed calibration",
                               AWQConfig(group_size=128, symmetric=False, weight_method="gptq"), MIX),
    "awq-gptq-g64-asym": ("W4A16 g64 AWQ + GPTQ rounding, asymmetric",
                          AWQConfig(group_size=64, symmetric=False, weight_method="gptq"), "embedded"),
    "awq-gptq-g64-mix-asym": ("W4A16 g64 AWQ + GPTQ rounding, asymmetric, mixed calibration",
                              AWQConfig(group_size=64, symmetric=False, weight_method="gptq"), MIX),
    "awq-gptq-g64-mix-asym-two": ("W4A16 g64 AWQ + GPTQ rounding, asymmetric, mixed calibration, two-sided clipping",
                                  AWQConfig(group_size=64, symmetric=False, weight_method="gptq", clip_two_sided=True),
                                  MIX),
    "bnb-int8": ("bitsandbytes LLM.int8()", "bitsandbytes", None),
    "bnb-nf4": ("bitsandbytes NF4 (blocksize 64)", "bitsandbytes", None),
    "llmc-w8a8-sq-gptq": ("llm-compressor SmoothQuant 0.8 + GPTQ W8A8", "llmcompressor", "embedded"),
    "llmc-rtn-g64": ("llm-compressor W4A16 g64 RTN", "llmcompressor", None),
    "llmc-gptq-g64": ("llm-compressor W4A16 g64 GPTQ", "llmcompressor", "embedded"),
    "llmc-awq-g64": ("llm-compressor W4A16 g64 AWQ", "llmcompressor", "embedded"),
}
# The slowest rows are the mixed-precision W8A8 ones (9 to 12 minutes each on a 2-core CPU): most of it is
# their sensitivity pass, 210 single-linear KL measurements.


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


def llmc_model(reference, key: str, calib: torch.Tensor, workdir: str):
    """``reference`` quantized by llm-compressor's recipe for ``key`` on ``calib``, saved compressed and
    read back with slmkit.load_model (so its tensors are the real packed ones)."""
    import datasets
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    w4_g64 = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))}
    recipe = {
        "llmc-w8a8-sq-gptq": lambda: [SmoothQuantModifier(smoothing_strength=0.8),
                                      GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "llmc-rtn-g64": lambda: [QuantizationModifier(config_groups=w4_g64, ignore=["lm_head"])],
        "llmc-gptq-g64": lambda: [GPTQModifier(config_groups=w4_g64, ignore=["lm_head"])],
        "llmc-awq-g64": lambda: [AWQModifier(), QuantizationModifier(config_groups=w4_g64, ignore=["lm_head"])],
    }[key]()
    model = copy.deepcopy(reference)
    tokenizer = slmkit.models.record.get_record(reference).tokenizer
    dataset = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    path = f"{workdir}/{key}"
    model.save_pretrained(path, save_compressed=True)
    tokenizer.save_pretrained(path)
    return slmkit.load_model(path)


def main(argv=None) -> int:
    parser = script_parser(__doc__, quality=True)
    parser.set_defaults(max_tokens=4096)
    parser.add_argument("--only", default="", help="comma-separated variant keys (default: all): "
                        + ", ".join(VARIANTS))
    parser.add_argument("--update", action="store_true",
                        help="measure only the --only variants and replace or add their rows in the existing result")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep the rows the result already has, measure the rest")
    args = parser.parse_args(argv)
    try:
        keys = selected_variants(args.only, VARIANTS) if args.only else list(VARIANTS)
        files = result_files(args.out, "smollm2-quantization-comparison", args.overwrite or args.update or args.resume)
        previous = previous_rows(
            files[0], args.update or args.resume,
            {"--model": args.model, "--calib-blocks": args.calib_blocks, "--max-tokens": args.max_tokens},
            lambda old: {"--model": old["model"], "--calib-blocks": old["calibration"]["blocks"],
                         "--max-tokens": old["max_tokens"]})
        evals = domain_evals(args.max_tokens)
        reference = slmkit.load_model(args.model)
        calibrations = {"embedded": slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512)}
        check_same_reference(files[0], previous, reference, evals, lambda row: row)
        run = run_record(run_environment())  # each new row records the run that measured it
    except slmkit.SlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.resume:  # rows already measured stay; the rest are measured now
        keys = keys_to_resume(keys, previous, files[0])
        if not keys:  # leave the finished result as it is
            return 0
    rows, notes = [], (earlier_notes(files[0], keys) if previous else [])
    missing_packages = {}
    workdir = tempfile.TemporaryDirectory(prefix="compare-quant-")
    for key in keys:
        label, config, source = VARIANTS[key]
        if isinstance(config, str) and importlib.util.find_spec(config) is None:
            missing_packages.setdefault(config, []).append(key)
            continue
        if source is not None and source not in calibrations:  # written by the model: made once, not timed
            calibrations[source] = slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512, source=source)
        calib = calibrations.get(source)
        start = time.perf_counter()
        if isinstance(config, str):  # a baseline library's failure is its row's note, not the end of the run
            try:
                if config == "bitsandbytes":
                    model = bnb_model(str(reference.config._name_or_path), key)
                else:
                    model = llmc_model(reference, key, calibrations["embedded"], workdir.name)
            except Exception as error:  # noqa: BLE001 - any error of the other library
                first = (str(error).strip().splitlines() or [""])[0]
                notes.append(f"{label}: not measured, {config} failed here: {type(error).__name__}: {first}")
                print(f"{label}: {config} failed: {type(error).__name__}: {first}", file=sys.stderr, flush=True)
                continue
        else:
            model = copy.deepcopy(reference)
            slmkit.quantize(model, config, calib=calib)
        seconds = time.perf_counter() - start
        row = {"key": key, "variant": label, "calibration_source": source,
               "config": {"baseline": config} if isinstance(config, str) else {config.name: config.to_dict()},
               "quantize_seconds": seconds, "bits_per_weight": linear_bits_per_weight(model), "measured": run}
        for index, (domain, eval_config) in enumerate(evals.items()):
            if config == "bitsandbytes" and index:  # bitsandbytes 0.50's CPU 4-bit weights break once state_dict() ran
                model = bnb_model(str(reference.config._name_or_path), key)
            row[domain] = slmkit.evaluate(model, reference=reference, config=eval_config).to_dict()
        print(f"{label}: " + ", ".join(f"{d} ppl {row[d]['perplexity']:.3f}" for d in QUALITY_DOMAINS), flush=True)
        rows.append(row)
        del model
        write(files, args, evals, merge_rows(previous, rows), notes, keys, bool(previous), quiet=True)  # after every row
    for package, skipped in missing_packages.items():
        notes.append(f"{', '.join(skipped)}: not measured, {package} is not installed here "
                     f"({'pip install slmkit[bnb]' if package == 'bitsandbytes' else 'see this script docstring'}).")
    return write(files, args, evals, merge_rows(previous, rows), notes, keys, bool(previous))


def note_subjects(note: str) -> set[str]:
    """The variant keys a note is about: its subject (before ": ") is one row's label or a list of keys."""
    subject = note.split(": ", 1)[0]
    return {key for key, (label, _, _) in VARIANTS.items() if subject == label or key in subject.split(", ")}


def earlier_notes(json_file, keys: list[str]) -> list[str]:
    """The notes of an earlier result (``--update``, ``--resume``) about rows this run does not measure again."""
    return [note for note in json.loads(json_file.read_text()).get("notes", []) if not note_subjects(note) & set(keys)]


BASELINES = ("bitsandbytes", "llmcompressor", "compressed-tensors")  # the other libraries whose version a row records


def run_environment() -> dict:
    """:func:`slmkit.bench.environment` with the versions of the installed baseline libraries."""
    env = environment()
    for package in BASELINES:
        try:
            env["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


def write(files, args, evals, rows, notes, keys, partial_update: bool, quiet: bool = False) -> int:
    """Write (and unless ``quiet`` print) the result so far: JSON + Markdown, in the table's order."""
    order = list(VARIANTS)
    rows = sorted(rows, key=lambda row: order.index(row["key"]))
    if not rows:
        return 0
    result = {**run_environment(), "model": args.model, "max_tokens": args.max_tokens,
              "calibration": {"blocks": args.calib_blocks, "block_len": 512, "split": "calib"},
              "domains": {d: {"source": s, "about": a} for d, (s, a) in QUALITY_DOMAINS.items()},
              "evaluation": {d: c.to_dict() for d, c in evals.items()}, "rows": rows, "notes": notes}
    missing = [key for key in VARIANTS if key not in {row["key"] for row in rows}]
    if missing:
        result["not_measured"] = missing
    if partial_update:
        result["updated_rows"] = keys
    baselines = {name: result["versions"][name] for name in BASELINES if name in result["versions"]}
    lines = markdown_header(result, f"Quantization of {args.model}: quality against the float32 model in two domains")
    if baselines:
        lines += ["Baseline libraries: " + ", ".join(f"{name} {version}" for name, version in baselines.items()) + ".", ""]
    if partial_update:
        lines += [f"Rows measured by this command: {', '.join(keys)}; the others come from earlier runs.", ""]
    lines += markdown_runs(rows, result)
    first = rows[0]
    lines += [f"Calibration: {args.calib_blocks} × 512 tokens of the embedded corpus's calib split (Shakespeare and "
              f"Milton), except: \"generated\" rows use {args.calib_blocks} blocks the model wrote itself, \"mixed\" "
              f"rows half of each (`calib_data(source=\"{MIX}\")`). " + domains_note(first), ""]
    header = ["model", "bits/weight", "size", "time", *domain_columns()]
    table = [["float32 (reference)", "32", f"{first['shakespeare']['reference_weight_bytes'] / 1e6:.1f} MB", "—"]
             + reference_domain_cells(first)]
    for row in rows:
        table.append([row["variant"], f"{row['bits_per_weight']:.2f}",
                      f"{row['shakespeare']['weight_bytes'] / 1e6:.1f} MB", f"{row['quantize_seconds']:.0f} s",
                      *domain_cells(row)])
    lines += markdown_table(header, table)
    explained = set().union(*map(note_subjects, notes))
    unexplained = [key for key in missing if key not in explained]
    if unexplained:  # the failed and not-installed ones already have their note
        notes = notes + [f"Not measured (yet): {', '.join(unexplained)}."]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return finish(files, result, lines, quiet)


if __name__ == "__main__":
    sys.exit(main())
