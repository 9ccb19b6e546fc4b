"""bft's KL term against TRL's chunked divergence (trl/kernels/chunked_divergence.py, the loss of TRL's
DistillationTrainer), where the two objectives coincide. Tiny shapes, fp32.

The map (what differs, and how each difference is undone here):

- the teacher: TRL distils from ONE head, bft from the hybrid t = λ·a + (1 − λ)·b of two. The hybrid is one head on
  concatenated hidden states: t = [h_a | h_b]·[λ·W_a | (1 − λ)·W_b]ᵀ.
- the terms: bft adds the completion term on harmful rows; with l2_reg = 0 (or alpha_base = 0) only the KL is left.
- τ²: bft's KL_n = τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) (Hinton's scaling); TRL divides both logits by τ and does
  not multiply by τ² (DistillationTrainer neither).
- the direction: bft kl="forward" is TRL beta = 0.0 (KL(teacher ‖ student)), kl="reverse" is beta = 1.0; TRL's
  0 < beta < 1 (generalized JSD) has no bft counterpart.
- the reduction: both average over the valid rows (bft: Σ/max(1, #valid); TRL's _chunked_divergence_loss without
  num_items_in_batch: Σ/max(1, #valid), with it: Σ/num_items_in_batch).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from helpers import TRITON_DEVICE
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.trainer.distillation_trainer import _chunked_divergence_loss

import bft

pytestmark = pytest.mark.usefixtures("one_thread")

N, H, V, TAU, LAM = 7, 8, 50, 2.0, 1.2


def _inputs(seed=0, h_base=None):
    g = torch.Generator().manual_seed(seed)
    hb = h_base or H
    sh, ah, bh = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g), torch.randn(N, hb, generator=g)
    sw, aw, bw = (torch.randn(V, h, generator=g) * (3.0 / h**0.5) for h in (H, H, hb))
    harmful = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    return sh, sw, ah, aw, bh, bw, harmful


def hybrid_as_one_head(ah, aw, bh, bw, lam):
    """The hybrid teacher λ·a + (1 − λ)·b as one head: [h_a | h_b] and [λ·W_a | (1 − λ)·W_b]."""
    return torch.cat([ah, bh], dim=1), torch.cat([lam * aw, (1 - lam) * bw], dim=1)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _bft(backend, sh, sw, ah, aw, bh, bw, harmful, valid=None, **kw):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    if dev != "cpu":
        pytest.skip("the triton backend needs the interpreter or a GPU holding the tensors")
    s, w = _leaves(sh, sw)
    out = bft.bft_loss(
        s,
        w,
        ah,
        aw,
        bh,
        bw,
        harmful=harmful,
        valid=valid,
        top_k=5,
        temperature=TAU,
        teacher_lambda=LAM,
        backend=backend,
        **kw,
    )
    out.loss.backward()
    return out, s.grad, w.grad


def _trl_rows(sh, sw, ah, aw, bh, bw, beta):
    s, w = _leaves(sh, sw)
    th, tw = hybrid_as_one_head(ah, aw, bh, bw, LAM)
    div, entropy = ChunkedDivergenceFunction.apply(s, w, None, th, tw, None, beta, TAU)
    return div, entropy, s, w


def _close(x, y, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("kl,beta", [("forward", 0.0), ("reverse", 1.0)])
@pytest.mark.parametrize("kl_only", [{"l2_reg": 0.0}, {"alpha_base": 0.0}])
def test_kl_only_equals_trl_chunked_divergence_times_tau_squared(backend, kl, beta, kl_only):
    sh, sw, ah, aw, bh, bw, harmful = _inputs()
    out, g_sh, g_sw = _bft(backend, sh, sw, ah, aw, bh, bw, harmful, kl=kl, **kl_only)
    div, entropy, s, w = _trl_rows(sh, sw, ah, aw, bh, bw, beta)
    (TAU**2 * div.mean()).backward()

    _close(out.kl, TAU**2 * div.detach())  # per row: bft's KL_n = τ²·TRL's divergence
    _close(out.loss.detach(), TAU**2 * div.detach().mean())
    _close(g_sh, s.grad)
    _close(g_sw, w.grad)
    assert torch.all(out.completion == 0) or kl_only.get("alpha_base") == 0.0
    # TRL's entropy is of softmax(s/τ), a diagnostic bft does not report: check it is that
    ref = torch.distributions.Categorical(logits=(sh @ sw.T) / TAU).entropy()
    _close(entropy, ref)


def test_the_differences_matter():
    """Unmapped, the two disagree: the check above can fail."""
    sh, sw, ah, aw, bh, bw, harmful = _inputs()
    out, _, _ = _bft("reference", sh, sw, ah, aw, bh, bw, harmful, l2_reg=0.0)
    div, _, _, _ = _trl_rows(sh, sw, ah, aw, bh, bw, 0.0)
    assert not torch.allclose(out.kl, div.detach(), rtol=1e-3)  # without τ²
    rev, _, _, _ = _trl_rows(sh, sw, ah, aw, bh, bw, 1.0)
    assert not torch.allclose(out.kl, TAU**2 * rev.detach(), rtol=1e-3)  # the other direction
    # the teacher head must be the hybrid: aligned alone (λ = 1) is another objective at λ = 1.2
    s, w = _leaves(sh, sw)
    aligned_only, _ = ChunkedDivergenceFunction.apply(s, w, None, ah, aw, None, 0.0, TAU)
    assert not torch.allclose(out.kl, TAU**2 * aligned_only.detach(), rtol=1e-3)
    # with the completion term on (l2_reg > 0, harmful rows), bft's loss is larger than the KL alone
    full, _, _ = _bft("reference", sh, sw, ah, aw, bh, bw, harmful, l2_reg=1e-2)
    assert full.loss > TAU**2 * div.detach().mean() + 1e-4


def test_reduction_over_valid_rows_and_wider_base_head():
    """Invalid rows: bft's valid= and TRL's completion_mask both average over the valid rows. The base model may
    have another hidden size (only V must match): the concatenated teacher is then H_a + H_b wide."""
    sh, sw, ah, aw, bh, bw, harmful = _inputs(seed=1, h_base=12)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    out, g_sh, g_sw = _bft("torch", sh, sw, ah, aw, bh, bw, harmful, valid=valid, l2_reg=0.0)
    s, w = _leaves(sh, sw)
    th, tw = hybrid_as_one_head(ah, aw, bh, bw, LAM)
    loss, _, n_valid = _chunked_divergence_loss(s[None], th[None], w, tw, valid[None].long(), beta=0.0, temperature=TAU)
    (TAU**2 * loss).backward()
    assert int(n_valid) == int(valid.sum())
    _close(out.loss.detach(), TAU**2 * loss.detach())
    _close(g_sh, s.grad)
    _close(g_sw, w.grad)
    # num_items_in_batch (TRL's gradient-accumulation reduction) is Σ / that count, bft's is per micro-batch
    loss_items, _, _ = _chunked_divergence_loss(
        sh[None], th[None], sw, tw, valid[None].long(), beta=0.0, temperature=TAU, num_items_in_batch=10
    )
    _close(TAU**2 * loss_items, out.loss.detach() * int(valid.sum()) / 10)


def test_benchmark_script_tiny_dry_run(tmp_path):
    """benchmarks/trl_peer.py --tiny: every row runs (triton under the interpreter), the compared rows pass the
    correctness check against naive before timing, the JSON names the device."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("trl_peer_dry", bench / "trl_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "trl_peer.json"
    module.main(["--tiny", "--shapes", "8,16,128", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["device"] and payload["dry_run"] and payload["versions"]["trl"]
    (shape,) = payload["shapes"]
    impls = shape["impls"]
    assert list(impls) == module.ORDER
    for name in module.COMPARED:
        if impls[name]["status"] == "skipped":  # bft-triton without the interpreter or a GPU
            continue
        assert impls[name]["status"] == "ok" and impls[name]["check"]["agree"], (name, impls[name])
        assert impls[name]["seconds"] > 0
    assert impls["trl-chunked"]["check"]["loss_rel"] < 1e-5
