"""Turning (prompt, response) pairs into token ids with a model's chat template.

The one rule everything in bft relies on: the response is tokenized on its own and appended right after the
rendered prompt (chat template + generation prompt), followed by the template's end-of-turn token, so

    ids = encode_chat(tok, prompt, response)
    ids.input_ids[ids.response_start:] == tok(response, add_special_tokens=False).input_ids + [end_of_turn_id]

and a loss mask over the response is simply ``positions >= response_start``. Tokenizing the response separately
(rather than slicing a jointly tokenized string) means a token can never straddle the prompt/response boundary;
for the byte-level BPE tokenizers of SmolLM2, Llama-3 and Qwen the generation prompt ends in a newline, which is a
pre-tokenization boundary anyway, so the ids are the same as tokenizing the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChatEncoding", "chat_messages", "encode_chat", "end_of_turn_id", "prompt_text", "render_prompts"]


@dataclass(frozen=True)
class ChatEncoding:
    """Token ids of one chat turn.

    Attributes:
        input_ids: rendered prompt (with generation prompt), then the response tokens and the end-of-turn token
            when a response was given.
        response_start: index of the first response token (== ``len(input_ids)`` when there is no response).
    """

    input_ids: list[int]
    response_start: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.response_start]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :]


def chat_messages(prompt: str, *, system: str | None = None, response: str | None = None) -> list[dict]:
    """The message list ``[system?, user, assistant?]`` that chat templates consume."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat_template. Base (pre-trained) checkpoints often ship without one: "
            "encode prompts with the aligned/instruct model's tokenizer (bft requires both to share a vocabulary), "
            "or set tokenizer.chat_template."
        )


def prompt_text(
    tokenizer, prompt: str, *, system: str | None = None, prefill: str = "", template_kwargs: dict | None = None
) -> str:
    """The prompt rendered with the chat template and the generation prompt, followed by ``prefill``.

    ``prefill`` is text the assistant turn is forced to start with (prefilling attacks, e.g. AdvBench's
    "Sure, here is ..."); generation continues from it. ``template_kwargs`` are extra variables for the template,
    e.g. ``{"enable_thinking": False}`` for Qwen3 (whose generation prompt then ends with an empty think block).
    """
    _require_template(tokenizer)
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, system=system), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return text + prefill


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The id of the token that closes an assistant turn in ``tokenizer``'s chat template.

    Found by rendering a probe conversation with and without an assistant reply and taking the first special token
    that follows the reply (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for Gemma,
    ``</s>`` for Mistral). Falls back to ``eos_token_id`` when the template closes the turn with no special token.
    """
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_bft_end_of_turn", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    _require_template(tokenizer)
    probe = "bft probe reply"
    prompt = tokenizer.apply_chat_template(chat_messages("hi"), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat_messages("hi", response=probe), tokenize=False)
    found = None
    if full.startswith(prompt) and probe in full[len(prompt) :]:
        trailer = full[len(prompt) :].split(probe, 1)[1]
        special = _special_ids(tokenizer)
        found = next((i for i in tokenizer(trailer, add_special_tokens=False).input_ids if i in special), None)
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        raise ValueError(
            "cannot tell which token ends an assistant turn: the chat template emits no special token after the "
            "reply and the tokenizer has no eos_token"
        )
    try:  # cache on the tokenizer, keyed by the template in case someone swaps it
        tokenizer._bft_end_of_turn = (template, int(found))
    except AttributeError:
        pass
    return int(found)


def encode_chat(
    tokenizer,
    prompt: str,
    response: str | None = None,
    *,
    system: str | None = None,
    template_kwargs: dict | None = None,
) -> ChatEncoding:
    """Token ids of ``prompt`` rendered as a user turn (+ generation prompt), then ``response`` and end-of-turn.

    ``input_ids[response_start:]`` are exactly ``tokenizer(response, add_special_tokens=False).input_ids`` followed
    by :func:`end_of_turn_id`; with ``response=None`` only the prompt is encoded (ready for generation) and
    ``response_start == len(input_ids)``. The template supplies any bos token, so no special tokens are added.
    ``template_kwargs`` are passed to the chat template (see :func:`prompt_text`).
    """
    rendered = prompt_text(tokenizer, prompt, system=system, template_kwargs=template_kwargs)
    prompt_ids = list(tokenizer(rendered, add_special_tokens=False).input_ids)
    if response is None:
        return ChatEncoding(input_ids=prompt_ids, response_start=len(prompt_ids))
    if not isinstance(response, str):
        raise ValueError(f"response must be a string or None, got {type(response).__name__}")
    response_ids = list(tokenizer(response, add_special_tokens=False).input_ids)
    return ChatEncoding(
        input_ids=prompt_ids + response_ids + [end_of_turn_id(tokenizer)], response_start=len(prompt_ids)
    )


def render_prompts(tokenizer, prompts: list[str], prefills: list[str] | None = None, *, system: str | None = None):
    """Chat-render prompts (+ optional response prefixes) and tokenize them as a left-padded batch."""
    prefills = prefills or [""] * len(prompts)
    texts = [prompt_text(tokenizer, p, system=system, prefill=f) for p, f in zip(prompts, prefills)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    return enc["input_ids"], enc["attention_mask"]
