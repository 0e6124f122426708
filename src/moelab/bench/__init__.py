"""What the benchmarks in scripts/ share (timing.py); the benchmarks themselves are the scripts."""
