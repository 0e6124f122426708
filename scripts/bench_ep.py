"""Expert parallelism on CPU: per-rank expert bytes and step time at ep = 1, 2, 4.

    python scripts/bench_ep.py [--experts 8] [--batch 64] [--steps 10]

For each ep, `ep` processes (gloo, dp=1) train the default ViT-MoE on the same global
batch of digits (each rank a 1/ep slice). Reports expert weight bytes held per rank at
rest and the median step time (forward + backward + AdamW). Timings on a 2-core machine
with more processes than cores mostly measure contention; the bytes are exact.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from hydra import compose, initialize_config_dir

    from moelab.data.digits import DigitsDataModule
    from moelab.models.build import build_model
    from moelab.moe import collect_aux_losses
    from moelab.parallel.fsdp_ep import build_mesh, expert_parameter_bytes, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experts={args.experts}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    unsharded_bytes = expert_parameter_bytes(model)
    parallelize(model, build_mesh("cpu", world, world))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = DigitsDataModule(batch_size=args.batch)
    data.setup()
    images, labels = data.splits["train"].tensors[0][: args.batch], data.splits["train"].tensors[1][: args.batch]
    images, labels = images.chunk(world)[rank], labels.chunk(world)[rank]
    times = []
    for step in range(args.steps + 3):
        dist.barrier()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels) + collect_aux_losses(model)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dist.barrier()
        if step >= 3:
            times.append(time.perf_counter() - start)
    if rank == 0:
        torch.save({"bytes": expert_parameter_bytes(model), "unsharded": unsharded_bytes, "step_ms": 1000 * statistics.median(times)}, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"| ep | processes | expert bytes per rank | vs ep=1 | median step ms (global batch {args.batch}) |")
    print("|---|---|---|---|---|")
    base = None
    for ep in args.ep:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = f"/tmp/bench_ep_{ep}.pt"
        mp.start_processes(worker, args=(ep, port, args, out), nprocs=ep, start_method="spawn")
        result = torch.load(out)
        base = base or result["bytes"]
        print(f"| {ep} | {ep} | {result['bytes']:,} | {result['bytes'] / base:.2f} | {result['step_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
