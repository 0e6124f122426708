"""`python -m moelab.report <sweep folder>`: the short name of moelab.sweeps.report, which writes
a sweep's report.md and figures (run it with --help for the options)."""

from moelab.sweeps.report import main, write_report

__all__ = ["main", "write_report"]

if __name__ == "__main__":
    raise SystemExit(main())
