"""The three models of a BFT run and the forward passes the trainer needs from them.

Memory plan (paper Eq. 8-14 need the logits of three models at every response position; we never build them):

- every forward stops at the decoder's final (normed) hidden states: :func:`final_hidden_states` runs
  ``model.get_decoder()``, not the causal-LM head, so no [B, L, V] logits exist for any model;
- the frozen forwards (base; aligned in full fine-tuning) run under ``torch.no_grad`` and keep only that
  [B, L, H] output;
- with LoRA the aligned teacher *is* the student with its adapters disabled (``peft_model.disable_adapter()``), so
  one copy of the weights serves both, and both use the same lm_head tensor;
- the frozen weights can be 8-bit or 4-bit (bitsandbytes); the lm_head is kept in 16-bit so the loss reads it
  as a plain [V, H] matrix.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from bft.trainer.config import TINY_ALIGNED, TINY_BASE, Config
from torch import nn

from bft.hf import models
from bft.hf.models import final_hidden_states

if TYPE_CHECKING:
    from bft.loss import BFTLoss

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def lm_head_weight(model: nn.Module, vocab_size: int | None = None) -> torch.Tensor:
    """[V, H] lm_head weight (:func:`bft.hf.models.lm_head_weight`), rows cut to ``vocab_size`` (the tokenizer's)."""
    return models.lm_head_weight(model, vocab_size)


def resolve_attn_implementation(requested: str, dtype: torch.dtype, device: torch.device) -> str:
    """``"auto"``: flash_attention_2 when the flash-attn package is installed and we run 16-bit on CUDA, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError(
            "model.attn_implementation='flash_attention_2' needs the flash-attn package "
            "(pip install flash-attn); use 'sdpa' or 'auto'"
        )
    if requested != "auto":
        return requested
    if has_flash and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def check_quantization_available(kind: str | None) -> None:
    """Fail before anything loads when 8/4-bit frozen weights are asked for but cannot be had."""
    if kind is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"model.frozen_quantization={kind!r} needs bitsandbytes and a CUDA GPU: "
            "pip install bitsandbytes (or set model.frozen_quantization: null)"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"model.frozen_quantization={kind!r} needs a CUDA GPU (bitsandbytes); none is available")


def load_causal_lm(
    name: str,
    *,
    gguf_file=None,
    dtype: torch.dtype,
    quantization=None,
    attn_implementation: str,
    device: torch.device,
    trainable: bool,
):
    """Load one model on ``device`` via :func:`bft.hf.models.load_model` (8/4-bit keep a 16-bit lm_head); frozen
    ones are put in eval mode with ``requires_grad=False``. A missing path or hub id raises FileNotFoundError."""
    try:
        model = models.load_model(
            name,
            gguf_file=gguf_file,
            dtype=dtype,
            device=device,
            quantization=quantization,
            attn_implementation=attn_implementation,
        )
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FileNotFoundError(str(e)) from e
    model.config.use_cache = False
    if not trainable:
        freeze(model)
    return model


def load_tokenizer(name: str, *, gguf_file: str | None = None):
    try:
        return models.load_tokenizer(name, gguf_file=gguf_file)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FileNotFoundError(str(e)) from e


def _set_attn_implementation(model, attn_implementation: str) -> None:
    current = getattr(model.config, "_attn_implementation", None)
    if current == attn_implementation:
        return
    try:
        model.set_attn_implementation(attn_implementation)
    except (AttributeError, ValueError, ImportError) as e:
        warnings.warn(f"could not switch attention to {attn_implementation!r} ({e}); keeping {current!r}", stacklevel=2)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Trio:
    """The models of one run.

    student: the trainable model (a peft model in LoRA mode).
    base:    the frozen base model; ``None`` when training from the teacher cache (it is not loaded).
    aligned: the frozen aligned model in full fine-tuning; ``None`` in LoRA mode (the teacher is ``student`` with
             adapters disabled) and when training from the teacher cache.
    tokenizer: the aligned model's tokenizer (it has the chat template); base_tokenizer: the base model's.
    """

    student: nn.Module
    base: nn.Module
    aligned: nn.Module | None
    tokenizer: object
    base_tokenizer: object
    vocab_size: int  # len(tokenizer): rows of every lm_head that the loss reads

    @property
    def lora(self) -> bool:
        return hasattr(self.student, "get_base_model")  # a peft model


def load_tokenizers(config: Config):
    """(aligned-side tokenizer, base tokenizer); the tiny models share one built in memory."""
    m = config.model
    if m.aligned == TINY_ALIGNED:
        from bft.hf.testing import tiny_tokenizer

        tok = tiny_tokenizer(padding_side="right")
        return tok, tok
    tokenizer = load_tokenizer(m.tokenizer or m.aligned, gguf_file=None if m.tokenizer else m.aligned_gguf_file)
    base_tokenizer = load_tokenizer(m.base, gguf_file=m.base_gguf_file)
    return tokenizer, base_tokenizer


def _tiny_pair(m, tokenizer, device: torch.device, dtype: torch.dtype, attn: str):
    """The tiny random (base, aligned) pair of ``model.base: tiny-random-base`` on ``device`` in ``dtype``."""
    if m.frozen_quantization:
        raise ValueError("the tiny random models cannot be quantized; set model.frozen_quantization: null")
    from bft.hf.testing import tiny_llama_pair

    base, aligned, _ = tiny_llama_pair(
        seed=m.tiny_seed, tokenizer=tokenizer, hidden_size=m.tiny_hidden_size, num_layers=m.tiny_num_layers
    )
    for model in (base, aligned):
        model.to(device=device, dtype=dtype)
        _set_attn_implementation(model, attn)
        model.config.use_cache = False
    return base, aligned


def build_teachers(config: Config, tokenizer, base_tokenizer, device: torch.device) -> Trio:
    """The two frozen models alone, as the live run's teachers compute (for building the teacher cache): base, and
    aligned with ``model.frozen_quantization`` as in both modes (LoRA's teacher is its student's quantizable body
    with the adapters disabled, which computes what the plain model does). ``trio.student`` is the aligned model."""
    m = config.model
    dtype = torch_dtype(m.dtype)
    attn = resolve_attn_implementation(m.attn_implementation, dtype, device)
    if m.base == TINY_BASE:
        base, aligned = _tiny_pair(m, tokenizer, device, dtype, attn)
        freeze(base)
        freeze(aligned)
    else:
        common = {
            "dtype": dtype,
            "attn_implementation": attn,
            "device": device,
            "quantization": m.frozen_quantization,
            "trainable": False,
        }
        base = load_causal_lm(m.base, gguf_file=m.base_gguf_file, **common)
        aligned = load_causal_lm(m.aligned, gguf_file=m.aligned_gguf_file, **common)
    vocab_size = check_vocab(tokenizer, base_tokenizer, aligned, base)
    return Trio(
        student=aligned,
        base=base,
        aligned=aligned,
        tokenizer=tokenizer,
        base_tokenizer=base_tokenizer,
        vocab_size=vocab_size,
    )


def build_trio(config: Config, tokenizer, base_tokenizer, device: torch.device, frozen: bool = True) -> Trio:
    """Load/build base, aligned and student as configured (the student starts as the aligned model).

    ``frozen=False`` (training from the teacher cache): the student only; the frozen base and aligned bodies are
    not loaded (``trio.base = trio.aligned = None``)."""
    m, f = config.model, config.finetune
    dtype = torch_dtype(m.dtype)
    attn = resolve_attn_implementation(m.attn_implementation, dtype, device)
    lora = f.mode == "lora"
    if m.base == TINY_BASE:
        base, aligned = _tiny_pair(m, tokenizer, device, dtype, attn)
        freeze(base)
        student = aligned if lora or not frozen else copy.deepcopy(aligned)
        aligned = None if lora or not frozen else freeze(aligned)
        base = base if frozen else None
    else:
        common = dict(dtype=dtype, attn_implementation=attn, device=device)
        base = None
        if frozen:
            base = load_causal_lm(
                m.base, gguf_file=m.base_gguf_file, quantization=m.frozen_quantization, trainable=False, **common
            )
        # LoRA: the student's own weights are frozen (only adapters train), so they may be quantized (QLoRA) and
        # double as the aligned teacher. Full: a trainable 16-bit copy plus a separate frozen (quantizable) one.
        student = load_causal_lm(
            m.student or m.aligned,  # model.student: another starting point than the teacher (from the cache only)
            gguf_file=None if m.student else m.aligned_gguf_file,
            quantization=m.frozen_quantization if lora else None,
            trainable=True,
            **common,
        )
        aligned = None
        if not lora and frozen:
            aligned = load_causal_lm(
                m.aligned, gguf_file=m.aligned_gguf_file, quantization=m.frozen_quantization, trainable=False, **common
            )

    vocab_size = check_vocab(tokenizer, base_tokenizer, student, base)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(student)
    if lora:
        student = add_lora(student, config)
    student.train()
    return Trio(
        student=student,
        base=base,
        aligned=aligned,
        tokenizer=tokenizer,
        base_tokenizer=base_tokenizer,
        vocab_size=vocab_size,
    )


def check_vocab(tokenizer, base_tokenizer, aligned_model=None, base_model=None) -> int:
    """Base and aligned must share one vocabulary (:func:`bft.hf.models.check_same_vocab`, which also checks that each
    lm_head covers it); returns V = len(tokenizer), the rows of every lm_head the loss reads."""
    return models.check_same_vocab(tokenizer, base_tokenizer, aligned_model, base_model)  # aligned, then base


def add_lora(model: nn.Module, config: Config) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters train, the lm_head stays shared and frozen."""
    from peft import LoraConfig

    f = config.finetune
    lora_config = LoraConfig(
        r=f.lora_r,
        lora_alpha=f.lora_alpha,
        lora_dropout=f.lora_dropout,
        target_modules=f.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = models.get_peft_model(model, lora_config)
    return peft_model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (works with frozen embeddings, i.e. LoRA, without input grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


class BFTStudent(nn.Module):
    """The trainable student with the BFT loss inside ``forward``.

    Everything that reads the student's weights runs inside this forward — its final hidden states, its lm_head
    and, with LoRA, the aligned teacher (the same weights with the adapters disabled) — because that is where
    wrappers make them whole: DDP sees the lm_head used, and FSDP has the root's parameters (embeddings, final norm,
    lm_head) unsharded and each decoder layer gathers its own. Returns a dict with the scalar ``loss`` and the
    detached per-row terms of :class:`bft.BFTLossOutput`.

    ``objective``: the :class:`bft.BFTLoss` to apply (:func:`bft.trainer.train.loss_module` builds it from the
    config's one :class:`bft.loss.BFTLossParams`).
    """

    def __init__(self, model: nn.Module, objective: BFTLoss, vocab_size: int):
        super().__init__()
        self.model = model
        self.objective = objective
        self.vocab_size = vocab_size

    @property
    def _no_split_modules(self):
        """The decoder-layer classes of the model inside, so that FSDP's transformer-based auto-wrap (accelerate's
        default when no class names are given) finds them through this wrapper."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(inner, "_no_split_modules", None)

    def forward(
        self,
        input_ids,
        attention_mask,
        aligned_hidden,
        aligned_weight,
        base_hidden,
        base_weight,
        harmful,
        valid,
        topk_ids=None,
        risk=None,
    ) -> dict:
        """``aligned_hidden = aligned_weight = None``: the aligned teacher is this student with its LoRA adapters
        disabled (one copy of the weights; the heads are the same tensor). ``aligned_weight = None`` with
        ``aligned_hidden`` given (LoRA from the teacher cache): the aligned head is the student's own.
        ``topk_ids`` / ``risk``: the base-favored ids and density of the teacher cache, handed to the loss."""
        if aligned_weight is not None and aligned_hidden is None:
            raise ValueError(
                "pass both aligned_hidden and aligned_weight, or neither (LoRA: the student without its adapters)"
            )
        if aligned_hidden is None:
            if not hasattr(self.model, "disable_adapter"):
                raise ValueError(
                    "aligned_hidden=None needs a peft (LoRA) student: its aligned teacher is the "
                    "student with the adapters disabled"
                )
            with self.model.disable_adapter():
                aligned_hidden = frozen_hidden_states(self.model, input_ids, attention_mask)
        hidden = final_hidden_states(self.model, input_ids, attention_mask)
        weight = lm_head_weight(self.model, self.vocab_size)
        if aligned_weight is None:
            aligned_weight = weight  # the very tensor the student uses (frozen in LoRA)
        given = {} if topk_ids is None else {"topk_ids": topk_ids, "risk": risk}
        return self.loss(
            hidden, weight, aligned_hidden, aligned_weight, base_hidden, base_weight, harmful, valid, **given
        )

    def loss(
        self,
        hidden,
        weight,
        aligned_hidden,
        aligned_weight,
        base_hidden,
        base_weight,
        harmful,
        valid,
        topk_ids=None,
        risk=None,
    ) -> dict:
        """The fused :func:`bft.bft_loss` (this student's :class:`bft.BFTLoss`) on [B, L, H] hidden states and
        [V, H] heads, rows flattened (with the teacher cache's ``topk_ids`` [B·L, k] and ``risk`` [B·L] when
        given)."""
        dtype = weight.dtype  # one dtype for all six tensors; frozen weights are cast only when they differ
        H = hidden.shape[-1]
        out = self.objective(
            hidden.reshape(-1, H).to(dtype),
            weight,
            aligned_hidden.reshape(-1, aligned_hidden.shape[-1]).to(dtype),
            aligned_weight.to(dtype),
            base_hidden.reshape(-1, base_hidden.shape[-1]).to(dtype),
            base_weight.to(dtype),
            harmful=harmful.reshape(-1),
            valid=valid.reshape(-1),
            topk_ids=topk_ids,
            risk=risk,
        )
        return {"loss": out.loss, "kl": out.kl, "completion": out.completion, "risk": out.risk, "alpha": out.alpha}


@torch.no_grad()
def frozen_hidden_states(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states of a frozen model; eval mode for the pass so no dropout touches the teacher."""
    was_training = model.training
    model.eval()
    try:
        return final_hidden_states(model, input_ids, attention_mask)
    finally:
        model.train(was_training)


@torch.no_grad()
def teacher_hidden_states(trio: Trio, input_ids, attention_mask, vocab_size: int):
    """(aligned_hidden, aligned_weight, base_hidden, base_weight) of the frozen models for one batch, without
    autograd. With LoRA the aligned pair is ``(None, None)``: :class:`BFTStudent` computes it inside its forward
    (the student with adapters disabled), where wrappers such as FSDP have the weights gathered."""
    base_hidden = frozen_hidden_states(trio.base, input_ids, attention_mask)
    base_weight = lm_head_weight(trio.base, vocab_size)
    if trio.lora:
        return None, None, base_hidden, base_weight
    aligned_hidden = frozen_hidden_states(trio.aligned, input_ids, attention_mask)
    aligned_weight = lm_head_weight(trio.aligned, vocab_size)
    return aligned_hidden, aligned_weight, base_hidden, base_weight
