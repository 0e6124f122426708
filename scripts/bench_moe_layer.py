"""One MoE FFN layer against a dense SwiGLU FFN of equal active FLOPs: forward + backward.

    python scripts/bench_moe_layer.py                 # GPU: T=16384, d=1024, bf16; CPU: a small shape, fp32
    python scripts/bench_moe_layer.py --tokens 2048 --d-model 256 --scale 8

Columns, all measured in one run on one device: dense SwiGLU (hidden k·F); moelab top-k
(dropless, grouped matmul, the device's default path: row gathers on GPUs, index +
scatter-add on the CPU); the same layer forced onto row gathers, then onto the generic
index + scatter-add path (`moelab.moe.routing.GATHER_ROWS = True / False`); the
same with parameters in the compute dtype (as HF's column has them; the other moelab
columns keep fp32 parameters under autocast, as mixed-precision training does); Hugging
Face's MixtralSparseMoeBlock (if `transformers` is installed); the 30-line reference layer
(moelab.bench.reference: sort, three `_grouped_mm`, `index_add_`); on a GPU, moelab with the
Triton kernel of the experts' first half (`expert.kernel=triton`); moelab expert choice and
Soft MoE at the same active FLOPs (k·T expert rows). Each cell: milliseconds, and
dense_ms / layer_ms in brackets (1.0 = as fast as dense). Gradients are cleared before
every step, as `zero_grad(set_to_none=True)` does. The columns take turns step by step
(median of `--steps` turns), so a shared machine's changing speed hits them alike.

    --compile   adds columns: the moelab top-k layer under torch.compile, gather and scatter paths
    --profile   then profiles the moelab top-k layer on the shape with the lowest dense/moelab
                ratio (torch.profiler) and prints its top kernels by device time
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from moelab.bench.reference import ReferenceMoE
from moelab.bench.timing import CompileFailed, on_path, step_timer, timed, timed_side_by_side, try_compile
from moelab.moe import ExpertChoiceRouter, GroupedExperts, MoELayer, SoftMoERouter, TopKRouter
from moelab.moe.experts import DenseFFN

# (experts, k, expert hidden F) from the issue: Mixtral-like, fine-grained, very fine-grained.
CONFIGS = [(8, 2, 2816), (64, 2, 1024), (64, 8, 384)]


def hf_mixtral(d_model: int, hidden: int, experts: int, k: int, implementation: str):
    try:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=d_model, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=k)
    # transformers >= 5 dispatches the experts by this; a standalone block built from a bare
    # config gets None, which is its per-expert Python loop ("eager").
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    parser.add_argument("--d-model", type=int, default=1024 if cuda else 256)
    parser.add_argument("--seq-len", type=int, default=1024 if cuda else 256, help="tokens per sequence (Soft MoE)")
    parser.add_argument("--scale", type=int, default=1 if cuda else 8, help="divide every F by this (small CPU runs)")
    parser.add_argument("--steps", type=int, default=20 if cuda else 5)
    parser.add_argument("--hf-experts", default="grouped_mm", help="HF's experts implementation: grouped_mm, eager, ...")
    parser.add_argument("--compile", action="store_true", help="add columns: moelab top-k under torch.compile")
    parser.add_argument("--profile", action="store_true", help="profile the worst shape's moelab layer")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, {dtype}, T={args.tokens}, d={args.d_model}, fwd+bwd, "
          f"median of {args.steps}, HF experts={args.hf_experts}")
    labels = {"dense": "dense", "moelab": "moelab", "gather": "moelab gather path", "scatter": "moelab scatter path", "weights": f"moelab {str(dtype)[6:]} weights",
              "hf": "HF Mixtral", "ref": "30-line reference", "ec": "expert choice", "soft": "soft"}
    if cuda:
        labels["triton"] = "moelab triton kernel"
    if args.compile:
        labels |= {"compiled": "moelab compiled", "compiled_scatter": "compiled scatter path"}
    print("| E | k | F | dense ms | " + " | ".join(f"{labels[key]} ms (dense/it)" for key in list(labels)[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(labels) - 1))
    sequences = args.tokens // args.seq_len
    worst = None
    for experts, k, hidden in CONFIGS:
        hidden //= args.scale
        torch.manual_seed(0)
        x = torch.randn(sequences, args.seq_len, args.d_model, device=device, requires_grad=True)
        swiglu = partial(GroupedExperts, num_experts=experts, activation="swiglu")
        topk = MoELayer(args.d_model, hidden, partial(TopKRouter, k=k), swiglu).to(device)
        runs = {
            "dense": DenseFFN(args.d_model, k * hidden, "swiglu").to(device),
            "moelab": topk,
            "gather": on_path(topk, True),
            "scatter": on_path(topk, False),
            # parameters in the compute dtype, as HF's column has them: no per-step weight cast
            "weights": MoELayer(args.d_model, hidden, partial(TopKRouter, k=k), swiglu).to(device, dtype),
            # HF's grouped_mm path casts its input to the weights' dtype (it ignores autocast),
            # so it gets bf16 parameters; the other moelab columns keep fp32 master weights.
            "hf": hf_mixtral(args.d_model, hidden, experts, k, args.hf_experts),
            "ref": ReferenceMoE(args.d_model, hidden, experts, k).to(device),
            "ec": MoELayer(args.d_model, hidden, partial(ExpertChoiceRouter, capacity_factor=float(k)), swiglu).to(device),
            "soft": MoELayer(args.d_model, hidden, partial(SoftMoERouter, slots_per_expert=max(1, k * args.seq_len // experts)),
                             swiglu).to(device),
        }
        if cuda:  # gather + gate/up + SwiGLU in one Triton kernel (expert.kernel=triton)
            runs["triton"] = MoELayer(args.d_model, hidden, partial(TopKRouter, k=k), partial(swiglu, kernel="triton")).to(device)
        if args.compile:
            runs["compiled"] = try_compile(topk)
            runs["compiled_scatter"] = on_path(try_compile(topk), False)
        timers = {}
        ms = {key: float("nan") for key in runs}
        for key, run in runs.items():
            if run is None:
                continue
            if key == "hf":
                run = run.to(device, dtype)
            timer = step_timer(run, x, device, dtype, params=topk if key in ("gather", "scatter", "compiled", "compiled_scatter") else None)
            try:
                timer()  # a compile failure shows here, before the timed rounds
            except CompileFailed as error:
                print(f"{labels[key]}: torch.compile failed: {error}", flush=True)
                continue
            timers[key] = timer
        ms |= timed_side_by_side(timers, args.steps)
        cells = " | ".join(f"{ms[key]:.2f} ({ms['dense'] / ms[key]:.2f})" for key in list(labels)[1:])
        print(f"| {experts} | {k} | {hidden} | {ms['dense']:.2f} | {cells} |", flush=True)
        if worst is None or ms["dense"] / ms["moelab"] < worst[0]:
            worst = (ms["dense"] / ms["moelab"], experts, k, hidden, topk, x)
    if args.profile:
        profile(*worst[1:], device, dtype)


def profile(experts: int, k: int, hidden: int, layer: torch.nn.Module, x: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> None:
    """Top kernels (by device time, or CPU time on CPU) of 5 forward + backward steps of `layer`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timed(layer, x, 1, device, dtype)
    with torch_profile(activities=activities) as prof:
        timed(layer, x, 5, device, dtype)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: moelab top-k, E={experts} k={k} F={hidden}, 8 forward + backward steps (3 warm-up), by {sort_by}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
