"""Tiny, fully offline stand-ins for real chat models, for tests and examples.

Nothing here downloads anything: the tokenizer is built in memory with the ``tokenizers`` library and the models
are randomly initialised ``LlamaForCausalLM`` instances. They are small enough that a forward pass on CPU takes
milliseconds, yet they exercise the same code paths as a real chat model (chat template, special tokens, padding,
separate ``lm_head``).

- :func:`tiny_tokenizer` — character-level tokenizer over printable ASCII (+ ``\\n``, ``\\t``) with the ChatML
  special tokens ``<|im_start|>``, ``<|im_end|>`` (end of turn, eos), ``<pad>``, ``<|endoftext|>`` and ``<unk>``,
  and a SmolLM2-style ChatML ``chat_template``. ``decode(encode(text)) == text`` for ASCII text.
- :func:`tiny_llama` — a random ``LlamaForCausalLM`` whose vocabulary matches the tokenizer.
- :func:`tiny_llama_pair` — ``(base, aligned, tokenizer)``: the aligned model is the base model plus a
  deterministic Gaussian weight perturbation, so the two disagree measurably (as a base and an instruct model do).
"""

from __future__ import annotations

import copy
import string

import torch

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "tiny_llama",
    "tiny_llama_pair",
    "tiny_tokenizer",
]

#: Special tokens of the tiny tokenizer, in id order (ids 0..4).
SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")

#: ChatML template in the style of SmolLM2-Instruct (without its default system prompt, to keep sequences short).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Every character the tokenizer knows besides the special tokens: printable ASCII minus the vertical whitespace
# characters \r \x0b \x0c that `string.printable` also contains (they would not survive most chat templates).
_CHARACTERS = tuple(dict.fromkeys(c for c in string.printable if c not in "\r\x0b\x0c"))


def tiny_tokenizer(*, padding_side: str = "right"):
    """A character-level ``PreTrainedTokenizerFast`` with ChatML special tokens, built offline.

    Vocabulary: ids 0..4 are :data:`SPECIAL_TOKENS`, then one id per printable ASCII character (space, ``\\n`` and
    ``\\t`` included); ``len(tokenizer) == 102``. ``eos_token = "<|im_end|>"`` (the end-of-turn token of the chat
    template), ``pad_token = "<pad>"``, ``unk_token = "<unk>"``, no bos token.

    Args:
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in _CHARACTERS:
        vocab[character] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character ([\s\S] matches newlines too, unlike "."), so WordLevel sees single chars.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens without the spaces a WordLevel decode would insert, so decode(encode(x)) == x.
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def tiny_llama(
    tokenizer=None,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    initializer_range: float = 0.1,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` (fp32, eval mode) sized to ``tokenizer``'s vocabulary.

    ``vocab_size = len(tokenizer)``, ``pad_token_id``/``eos_token_id`` taken from the tokenizer,
    ``tie_word_embeddings=False`` (a separate ``lm_head`` as in 7-8B chat models). The weights depend only on
    ``seed`` and the sizes; the global torch RNG is left untouched. ``initializer_range`` defaults to 0.1 (not
    Llama's 0.02) so that logits are far from uniform even at ``hidden_size=32``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    # Build under a forked RNG so the weights are a function of `seed` alone and callers' RNG state is unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model


@torch.no_grad()
def _perturb_(model, *, scale: float, seed: int) -> None:
    """In place: θ ← θ + scale·ε, ε ~ N(0, 1) i.i.d., drawn from a generator seeded with ``seed``."""
    generator = _seeded_generator(seed)
    for _, parameter in sorted(model.named_parameters()):  # sorted: the draw order does not depend on registration
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        parameter.add_(noise.to(parameter.dtype), alpha=scale)


def tiny_llama_pair(
    seed: int = 0,
    *,
    tokenizer=None,
    hidden_size: int = 32,
    num_layers: int = 2,
    perturbation: float = 0.5,
):
    """``(base_model, aligned_model, tokenizer)`` sharing one tokenizer and architecture.

    ``base = tiny_llama(tokenizer, seed=seed)``; ``aligned`` is a deep copy with every parameter shifted by
    ``perturbation · initializer_range · ε``, ε ~ N(0, 1) drawn from a generator seeded with ``seed + 1``, so the
    pair is fully deterministic and its next-token distributions differ measurably (tests check a KL > 0.01).
    """
    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    base = tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    aligned = copy.deepcopy(base)
    _perturb_(aligned, scale=perturbation * base.config.initializer_range, seed=seed + 1)
    aligned.eval()
    return base, aligned, tokenizer


def peak_allocated_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn()`` beyond what was live before it (CPU only).

    Read from the PyTorch profiler's allocation events, in time order: every allocation and free made by torch on
    the CPU during the call, including those inside autograd's backward. The CPU analogue of
    ``torch.cuda.max_memory_allocated() - memory_allocated_before`` — used by the tests to check a backend's
    working memory against its documented plan without a GPU.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].alloc_size))  # frees are negative
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak
