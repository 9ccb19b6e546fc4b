"""Kernel 1 of the BFT loss: the three logit tiles of a row chunk, accumulated and stored in fp32.

For a chunk of C rows, ``S = h_s W_sᵀ``, ``A = h_a W_aᵀ``, ``B = h_b W_bᵀ`` ([C, V] each). One program computes the
[BM, BN] tile of all three, so each (row block, vocab block) is visited once for the three models. Inputs may be
bf16/fp16/fp32; ``tl.dot`` accumulates in fp32 and the tiles are stored in fp32 — logits are never rounded to
the input dtype before the softmaxes and differences of kernel 2 (:mod:`bft.kernels.bft_rows`).

Under ``TRITON_INTERPRET=1`` (CPU tensors) the 16-bit tiles are upcast to fp32 before ``tl.dot``: the interpreter
of Triton 3.9 returns garbage for bf16 dots, and the upcast is exact (the products and the fp32 accumulation are
the same as on the GPU's tensor cores up to summation order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _one_tile(
    h_ptr,
    w_ptr,
    stride_h,
    stride_w,
    rows,
    cols,
    n_rows,
    V,
    H,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + ks[None, :], mask=(rows[:, None] < n_rows) & (ks[None, :] < H), other=0.0
        )
        w = tl.load(
            w_ptr + cols[None, :] * stride_w + ks[:, None], mask=(cols[None, :] < V) & (ks[:, None] < H), other=0.0
        )
        if UPCAST:  # exact: bf16/fp16 -> fp32 loses nothing, and the dot accumulates in fp32 either way
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision="ieee")
    return acc


@triton.jit
def _bft_logits_kernel(
    sh_ptr,
    sw_ptr,
    ah_ptr,
    aw_ptr,
    bh_ptr,
    bw_ptr,
    s_out,
    a_out,
    b_out,
    stride_sh,
    stride_sw,
    stride_ah,
    stride_aw,
    stride_bh,
    stride_bw,
    stride_out,
    n_rows,
    V,
    H_s,
    H_a,
    H_b,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    out_off = rows[:, None] * stride_out + cols[None, :]
    out_mask = (rows[:, None] < n_rows) & (cols[None, :] < V)
    s = _one_tile(sh_ptr, sw_ptr, stride_sh, stride_sw, rows, cols, n_rows, V, H_s, BM, BN, BK, UPCAST)
    tl.store(s_out + out_off, s, mask=out_mask)
    a = _one_tile(ah_ptr, aw_ptr, stride_ah, stride_aw, rows, cols, n_rows, V, H_a, BM, BN, BK, UPCAST)
    tl.store(a_out + out_off, a, mask=out_mask)
    b = _one_tile(bh_ptr, bw_ptr, stride_bh, stride_bw, rows, cols, n_rows, V, H_b, BM, BN, BK, UPCAST)
    tl.store(b_out + out_off, b, mask=out_mask)


def _tile_sizes(device: torch.device, H: int):
    if device.type == "cuda":
        return 64, 128, 64, {"num_warps": 8, "num_stages": 3}
    # Interpreter (CPU): few, large programs — each program costs Python overhead, not FLOPs.
    return 64, 256, min(256, triton.next_power_of_2(max(16, H))), {}


def three_logits_triton(sh, sw, ah, aw, bh, bw, s_out, a_out, b_out) -> None:
    """Fill fp32 ``s_out, a_out, b_out`` ([n, V], row stride V) with the student, aligned and base logits."""
    n, V = sh.shape[0], sw.shape[0]
    for x in (sh, sw, ah, aw, bh, bw):
        if x.stride(-1) != 1:
            raise ValueError("bft kernels need row-major (last-dim contiguous) hidden states and weights")
    BM, BN, BK, opts = _tile_sizes(sh.device, max(sh.shape[1], ah.shape[1], bh.shape[1]))
    grid = (triton.cdiv(n, BM), triton.cdiv(V, BN))
    _bft_logits_kernel[grid](
        sh,
        sw,
        ah,
        aw,
        bh,
        bw,
        s_out,
        a_out,
        b_out,
        sh.stride(0),
        sw.stride(0),
        ah.stride(0),
        aw.stride(0),
        bh.stride(0),
        bw.stride(0),
        s_out.stride(0),
        n,
        V,
        sh.shape[1],
        ah.shape[1],
        bh.shape[1],
        BM=BM,
        BN=BN,
        BK=BK,
        UPCAST=sh.device.type != "cuda",
        **opts,
    )


_CUBLAS_FP32_OUT = {"ok": None}


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> bool:
    """``out (+)= a @ b`` with fp32 output from 16-bit inputs through cuBLAS, if this PyTorch has ``mm.dtype``.

    Returns False (doing nothing) where that is unavailable, so the caller can use its own path.
    """
    if a.device.type != "cuda" or a.dtype not in (torch.bfloat16, torch.float16) or _CUBLAS_FP32_OUT["ok"] is False:
        return False
    try:
        if accumulate:
            torch.ops.aten.addmm.dtype_out(out, a, b, torch.float32, out=out)
        else:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    except (RuntimeError, AttributeError, NotImplementedError):
        _CUBLAS_FP32_OUT["ok"] = False
        return False
    _CUBLAS_FP32_OUT["ok"] = True
    return True


def three_logits(sh, sw, ah, aw, bh, bw, s_out, a_out, b_out, gemm: str = "auto") -> None:
    """The three fp32 logit blocks; ``gemm="auto"`` uses cuBLAS with fp32 output on CUDA when available
    (faster than a Triton GEMM), else the Triton kernel above. ``"triton"`` forces the kernel."""
    if gemm not in ("auto", "triton", "cublas"):
        raise ValueError(f"gemm must be 'auto', 'triton' or 'cublas', got {gemm!r}")
    if gemm != "triton" and sh.device.type == "cuda":
        if sh.dtype == torch.float32:
            torch.mm(sh, sw.T, out=s_out)
            torch.mm(ah, aw.T, out=a_out)
            torch.mm(bh, bw.T, out=b_out)
            return
        if mm_fp32_out(sh, sw.T, s_out):
            mm_fp32_out(ah, aw.T, a_out)
            mm_fp32_out(bh, bw.T, b_out)
            return
        if gemm == "cublas":
            raise RuntimeError("this PyTorch build has no cuBLAS matmul with fp32 output for 16-bit inputs")
    three_logits_triton(sh, sw, ah, aw, bh, bw, s_out, a_out, b_out)
