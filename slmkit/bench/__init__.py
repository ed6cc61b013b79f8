"""Benchmark reporting: the environment a result was measured in, and result files (JSON + Markdown)."""

from slmkit.bench.results import (environment, finish, markdown_header, markdown_table, result_files, script_parser,
                                  write_results)

__all__ = ["environment", "finish", "markdown_header", "markdown_table", "result_files", "script_parser",
           "write_results"]
