"""Benchmark reporting: the environment a result was measured in, and result files (JSON + Markdown)."""

from slmkit.bench.results import (MIXED_CALIBRATION, QUALITY_DOMAINS, check_same_reference, data_note, domain_cells,
                                  domain_columns, domain_evals, domains_note, environment, finish, keys_to_resume,
                                  markdown_header, markdown_runs, markdown_table, merge_rows, previous_rows,
                                  quality_inputs, reference_domain_cells, result_files, run_record, script_parser,
                                  selected_variants, write_results)

__all__ = ["MIXED_CALIBRATION", "QUALITY_DOMAINS", "check_same_reference", "data_note", "domain_cells",
           "domain_columns", "domain_evals", "domains_note", "environment", "finish", "keys_to_resume",
           "markdown_header", "markdown_runs", "markdown_table", "merge_rows", "previous_rows", "quality_inputs",
           "reference_domain_cells", "result_files", "run_record", "script_parser", "selected_variants",
           "write_results"]
