"""Systems under evaluation and batched generation from token ids.

A :class:`System` is what a row of the paper's tables is: a model that answers prompts, either decoded plainly
("baseline", "trained", any HF causal LM) or with Eq. 7 contrastive decoding against a base model
("contrastive", via :func:`bft.decoding.contrastive_generate`). Every attack feeds it *token ids*
(chat-rendered prompt, then an optional forced response prefix), never re-tokenized text, so a prefill of k
tokens is exactly k tokens and a GCG suffix is exactly the optimised ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bft.decoding import contrastive_generate
from bft.decoding.contrastive import check_form
from bft.hf.chat import encode_chat
from bft.hf.generation import GenerationSettings, generate_from_ids

__all__ = ["GenerationSettings", "System", "contrastive_name", "generate_plain_or_contrastive"]


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
    form: str = "logprobs"  # Eq. 7 on log-probs, or "logits" (the paper's text); contrastive systems only

    def __post_init__(self):
        check_form(self.form)
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
            "form": self.form if self.contrastive else None,
            "system_prompt": self.system_prompt,
        }

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-rendered prompt (with generation prompt) as ids: :func:`bft.hf.chat.encode_chat`."""
        return encode_chat(self.tokenizer, prompt, system=self.system_prompt).input_ids

    def generate(
        self, inputs: Sequence[Sequence[int]], settings: GenerationSettings, *, desc: str | None = None
    ) -> list[list[int]]:
        """New token ids (without the input, without padding) for each input id list."""
        return generate_plain_or_contrastive(
            self.model,
            self.tokenizer,
            inputs,
            settings,
            base_model=self.base_model,
            alpha=self.alpha,
            form=self.form,
            desc=desc or self.name,
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _model_name(model) -> str | None:
    if model is None:
        return None
    return (
        getattr(model, "name_or_path", None)
        or getattr(getattr(model, "config", None), "_name_or_path", None)
        or (type(model).__name__)
    )


def contrastive_name(alpha: float, form: str = "logprobs") -> str:
    """The table name of a contrastive system: ``contrastive α=1``, or ``contrastive (logits) α=1`` for the
    paper's logit form of Eq. 7."""
    return f"contrastive α={alpha:g}" if form == "logprobs" else f"contrastive ({form}) α={alpha:g}"


def generate_plain_or_contrastive(
    model,
    tokenizer,
    inputs: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    *,
    base_model=None,
    alpha: float | None = None,
    form: str = "logprobs",
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """:func:`bft.hf.generation.generate_from_ids`, plain when ``base_model`` is None, else with Eq. 7 contrastive
    decoding (:func:`bft.decoding.contrastive_generate`) against ``base_model`` at ``alpha``."""
    if (base_model is None) != (alpha is None):
        raise ValueError("contrastive decoding needs both base_model and alpha")
    generate = None
    if base_model is not None:

        def generate(input_ids, attention_mask, **kwargs):
            return contrastive_generate(
                model, base_model, input_ids, attention_mask, alpha=float(alpha), form=form, **kwargs
            )

    return generate_from_ids(model, tokenizer, inputs, settings, generate=generate, desc=desc, progress=progress)
