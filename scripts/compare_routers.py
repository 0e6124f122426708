"""Validation accuracy of every router on the bundled digits at equal steps, as a Markdown table.

    python scripts/compare_routers.py [extra overrides ...]

Runs `train.py` once per router config (same seed, data, model and steps) and reads each
run's metrics.json. Extra arguments are passed to every run (e.g. trainer.max_epochs=10).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> None:
    routers = sorted(p.stem for p in (ROOT / "conf" / "router").glob("*.yaml"))
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    rows = []
    for router in routers:
        run_dir = ROOT / "outputs" / "compare_routers" / stamp / router
        args = [sys.executable, "train.py", f"router={router}", f"hydra.run.dir={run_dir}", *overrides]
        start = time.perf_counter()
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            rows.append((router, "failed: " + result.stderr.strip().splitlines()[-1], "", "", f"{seconds:.0f}"))
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append(
            (
                router,
                f"{metrics['val/acc']:.4f}",
                f"{metrics['test/acc']:.4f}",
                f"{metrics['val/loss']:.4f}",
                f"{seconds:.0f}",
            )
        )
        print(f"{router}: {rows[-1][1:]}", file=sys.stderr, flush=True)
    print("| router | val/acc | test/acc | val/loss | wall s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
