"""The fingerprint of a teacher cache: everything its contents depend on, as named JSON values.

The settings, the identities of the two frozen models and the tokenizer, and a digest of the encoded examples. A
cache is used only when its saved fingerprint equals the run's; :func:`fingerprint_differences` names each key
that differs, so a refusal says what changed. :func:`sha256_file` is the one SHA-256 of a file in the cache code:
the model identities here and the shard checksums of :mod:`bft.trainer.cache_store` both use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

#: Bump when what the cache holds, or how the loss reads it, changes: old caches are then refused as stale.
OBJECTIVE_VERSION = 1
_BLOCK = 16 * 2**20  # read size when hashing a whole file: bounded memory, few Python iterations
_SAMPLE_BYTES = 2**20
_SAMPLES = 16
_HASH_WHOLE_BELOW = 64 * 2**20  # weight files up to this size are hashed whole; larger ones by samples


def sha256_file(path: str | Path, *, sample_above: int | None = None) -> str:
    """The SHA-256 hex digest of a file's bytes. With ``sample_above``, a larger file is hashed by samples
    instead: ``_SAMPLES`` blocks of ``_SAMPLE_BYTES`` spread evenly over it, then its size (weights of 7-8B models
    are ~16 GB; reading them whole would make every fingerprint take minutes)."""
    digest = hashlib.sha256()
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        if sample_above is None or size <= sample_above:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                digest.update(block)
        else:
            for i in range(_SAMPLES):
                fh.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                digest.update(fh.read(_SAMPLE_BYTES))
            digest.update(str(size).encode())
    return digest.hexdigest()


def _model_files(directory: Path, gguf_file: str | None) -> list[Path]:
    if gguf_file:
        return [directory / gguf_file]
    keep = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".model")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(keep))


def model_identity(name: str, gguf_file: str | None, config) -> dict:
    """What identifies a model's weights: the tiny models' construction, or each weight/config file's size and
    SHA-256 (sampled for large files) of a local folder, GGUF file (not their paths) or cached Hub snapshot (and its
    id); a Hub id that is not in the local cache is identified by its name only."""
    from bft.trainer.config import TINY_ALIGNED, TINY_BASE

    m = config.model
    if name in (TINY_BASE, TINY_ALIGNED):
        from bft.hf import testing

        return {
            "tiny": name,
            "hidden_size": m.tiny_hidden_size,
            "num_layers": m.tiny_num_layers,
            "seed": m.tiny_seed,
            "code": sha256_file(testing.__file__),
        }
    from bft.hf.models import resolve_model_source

    source, gguf = resolve_model_source(name, gguf_file)
    directory = Path(source)
    local = directory.exists()
    if not local:
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached locally: the name is all we know
            return {"hub_id": source, "gguf_file": gguf}
    files = {
        p.name: [p.stat().st_size, sha256_file(p, sample_above=_HASH_WHOLE_BELOW)]
        for p in _model_files(directory, gguf)
    }
    if local:  # a local folder or file is known by its files: moved elsewhere, it is the same model
        return {"gguf_file": gguf, "files": files}
    return {"name": name, "gguf_file": gguf, "files": files}


def tokenizer_identity(tokenizer) -> str:
    """A digest of the vocabulary, the chat template and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    parts = {
        "vocab": vocab,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def example_key(example) -> str:
    """A key of one encoded example: its tokens, where its response starts and its role."""
    digest = hashlib.sha256(np.asarray(example.input_ids, dtype=np.int64).tobytes())
    digest.update(f"{example.response_start}:{int(example.harmful)}".encode())
    return digest.hexdigest()[:32]


def data_identity(source: str) -> str | dict:
    """A dataset's identity: a local file by its SHA-256, not its path (a cache moved with its run folder and its
    data is the same cache); a Hub id or local dataset folder by its name."""
    path = Path(source)
    if path.is_file():
        return {"sha256": sha256_file(path)}
    return source


def examples_digest(examples) -> str:
    """A digest of the examples' keys, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(example_key(e).encode())
    return digest.hexdigest()


def fingerprint(config, tokenizer, harmful, utility) -> dict:
    """Everything the cache's contents depend on, as named JSON values (a mismatch names what differs)."""
    m, d = config.model, config.data
    t_seed = config.train.seed

    def data_source(role):
        limit = getattr(d, f"{role}_limit")
        out = {
            "source": data_identity(getattr(d, role)),
            "split": getattr(d, f"{role}_split"),
            "limit": limit,
            "columns": getattr(d, f"{role}_columns"),
        }
        if limit is not None:
            out["selection_seed"] = t_seed  # bft.hf.data.load picks `limit` rows with the run's seed
        if role == "harmful":
            out["response"] = d.harmful_response
            if d.harmful_response == "generate":
                out["generate_max_new_tokens"] = d.generate_max_new_tokens
        return out

    return {
        "objective_version": OBJECTIVE_VERSION,
        "model.base": model_identity(m.base, m.base_gguf_file, config),
        "model.aligned": model_identity(m.aligned, m.aligned_gguf_file, config),
        "model.dtype": m.dtype,
        "model.frozen_quantization": m.frozen_quantization,
        "model.attn_implementation": m.attn_implementation,
        "tokenizer": tokenizer_identity(tokenizer),
        "data.harmful": data_source("harmful") if d.harmful_ratio > 0 else None,
        "data.utility": data_source("utility") if d.harmful_ratio < 1 else None,
        "data.max_length": d.max_length,
        "data.system": d.system,
        "data.examples": examples_digest(list(harmful) + list(utility)),
        # the loss settings the stored ids and risk depend on (top_k, and the selection rule unless it is the
        # default "vocab"): a cache built under one completion term, τ, λ, α or KL setting serves every other
        **{f"loss.{name}": value for name, value in config.loss.teacher_cache_fields().items()},
    }


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """One line per key whose value differs, ``"KEY: cache SAVED vs config NOW"`` (long values shortened)."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: cache {_short(saved.get(key))} vs config {_short(now.get(key))}")
    return diffs
