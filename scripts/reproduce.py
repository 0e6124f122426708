"""Reproduction studies: the MoE literature's findings, re-measured with moelab on the bundled data.

    python scripts/reproduce.py                          # the default set, results in docs/results.md
    python scripts/reproduce.py --study upcycling        # a study outside the default set
    python scripts/reproduce.py --study capacity zloss   # some studies (the page keeps those already in outputs/reproduce/)
    python scripts/reproduce.py --seeds 5                # more seeds per setting
    python scripts/reproduce.py --quick                  # every study end to end in minutes (a smoke run)

Each study runs `train.py -m` multiruns (so every job is a normal moelab run, with its
metrics.json, TensorBoard events and a sweep report), then writes its section of
`docs/results.md` (figures in `docs/results/`): the paper's claim, the command, seeds and
steps, a table of mean ± std over seeds and what the numbers say. Sweeps land in
`outputs/reproduce/<study>/<sweep>/`; a study whose folders exist is not rerun unless
`--rerun`. `--quick` shortens every run and grid and writes to `outputs/reproduce_quick/`
instead, leaving docs/ alone.

The studies are defined in moelab.studies.catalogue; this script only reads its options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.studies.catalogue import STUDIES
from moelab.studies.reproduce import reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", nargs="*", choices=[s.name for s in STUDIES], help="studies to run (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default: each study's own, 3 for most)")
    parser.add_argument("--quick", action="store_true", help="tiny runs and grids, written outside docs/")
    parser.add_argument("--rerun", action="store_true", help="run studies whose sweep folders already exist")
    parser.add_argument("--out", type=Path, help="folder for the sweeps (default: outputs/reproduce[_quick])")
    args = parser.parse_args()
    reproduce(args.study, args.seeds, args.quick, args.rerun, args.out)


if __name__ == "__main__":
    main()
