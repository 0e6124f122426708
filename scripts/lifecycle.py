"""The MoE lifecycle end to end on the bundled LM data, written up as docs/lifecycle.md.

    python scripts/lifecycle.py            # about 20 minutes on 2 CPU cores
    python scripts/lifecycle.py --quick    # every step in a few minutes, page under outputs/lifecycle_quick/

One seed, the byte-level LM on Python's stdlib (`experiment=lm_pystdlib`) at 300 steps of
32 × 128 bytes. Every step is a plain `train.py` run or `scripts/merge_experts.py` call in
its own folder under `outputs/lifecycle/`; a run whose folder holds an ok metrics.json is
kept (`--rerun` starts over). Then the page: each method's command and what it measured.

- sparse upcycling: dense for 200 steps, upcycled for 100, against dense and MoE from
  scratch for 300; and the upcycled model's loss at step 0 against the dense model's;
- distillation: a dense student of the MoE, and the share of the MoE's gain it keeps;
- merging: the MoE merged to 4, 2 and 1 experts per layer by each method;
- LoRA-MoE experts and MaskMoE against plain top-k; MaskMoE's loss on rare tokens;
- fine-tuning recipes: 100 more steps training everything, only the non-expert weights or
  only the experts.
"""

from __future__ import annotations

import argparse

from moelab.studies.lifecycle import walk_through


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps per run; page under outputs/lifecycle_quick/")
    parser.add_argument("--rerun", action="store_true", help="run every step again")
    args = parser.parse_args()
    walk_through(args.quick, args.rerun)


if __name__ == "__main__":
    main()
