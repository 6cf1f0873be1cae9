"""A static results site built from the run records: the paper tables beside the paper's numbers, the studies'
verdicts, the figures, the benchmarks, one page per record group and one per run with its curves (``python -m
lilyexp.site``; ``make site``). No server, account or network: it opens from disk in any browser."""
