"""End-to-end training throughput and MFU of the MoE LM and its dense twin, in one run.

    python scripts/bench_train.py                               # experiment=lm_small_gpu on a GPU
    python scripts/bench_train.py --experiment lm_pystdlib --steps 20 --peak-tflops 0   # CPU smoke run

Builds the experiment through moelab.run.build.build (Lightning, the real task and data),
trains `--steps` steps for the MoE model and for `model.moe_every=0` (same active FLOPs),
and reports tokens/s over the steps after `--warmup`, and MFU over active FLOPs:
6 · N_active + 6 · layers · seq_len · d_model per token (PaLM's formula, attention
included), N_active = non-embedding parameters a token uses (each MoE layer: router,
shared experts and k/E of the routed experts; the output head counted). Peak FLOP/s:
`--peak-tflops`, or moelab.tasks.throughput's table of dense bf16 peaks (H100/H200 989), or
none (no MFU).

    --scatter              every routing plan on the generic index + scatter-add path (A/B
                           against row gathers, the GPU default; the CPU default is this path)
    --profile              prints the MoE run's top kernels over 3 batches after the warm-up
    --compile              compiles each transformer block (torch.compile per block, as torchtitan does)
    --compare-compile      eager vs compiled step time of the MoE model and its dense twin, for
                           each experiment of --experiment (e.g. vit_digits,lm_pystdlib)
    --random-tokens DIR    trains on uniformly random token ids written to DIR (data=tokens), for
                           a machine without the dataset: throughput only, the loss means nothing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from omegaconf import open_dict

from moelab.moe import routing
from moelab.tasks.throughput import active_non_embedding_parameters, peak_flops
from moelab.run.build import build

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Times each training batch after `warmup`; with `profile`, profiles 3 batches after
    the warm-up and prints the top kernels."""

    def __init__(self, warmup: int, profile: bool = False) -> None:
        self.warmup, self.times, self.tokens = warmup, [], 0
        self.profiler = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch_profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=3, repeat=1))
            self.profiler.start()

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.tokens += batch[0].numel()
        if self.profiler is not None:
            self.profiler.step()
            if batch_idx == self.warmup + 4:
                self.report()

    def report(self) -> None:
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


def measure(experiment: str, steps: int, warmup: int, extra: list[str], compile_blocks: bool = False,
            profile: bool = False) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", "callbacks=none", "logger=csv", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "outputs" / "bench_train")
        cfg.trainer.max_steps, cfg.trainer.max_epochs = steps + warmup, -1
        cfg.trainer.limit_val_batches, cfg.trainer.num_sanity_val_steps = 0, 0
        cfg.trainer.enable_checkpointing, cfg.trainer.enable_progress_bar = False, False
        cfg.task.compile = compile_blocks  # task.compile: each block compiled when the model is configured
    datamodule, task, trainer = build(cfg)
    timer = StepTimer(warmup, profile)
    trainer.callbacks.append(timer)
    trainer.fit(task, datamodule=datamodule)
    step_ms = 1000 * sum(timer.times) / len(timer.times)
    seq_len = cfg.data.get("seq_len")
    if seq_len is None:  # not a language model: step time only
        return {"step_ms": step_ms}
    active = active_non_embedding_parameters(task.model)
    flops_per_token = 6 * active + 6 * cfg.model.depth * seq_len * cfg.model.d_model
    tokens_per_s = timer.tokens / sum(timer.times)
    return {"tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * flops_per_token, "active": active,
            "step_ms": step_ms}


def compare_compile(experiments: list[str], steps: int, warmup: int, overrides: list[str]) -> None:
    """Eager vs compiled-per-block step time of each experiment's MoE model and dense twin."""
    print("| experiment | model | eager ms/step | compiled ms/step | compiled speed / eager |")
    print("|---|---|---|---|---|")
    for experiment in experiments:
        for name, extra in (("MoE", []), ("dense twin", ["model.moe_every=0"])):
            eager = measure(experiment, steps, warmup, [*overrides, *extra])
            compiled = measure(experiment, steps, warmup, [*overrides, *extra], compile_blocks=True)
            print(f"| {experiment} | {name} | {eager['step_ms']:.1f} | {compiled['step_ms']:.1f} | "
                  f"{eager['step_ms'] / compiled['step_ms']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="lm_small_gpu", help="one, or several joined by commas (--compare-compile)")
    parser.add_argument("--compare-compile", action="store_true",
                        help="eager vs compiled step time, MoE and dense twin, of each --experiment")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--scatter", action="store_true", help="every plan on the generic scatter-add path (A/B)")
    parser.add_argument("--profile", action="store_true", help="print the MoE run's top kernels over 3 batches")
    parser.add_argument("--random-tokens", type=Path, default=None, help="train on random token ids written here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (e.g. trainer.precision=bf16-mixed)")
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
    if args.scatter:
        routing.GATHER_ROWS = False
    if args.compare_compile:
        print(f"device: {device}, torch {torch.__version__}, eager vs compiled per block, {args.steps} timed steps "
              f"after {args.warmup} (the compile happens in the warm-up)")
        compare_compile(args.experiment.split(","), args.steps, args.warmup, overrides)
        return
    mode = ("compiled per block" if args.compile else "eager") + (", scatter path" if args.scatter else "")
    print(f"device: {device}, torch {torch.__version__}, experiment={args.experiment}, {mode}, {args.steps} timed steps")
    print("| model | active params | tokens/s | TFLOP/s | MFU | vs dense tokens/s |")
    print("|---|---|---|---|---|---|")
    moe = measure(args.experiment, args.steps, args.warmup, overrides, args.compile, args.profile)
    dense = measure(args.experiment, args.steps, args.warmup, [*overrides, "model.moe_every=0"], args.compile)
    for name, r in (("MoE", moe), ("dense", dense)):
        mfu = f"{r['flops_per_s'] / (peak * 1e12):.1%}" if peak else "—"
        print(f"| {name} | {r['active'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.3f} | {mfu} | "
              f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
