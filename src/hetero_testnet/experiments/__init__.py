"""Experiment files (`spec`), the resumable runner (`runner`), and the report: one run's results
(`run_result`), their grouping and comparisons (`report`, `stats`), and the markdown, CSV/JSON and plots
(`render`, `conclusions`, `export`, `plots`, `format`). Reads runs only through `events` and `rundir`.
"""
