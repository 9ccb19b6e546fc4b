"""Contrastive decoding (Eq. 7): the formula, the cached logits processor and batched generation.

The oracle for generation is a cache-free loop that re-runs both models on the whole (left-padded) sequence at
every step and applies the formula written out directly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LogitsProcessorList

from bft.decoding import ContrastiveLogitsProcessor, contrastive_generate, contrastive_logprobs
from bft.hf.testing import tiny_llama_pair

PROMPTS = ["Hi", "How do I bake bread at home?", "Tell me a story about a cat and a dog."]


def direct_formula(aligned_logits, base_logits, alpha):
    """Eq. 7 on log-probs, element by element in float64."""
    la = torch.log_softmax(aligned_logits.double(), -1)
    lb = torch.log_softmax(base_logits.double(), -1)
    favored = (lb > la).double()
    return la - alpha * favored * (lb - la)


def direct_formula_logits(aligned_logits, base_logits, alpha):
    """Eq. 7 as the paper writes it, on raw logits (B by probabilities), element by element in float64, shifted by
    −lse(aligned logits) like contrastive_logprobs(form="logits") (softmax-invariant)."""
    za, zb = aligned_logits.double(), base_logits.double()
    la, lb = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
    favored = (lb > la).double()
    return za - alpha * favored * (zb - za) - torch.logsumexp(za, -1, keepdim=True)


FORMULAS = {"logprobs": direct_formula, "logits": direct_formula_logits}


@pytest.fixture(scope="module")
def pair():
    base, aligned, tok = tiny_llama_pair(seed=0)
    return base, aligned, tok


def left_padded_batch(tok, prompts=PROMPTS):
    from bft.hf.chat import prompt_text

    tok.padding_side = "left"
    enc = tok([prompt_text(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "the batch must actually contain padding"
    return enc["input_ids"], enc["attention_mask"]


def position_ids(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def cache_free_loop(aligned, base, ids, mask, alpha, max_new_tokens, eos, pad, *, sample_seed=None, form="logprobs"):
    """Recompute both models on the whole sequence at every step (no KV cache anywhere)."""
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        pos = position_ids(mask)
        a = aligned(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
        b = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
        scores = FORMULAS[form](a, b, alpha).float()
        if sample_seed is None:
            nxt = scores.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        unfinished &= nxt != eos
        if not unfinished.any():
            break
    return ids


# ------------------------------------------------------------------------------------------------ the formula


def test_contrastive_logprobs_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, 50, generator=g) * 3
    b = torch.randn(4, 7, 50, generator=g) * 3
    for alpha in (0.0, 0.5, 1.0, 3.0):
        got = contrastive_logprobs(a, b, alpha)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), direct_formula(a, b, alpha), atol=1e-5, rtol=1e-5)
    # penalized entries went down by exactly α·(ℓ_b − ℓ_a) > 0, others unchanged
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    out = contrastive_logprobs(a, b, 2.0)
    favored = lb > la
    assert favored.any() and (~favored).any()
    torch.testing.assert_close(out[~favored], la[~favored])
    assert (out[favored] < la[favored]).all()


def test_contrastive_logprobs_ties_and_shift_invariance():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # identical distributions: B is empty (ties are not base-favored), nothing changes
    torch.testing.assert_close(contrastive_logprobs(a, a.clone(), 5.0), torch.log_softmax(a, -1))
    # a constant shift of the base logits does not change its distribution, hence not the result either
    torch.testing.assert_close(contrastive_logprobs(a, a + 100.0, 5.0), torch.log_softmax(a, -1))
    b = torch.tensor([[1.0, 2.5, 3.0, 4.0]])
    torch.testing.assert_close(contrastive_logprobs(a, b, 1.0), contrastive_logprobs(a - 7.0, b + 3.0, 1.0))


def test_contrastive_logprobs_large_logits_and_low_precision():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 64, generator=g) * 1e4
    b = torch.randn(3, 64, generator=g) * 1e4
    got = contrastive_logprobs(a, b, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), direct_formula(a, b, 1.0), rtol=1e-6, atol=1e-2)
    # bf16 inputs are upcast before log_softmax (never rounded in between)
    a16, b16 = (torch.randn(2, 64, generator=g) * 4).bfloat16(), (torch.randn(2, 64, generator=g) * 4).bfloat16()
    got16 = contrastive_logprobs(a16, b16, 1.0)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, contrastive_logprobs(a16.float(), b16.float(), 1.0))


def test_contrastive_logprobs_masked_tokens_stay_masked_and_top_k():
    a = torch.tensor([[0.0, -math.inf, 1.0, 2.0, 0.5]])
    b = torch.tensor([[3.0, 1.0, 1.0, 0.0, 2.0]])
    for alpha in (0.0, 1.0):
        out = contrastive_logprobs(a, b, alpha)
        assert not torch.isnan(out).any()
        assert out[0, 1] == -math.inf
    full = contrastive_logprobs(a, b, 1.0)
    assert torch.equal(contrastive_logprobs(a, b, 1.0, top_k=5), full)
    # top_k=1 penalizes only argmax Δ (id 1 has Δ=+inf but is masked; next is id 0)
    la = torch.log_softmax(a, -1)
    one = contrastive_logprobs(a, b, 1.0, top_k=2)
    lb = torch.log_softmax(b, -1)
    assert one[0, 0] < la[0, 0] and torch.equal(one[0, 2:], la[0, 2:])
    assert (full[0, 4] < la[0, 4]) and (lb[0, 4] > la[0, 4])


def test_logits_form_matches_the_paper_formula_and_is_not_shift_invariant():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 37, generator=g) * 3
    b = torch.randn(4, 37, generator=g) * 5  # a sharper model: lse_b − lse_a is far from 0
    for alpha in (0.5, 1.0, 4.0):
        got = contrastive_logprobs(a, b, alpha, form="logits")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), direct_formula_logits(a, b, alpha), rtol=1e-5, atol=1e-5)
    # B is the same set in both forms; off B both return ℓ_a; on B they differ by α·(lse_b − lse_a)
    lp, lg = contrastive_logprobs(a, b, 2.0), contrastive_logprobs(a, b, 2.0, form="logits")
    favored = torch.log_softmax(b, -1) > torch.log_softmax(a, -1)
    shift = (torch.logsumexp(b, -1) - torch.logsumexp(a, -1))[:, None].expand_as(lp)
    torch.testing.assert_close(lg[~favored], lp[~favored])
    torch.testing.assert_close(lp[favored] - lg[favored], 2.0 * shift[favored], rtol=1e-4, atol=1e-4)
    # adding a constant to the base logits changes neither distribution, and the log-prob form does not move;
    # the paper's logit form does (the reason log-probs are the default)
    torch.testing.assert_close(contrastive_logprobs(a, b + 7.0, 2.0), lp)
    assert not torch.allclose(contrastive_logprobs(a, b + 7.0, 2.0, form="logits"), lg)
    # top-k: the same ids are penalised (ranking of Δ is shift-free), with the logit-form penalty
    top = contrastive_logprobs(a, b, 2.0, top_k=5, form="logits")
    changed = top != torch.log_softmax(a, -1)
    assert (changed.sum(-1) <= 5).all() and (changed <= favored).all()
    torch.testing.assert_close(top[changed], lg[changed])
    with pytest.raises(ValueError, match="form must be one of"):
        contrastive_logprobs(a, b, 1.0, form="probs")


def test_contrastive_logprobs_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_logprobs(torch.zeros(2, 5), torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        contrastive_logprobs(torch.zeros(5), torch.zeros(5), -1.0)
    with pytest.raises(ValueError, match="top_k"):
        contrastive_logprobs(torch.zeros(5), torch.zeros(5), 1.0, top_k=6)


# ----------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("form", ["logprobs", "logits"])
@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_greedy_equals_cache_free_loop_with_left_padding(pair, alpha, form):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    n = 12
    out = contrastive_generate(
        aligned,
        base,
        ids,
        mask,
        alpha=alpha,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        form=form,
    )
    ref = cache_free_loop(aligned, base, ids, mask, alpha, n, tok.eos_token_id, tok.pad_token_id, form=form)
    assert torch.equal(out, ref)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    # and contrastive decoding actually changed something versus plain greedy decoding
    plain = aligned.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert not torch.equal(plain, out)


def test_sampling_equals_cache_free_loop(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    torch.manual_seed(123)
    out = contrastive_generate(
        aligned,
        base,
        ids,
        mask,
        alpha=1.0,
        max_new_tokens=10,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tok.pad_token_id,
    )
    ref = cache_free_loop(aligned, base, ids, mask, 1.0, 10, tok.eos_token_id, tok.pad_token_id, sample_seed=123)
    assert torch.equal(out, ref)


def test_alpha_zero_equals_plain_generate(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    kw = dict(max_new_tokens=10, pad_token_id=tok.pad_token_id)
    plain = aligned.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(contrastive_generate(aligned, base, ids, mask, alpha=0.0, do_sample=False, **kw), plain)
    torch.manual_seed(7)
    plain_s = aligned.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, **kw)
    torch.manual_seed(7)
    cd_s = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        logits_processor=LogitsProcessorList([ContrastiveLogitsProcessor(base, alpha=0.0, attention_mask=mask)]),
        **kw,
    )
    assert torch.equal(cd_s, plain_s)


def test_processor_uses_kv_cache_and_matches_contrastive_generate(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    n = 8
    proc = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        min_new_tokens=n,
        pad_token_id=tok.pad_token_id,
        logits_processor=LogitsProcessorList([proc]),
    )
    assert out.shape[1] == ids.shape[1] + n
    # prompt once, then exactly one new token per row per later step
    assert proc.base_forward_tokens == ids.numel() + ids.shape[0] * (n - 1)
    ref = contrastive_generate(
        aligned,
        base,
        ids,
        mask,
        alpha=1.0,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    assert torch.equal(out, ref)


def test_processor_rebuilds_cache_when_sequences_change(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    scores = torch.randn(ids.shape[0], len(tok))
    proc = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)
    proc(ids, scores)
    proc(torch.cat([ids, torch.full_like(ids[:, :1], 40)], 1), scores)
    # a different continuation (as after a beam reorder): must equal a fresh processor's answer
    other = torch.cat([ids, torch.full_like(ids[:, :2], 50)], 1)
    got = proc(other, scores)
    fresh = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)(other, scores)
    torch.testing.assert_close(got, fresh)


def test_first_n_and_top_k_options(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = aligned.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(contrastive_generate(aligned, base, ids, mask, alpha=2.0, first_n=0, **kw), plain)
    full = contrastive_generate(aligned, base, ids, mask, alpha=2.0, **kw)
    assert torch.equal(contrastive_generate(aligned, base, ids, mask, alpha=2.0, favored_top_k=len(tok), **kw), full)
    # first_n=3: the first 3 new tokens follow contrastive decoding; the base model is not run after that
    proc = ContrastiveLogitsProcessor(base, alpha=2.0, first_n=3, attention_mask=mask)
    part = aligned.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), **kw)
    L = ids.shape[1]
    assert torch.equal(part[:, : L + 3], full[:, : L + 3])
    assert proc.base_forward_tokens == ids.numel() + ids.shape[0] * 2


def test_contrastive_generate_rejects_bad_input(pair):
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    with pytest.raises(ValueError, match="num_beams"):
        contrastive_generate(aligned, base, ids, mask, num_beams=2, max_new_tokens=2)
    right = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="left-padded"):
        contrastive_generate(aligned, base, ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="does not match"):
        contrastive_generate(aligned, base, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveLogitsProcessor(base, alpha=-1)


def test_generate_cli_with_text_prompts(tmp_path, monkeypatch, pair):
    """`bft generate` end to end on a plain text prompts file, with the tiny pair standing in for real models."""
    import bft.commands.generate as cd
    from bft.cli import main

    base, aligned, tok = pair
    monkeypatch.setattr(cd, "load_pair", lambda *a, **k: (aligned, base, tok))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi\n\nWrite a poem\n", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    rc = main(
        [
            "generate",
            "--aligned",
            "x",
            "--base",
            "y",
            "--alpha",
            "1.0",
            "--prompts",
            str(prompts),
            "--prefill",
            "Sure",
            "--max-new-tokens",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi", "Write a poem"]
    assert all(r["prefill"] == "Sure" and r["alpha"] == 1.0 for r in rows)


# ------------------------------------------------------------------------------------- fast paths are exact


def test_penalty_fast_path_is_bitwise_the_masked_formula():
    """The default path (fmin form, in place) gives the very same floats as the masked form of Eq. 7."""
    from bft.decoding.contrastive import _penalize_

    def masked(la, lb, alpha):
        diff = lb - la
        return torch.where((diff > 0) & torch.isfinite(la), la - alpha * diff, la)

    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4000, generator=g) * 5
    b = a + torch.randn(6, 4000, generator=g) * torch.tensor([0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0])[:, None]
    a[torch.rand(a.shape, generator=g) < 0.05] = -math.inf
    b[torch.rand(b.shape, generator=g) < 0.05] = -math.inf
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    for alpha in (1e-30, 0.3, 1.0, 3.0, 1e30, math.inf):
        want = masked(la, lb, alpha)
        got = _penalize_(la.clone(), lb.clone(), alpha)
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32)), alpha
        assert torch.equal(contrastive_logprobs(a, b, alpha)[ok], want[ok])


def test_topk_mask_equals_stable_sort_with_ties():
    from bft.reference import topk_lowest_id_ties, topk_mask_lowest_id_ties

    g = torch.Generator().manual_seed(4)
    for V in (1, 2, 7, 33):
        v = torch.randint(-2, 3, (4, V), generator=g).float()  # many ties
        v[torch.rand(v.shape, generator=g) < 0.15] = -math.inf
        v[torch.rand(v.shape, generator=g) < 0.15] = math.inf
        for k in range(1, V + 1):
            want = torch.zeros(4, V, dtype=torch.bool).scatter_(-1, topk_lowest_id_ties(v, k), True)
            assert torch.equal(topk_mask_lowest_id_ties(v, k)[0], want), (V, k)


def test_top_k_formula_matches_algorithm_1_reference():
    from bft.reference import topk_lowest_id_ties

    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 40, generator=g).round()  # rounding makes ties in Δ
    b = torch.randn(3, 40, generator=g).round()
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    for k in (1, 3, 10, 40):
        top = torch.zeros(3, 40, dtype=torch.bool).scatter_(-1, topk_lowest_id_ties(lb - la, k), True)
        want = torch.where((lb > la) & top, la - 2.0 * (lb - la), la)
        torch.testing.assert_close(contrastive_logprobs(a, b, 2.0, top_k=k), want, rtol=0, atol=0)


def test_processor_positions_continue_correctly_after_a_trailing_pad(pair):
    """Cached steps continue position ids from the count of attended tokens, as cumsum(mask) − 1 does, also when
    the prompt's last column is a pad (possible with a hand-made mask or the pad_token_id fallback)."""
    base, aligned, tok = pair
    ids, mask = left_padded_batch(tok)
    mask = mask.clone()
    mask[0, -1] = 0  # row 0 ends in a pad
    scores = torch.randn(ids.shape[0], len(tok))
    proc = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)
    seq = ids
    proc(seq, scores)  # the cache is built on the prompt, whose last column is a pad in row 0
    for t in (40, 41, 42):
        seq = torch.cat([seq, torch.full_like(ids[:, :1], t)], 1)
        got = proc(seq, scores)
    assert proc.base_forward_tokens == seq.shape[0] * (ids.shape[1] + 3)
    fresh = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)(seq, scores)  # cumsum positions
    torch.testing.assert_close(got, fresh, rtol=1e-4, atol=1e-4)


def test_logits_form_through_eval_and_likelihood(pair):
    """form="logits" reaches generation and the likelihood measure; each equals its direct computation."""
    from bft.eval.generation import GenerationSettings, System, contrastive_name, generate_plain_or_contrastive
    from bft.eval.likelihood import continuation_logprobs

    base, aligned, tok = pair
    system = System(contrastive_name(2.0, "logits"), aligned, tok, base_model=base, alpha=2.0, form="logits")
    assert system.name == "contrastive (logits) α=2" and system.describe()["form"] == "logits"
    inputs = [system.prompt_ids(p) for p in PROMPTS[:2]]
    settings = GenerationSettings(max_new_tokens=5, batch_size=2)
    got = system.generate(inputs, settings)
    assert got == generate_plain_or_contrastive(
        aligned, tok, inputs, settings, base_model=base, alpha=2.0, form="logits", progress=False
    )
    lp = continuation_logprobs(aligned, tok, ["Hi"], [" there friend"], base_model=base, alpha=2.0, form="logits")
    lq = continuation_logprobs(aligned, tok, ["Hi"], [" there friend"], base_model=base, alpha=2.0)
    assert lp[0].shape == lq[0].shape and not torch.equal(lp[0], lq[0])
    with pytest.raises(ValueError, match="form must be one of"):
        System("x", aligned, tok, base_model=base, alpha=1.0, form="nope")
