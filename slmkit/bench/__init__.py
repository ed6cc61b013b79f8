"""Benchmark reporting: the environment a result was measured in, and result files (JSON + Markdown)."""

from slmkit.bench.results import environment, result_files, script_parser, write_results

__all__ = ["environment", "result_files", "script_parser", "write_results"]
