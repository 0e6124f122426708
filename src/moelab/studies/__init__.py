"""The reproduction studies (docs/results.md) and the lifecycle walk-through (docs/lifecycle.md),
importable: scripts/reproduce.py and scripts/lifecycle.py call them. They run `train.py`
jobs in this source checkout and write its docs/ pages."""
