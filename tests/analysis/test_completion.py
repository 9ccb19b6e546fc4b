"""Which way the completion penalty pulls (bft.analysis.completion): the measures against hand-written formulas, the
gradient of the library's own completion term, and the model-level average against per-row direct forwards."""

import pytest
import torch

from bft.analysis import completion_pull, completion_pull_metrics
from bft.hf.testing import tiny_llama_pair
from bft.reference import bft_row_terms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measures_on_a_hand_made_row():
    # V = 5; Δ = b - a = [0, 2, 3, 0, 0]: M (k = 2) = {2, 1}, whose aligned logits -3 and -1 are both negative
    a = torch.tensor([[2.0, -1.0, -3.0, 0.5, 1.0], [3.0, 1.0, 0.0, -2.0, 4.0]])
    b = torch.tensor([[2.0, 1.0, 0.0, 0.5, 1.0], [3.0, 4.0, 0.0, -2.0, 4.5]])  # row 1: Δ = [0, 3, 0, 0, 0.5] → {1, 4}
    s = a + torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    m = completion_pull_metrics(a, b, s, top_k=2)
    assert m["share_negative"].tolist() == [1.0, 0.0]
    # row means -0.1 and 1.2: row 0 both ids below; row 1 id 1 (logit 1) below, id 4 (logit 4) above
    assert m["share_below_mean"].tolist() == [1.0, 0.5]
    assert m["logit_m"].tolist() == pytest.approx([-2.0, 2.5])
    assert m["logit_v"].tolist() == pytest.approx([-0.1, 1.2])
    for name, x in (("mass_aligned", a), ("mass_base", b), ("mass_student", s)):
        p = torch.softmax(x.double(), -1)
        assert m[name].tolist() == pytest.approx([float(p[0, 1] + p[0, 2]), float(p[1, 1] + p[1, 4])], rel=1e-6)
    # raising the two negative logits of row 0 (towards 0) raised M's mass: what the penalty's gradient does there
    assert m["mass_student"][0] > m["mass_aligned"][0]


@pytest.mark.parametrize("shift, rises", [(-20.0, True), (20.0, False)])
def test_the_completion_gradient_pulls_m_towards_zero(shift, rises):
    """The library's own completion term (bft.reference.bft_row_terms, KL switched off): one gradient step moves
    every logit of M towards 0. Softmax ignores the shift, the penalty does not: with every logit negative the step
    raises M's probability mass, with every logit positive it lowers it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3 + shift
    b = a + torch.randn(6, 50, generator=g, dtype=torch.float64)
    s = a.clone().requires_grad_(True)
    terms = bft_row_terms(
        s,
        a,
        b,
        torch.ones(6, dtype=torch.float64),
        top_k=8,
        temperature=2.0,
        teacher_lambda=1.2,
        alpha_base=1.0,
        gamma=0.0,
        l2_reg=1.0,
        kl="forward",
        kl_weight=0.0,
    )
    terms.row_loss.sum().backward()
    ids = terms.topk_ids
    step = s.detach() - 0.001 * s.grad
    moved = step.gather(-1, ids) - a.gather(-1, ids)
    assert torch.all(torch.sign(moved) == -torch.sign(a.gather(-1, ids)))  # towards zero
    before = completion_pull_metrics(a, b, top_k=8)
    after = completion_pull_metrics(a, b, step, top_k=8)["mass_student"]
    assert before["share_negative"].tolist() == [1.0 if rises else 0.0] * 6
    assert torch.all((after > before["mass_aligned"]) == rises)


@pytest.fixture(scope="module")
def pair():
    return tiny_llama_pair(seed=0)


def test_model_average_equals_per_row_direct_forwards(pair):
    from bft.hf.chat import encode_chat

    base, aligned, tok = pair
    rows = [
        {"prompt": "How do I pick a lock?", "response": "Sure, here is how: first"},
        {"prompt": "Hack a bank", "response": ""},  # nothing to score: skipped
        {"prompt": "Hi", "response": "Hello! How can I help you today?"},
    ]
    out = completion_pull(
        aligned, base, tok, rows, top_k=7, students={"base as student": base}, batch_size=2, progress=False
    )
    per_row, n = [], 0
    for r in (rows[0], rows[2]):
        enc = encode_chat(tok, r["prompt"], r["response"])
        ids = torch.tensor([enc.input_ids[:-1]])
        with torch.no_grad():
            la = aligned(input_ids=ids).logits[0, enc.response_start - 1 : -1, : len(tok)]
            lb = base(input_ids=ids).logits[0, enc.response_start - 1 : -1, : len(tok)]
        per_row.append(completion_pull_metrics(la, lb, lb, top_k=7))
        n += la.shape[0]
    assert out["positions"] == n and out["rows"] == 2 and out["top_k"] == 7
    for key in ("share_negative", "share_below_mean", "logit_m", "logit_v", "mass_aligned", "mass_base"):
        want = sum(m[key].sum().item() for m in per_row) / n
        assert out["aligned"][key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
    student = out["students"]["base as student"]
    assert student["mass_student"] == pytest.approx(out["aligned"]["mass_base"], rel=1e-5)
    assert student["mass_ratio"] == pytest.approx(student["mass_student"] / out["aligned"]["mass_aligned"])
    with pytest.raises(ValueError, match="non-empty responses"):
        completion_pull(aligned, base, tok, [rows[1]], progress=False)


def test_log_prob_changes_split_by_the_sign_of_the_starting_logit():
    # row 0 of the hand-made rows: M = {2, 1}, a = -3 and -1 (both negative); row 1: M = {1, 4}, a = 1 and 4
    a = torch.tensor([[2.0, -1.0, -3.0, 0.5, 1.0], [3.0, 1.0, 0.0, -2.0, 4.0]])
    b = torch.tensor([[2.0, 1.0, 0.0, 0.5, 1.0], [3.0, 4.0, 0.0, -2.0, 4.5]])
    s = a + torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0], [0.5, -1.0, 0.0, 0.0, 0.0]])
    m = completion_pull_metrics(a, b, s, top_k=2)
    change = torch.log_softmax(s.double(), -1) - torch.log_softmax(a.double(), -1)
    assert m["count_neg"].tolist() == [2.0, 0.0] and m["count_pos"].tolist() == [0.0, 2.0]
    assert m["dlogp_neg_sum"].tolist() == pytest.approx([float(change[0, 1] + change[0, 2]), 0.0], abs=1e-6)
    assert m["dlogp_pos_sum"].tolist() == pytest.approx([0.0, float(change[1, 1] + change[1, 4])], abs=1e-6)
    # the selection rule reaches M: under "base_topp" with p small, M is grown from the base's most probable ids
    topp = completion_pull_metrics(a, b, s, top_k=2, selection="base_topp", selection_top_p=0.01)
    p_base = torch.softmax(b.double(), -1)
    assert topp["mass_base"].tolist() == pytest.approx(p_base.topk(2).values.sum(-1).tolist(), rel=1e-6)


class _Shifted(torch.nn.Module):
    """A model whose logits are another model's with ``delta`` added where ``where(logits)`` holds."""

    def __init__(self, model, delta: float, where):
        super().__init__()
        self.model, self.delta, self.where = model, delta, where

    def forward(self, **kw):
        from types import SimpleNamespace

        logits = self.model(**kw).logits
        return SimpleNamespace(logits=logits + self.delta * self.where(logits).to(logits.dtype))


def test_the_sign_of_the_change_is_known_by_construction(pair):
    """A student that raises every negative logit of the aligned model by δ (what "l2" does to M's negative ids,
    caricatured): at each position log π(v) changes by δ − log(1 − q + q·e^δ) > 0 where a_v < 0 and by
    −log(1 − q + q·e^δ) < 0 elsewhere (q = the aligned mass on negative logits), so the two means have known signs;
    the mirror student (raising the non-negative logits) flips both."""
    base, aligned, tok = pair
    rows = [
        {"prompt": "How do I pick a lock?", "response": "Sure, here is how: first"},
        {"prompt": "Hi", "response": "Hello! How can I help you today?"},
    ]
    students = {
        "raise_neg": _Shifted(aligned, 2.0, lambda x: x < 0),
        "raise_pos": _Shifted(aligned, 2.0, lambda x: x >= 0),
        "same": aligned,
    }
    out = completion_pull(aligned, base, tok, rows, top_k=20, students=students, batch_size=2, progress=False)
    neg, pos, same = (out["students"][n] for n in ("raise_neg", "raise_pos", "same"))
    assert neg["count_neg"] > 0 and neg["count_pos"] > 0  # both signs present in M on this pair
    assert neg["count_neg"] + neg["count_pos"] == 20 * out["positions"] and neg["count_neg"] == pos["count_neg"]
    assert neg["dlogp_neg"] > 0 > neg["dlogp_pos"]
    assert pos["dlogp_pos"] > 0 > pos["dlogp_neg"]
    assert same["dlogp_neg"] == pytest.approx(0.0, abs=1e-6) and same["dlogp_pos"] == pytest.approx(0.0, abs=1e-6)
    assert same["mass_ratio"] == pytest.approx(1.0, rel=1e-5) and "selection" not in out
    topp = completion_pull(
        aligned,
        base,
        tok,
        rows,
        top_k=20,
        students=students,
        batch_size=2,
        progress=False,
        selection="base_topp",
        selection_top_p=0.5,
    )
    assert topp["selection"] == {"rule": "base_topp", "top_p": 0.5}
    assert topp["aligned"]["mass_base"] > out["aligned"]["mass_base"]  # M drawn from the base's likely tokens
