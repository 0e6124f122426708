"""Hydra multiruns read back: the jobs of a sweep folder (jobs.py), the summary table written
when a multirun ends (summary.py) and the report with seeds grouped and figures (report.py,
also `python -m moelab.report`)."""
