"""Systems under evaluation and batched generation from token ids.

A :class:`System` is what a row of the paper's tables is: a model that answers prompts, either decoded plainly
("baseline", "trained", any HF causal LM) or with Eq. 7 contrastive decoding against a base model
("contrastive", via :func:`bft.contrastive.contrastive_generate`). Every attack feeds it *token ids*
(chat-rendered prompt, then an optional forced response prefix), never re-tokenized text, so a prefill of k
tokens is exactly k tokens and a GCG suffix is exactly the optimised ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["GenerationSettings", "System", "generate_from_ids", "left_pad"]


@dataclass
class GenerationSettings:
    """Decoding settings, recorded with every result. Default greedy (deterministic); Qi et al. (2024) sample
    with ``do_sample=True, temperature=0.9, top_p=0.6``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")

    def to_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample)}
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        else:  # silence generation_config's sampling defaults that greedy decoding ignores
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class System:
    """A model as evaluated: ``name`` for the tables, the model, its tokenizer, and for contrastive decoding the
    base model and α (Eq. 7). ``alpha=None`` (or no base model) means plain decoding."""

    name: str
    model: object
    tokenizer: object
    base_model: object | None = None
    alpha: float | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if (self.base_model is None) != (self.alpha is None):
            raise ValueError(f"system {self.name!r}: contrastive decoding needs both base_model and alpha")
        if self.alpha is not None and not float(self.alpha) >= 0:
            raise ValueError(f"system {self.name!r}: alpha must be >= 0, got {self.alpha}")

    @property
    def contrastive(self) -> bool:
        return self.base_model is not None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": _model_name(self.model),
            "decoding": "contrastive" if self.contrastive else "plain",
            "base_model": _model_name(self.base_model) if self.contrastive else None,
            "alpha": self.alpha,
            "system_prompt": self.system_prompt,
        }

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-rendered prompt (with generation prompt) as ids: :func:`bft.hf.chat.encode_chat`."""
        from bft.hf.chat import encode_chat

        return encode_chat(self.tokenizer, prompt, system=self.system_prompt).input_ids

    def generate(
        self, inputs: Sequence[Sequence[int]], settings: GenerationSettings, *, desc: str | None = None
    ) -> list[list[int]]:
        """New token ids (without the input, without padding) for each input id list."""
        return generate_from_ids(
            self.model, self.tokenizer, inputs, settings, base_model=self.base_model, alpha=self.alpha,
            desc=desc or self.name,
        )  # fmt: skip

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _model_name(model) -> str | None:
    if model is None:
        return None
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None) or (
        type(model).__name__
    )


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)`` [B, L] (generation needs the prompt at the right)."""
    if not batch or any(len(ids) == 0 for ids in batch):
        raise ValueError("every input must contain at least one token")
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, length - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, length - len(ids) :] = 1
    return input_ids, mask


def _pad_id(tokenizer, model) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(getattr(model, "generation_config", None), "pad_token_id", None)):  # fmt: skip
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (list, tuple)) else candidate)
    raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _stop_ids(tokenizer, model) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end-of-turn token and eos."""
    from bft.hf.chat import end_of_turn_id

    ids = set()
    try:
        ids.add(end_of_turn_id(tokenizer))
    except ValueError:
        pass
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in eos if isinstance(eos, (list, tuple)) else [eos, getattr(tokenizer, "eos_token_id", None)]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


@torch.no_grad()
def generate_from_ids(
    model,
    tokenizer,
    inputs: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    *,
    base_model=None,
    alpha: float | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """Batched generation (left-padded); returns only the new tokens of each row, cut at the first stop token
    (which is dropped) and with padding removed.

    Plain ``model.generate`` when ``base_model`` is None, else :func:`bft.contrastive.contrastive_generate` with
    ``alpha``. Sampling is seeded per batch (``settings.seed + batch index``), so results do not depend on what ran
    before.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    inputs = [list(map(int, ids)) for ids in inputs]
    if (base_model is None) != (alpha is None):
        raise ValueError("contrastive decoding needs both base_model and alpha")
    pad_id = _pad_id(tokenizer, model)
    stop = _stop_ids(tokenizer, model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    starts = range(0, len(inputs), settings.batch_size)
    try:
        for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress or not inputs)):
            batch = inputs[start : start + settings.batch_size]
            input_ids, mask = left_pad(batch, pad_id)
            kwargs = settings.generate_kwargs()
            kwargs.update(pad_token_id=pad_id, eos_token_id=stop or None)
            if settings.do_sample:
                torch.manual_seed(settings.seed + batch_index)
            if base_model is None:
                seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
            else:
                from bft.contrastive import contrastive_generate

                seqs = contrastive_generate(model, base_model, input_ids, mask, alpha=float(alpha), **kwargs)
            new = seqs[:, input_ids.shape[1] :].tolist()
            for row in new:
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                outputs.append(row[:cut])
    finally:
        model.train(was_training)
    return outputs
