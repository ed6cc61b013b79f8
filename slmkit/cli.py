"""The ``slmkit`` command: parses arguments and calls the public API; errors are one line.

Commands: ``run`` (a recipe), ``eval``, ``generate``, ``export``, ``bench``, ``info``. ``slmkit COMMAND --help`` shows examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from slmkit._files import ensure_new, write_text_atomic
from slmkit.errors import SlmkitError, first_line

DEFAULT_RECIPE = "recipes/smollm2-w8a8.yaml"


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _check_new_file(path: str | None, overwrite: bool) -> Path | None:
    return None if path is None else ensure_new(path, overwrite)


def _write_json(file: Path | None, data) -> None:
    if file is not None:
        write_text_atomic(file, json.dumps(data, indent=2) + "\n")
        print(f"wrote {file}")


def _sigterm_interrupts() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so `kill` stops a command as cleanly as Ctrl-C does."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def cmd_run(args) -> int:
    from slmkit.recipes import Recipe, partial_dir, run_recipe

    recipe = Recipe.from_file(args.recipe, args.set)  # validate before any work
    output = args.output or str(Path("out") / Path(args.recipe).stem)
    json_file = _check_new_file(args.json, args.overwrite)
    _sigterm_interrupts()  # a scheduler's `kill` (SLURM, docker stop) stops as Ctrl-C does
    try:
        result = run_recipe(recipe, output=output, overwrite=args.overwrite, model=args.model, device=args.device)
    except BaseException:  # Ctrl-C, a kill, a full disk, memory running out, a failing step
        partial = partial_dir(Path(output).expanduser())
        if partial.exists():
            print(f"\nslmkit: the finished work is kept in {partial}; run the same command again to resume "
                  "(evaluation settings may change: the evaluation runs after every step)", file=sys.stderr)
        raise
    print()
    print(result.table())
    _write_json(json_file, {"report": result.report.to_dict() if result.report else None,
                            "seconds": result.seconds, "output": str(result.output), "recipe": recipe.to_dict()})
    return 0


def cmd_eval(args) -> int:
    from slmkit import EvalConfig, evaluate, load_model
    from slmkit.config import ConfigError

    json_file = _check_new_file(args.json, args.overwrite)
    try:
        config = EvalConfig(source=args.data, split=args.split, max_tokens=args.max_tokens, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    except ConfigError as error:
        raise SlmkitError(f"eval: {error}") from None
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    reference = load_model(args.reference, dtype=args.dtype, device=args.device) if args.reference else None
    report = evaluate(model, reference=reference, config=config)
    print(report.table())
    _write_json(json_file, report.to_dict())
    return 0


def cmd_export(args) -> int:
    from slmkit import export, load_model

    ensure_new(args.output, args.overwrite)  # refuse before loading anything
    model = load_model(args.model)
    path = export(model, args.output, format=args.format, overwrite=args.overwrite)
    print(f"wrote {path} ({args.format}); serve it with: vllm serve {path}")
    return 0


def cmd_generate(args) -> int:
    from slmkit import generate, load_model
    from slmkit.engine import SamplingParams

    if args.max_new_tokens < 1:  # bad sampling settings fail before the model loads
        raise SlmkitError(f"max_new_tokens must be at least 1, got {args.max_new_tokens}")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.stream:  # the KV-cache engine, printing tokens as they come
        from slmkit.engine import Engine

        engine = Engine(model, max_batch_size=1)
        for delta in engine.stream(args.prompt, params, chat=not args.no_chat_template):
            print(delta.text, end="", flush=True)
        print()
        return 0
    text = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=not args.no_chat_template)
    print(text)
    return 0


def cmd_serve(args) -> int:
    from slmkit import load_model
    from slmkit.engine import Engine, EngineConfig
    from slmkit.engine.server import Server, check_listen

    check_listen(args.host, args.port, "--port")  # a bad or taken port fails now, not after the model has loaded
    config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                          memory_fraction=args.memory_fraction, speculative_tokens=args.speculative_tokens)
    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device), config)

    _sigterm_interrupts()  # `kill` (docker stop, systemd) stops as cleanly as Ctrl-C
    with Server(engine, args.host, args.port, model_name=args.name, quiet=args.quiet) as server:
        print(f"slmkit: serving '{server.model_name}' at {server.url}/v1 (max_model_len {engine.max_model_len}, "
              f"{engine.num_blocks} cache blocks); Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("slmkit: stopped", file=sys.stderr)
    # The server and the engine loop are closed. Leave without the interpreter's teardown: with
    # transformers 5.25 it sometimes aborted there ("terminate called without an active exception", from a
    # native thread of an imported library), turning a clean stop into exit status -6 (2 of 10 stops).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_bench(args) -> int:
    if args.what == "generate":
        from slmkit.bench.generation import main as bench_main
    else:
        from slmkit.bench.kernels import main as bench_main
    return bench_main(args.rest)


def cmd_info(args) -> int:
    from slmkit.models.arch import config_summary
    from slmkit.models.checkpoint import read_manifest
    from slmkit.models.loading import load_config

    kind, location, config = load_config(args.path)
    summary = config_summary(config)
    manifest = read_manifest(location) if kind == "checkpoint" else None
    quantization = getattr(config, "quantization_config", None) if kind != "gguf" else None  # GGUF loads as float
    if "width pruning" in summary and ((manifest or {}).get("modules") or isinstance(quantization, dict)):
        summary["width pruning"] = "none: its weights are quantized (prune the float model, then quantize)"
    if args.json:
        print(json.dumps(manifest if manifest is not None else {"source": str(args.path), "kind": kind, **summary},
                         indent=2))
        return 0
    if manifest is None:  # any other source: its config, and the files it has here
        print(f"model           {location}\nformat          {_SOURCE_FORMATS[kind]}")
        for key, value in summary.items():
            print(f"{key:<15} {value}")
        if isinstance(quantization, dict):
            from slmkit.quantize.export import describe_quantization

            print(f"quantization    {describe_quantization(quantization)}")
        if kind == "gguf":
            files = [location]
        elif kind == "hub":
            files = []  # nothing downloaded
        else:
            files = sorted(f for f in Path(location).iterdir() if f.suffix in (".safetensors", ".bin"))
        for file in files:
            print(f"file            {file.name}: {file.stat().st_size / 1e6:,.1f} MB")
        return 0
    print(f"checkpoint      {location}")
    print(f"format          slmkit checkpoint v{manifest['format_version']} "
          f"(written by slmkit {manifest.get('slmkit_version')})")
    for key, value in summary.items():
        print(f"{key:<15} {value}")
    print(f"made from       {manifest.get('source')}")
    for index, step in enumerate(manifest.get("steps", []), 1):
        (name, fields), = step.items()
        print(f"step {index:<10} {name} {json.dumps(fields)}")
    kinds: dict[str, int] = {}
    for layout in manifest.get("modules", {}).values():
        kinds[layout["type"]] = kinds.get(layout["type"], 0) + 1
    if kinds:
        print("modules         " + ", ".join(f"{count} × {kind}" for kind, count in kinds.items()))
    for name, meta in manifest.get("files", {}).items():
        print(f"file            {name}: {meta['bytes'] / 1e6:,.1f} MB, sha256 {meta['sha256'][:16]}…")
    report = manifest.get("metrics", {}).get("eval")
    if report:
        line = f"perplexity {report['perplexity']:.3f} on {report['tokens']:,} held-out tokens"
        if report.get("reference_perplexity") is not None:
            line += (f" (reference {report['reference_perplexity']:.3f}), KL {report['kl_mean']:.4f}, "
                     f"top-1 agreement {100 * report['top1_agreement']:.2f}%")
        print(f"measured        {line}")
    return 0


_SOURCE_FORMATS = {
    "gguf": "GGUF file (slmkit dequantizes it to float on load)",
    "hf_dir": "transformers directory (not written by slmkit)",
    "compressed_tensors": "compressed-tensors checkpoint (loads quantized)",
    "hub": "Hugging Face hub model (its config only was read; load_model downloads the weights)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``slmkit`` command."""
    parser = argparse.ArgumentParser(
        prog="slmkit",
        formatter_class=_formatter,
        description="Compress open Transformer language models and measure what quality they kept.",
        epilog="examples:\n  slmkit run recipes/smollm2-w8a8.yaml\n  slmkit eval out/smollm2-w8a8 --reference smollm2-135m\n"
        "  slmkit generate smollm2-135m --prompt 'Write a haiku about autumn.'\n  slmkit info out/smollm2-w8a8\n"
        "  slmkit export out/smollm2-w4a16-gptq out/smollm2-w4a16-vllm\n"
        "  slmkit bench generate smollm2-135m --device cuda\n"
        "  slmkit serve smollm2-135m --port 8000",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from slmkit import __version__

    parser.add_argument("--version", action="version", version=f"slmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: load, compress, evaluate, save", formatter_class=_formatter,
                         description="Run a YAML recipe: load the model, apply its steps, evaluate against the "
                         "original model on held-out text, and save the result.\nAn interrupted run resumes "
                         "after its last finished step (a distill step: after its last checkpoint; a calibration "
                         "walk such as SmoothQuant or GPTQ: after its last finished block) when run again with "
                         "the same output.",
                         epilog="examples:\n  slmkit run recipes/smollm2-w8a8.yaml\n"
                         "  slmkit run recipes/smollm2-w8a8.yaml --output out/w8a8 --overwrite --json out/w8a8.json\n"
                         "  slmkit run recipes/smollm2-w8a8.yaml --model ./my-llama-dir\n"
                         "  slmkit run recipes/smollm2-ffn25-distill.yaml --output out/heal   # prune, then distill\n"
                         "  slmkit run recipes/smollm2-ffn25-distill.yaml --device cuda --set distill.steps=2000 "
                         "--set distill.batch_size=32\n"
                         "  slmkit run recipes/smollm2-shared-ffn.yaml    # blocks share FFNs, then distill\n"
                         "  slmkit run recipes/smollm2-openelm.yaml       # OpenELM layer-wise widths, then distill\n"
                         "  accelerate launch --config_file recipes/accelerate/ddp.yaml -m slmkit.cli run "
                         "recipes/smollm2-ffn25-distill.yaml --device cuda\n"
                         "  accelerate launch --config_file recipes/accelerate/fsdp.yaml -m slmkit.cli run "
                         "recipes/smollm2-ffn25-distill.yaml --device cuda   # sharded student (FSDP2)")
    run.add_argument("recipe", help="YAML recipe file")
    run.add_argument("--output", "-o", help="checkpoint directory to write (default: out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output / JSON file")
    run.add_argument("--model", help="override the recipe's model (path, hub id, .gguf, or smollm2-135m)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    run.add_argument("--json", help="also write the report as JSON to this file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field (repeatable): a recipe key or a step by name, then the "
                     "field, e.g. distill.steps=2000, calibration.num_blocks=128, steps[0].ffn=0.3")
    run.set_defaults(handler=cmd_run)

    ev = sub.add_parser("eval", help="perplexity (and KL / top-1 vs a reference) on held-out text",
                        formatter_class=_formatter,
                        description="Evaluate a model on held-out text: perplexity, and against a reference "
                        "model KL divergence (mean, p99) and top-1 agreement; size, peak memory, time.",
                        epilog="examples:\n  slmkit eval smollm2-135m\n"
                        "  slmkit eval out/smollm2-w8a8 --reference smollm2-135m --json out/eval.json\n"
                        "  slmkit eval ./model-dir --data notes.txt --split all --max-tokens 4096")
    ev.add_argument("model", help="model source: checkpoint dir, HF dir, hub id, .gguf, or smollm2-135m")
    ev.add_argument("--reference", help="the uncompressed model to compare against")
    ev.add_argument("--data", default="embedded",
                    help="text: 'embedded', 'python-docs', a .txt/.jsonl/.parquet file or a directory of them, "
                         "or hf:NAME[:CONFIG][:SPLIT]")
    ev.add_argument("--split", default="eval", help="split of embedded / python-docs: eval (held out), calib or all")
    ev.add_argument("--max-tokens", type=int, default=16384, help="tokens to evaluate (default 16384)")
    ev.add_argument("--seq-len", type=int, default=1024, help="window length (default 1024)")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ev.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--json", help="write the report as JSON to this file")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing JSON file")
    ev.set_defaults(handler=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a prompt", formatter_class=_formatter,
                         description="Generate a continuation of a prompt (greedy by default; sampled with "
                         "--temperature > 0). Uses the tokenizer's chat template when it has one.",
                         epilog="examples:\n  slmkit generate smollm2-135m --prompt 'What is the capital of France?'\n"
                         "  slmkit generate out/smollm2-w8a8 --prompt 'Tell me a story.' --temperature 0.8 --top-p 0.9 --seed 1\n"
                         "  slmkit generate smollm2-135m --prompt 'Write a haiku.' --stream --device cuda")
    gen.add_argument("model", help="model source")
    gen.add_argument("--prompt", "-p", required=True, help="the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (sampling only)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (sampling only)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.add_argument("--stream", action="store_true",
                     help="generate with the KV-cache engine (slmkit.Engine) and print tokens as they come")
    gen.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.set_defaults(handler=cmd_generate)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", formatter_class=_formatter,
                         description="Serve a model with the KV-cache engine (continuous batching, prefix caching) "
                         "behind OpenAI's API: POST /v1/completions and /v1/chat/completions (\"stream\": true "
                         "for server-sent events), GET /v1/models and /health.",
                         epilog="examples:\n  slmkit serve smollm2-135m --port 8000\n"
                         "  slmkit serve out/smollm2-w8a8 --device cuda --dtype bfloat16 --max-batch-size 32\n"
                         "  slmkit serve smollm2-135m --speculative-tokens 4   # faster greedy answers that quote\n"
                         "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                         "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 32}'\n"
                         "  curl -sN localhost:8000/v1/completions -d '{\"prompt\": \"Once upon a time\", \"stream\": true}'")
    srv.add_argument("model", help="model source: checkpoint dir, HF dir, hub id, .gguf, or smollm2-135m")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    srv.add_argument("--name", help="the model name clients send and /v1/models lists (default: the source)")
    srv.add_argument("--max-batch-size", type=int, default=16, help="requests decoding at once (default 16)")
    srv.add_argument("--max-model-len", type=int, help="prompt + output tokens per request at most")
    srv.add_argument("--memory-fraction", type=float,
                     help="share of free device memory for the KV cache (default 0.5 on CUDA, 0.1 of RAM on CPU)")
    srv.add_argument("--speculative-tokens", type=int, default=0,
                     help="prompt-lookup draft tokens per step for greedy requests (0: off; e.g. 4 when answers "
                     "quote their prompts)")
    srv.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    srv.add_argument("--device", default="cpu", help="cpu or cuda")
    srv.add_argument("--quiet", action="store_true", help="no line per request")
    srv.set_defaults(handler=cmd_serve)

    bench = sub.add_parser("bench", help="speed: the engine vs HF generate, kernels vs torch",
                           formatter_class=_formatter,
                           description="Benchmarks that print tables and write JSON + Markdown (+ PNG plots with "
                           "matplotlib).\n  generate  TTFT, TPOT, inter-token latency, tokens/s, memory and "
                           "bandwidth of the engine beside HF generate (eager; static cache + torch.compile); "
                           "runs on CPU too, slowly\n  kernels   attention vs torch SDPA (flash), paged decode, "
                           "fused ops vs eager (CUDA only)\nRun `slmkit bench generate --help` for the options.",
                           epilog="examples:\n  slmkit bench generate smollm2-135m --device cuda --out benchmarks/results/h100\n"
                           "  slmkit bench generate random:llama-1b --batch 1 --shapes 128/256 --device cuda\n"
                           "  slmkit bench generate smollm2-135m --shapes 32/16 --batch 1,4 --out /tmp/bench   # CPU\n"
                           "  slmkit bench kernels --out benchmarks/results/h100")
    bench.add_argument("what", choices=["generate", "kernels"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see its --help)")
    bench.set_defaults(handler=cmd_bench)

    exp = sub.add_parser("export", help="write a quantized checkpoint in the compressed-tensors format (vLLM)",
                         formatter_class=_formatter,
                         description="Export a quantized slmkit checkpoint (W8A8, W8A16 or W4A16) in the "
                         "compressed-tensors format that vLLM serves. The integer weights are copied, not "
                         "re-quantized; `slmkit.load_model` reads the export back bit-exactly.",
                         epilog="examples:\n  slmkit run recipes/smollm2-w4a16-gptq.yaml --output out/w4\n"
                         "  slmkit export out/w4 out/w4-vllm\n  vllm serve out/w4-vllm")
    exp.add_argument("model", help="a quantized slmkit checkpoint directory")
    exp.add_argument("output", help="directory to write")
    exp.add_argument("--format", default="compressed-tensors", help="serving format (compressed-tensors)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    exp.set_defaults(handler=cmd_export)

    info = sub.add_parser("info", help="what a model or checkpoint is and how it was made", formatter_class=_formatter,
                          description="Describe a model without loading its weights: its architecture (the slmkit "
                          "family it runs as, or why it is not supported), blocks and widths, attention kinds and "
                          "the dimensions width pruning may shrink. For an slmkit checkpoint also the source "
                          "model, the steps applied with their configs, compressed modules, files and measured "
                          "quality. Any load_model source: a checkpoint, a transformers or compressed-tensors "
                          "directory, a .gguf file, smollm2-135m, or a hub id (reads its config.json only).",
                          epilog="examples:\n  slmkit info out/smollm2-w8a8\n  slmkit info out/smollm2-w8a8 --json\n"
                          "  slmkit info smollm2-135m\n  slmkit info HuggingFaceTB/SmolLM3-3B   # supported? before downloading")
    info.add_argument("path", help="checkpoint directory or any model source")
    info.add_argument("--json", action="store_true", help="print the raw manifest (a checkpoint) or the summary")
    info.set_defaults(handler=cmd_info)
    return parser


def _leave_process_group() -> None:
    """Under ``accelerate launch`` or ``torchrun``: close the run's process group once the command is done,
    as PyTorch asks, rather than leave it to the interpreter's teardown."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _out_of_device_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory error of an accelerator (torch is imported lazily: found in sys.modules)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ()))


def _environment_error(error: BaseException) -> str:
    """One line for an error of the machine rather than of the input."""
    if isinstance(error, MemoryError) or _out_of_device_memory(error):
        what = "the machine" if isinstance(error, MemoryError) else "the GPU"
        return (f"{what} ran out of memory ({first_line(error, 160)}); use smaller batches (--batch-size, "
                "calibration num_blocks / batch_size) or a larger device")
    return first_line(error, 300)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slmkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.handler(args)
        _leave_process_group()
        return code
    except SlmkitError as error:
        if args.debug:
            traceback.print_exc()
        print(f"slmkit: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # the machine, not the input: a full disk, a directory it may not write, memory running out
        if not isinstance(error, (OSError, MemoryError)) and not _out_of_device_memory(error):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"slmkit: error: {_environment_error(error)} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
