"""End-to-end training throughput and MFU of the MoE LM and its dense twin, against a plain
PyTorch loop over the same model, in one run.

    python scripts/bench_train.py                               # experiment=lm_small_gpu on a GPU
    python scripts/bench_train.py --experiment lm_pystdlib --steps 20 --peak-tflops 0   # CPU smoke run

For the MoE model and for `model.moe_every=0` (same active FLOPs), three columns, each the
steps after `--warmup` timed as one stretch (a device sync at each end only):
- plain: the same model, data, fused AdamW, schedule, clipping and precision in a Python
  loop, the whole model compiled when the experiment compiles (moelab.bench.training);
- bare: `trainer.fit` with `callbacks=none logger=csv`;
- user's run: `trainer.fit` with the default callbacks and TensorBoard logger, as a user
  runs it (checkpoints, expert views, collapse alarm, progress bar).
Tokens/s and MFU over active FLOPs: 6 · N_active + 6 · layers · seq_len · d_model per token
(PaLM's formula, causal attention; moelab.tasks.throughput), N_active the non-embedding
parameters a token uses. Peak FLOP/s: `--peak-tflops`, or moelab.tasks.throughput's table of
dense bf16 peaks (H100/H200 989), or none (no MFU).

    --scatter              every routing plan on the generic index + scatter-add path (A/B
                           against row gathers, the GPU default; the CPU default is this path)
    --profile              prints the MoE user's run's top kernels over 3 batches after the warm-up
    --compile              compiles each transformer block (task.compile=blocks), or
    --compile-model        the whole model (task.compile=model)
    --compare-compile      eager vs compiled-per-block step time of the MoE model and its dense
                           twin, for each experiment of --experiment (e.g. vit_digits,lm_pystdlib)
    --random-tokens DIR    trains on uniformly random token ids written to DIR (data=tokens), for
                           a machine without the dataset: throughput only, the loss means nothing
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Callback

from moelab.bench.training import compose_run, fit_timing, plain_loop_timing
from moelab.models.build import build_model
from moelab.moe import routing
from moelab.tasks.throughput import peak_flops, training_flops_per_token

BARE = ["callbacks=none", "logger=csv"]


class Profile(Callback):
    """Profiles 3 training batches after `warmup` and prints the top kernels."""

    def __init__(self, warmup: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=3, repeat=1))
        self.profiler.start()
        self.warmup = warmup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if batch_idx == self.warmup + 4:
            self.profiler.stop()
            sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(f"profile: 3 training batches after {self.warmup + 1}, by {sort_by}")
            print(self.profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70))
            self.profiler = None


def write_random_tokens(out: Path, vocab_size: int, tokens: int) -> None:
    """{train,val,test}.bin of uniform random ids below `vocab_size` (uint16 or uint32) and meta.json."""
    import json

    import numpy as np

    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 10), ("test", tokens // 10)):
        rng.integers(0, vocab_size, n, dtype=np.int64).astype(dtype).tofile(out / f"{split}.bin")
    (out / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype, "bytes_per_token": None}))


def flops_per_token(cfg) -> float:
    model = build_model(cfg)
    return training_flops_per_token(model, cfg.model.depth, cfg.model.d_model, cfg.data.seq_len, causal=True)


def compare_compile(experiments: list[str], steps: int, warmup: int, overrides: list[str], out: Path) -> None:
    """Eager vs compiled-per-block step time of each experiment's MoE model and dense twin."""
    print("| experiment | model | eager ms/step | compiled ms/step | compiled speed / eager |")
    print("|---|---|---|---|---|")
    for experiment in experiments:
        for name, extra in (("MoE", []), ("dense twin", ["model.moe_every=0"])):
            base = [f"experiment={experiment}", *BARE, *overrides, *extra]
            eager = fit_timing(compose_run(base, out / "eager", warmup + steps), warmup, steps).ms_per_step
            compiled = fit_timing(compose_run([*base, "task.compile=blocks"], out / "compiled", warmup + steps), warmup,
                                  steps).ms_per_step
            print(f"| {experiment} | {name} | {eager:.1f} | {compiled:.1f} | {eager / compiled:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="lm_small_gpu", help="one, or several joined by commas (--compare-compile)")
    parser.add_argument("--compare-compile", action="store_true",
                        help="eager vs compiled step time, MoE and dense twin, of each --experiment")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--compile-model", action="store_true", help="torch.compile the whole model")
    parser.add_argument("--scatter", action="store_true", help="every plan on the generic scatter-add path (A/B)")
    parser.add_argument("--profile", action="store_true", help="print the MoE run's top kernels over 3 batches")
    parser.add_argument("--random-tokens", type=Path, default=None, help="train on random token ids written here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. trainer.precision=bf16-mixed)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops
    if peak is None:  # moelab.tasks.throughput's table of dense bf16 peaks; none on the CPU
        peak = (peak_flops(torch.device("cuda")) or 0.0) / 1e12 if torch.cuda.is_available() else 0.0
    overrides = list(args.overrides)
    if args.random_tokens is not None:
        if not (args.random_tokens / "meta.json").exists():
            write_random_tokens(args.random_tokens, 50304, 4_000_000)
        overrides = ["data=tokens", f"data.path={args.random_tokens.resolve()}", *overrides]
    if args.compile or args.compile_model:
        overrides.append(f"task.compile={'model' if args.compile_model else 'blocks'}")
    if args.scatter:
        routing.GATHER_ROWS = False
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.compare_compile:
        print(f"device: {device}, torch {torch.__version__}, eager vs compiled per block, {args.steps} timed steps "
              f"after {args.warmup} (the compile happens in the warm-up)")
        compare_compile(args.experiment.split(","), args.steps, args.warmup, overrides, out)
        return
    mode = (overrides[-1] if args.compile or args.compile_model else "eager") + (", scatter path" if args.scatter else "")
    print(f"device: {device}, torch {torch.__version__}, experiment={args.experiment}, {mode}, {args.steps} timed steps")
    print("| model | plain loop tokens/s (MFU) | bare tokens/s (MFU) | user's run tokens/s (MFU) | user's / plain | "
          "user's / bare |")
    print("|---|---|---|---|---|---|")
    total = args.warmup + args.steps
    rows = {}
    for name, extra in (("MoE", []), ("dense", ["model.moe_every=0"])):
        base = [f"experiment={args.experiment}", *overrides, *extra]
        user_cfg = compose_run(base, out / f"{name}_user", total)
        per_token = flops_per_token(user_cfg)
        plain = plain_loop_timing(compose_run(base, out / f"{name}_plain", total), args.warmup, args.steps)
        bare = fit_timing(compose_run([*base, *BARE], out / f"{name}_bare", total), args.warmup, args.steps)
        profile = [Profile(args.warmup)] if args.profile and name == "MoE" else []
        user = fit_timing(user_cfg, args.warmup, args.steps, profile)
        cells = [f"{t.items_per_s:,.0f} ({t.items_per_s * per_token / (peak * 1e12):.1%})" if peak else
                 f"{t.items_per_s:,.0f}" for t in (plain, bare, user)]
        print(f"| {name} | {' | '.join(cells)} | {user.items_per_s / plain.items_per_s:.2f} | "
              f"{user.items_per_s / bare.items_per_s:.2f} |", flush=True)
        rows[name] = user
    print(f"\nMoE / dense tokens/s, user's runs: {rows['MoE'].items_per_s / rows['dense'].items_per_s:.2f}")


if __name__ == "__main__":
    main()
