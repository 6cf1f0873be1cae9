"""Paper tables (Markdown, LaTeX, CSV) from run records, beside the paper's numbers (``python -m lilyexp.tables``)."""
