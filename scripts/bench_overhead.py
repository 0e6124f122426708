"""moelab's per-step overhead: `trainer.fit` against a plain PyTorch loop over the same module.

    OMP_NUM_THREADS=1 python scripts/bench_overhead.py
    python scripts/bench_overhead.py --steps 300 --rounds 5

Two tiny models, where a step is short and the loop around it shows: the byte-level LM
(`experiment=lm_pystdlib`, d_model 32, 4 blocks, 2 heads, 16 bytes × 2 sequences) and the
default ViT at width 32. Each is timed, in turns, as
- plain: forward, cross-entropy + auxiliary losses, backward, clipping, the same (fused)
  AdamW and schedule, in a Python loop (moelab.bench.training.plain_loop_step_ms);
- moelab: `trainer.fit` with the default callbacks and TensorBoard logger, logging every
  1000 steps (so the column is the cost of a step between logging steps);
- moelab, logging every 10 steps: the default, logging steps included.
Each cell is the median over `--rounds` rounds of the mean ms per step over `--steps` steps
(after `--warmup`); the rounds take turns, so a shared machine's drift hits every column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from moelab.bench.training import compose_run, fit_step_ms, plain_loop_step_ms

MODELS = {
    "LM": ["experiment=lm_pystdlib", "model.d_model=32", "model.depth=4", "model.num_heads=2", "data.seq_len=16",
           "data.batch_size=2", "data.max_bytes=2000000"],
    "ViT": ["model.embed_dim=32", "model.num_heads=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device: CPU, {args.threads} thread(s), torch {torch.__version__}; ms per step, median of {args.rounds} "
          f"rounds of {args.steps} steps (after {args.warmup})")
    print("| model | plain loop | moelab, logging every 1000 | ratio | moelab, logging every 10 (default) | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in MODELS.items():
            columns = {"plain": [], "quiet": [], "default": []}
            for round_ in range(args.rounds):
                total = args.warmup + args.steps
                quiet = compose_run([*overrides, "trainer.log_every_n_steps=1000"], Path(out) / f"{name}{round_}q", total)
                default = compose_run([*overrides, "trainer.log_every_n_steps=10"], Path(out) / f"{name}{round_}d", total)
                columns["plain"].append(plain_loop_step_ms(quiet, args.warmup, args.steps))
                columns["quiet"].append(fit_step_ms(quiet, args.warmup, args.steps))
                columns["default"].append(fit_step_ms(default, args.warmup, args.steps))
            ms = {key: statistics.median(values) for key, values in columns.items()}
            print(f"| {name} | {ms['plain']:.2f} | {ms['quiet']:.2f} | {ms['quiet'] / ms['plain']:.2f} | "
                  f"{ms['default']:.2f} | {ms['default'] / ms['plain']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
