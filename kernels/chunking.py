"""Row chunks and vocabulary slices of the fused backends, defined once (torch only).

Both the chunked torch backend (:mod:`bft.chunked`) and the Triton driver (:mod:`bft.kernels.bft_loss`) hold
only [C, V] logit blocks of C rows, sized from a byte budget (:func:`rows_per_block`), and never a whole fp32 copy
of a 16-bit [V, H] head: GEMMs against a head upcast it one vocabulary slice of at most :data:`VOCAB_SLICE_BYTES`
at a time (:func:`vocab_slices`, :func:`logits_sliced`, :func:`grad_hidden_sliced`).
"""

from __future__ import annotations

import torch

#: fp32 bytes of the slice of a [V, H] head upcast at a time (tests shrink it to force many slices)
VOCAB_SLICE_BYTES = 64 * 2**20


def rows_per_block(V: int, block_bytes: int) -> int:
    """Rows C of an fp32 [C, V] block of at most ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (4 * max(1, V)))


def vocab_slices(V: int, H: int):
    """[v0, v1) ranges covering the V rows of a [V, H] head, each at most :data:`VOCAB_SLICE_BYTES` in fp32."""
    step = max(1, VOCAB_SLICE_BYTES // (4 * max(1, H)))
    for v0 in range(0, V, step):
        yield v0, min(V, v0 + step)


def logits_sliced(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = hidden @ weight.T`` with ``hidden`` already in ``out``'s dtype, ``weight`` upcast a slice at a time."""
    for v0, v1 in vocab_slices(weight.shape[0], weight.shape[1]):
        out[:, v0:v1] = hidden @ weight[v0:v1].to(out.dtype).T
    return out


def grad_hidden_sliced(g: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = g @ weight`` (g: [C, V] in ``out``'s dtype), ``weight`` upcast a slice at a time."""
    out.zero_()
    for v0, v1 in vocab_slices(weight.shape[0], weight.shape[1]):
        out += g[:, v0:v1] @ weight[v0:v1].to(out.dtype)
    return out


#: The per-row outputs of a fused backend, copied chunk by chunk from its row terms.
ROW_OUTPUTS = ("kl", "completion", "risk", "alpha", "topk_ids")


def fused_outputs(N: int, V: int, H: int, top_k: int, dtype, device, *, need_dh: bool, need_dw: bool) -> dict:
    """The output dict of a fused backend (``bft.chunked`` and the Triton driver fill the same one): the loss sum,
    the per-row terms of :data:`ROW_OUTPUTS` (``topk_ids`` int64 [N, top_k], the rest [N] in ``dtype``), and the
    gradients of the student's hidden states [N, H] and LM-head weight [V, H] when asked for (else None)."""
    out = {"loss_sum": torch.zeros((), dtype=dtype, device=device)}
    for name in ROW_OUTPUTS:
        shape, kind = ((N, top_k), torch.int64) if name == "topk_ids" else ((N,), dtype)
        out[name] = torch.empty(shape, dtype=kind, device=device)
    out["grad_hidden"] = torch.empty(N, H, dtype=dtype, device=device) if need_dh else None
    out["grad_weight"] = torch.zeros(V, H, dtype=dtype, device=device) if need_dw else None
    return out


def store_rows(out: dict, rows: dict, r0: int, r1: int) -> None:
    """Add a chunk's row losses (rows ``r0:r1``) to ``out["loss_sum"]`` and copy its per-row terms into ``out``."""
    out["loss_sum"] += rows["row_loss"].sum()
    for name in ROW_OUTPUTS:
        out[name][r0:r1] = rows[name]
