"""A small, readable GCG (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned LLMs").

Goal: find a suffix s (n tokens) appended to the user's request x so that the model's reply starts with a target
y (AdvBench's "Sure, here is ..."). The loss is the teacher-forced cross-entropy of the target,

    L(s) = −(1/|y|) Σ_t log π(y_t | chat(x ⊕ " " ⊕ s), y_<t),

minimised over discrete tokens by Greedy Coordinate Gradient:

1. gradient: write the suffix as one-hot rows e_i ∈ R^V and its embeddings as e_i W_E; g = ∂L/∂e ∈ R^{n×V}
   estimates, to first order, how L changes when position i switches to token v;
2. candidates: for each of ``search_width`` candidates pick ``n_replace`` random positions i and, for each,
   a random token among the ``topk`` most negative g_i (disallowed tokens — special, non-ASCII, out-of-vocab —
   are never proposed); candidates that do not survive decode → encode unchanged are dropped (the attack must
   be reproducible from the suffix *text*);
3. evaluate all candidates' exact loss in batches (one forward each) and keep the best; repeat for ``steps``.

The best suffix over all steps is returned with the loss history. Works with current ``transformers`` (only
``inputs_embeds`` and ``logits`` are used). Cost per step: one forward+backward and ``search_width`` forwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from bft.hf.chat import prompt_text

__all__ = ["GCGConfig", "GCGResult", "run_gcg", "target_loss", "disallowed_token_mask"]

_PLACEHOLDER = "\x00BFT_GCG_SUFFIX\x00"


@dataclass
class GCGConfig:
    steps: int = 250
    search_width: int = 256
    topk: int = 256
    n_replace: int = 1
    suffix_init: str = "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !"
    eval_batch_size: int = 64
    seed: int = 0
    allow_non_ascii: bool = False
    filter_retokenization: bool = True

    def __post_init__(self):
        for name in ("steps", "search_width", "topk", "n_replace", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 for GCG, got {getattr(self, name)}")
        if not self.suffix_init.strip():
            raise ValueError("suffix_init must contain at least one token for GCG")


@dataclass
class GCGResult:
    suffix: str
    suffix_ids: list[int]
    best_loss: float
    losses: list[float] = field(default_factory=list)  # loss of the current suffix after each step
    initial_loss: float = float("nan")
    input_ids: list[int] = field(default_factory=list)  # chat(prompt + " " + suffix) ready for generation

    def to_dict(self) -> dict:
        return asdict(self)


def _segments(tokenizer, prompt: str, system_prompt: str | None):
    """Token ids of the chat template before and after the suffix slot in ``prompt + " " + suffix``."""
    text = prompt_text(tokenizer, f"{prompt} {_PLACEHOLDER}", system=system_prompt)
    if text.count(_PLACEHOLDER) != 1:
        raise ValueError("the chat template altered the GCG suffix placeholder; cannot locate the suffix slot")
    before, after = text.split(_PLACEHOLDER)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    return enc(before), enc(after)


_MASK_CACHE: dict = {}


def disallowed_token_mask(tokenizer, vocab_rows: int, allow_non_ascii: bool = False) -> torch.Tensor:
    """[vocab_rows] bool: True for ids GCG must not propose (special tokens, ids beyond the tokenizer, tokens that
    decode to nothing or, unless allowed, to non-printable-ASCII text)."""
    key = (id(tokenizer), vocab_rows, allow_non_ascii)
    if key in _MASK_CACHE:
        return _MASK_CACHE[key]
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    n = len(tokenizer)
    mask[min(n, vocab_rows) :] = True
    special = set(tokenizer.all_special_ids)
    for i in range(min(n, vocab_rows)):
        if i in special:
            mask[i] = True
            continue
        text = tokenizer.decode([i])
        if not text.strip():
            mask[i] = True
        elif not allow_non_ascii and not (text.isascii() and text.isprintable()):
            mask[i] = True
    _MASK_CACHE[key] = mask
    return mask


def target_loss(
    model, before: torch.Tensor, suffixes: torch.Tensor, after: torch.Tensor, target: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Mean target cross-entropy for each suffix row: [C] fp32 (no gradient)."""
    device = next(model.parameters()).device
    C = suffixes.shape[0]
    T = target.numel()
    losses = []
    with torch.no_grad():
        for i in range(0, C, batch_size):
            chunk = suffixes[i : i + batch_size].to(device)
            b = chunk.shape[0]
            ids = torch.cat([before.expand(b, -1), chunk, after.expand(b, -1), target.expand(b, -1)], dim=1).to(device)
            logits = model(input_ids=ids).logits[:, -T - 1 : -1, :].float()
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.view(-1).to(device).repeat(b), reduction="none"
            ).view(b, T)
            losses.append(ce.mean(1).cpu())
    return torch.cat(losses)


def _token_gradient(model, before, suffix, after, target) -> torch.Tensor:
    """∂L/∂(one-hot suffix): [n, V] (fp32)."""
    embed = model.get_input_embeddings()
    W = embed.weight
    device = W.device
    one_hot = torch.zeros(suffix.numel(), W.shape[0], dtype=W.dtype, device=device)
    one_hot.scatter_(1, suffix.to(device).view(-1, 1), 1.0)
    one_hot.requires_grad_(True)
    parts = [embed(before.to(device)), one_hot @ W, embed(after.to(device)), embed(target.to(device))]
    embeds = torch.cat(parts, dim=1 if parts[0].dim() == 3 else 0)
    if embeds.dim() == 2:
        embeds = embeds.unsqueeze(0)
    T = target.numel()
    logits = model(inputs_embeds=embeds).logits[0, -T - 1 : -1, :].float()
    loss = torch.nn.functional.cross_entropy(logits, target.view(-1).to(device))
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad.float()


def _sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, config: GCGConfig, gen: torch.Generator):
    n = suffix.numel()
    top = (-grad).topk(min(config.topk, grad.shape[1]), dim=1).indices.cpu()  # [n, topk]
    cands = suffix.view(1, -1).repeat(config.search_width, 1)
    n_rep = min(config.n_replace, n)
    for c in range(config.search_width):
        positions = torch.randperm(n, generator=gen)[:n_rep]
        picks = torch.randint(0, top.shape[1], (n_rep,), generator=gen)
        cands[c, positions] = top[positions, picks]
    return cands


def _retokenizes(tokenizer, cands: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(cands.shape[0], dtype=torch.bool)
    texts = tokenizer.batch_decode(cands.tolist())
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        keep[i] = ids == cands[i].tolist()
    return keep


def run_gcg(
    model,
    tokenizer,
    prompt: str,
    target: str,
    config: GCGConfig | None = None,
    *,
    system_prompt: str | None = None,
    progress: bool = True,
) -> GCGResult:
    """Optimise a suffix for ``prompt`` so that ``model`` answers ``target`` (module docstring for the method)."""
    from tqdm.auto import tqdm

    config = config or GCGConfig()
    if not target.strip():
        raise ValueError("GCG needs a non-empty target string")
    gen = torch.Generator().manual_seed(int(config.seed))
    before_ids, after_ids = _segments(tokenizer, prompt, system_prompt)
    before = torch.tensor([before_ids])
    after = torch.tensor([after_ids])
    target_ids = torch.tensor([list(tokenizer(target, add_special_tokens=False).input_ids)])
    suffix = torch.tensor(list(tokenizer(config.suffix_init, add_special_tokens=False).input_ids))
    W = model.get_input_embeddings().weight
    banned = disallowed_token_mask(tokenizer, W.shape[0], config.allow_non_ascii).to(W.device)

    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients only w.r.t. the one-hot suffix
        p.requires_grad_(False)
    try:
        current_loss = float(target_loss(model, before, suffix.view(1, -1), after, target_ids)[0])
        best_loss, best_suffix = current_loss, suffix.clone()
        result = GCGResult(suffix="", suffix_ids=[], best_loss=best_loss, initial_loss=current_loss)
        for _ in tqdm(range(config.steps), desc="gcg", disable=not progress, leave=False):
            grad = _token_gradient(model, before[0], suffix, after[0], target_ids[0])
            grad[:, banned] = torch.inf
            cands = _sample_candidates(suffix, grad, config, gen)
            if config.filter_retokenization:
                keep = _retokenizes(tokenizer, cands)
                if keep.any():
                    cands = cands[keep]
            losses = target_loss(model, before, cands, after, target_ids, config.eval_batch_size)
            i = int(losses.argmin())
            suffix, current_loss = cands[i].clone(), float(losses[i])
            result.losses.append(current_loss)
            if current_loss < best_loss:
                best_loss, best_suffix = current_loss, suffix.clone()
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    result.best_loss = best_loss
    result.suffix_ids = best_suffix.tolist()
    result.suffix = tokenizer.decode(result.suffix_ids)
    result.input_ids = before_ids + result.suffix_ids + after_ids
    return result
