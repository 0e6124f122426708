"""Which dtypes `torch._grouped_mm` (and `torch.nn.functional.grouped_mm`, where it exists)
accept on this device, and whether moelab's MoE layer runs forward + backward in fp32 and
under bf16 autocast there. One line per case: ok, or the error's first line.

    python scripts/grouped_mm_dtypes.py
"""

from __future__ import annotations

from functools import partial

import torch

from moelab.moe import GroupedExperts, MoELayer, TopKRouter


def attempt(label: str, fn) -> None:
    try:
        fn()
        print(f"{label}: ok")
    except Exception as error:  # noqa: BLE001 - the point is to report what fails
        print(f"{label}: {type(error).__name__}: {str(error).splitlines()[0]}")


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    offsets = torch.tensor([16, 48, 64], dtype=torch.int32, device=device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(64, 32, device=device, dtype=dtype)
        w = torch.randn(3, 32, 16, device=device, dtype=dtype)
        attempt(f"torch._grouped_mm {dtype}", lambda: torch._grouped_mm(x, w, offs=offsets))
        if hasattr(torch.nn.functional, "grouped_mm"):
            attempt(f"F.grouped_mm {dtype}", lambda: torch.nn.functional.grouped_mm(x, w, offs=offsets))
    layer = MoELayer(32, 16, partial(TopKRouter, k=2), partial(GroupedExperts, num_experts=4)).to(device)
    x = torch.randn(2, 8, 32, device=device)
    attempt("MoELayer fp32 forward+backward", lambda: layer(x).sum().backward())

    def autocast_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()

    attempt("MoELayer bf16 autocast forward+backward", autocast_step)


if __name__ == "__main__":
    main()
