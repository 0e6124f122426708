"""One MoE FFN layer against a dense SwiGLU FFN of equal active FLOPs: forward + backward.

    python scripts/bench_moe_layer.py                 # GPU: T=16384, d=1024, bf16; CPU: a small shape, fp32
    python scripts/bench_moe_layer.py --tokens 2048 --d-model 256 --scale 8

Columns, all measured in one run on one device: dense SwiGLU (hidden k·F), moelab top-k
(dropless, grouped matmul), Hugging Face's MixtralSparseMoeBlock (if `transformers` is
installed), moelab expert choice and Soft MoE at the same active FLOPs (k·T expert rows).
Reported as milliseconds and as dense_ms / layer_ms (1.0 = as fast as dense).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from moelab.moe import ExpertChoiceRouter, GroupedExperts, MoELayer, SoftMoERouter, TopKRouter
from moelab.moe.experts import DenseFFN

# (experts, k, expert hidden F) from the issue: Mixtral-like, fine-grained, very fine-grained.
CONFIGS = [(8, 2, 2816), (64, 2, 1024), (64, 8, 384)]


def hf_mixtral(d_model: int, hidden: int, experts: int, k: int):
    try:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=d_model, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=k)
    return MixtralSparseMoeBlock(config)


def timed(fn, x, steps: int, device: torch.device, dtype: torch.dtype) -> float:
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    parser.add_argument("--d-model", type=int, default=1024 if cuda else 256)
    parser.add_argument("--seq-len", type=int, default=1024 if cuda else 256, help="tokens per sequence (Soft MoE)")
    parser.add_argument("--scale", type=int, default=1 if cuda else 8, help="divide every F by this (small CPU runs)")
    parser.add_argument("--steps", type=int, default=20 if cuda else 5)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, {dtype}, T={args.tokens}, d={args.d_model}, fwd+bwd, median of {args.steps}")
    print("| E | k | F | dense ms | moelab ms | dense/moelab | HF Mixtral ms | dense/HF | expert choice ms | dense/EC | soft ms | dense/soft |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sequences = args.tokens // args.seq_len
    for experts, k, hidden in CONFIGS:
        hidden //= args.scale
        torch.manual_seed(0)
        x = torch.randn(sequences, args.seq_len, args.d_model, device=device, requires_grad=True)
        swiglu = partial(GroupedExperts, num_experts=experts, activation="swiglu")
        layers = {
            "dense": DenseFFN(args.d_model, k * hidden, "swiglu"),
            "moelab": MoELayer(args.d_model, hidden, partial(TopKRouter, k=k), swiglu),
            "ec": MoELayer(args.d_model, hidden, partial(ExpertChoiceRouter, capacity_factor=float(k)), swiglu),
            "soft": MoELayer(args.d_model, hidden, partial(SoftMoERouter, slots_per_expert=max(1, k * args.seq_len // experts)), swiglu),
        }
        ms = {key: timed(layer.to(device), x, args.steps, device, dtype) for key, layer in layers.items()}
        hf = hf_mixtral(args.d_model, hidden, experts, k)
        ms["hf"] = timed(hf.to(device), x, args.steps, device, dtype) if hf else float("nan")
        ratio = lambda key: ms["dense"] / ms[key]  # noqa: E731
        print(
            f"| {experts} | {k} | {hidden} | {ms['dense']:.2f} | {ms['moelab']:.2f} | {ratio('moelab'):.2f} | "
            f"{ms['hf']:.2f} | {ratio('hf'):.2f} | {ms['ec']:.2f} | {ratio('ec'):.2f} | {ms['soft']:.2f} | {ratio('soft'):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
