"""Result files of benchmark scripts: what every result records (BENCHMARKS.md) and how it is written."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

from slmkit._files import ensure_new, write_text_atomic


# The held-out text of the quality comparisons: the calibration domain and another one (key: (source, about))
QUALITY_DOMAINS = {"shakespeare": ("embedded", "held-out works of the calibration corpus (Hamlet, Paradise Regained)"),
                   "python-docs": ("python-docs", "Python's reference documentation: modern English prose")}
MIXED_CALIBRATION = "embedded+generated"  # half the calibration blocks from the corpus, half written by the model
QUALITY_SEQ_LEN = 1024  # evaluation window of the quality comparisons


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's ``cpuinfo``), else what ``platform`` knows (often just the architecture)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Date, exact command, device and library versions, for the header of every result file."""
    import torch
    import transformers

    import slmkit

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "slmkit": slmkit.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if torch.cuda.is_available():
        device = {"type": "cuda", "name": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    else:
        # the vector unit torch's CPU kernels use (AVX512, AVX2, ...): rounding, hence searches that pick
        # among near-equal candidates, can differ between them on the same machine
        device = {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads(),
                  "capability": torch.backends.cpu.get_cpu_capability()}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]), "device": device, "versions": versions}


def script_parser(description: str, quality: bool = False) -> argparse.ArgumentParser:
    """Argument parser of a benchmark script, with the ``--out`` and ``--overwrite`` every one takes.

    ``quality=True`` adds what quality comparisons take: ``--model``, ``--calib-blocks``, ``--max-tokens``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cpu", help="folder for the JSON and Markdown results")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    if quality:
        parser.add_argument("--model", default="smollm2-135m", help="any load_model source")
        parser.add_argument("--calib-blocks", type=int, default=64, help="calibration blocks of 512 tokens")
        parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens evaluated")
    return parser


def selected_variants(only: str, available) -> list[str]:
    """The variant keys of a comma-separated ``--only`` (all of ``available`` when empty); unknown keys fail."""
    from slmkit.errors import SlmkitError

    keys = [key for key in only.split(",") if key] or list(available)
    unknown = [key for key in keys if key not in available]
    if unknown:
        raise SlmkitError(f"unknown variant {unknown[0]!r}; choose from {', '.join(available)}")
    return keys


def previous_rows(json_file: Path, update: bool, settings: dict[str, Any],
                  recorded: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier result that ``--update`` re-measures in part ([] without ``--update``).

    ``settings`` holds this run's values of what must match, each named by the option that sets it (e.g.
    ``--max-tokens``); ``recorded(old_json)`` gives the earlier result's values by the same names. Refused
    (SlmkitError) when that result does not exist or a setting differs; the message names the setting, both
    values and, for an option, the flag that would match.
    """
    from slmkit.errors import SlmkitError

    if not update:
        return []
    if not json_file.is_file():
        raise SlmkitError(f"{json_file} does not exist yet; run without --update or --resume first")
    old = json.loads(json_file.read_text())
    earlier = recorded(old)
    for name, value in settings.items():
        if earlier.get(name) != value:
            hint = f"pass {name} {earlier[name]} or " if name.startswith("--") and earlier.get(name) is not None else ""
            raise SlmkitError(f"{json_file} was measured with {name} {earlier.get(name, '(not recorded)')}, this run "
                              f"has {value}; {hint}rerun all its rows (--overwrite)")
    return old["rows"]


REFERENCE_RTOL = 1e-3  # reference perplexities closer than this are the same text (CPU kernels move the 5th digit)


def check_same_reference(json_file: Path, previous: list[dict[str, Any]], reference, evals: dict[str, Any],
                         reports_of: Callable[[dict[str, Any]], dict[str, dict[str, Any]]]) -> None:
    """Refuse (SlmkitError) to add rows to ``previous`` (``--update``, ``--resume``) that would be measured
    against another reference: other text under the same source name, or another model.

    ``reference`` is evaluated alone on each of ``evals`` (name → EvalConfig); ``reports_of(row)`` gives an
    earlier row's evaluation reports by the same names. Where both record the scored tokens' fingerprint
    (``tokens_sha256``) they must match; the reference perplexity must match within
    :data:`REFERENCE_RTOL`. The tokens a source gives can change between environments (``python-docs``
    follows the Python version; a tokenizer converted by another transformers may separate documents with
    another token), and a table whose rows scored different tokens compares nothing.
    """
    import slmkit
    from slmkit.errors import SlmkitError
    from slmkit.models.record import get_record

    if not previous:
        return
    metrics = get_record(reference).metrics  # evaluate() records its report there: put back what was there
    had_eval, earlier = "eval" in metrics, metrics.get("eval")
    try:
        reports = {name: slmkit.evaluate(reference, config=config).to_dict() for name, config in evals.items()}
    finally:
        if had_eval:
            metrics["eval"] = earlier
        else:
            metrics.pop("eval", None)
    for name, report in reports.items():
        for row in previous:
            old = reports_of(row).get(name)
            if old is None:
                continue
            fingerprint = old["data"].get("tokens_sha256")
            if fingerprint is not None and fingerprint != report["data"]["tokens_sha256"]:
                raise SlmkitError(f"{json_file}: row {row['key']!r} scored other {name} tokens than this environment "
                                  f"gives (fingerprint {fingerprint}, here {report['data']['tokens_sha256']}); "
                                  "rerun all its rows (--overwrite) or write elsewhere (--out)")
            old_ppl, ppl = old["reference_perplexity"], report["perplexity"]
            if abs(ppl / old_ppl - 1) > REFERENCE_RTOL:
                raise SlmkitError(f"{json_file}: row {row['key']!r} was measured against a reference perplexity of "
                                  f"{old_ppl:.3f} on {name}, this environment gives {ppl:.3f} (other text, "
                                  "tokenizer or model); rerun all its rows (--overwrite) or write elsewhere (--out)")


def keys_to_resume(keys: list[str], previous: list[dict[str, Any]], json_file: Path) -> list[str]:
    """The variant ``keys`` a resumed run (``--resume``) still measures: those ``previous`` lacks. When none is
    left it says so; the caller then leaves the finished result as it is."""
    done = {row["key"] for row in previous}
    left = [key for key in keys if key not in done]
    if not left:
        print(f"nothing to measure: {json_file} has every selected row (--update re-measures rows)")
    return left


def merge_rows(previous: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier rows with the re-measured ones (same ``key``) replaced in place and new ones appended."""
    fresh = {row["key"]: row for row in rows}
    return [fresh.pop(row["key"], row) for row in previous] + list(fresh.values())


def result_files(out_dir: str | Path, stem: str, overwrite: bool) -> tuple[Path, Path]:
    """The (JSON, Markdown) paths of a result; refused before any work when they exist without overwrite."""
    out_dir = Path(out_dir)
    return ensure_new(out_dir / f"{stem}.json", overwrite), ensure_new(out_dir / f"{stem}.md", overwrite)


def write_results(files: tuple[Path, Path], data: dict[str, Any], markdown: str) -> None:
    """Write the JSON and Markdown of a result (each atomically) and say where."""
    json_file, md_file = files
    write_text_atomic(json_file, json.dumps(data, indent=2) + "\n")
    write_text_atomic(md_file, markdown)
    print(f"wrote {json_file} and {md_file}")


def device_text(device: dict[str, Any]) -> str:
    """``cpu (AMD EPYC, AVX512)`` / ``cuda (NVIDIA H100 80GB HBM3)``: a result's device in words."""
    return f"{device['type']} ({device['name']}{', ' + device['capability'] if device.get('capability') else ''})"


def markdown_header(result: dict[str, Any], title: str) -> list[str]:
    """Title, date, device, versions and command lines that open every Markdown result."""
    versions = result["versions"]
    return [f"# {title}", "",
            f"{result['date']}, {device_text(result['device'])}, torch {versions['torch']}, "
            f"triton {versions['triton']}, transformers {versions['transformers']}.", "",
            f"Command: `{result['command']}`", ""]


RUN_KEYS = ("date", "command", "device", "versions")


def run_record(result: dict[str, Any]) -> dict[str, Any]:
    """What a result row keeps, as its ``measured`` key, about the run that measured it: the date, command,
    device and versions of :func:`environment` (with any versions a script adds, such as baseline libraries).

    A table that ``--update`` / ``--resume`` builds over several runs keeps each row's own record, so it
    says which environment measured which row (the file's top-level environment is the last run's).
    """
    return json.loads(json.dumps({key: result[key] for key in RUN_KEYS}))


def measured_runs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, list[str]]]:
    """The distinct runs that measured ``rows`` (their ``measured`` records; None for rows without one), each
    with the keys of its rows, oldest first (records without a date first)."""
    runs: dict[str, tuple[dict[str, Any] | None, list[str]]] = {}
    for row in rows:
        record = row.get("measured")
        runs.setdefault(json.dumps(record, sort_keys=True), (record, []))[1].append(row["key"])
    return sorted(runs.values(), key=lambda run: (run[0] or {}).get("date") or "")


def markdown_runs(rows: list[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """Lines saying which run measured which rows, when ``rows`` come from more than one ([] otherwise).

    Each run is named by its date, what differs from ``header`` (the result's own environment, which the
    Markdown header shows: device, library versions), its command and its rows. A record with only
    ``before`` (a date) stands for a run whose environment was not kept, known only to have ended by then.
    """
    runs = measured_runs(rows)
    if len(runs) < 2:
        return []
    lines = [f"The rows come from {len(runs)} runs, oldest first (with what differs from the environment above):", ""]
    for record, keys in runs:
        if record is None or "date" not in record:
            when = f"before {record['before']}, " if record and record.get("before") else ""
            lines.append(f"- {when}a run whose environment was not recorded: {', '.join(keys)}.")
            continue
        differs = [device_text(record["device"])] if record["device"] != header["device"] else []
        differs += [f"{name} {version}" for name, version in record["versions"].items()
                    if version and version != header["versions"].get(name)]
        differs += [f"no {name}" for name, version in header["versions"].items()
                    if version and not record["versions"].get(name)]
        lines.append(f"- {record['date']}{' (' + ', '.join(differs) + ')' if differs else ''}, "
                     f"`{record['command']}`: {', '.join(keys)}.")
    return lines + [""]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def finish(files: tuple[Path, Path], data: dict[str, Any], lines: list[str], quiet: bool = False) -> int:
    """Print the Markdown result (unless ``quiet``: a partial result written after each row), write it with the
    JSON, and return exit status 0."""
    table = "\n".join(lines) + "\n"
    if not quiet:
        print(table)
    write_results(files, data, table)
    return 0


def quality_inputs(args: argparse.Namespace):
    """(reference model, calibration blocks of 512 tokens, EvalConfig) for a quality comparison, from the
    ``--model``, ``--calib-blocks`` and ``--max-tokens`` of :func:`script_parser` with ``quality=True``."""
    import slmkit

    eval_config = slmkit.EvalConfig(max_tokens=args.max_tokens, seq_len=QUALITY_SEQ_LEN)  # bad values fail before loading
    reference = slmkit.load_model(args.model)
    return reference, slmkit.calib_data(reference, n=args.calib_blocks, seq_len=512), eval_config


def domain_evals(max_tokens: int) -> dict[str, Any]:
    """One EvalConfig per domain of :data:`QUALITY_DOMAINS` (``max_tokens`` each, in the comparisons' windows)."""
    import slmkit

    return {name: slmkit.EvalConfig(source=source, max_tokens=max_tokens, seq_len=QUALITY_SEQ_LEN)
            for name, (source, _) in QUALITY_DOMAINS.items()}


def domains_note(row: dict[str, Any], seq_len: int = QUALITY_SEQ_LEN) -> str:
    """The sentence of a two-domain result saying how much held-out text of each domain a row was measured on
    (``row[domain]`` is an evaluation report's dict, for each of :data:`QUALITY_DOMAINS`)."""
    return ("Held-out: " + "; ".join(f"{row[d]['tokens']:,} tokens of {about} ({d})"
                                     for d, (_, about) in QUALITY_DOMAINS.items()) + f", in {seq_len}-token windows.")


def domain_columns() -> list[str]:
    """Table header cells of a two-domain result: perplexity, its rise, KL and top-1 agreement per domain."""
    return [cell for domain in QUALITY_DOMAINS for cell in (f"ppl {domain}", "Δ", "KL", "top-1")]


def reference_domain_cells(row: dict[str, Any]) -> list[str]:
    """The reference model's cells under :func:`domain_columns`: its perplexity in each domain."""
    return [cell for d in QUALITY_DOMAINS for cell in (f"{row[d]['reference_perplexity']:.3f}", "—", "—", "—")]


def domain_cells(row: dict[str, Any], rise_digits: int = 2) -> list[str]:
    """A row's cells under :func:`domain_columns`, from its evaluation report per domain."""
    cells = []
    for domain in QUALITY_DOMAINS:
        report = row[domain]
        rise = 100 * (report["perplexity"] / report["reference_perplexity"] - 1)
        cells += [f"{report['perplexity']:.3f}", f"{rise:+.{rise_digits}f}%", f"{report['kl_mean']:.4f}",
                  f"{100 * report['top1_agreement']:.2f}%"]
    return cells


def data_note(tokens: int, eval_config, calib_blocks: int) -> str:
    """The sentence of a quality result saying which text it was calibrated and evaluated on."""
    return (f"Held-out text: {tokens:,} tokens of the embedded corpus's eval split (Hamlet, Paradise Regained) "
            f"in {eval_config.seq_len}-token windows; calibration: {calib_blocks} × 512 tokens of the calib split.")
