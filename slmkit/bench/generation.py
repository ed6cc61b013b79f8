"""Generation benchmark: the engine beside transformers' ``generate`` on the same model, in one run.

For each (prompt length / output length) shape and batch size it measures, per system: time to first
token (TTFT), time per output token (TPOT), inter-token latency percentiles, output tokens/s, peak
device memory, and for the engine the decode bandwidth achieved (weights + KV bytes read per step over
TPOT) against the device's datasheet bandwidth and a measured copy bandwidth. Prompts are random token
ids (seeded) and every request generates exactly its output length (EOS ignored).

Baselines: ``hf-eager`` (``generate`` with the dynamic cache) and ``hf-compile`` (static cache, with
which ``generate`` compiles the forward itself on CUDA, CUDA graphs included: the gpt-fast recipe as
transformers ships it). Off by default on CPU, where compiling takes minutes and says nothing about GPUs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from slmkit.bench.models import load_bench_model
from slmkit.bench.results import environment, markdown_header, markdown_table, result_files, write_results
from slmkit.errors import SlmkitError
from slmkit.eval.report import peak_memory_bytes, weight_bytes
from slmkit.models.loading import parse_dtype

# Datasheet memory bandwidth (GB/s) by device-name fragment, most specific first.
DATASHEET_GB_S = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                  ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0))
BASELINES = ("hf-eager", "hf-compile")


def datasheet_bandwidth(device_name: str) -> float | None:
    """The datasheet memory bandwidth (GB/s) of a CUDA device name, None when unknown."""
    for fragment, value in DATASHEET_GB_S:
        if fragment in device_name:
            return value
    return None


def measure_copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float | None:
    """GB/s of a large device-to-device copy (bytes read + written); None off CUDA."""
    if device.type != "cuda":
        return None
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * source.numel() / (start.elapsed_time(end) / 1e3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _peak_memory(device: torch.device) -> int | None:
    # on CPU the process-wide RSS peak says nothing about one case: leave it out
    return peak_memory_bytes(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``length`` random token ids (ids 10.. to avoid special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size, (batch, length), generator=generator).tolist()


def _summary(system: str, ttfts: list[float], itls: list[float], tpots: list[float], tokens: int, seconds: float,
             device: torch.device) -> dict[str, Any]:
    return {"system": system, "ttft_ms": 1e3 * statistics.mean(ttfts), "tpot_ms": 1e3 * statistics.mean(tpots),
            "itl_p50_ms": 1e3 * _percentile(itls, 50), "itl_p90_ms": 1e3 * _percentile(itls, 90),
            "itl_p99_ms": 1e3 * _percentile(itls, 99), "output_tokens_per_s": tokens / seconds,
            "seconds": seconds, "peak_memory_bytes": _peak_memory(device)}


def bench_engine(engine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Run the prompts through the engine at once; latency and throughput figures."""
    from slmkit.engine import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    engine.generate([p[:8] for p in prompts[:1]], SamplingParams(max_tokens=2, ignore_eos=True), progress=False)
    engine.allocator.reset_prefix_cache()  # measure compute, not a cache filled by the warm-up
    _reset_peak(engine.device)
    _sync(engine.device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, progress=False)
    _sync(engine.device)
    seconds = time.perf_counter() - start
    ttfts = [o.ttft for o in outs]
    itls = [gap for o in outs for gap in o.inter_token_latencies]
    tpots = [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1) for o in outs if len(o.token_times) > 1]
    return _summary("slmkit", ttfts, itls, tpots or [float("nan")], sum(len(o.token_ids) for o in outs), seconds,
                    engine.device)


class _TimingStreamer:
    """A ``generate`` streamer that records when each step's tokens arrive (the prompt comes first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        """Called by generate with each step's tokens."""
        self.times.append(time.perf_counter())

    def end(self):
        """Called by generate when it is done."""


def bench_hf(model, prompts: list[list[int]], output_len: int, mode: str) -> dict[str, Any]:
    """transformers ``generate`` on the same prompts (one left-padded batch), eager or static + compiled."""
    device = next(model.parameters()).device
    input_ids = torch.tensor(prompts, device=device)
    options = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, temperature=None,
                   top_p=None, top_k=None, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    forward = model.forward
    if mode == "hf-compile":
        options["cache_implementation"] = "static"  # on CUDA, generate then compiles the forward by itself
        if device.type != "cuda":  # elsewhere it does not: compile this instance's forward as its docs show
            model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    try:
        with torch.inference_mode():
            for _ in range(2 if mode == "hf-compile" else 1):  # compile / warm up on the real shapes
                model.generate(input_ids, **options)
            _reset_peak(device)
            streamer = _TimingStreamer()
            _sync(device)
            start = time.perf_counter()
            model.generate(input_ids, streamer=streamer, **options)
            _sync(device)
            seconds = time.perf_counter() - start
    finally:
        model.forward = forward
    token_times = streamer.times[1:]  # the first put() is the prompt
    itls = [b - a for a, b in zip(token_times, token_times[1:])]
    ttft = token_times[0] - start if token_times else seconds
    tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else float("nan")
    return _summary(mode, [ttft] * len(prompts), itls, [tpot], len(prompts) * output_len, seconds, device)


def decode_bytes_per_step(model, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight once (the tied LM head once) + each sequence's KV."""
    from slmkit.engine.kv_cache import bytes_per_block
    from slmkit.models.arch import attention_shape, blocks

    weights = weight_bytes(model)  # parameters and quantized weights (buffers), tied ones once
    embed = model.get_input_embeddings().weight
    if model.get_output_embeddings() is None or model.get_output_embeddings().weight.data_ptr() != embed.data_ptr():
        weights -= embed.numel() * embed.element_size()  # an untied embedding table: one row per token, not read
    kv_heads = [attention_shape(model.config, i).num_kv_heads for i in range(len(blocks(model)))]
    head_dim = attention_shape(model.config, 0).head_dim
    kv = bytes_per_block(kv_heads, head_dim, 1, embed.dtype) * context * batch
    return weights + kv


@dataclasses.dataclass
class Shape:
    """Prompt and output lengths of one benchmark row."""

    prompt: int
    output: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``"128/64"`` → Shape(128, 64), with a one-line error for anything else."""
        try:
            prompt, output = (int(v) for v in text.split("/"))
        except ValueError:
            raise SlmkitError(f"a shape is PROMPT/OUTPUT, e.g. 128/128; got {text!r}") from None
        if prompt < 1 or output < 2:
            raise SlmkitError(f"shape {text}: prompt must be ≥ 1 and output ≥ 2 tokens")
        return cls(prompt, output)


def run(model, shapes: list[Shape], batches: list[int], baselines: list[str], engine_options: dict | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Every (shape, batch) for the engine and the baselines; the result dict the CLI writes."""
    from tqdm.auto import tqdm

    from slmkit.engine import Engine

    device = next(model.parameters()).device
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SlmkitError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    longest = max(s.prompt + s.output for s in shapes)
    engine = Engine(model, max_batch_size=max(batches), max_model_len=longest,
                    max_num_batched_tokens=max(2048, max(s.prompt for s in shapes)), **(engine_options or {}))
    env = environment()
    limit = datasheet_bandwidth(env["device"]["name"]) if device.type == "cuda" else None
    copy_bw = measure_copy_bandwidth(device)
    rows = []
    cases = [(shape, batch) for shape in shapes for batch in batches]
    for shape, batch in tqdm(cases, desc="bench", unit="case", disable=not progress):
        prompts = random_prompts(batch, shape.prompt, model.config.vocab_size, seed=batch)
        results = [bench_engine(engine, prompts, shape.output)]
        for baseline in baselines:
            results.append(bench_hf(model, prompts, shape.output, baseline))
        ours = results[0]
        bytes_per_step = decode_bytes_per_step(model, batch, shape.prompt + shape.output // 2)
        achieved = bytes_per_step / (ours["tpot_ms"] / 1e3) / 1e9
        row = {"prompt": shape.prompt, "output": shape.output, "batch": batch, "results": results,
               "decode_bytes_per_step": bytes_per_step, "achieved_gb_s": achieved,
               "fraction_of_datasheet": achieved / limit if limit else None,
               "fraction_of_copy": achieved / copy_bw if copy_bw else None}
        for result in results[1:]:
            row[f"speedup_vs_{result['system']}"] = result["tpot_ms"] / ours["tpot_ms"]
        rows.append(row)
    parameters = sum(p.numel() for p in model.parameters())
    from slmkit.models.record import get_record

    return {**env, "model": get_record(model).source or model.config.model_type,
            "parameters": parameters, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "datasheet_gb_s": limit, "copy_gb_s": copy_bw, "engine": engine.stats(), "rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
    """The Markdown report of :func:`run`'s result."""
    lines = markdown_header(result, f"Generation: slmkit engine vs transformers generate — {result['model']}")
    lines += [f"{result['parameters'] / 1e6:.0f}M parameters, {result['dtype']}; engine: "
              f"{result['engine']['num_blocks']} KV blocks of {result['engine']['block_size']}, CUDA graphs for "
              f"batch sizes {result['engine']['cuda_graph_batch_sizes'] or 'none'}, kernels "
              f"{'on' if result['engine']['use_kernels'] else 'off'}. Bandwidth: datasheet "
              f"{result['datasheet_gb_s'] or 'n/a'} GB/s, measured copy "
              f"{'n/a' if result['copy_gb_s'] is None else format(result['copy_gb_s'], ',.0f')} GB/s.", ""]
    table = []
    for row in result["rows"]:
        for r in row["results"]:
            key = "speedup_vs_" + r["system"]
            speedup = "" if r["system"] == "slmkit" else f"{row[key]:.2f}×"
            bandwidth = ""
            if r["system"] == "slmkit":
                bandwidth = f"{row['achieved_gb_s']:,.0f}"
                if row["fraction_of_datasheet"]:
                    bandwidth += f" ({100 * row['fraction_of_datasheet']:.0f}%)"
            memory = "" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
            table.append([f"{row['prompt']}/{row['output']}", str(row["batch"]), r["system"], f"{r['ttft_ms']:.1f}",
                          f"{r['tpot_ms']:.2f}", f"{r['itl_p50_ms']:.2f} / {r['itl_p90_ms']:.2f} / {r['itl_p99_ms']:.2f}",
                          f"{r['output_tokens_per_s']:,.0f}", memory, bandwidth, speedup])
    lines += markdown_table(["prompt/output", "batch", "system", "TTFT ms", "TPOT ms", "ITL p50/p90/p99 ms",
                             "out tok/s", "peak GiB", "decode GB/s (of datasheet)", "engine TPOT speed-up"], table)
    lines += ["", "TPOT speed-up = baseline TPOT / engine TPOT, same prompts, same run. Decode GB/s = (weights + "
              "KV bytes at mid-generation) / TPOT.", ""]
    return lines


def plot(result: dict[str, Any], path) -> bool:
    """Output tokens/s against batch size per shape and system as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = sorted({(r["prompt"], r["output"]) for r in result["rows"]})
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for axis, (prompt, output) in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if (r["prompt"], r["output"]) == (prompt, output)]
        for system in [r["system"] for r in rows[0]["results"]]:
            points = [(row["batch"], next(r for r in row["results"] if r["system"] == system)["output_tokens_per_s"])
                      for row in rows]
            axis.plot(*zip(*points), marker="o", label=system)
        axis.set(title=f"{prompt}/{output}", xlabel="batch", ylabel="output tokens/s", xscale="log", yscale="log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    """``slmkit bench generate``: parse arguments, run, print the table, write JSON + Markdown (+ PNG)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="slmkit bench generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="examples:\n  slmkit bench generate smollm2-135m --device cuda --dtype bfloat16 --out benchmarks/results/h100\n"
               "  slmkit bench generate smollm2-135m --shapes 128/128,512/256,2048/128 --batch 1,4,16,64 --device cuda\n"
               "  slmkit bench generate random:llama-1b --device cuda --baselines hf-eager   # random weights, real config\n"
               "  slmkit bench generate smollm2-135m --shapes 32/16 --batch 1,4 --out /tmp/bench   # CPU, slow")
    parser.add_argument("model", help="any load_model source, or random:llama-1b / random:smollm2-135m (random "
                                      "weights of that real shape)")
    parser.add_argument("--shapes", default="128/128,512/256,2048/128", help="PROMPT/OUTPUT lengths, comma separated")
    parser.add_argument("--batch", default="1,4,16,64", help="batch sizes, comma separated")
    parser.add_argument("--baselines", default=None,
                        help=f"comma separated from {', '.join(BASELINES)}, or none (default: both on CUDA, hf-eager on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on CUDA)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the engine's decode eagerly")
    parser.add_argument("--out", default="benchmarks/results/gpu" if torch.cuda.is_available() else "benchmarks/results/cpu",
                        help="folder for generation-<model>.json/.md/.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(argv)
    try:
        shapes = [Shape.parse(s) for s in args.shapes.split(",") if s]
        batches = sorted({int(b) for b in args.batch.split(",") if b})
    except ValueError:
        raise SlmkitError(f"--batch takes integers, got {args.batch!r}") from None
    if not shapes or not batches or min(batches) < 1:
        raise SlmkitError("give at least one shape and positive batch sizes")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlmkitError("--device cuda but no CUDA GPU is available")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.baselines is None:
        baselines = list(BASELINES) if device.type == "cuda" else ["hf-eager"]
    else:
        baselines = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    # every option is checked before an existing result file is reported or the model loads
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SlmkitError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    parse_dtype(dtype)
    stem = "generation-" + args.model.replace("random:", "random-").replace("/", "--").strip(".-")
    files = result_files(args.out, stem, args.overwrite)
    model = load_bench_model(args.model, dtype, device)
    result = run(model, shapes, batches, baselines, {"cuda_graphs": not args.no_cuda_graphs})
    lines = markdown(result)
    print("\n".join(lines))
    write_results(files, result, "\n".join(lines))
    png = files[1].with_suffix(".png")
    if plot(result, png):
        print(f"wrote {png}")
    return 0
