"""Working memory of the fused backends, checked against their plan on the CPU (no GPU needed).

The allocations are read from the PyTorch profiler (:func:`bft.hf.testing.peak_allocated_bytes`), autograd's
backward included. With C rows per chunk, a [C, V] fp32 block is C·V·4 bytes; the plans are

    triton: 3 blocks (S, A, B) + the gradient G (fp32 on the CPU): one block, or a group of blocks when the head
            trains, + then the fp32 dW accumulator (V·H·4, returned as the gradient itself in fp32, or rounded
            into a V·H·2 output in 16-bit)
    torch:  about a dozen blocks (logits, softmaxes, their gradients) + the same dW accumulator

plus per-row vectors and [N, H] gradients. Any [N, V] tensor, a whole fp32 copy of a 16-bit head, or a second
full-size copy of dW (what backward would make if it scaled the saved gradient out of place) breaks these bounds.
"""

from __future__ import annotations

import os

import pytest
import torch

import bft
from bft.hf.testing import peak_allocated_bytes

N, H, V, C, K = 48, 32, 3001, 8, 8  # V·H·4 = 3 blocks; N·V·4 = 6 blocks
GROUP_CHUNKS = 2  # with dW, the triton driver keeps G for 2 chunks before its gradient GEMMs


def inputs(dtype, need_dw):
    g = torch.Generator().manual_seed(0)
    tensors = []
    for _ in range(3):
        tensors += [torch.randn(N, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) * 0.5).to(dtype)]
    tensors[0].requires_grad_(True)
    tensors[1].requires_grad_(need_dw)
    harmful = torch.arange(N) % 5 < 2
    return tensors, harmful


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Vocabulary slices and backward's conversion slices as small relative to these shapes as they are at scale."""
    import bft.kernels.bft_loss
    import bft.kernels.chunking

    import bft.loss

    monkeypatch.setattr(bft.kernels.chunking, "VOCAB_SLICE_BYTES", 16 * 1024)  # both backends' (defined once)
    monkeypatch.setattr(bft.loss, "_BACKWARD_SLICE_BYTES", 16 * 1024)
    monkeypatch.setattr(bft.kernels.bft_loss, "DEFAULT_GROUP_BYTES", GROUP_CHUNKS * C * V * 4)  # fp32 G on the CPU


@pytest.mark.parametrize("need_dw", [True, False], ids=["head-trains", "head-frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("backend", "blocks"), [("triton", 3), ("torch", 12)])
def test_working_memory_follows_the_plan(backend, blocks, dtype, need_dw, completion="l2"):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU memory of the triton backend needs the interpreter (on a GPU, benchmarks/loss_gpu.py)")
    tensors, harmful = inputs(dtype, need_dw)

    def step():
        bft.bft_loss(
            *tensors, harmful=harmful, backend=backend, top_k=K, chunk_rows=C, completion=completion
        ).loss.backward()
        for t in tensors[:2]:
            t.grad = None

    step()  # warm-up: one-off allocations are not the loss's working set
    peak = peak_allocated_bytes(step)
    block = C * V * 4
    if backend == "triton":  # + the gradient G: one chunk's rows, or a group of chunks when dW is computed
        blocks += GROUP_CHUNKS if need_dw else 1
    dw_accumulator = V * H * 4 if need_dw else 0
    dw_output = V * H * tensors[1].element_size() if need_dw and dtype != torch.float32 else 0
    per_row = 4 * N * H * 4 + N * (16 * K + 64)  # [N, H] gradients (fp32 and output) and the per-row results
    plan = blocks * block + dw_accumulator + dw_output + per_row
    assert peak <= plan + block // 2, f"peak {peak} B > plan {plan} B (+ half a block {block // 2} B)"
    assert peak >= (3 if backend == "triton" else 4) * block  # the measurement sees the chunk's blocks at all


@pytest.mark.parametrize("completion", ["mass", "unlikelihood"])
@pytest.mark.parametrize(("backend", "blocks"), [("triton", 3), ("torch", 12)])
def test_softmax_completion_terms_keep_the_plan(backend, blocks, completion):
    """The softmax completion terms add no block: the row kernel hides s at M in place, and the torch backend's
    masks and dense gradient fit among its dozen blocks."""
    test_working_memory_follows_the_plan(backend, blocks, torch.float32, False, completion=completion)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_scales_the_gradients_it_takes_over(backend, dtype):
    """Backward scales the forward's gradients in place (no second copy): d(c·loss) = c·d(loss), the gradients
    accumulate into .grad as usual, and a second backward through a retained graph raises (it would otherwise see
    gradients that the first one took over)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU the triton backend's gradients are checked by tests/test_loss.py")
    tensors, harmful = inputs(dtype, True)
    expected = torch.autograd.grad(
        bft.bft_loss(*tensors, harmful=harmful, backend="reference", top_k=K).loss, tensors[:2]
    )
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    for scale in (0.3, 1.0):  # d loss = 0.3 scales in place; d loss = 1 hands the tensor over as it is
        out = bft.bft_loss(*tensors, harmful=harmful, backend=backend, top_k=K, chunk_rows=C)
        (scale * out.loss).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            out.loss.backward()
    for t, e in zip(tensors[:2], expected):  # accumulated over the two calls: 1.3 × the reference
        torch.testing.assert_close(t.grad.float(), 1.3 * e.float(), **tol)
