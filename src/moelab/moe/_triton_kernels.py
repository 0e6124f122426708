"""The Triton source of moelab.moe.kernels (imported only when the kernel is first used, so
that importing moelab needs no Triton; Triton's interpreter patches `tl` in this module's
globals, so the kernel lives at module level)."""

import triton
import triton.language as tl


@triton.jit
def gather_gate_up(
    x_ptr, token_ptr, w1_ptr, w3_ptr, h1_ptr, h3_ptr, a_ptr,
    tile_expert_ptr, tile_start_ptr, group_end_ptr,
    D, F,
    stride_xt, stride_xd, stride_we, stride_wd, stride_wf, stride_hn, stride_hf,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # past the last tile of the last expert
        return
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(group_end_ptr + expert)
    tokens = tl.load(token_ptr + rows, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_offsets = expert.to(tl.int64) * stride_we + cols[None, :] * stride_wf
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_xt + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w1 = tl.load(w1_ptr + w_offsets + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptr + w_offsets + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
        acc1 = tl.dot(x, w1, acc1)
        acc3 = tl.dot(x, w3, acc3)
    if ACTIVATION == 0:
        act = acc1 * tl.sigmoid(acc1)
    else:
        act = 0.5 * acc1 * (1.0 + tl.math.erf(acc1 * 0.7071067811865476))
    out = rows[:, None].to(tl.int64) * stride_hn + cols[None, :] * stride_hf
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h1_ptr + out, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
    tl.store(h3_ptr + out, acc3.to(h3_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + out, (act * acc3).to(a_ptr.dtype.element_ty), mask=mask)
