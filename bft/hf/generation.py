"""The one generation helper: batched, left-padded generation from token ids, seeded per batch.

Every attack, analysis and data step that generates goes through :func:`generate_from_ids`; contrastive decoding
(Eq. 7, :mod:`bft.decoding`) plugs in as the ``generate`` callable, so this layer does not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from bft.hf.batching import pad_batch, pad_token_id, stop_token_ids

__all__ = ["GenerationSettings", "generate_from_ids"]


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
            raise ValueError(
                f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample)}
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        else:  # silence generation_config's sampling defaults that greedy decoding ignores
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _cut_at_stop(row: list[int], stop: list[int]) -> list[int]:
    cut = next((i for i, t in enumerate(row) if t in stop), len(row))
    return row[:cut]


@torch.no_grad()
def generate_from_ids(
    model,
    tokenizer,
    inputs: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    *,
    generate: Callable | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """Batched generation (left-padded); returns only the new tokens of each row, cut at the first stop token
    (which is dropped) and with padding removed.

    ``generate(input_ids, attention_mask, **kwargs) -> sequences`` replaces ``model.generate`` (contrastive
    decoding passes its own). Sampling is seeded per batch (``settings.seed + batch index``), so results do not
    depend on what ran before.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    inputs = [list(map(int, ids)) for ids in inputs]
    pad_id = pad_token_id(tokenizer, model)
    stop = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    if generate is None:

        def generate(input_ids, attention_mask, **kwargs):
            return model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)

    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    starts = range(0, len(inputs), settings.batch_size)
    try:
        for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress or not inputs)):
            input_ids, mask = pad_batch(inputs[start : start + settings.batch_size], pad_id, side="left")
            kwargs = settings.generate_kwargs()
            kwargs.update(pad_token_id=pad_id, eos_token_id=stop or None)
            if settings.do_sample:
                torch.manual_seed(settings.seed + batch_index)
            seqs = generate(input_ids, mask, **kwargs)
            outputs += [_cut_at_stop(row, stop) for row in seqs[:, input_ids.shape[1] :].tolist()]
    finally:
        model.train(was_training)
    return outputs
