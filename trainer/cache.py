"""The exact frozen-teacher cache: ``bft cache CONFIG [--out DIR] [--rebuild] [key=value ...]``.

The base and the aligned model are frozen and the training examples are fixed, so everything the objective needs
from them is computed once, per response position (valid row) of every example the trainer will see:

    h_aligned  [H_a]   final hidden state of the aligned model (LoRA: the student with its adapters disabled)
    h_base     [H_b]   final hidden state of the base model      (both in the dtype the live path hands the loss)
    topk_ids   [k]     int32, TopK(b − a) with ties to the lower id, in the loss's order
    risk       []      fp32, the base-favored density |{v : log p_b(v) > log p_a(v)}| / V

plus the two [V, H] heads. :func:`bft.bft_loss` then takes ``topk_ids=`` and ``risk=`` and skips its own top-k
and count; it still needs the aligned and base logits for the hybrid teacher, which it recomputes from the cached
hidden states and heads. So training from the cache computes the same objective with only the student loaded.

This module builds a cache (runs the frozen models and computes the rows above) and is the public entry point:
it re-exports what callers use from the two modules beside it,

    :mod:`bft.trainer.cache_fingerprint`   what a cache depends on (settings, data, model identities), SHA-256
    :mod:`bft.trainer.cache_store`         the folder's layout, atomic writes, integrity checks, the reader
"""

from __future__ import annotations

from pathlib import Path

import torch
from bft.trainer.cache_fingerprint import (
    OBJECTIVE_VERSION,
    example_key,
    examples_digest,
    fingerprint,
    fingerprint_differences,
    model_identity,
    sha256_file,
    tokenizer_identity,
)
from bft.trainer.cache_store import (
    ARRAYS,
    FORMAT,
    HEADS,
    MANIFEST,
    RESPONSES,
    CacheError,
    Layout,
    StaleCacheError,
    TeacherCache,
    cache_bytes,
    cache_state,
    check_fingerprint,
    files_intact,
    read_manifest,
    remove,
    shard_file,
    write_array,
    write_manifest,
)

from bft.hf.batching import pad_token_id
from bft.reference import DEFAULT_SELECTION_TOP_P

__all__ = [
    "ARRAYS",
    "DESCRIPTION",
    "FORMAT",
    "HEADS",
    "MANIFEST",
    "OBJECTIVE_VERSION",
    "RESPONSES",
    "CacheError",
    "Layout",
    "StaleCacheError",
    "TeacherCache",
    "build",
    "cache_bytes",
    "cache_state",
    "cached_harmful_pairs",
    "estimated_bytes",
    "example_key",
    "examples_digest",
    "fingerprint",
    "fingerprint_differences",
    "model_identity",
    "remove",
    "sha256_file",
    "teacher_heads",
    "teacher_rows",
    "tokenizer_identity",
    "write_cache",
]

DESCRIPTION = (
    "Build the exact frozen-teacher cache of a BFT config: run the frozen base and aligned models once over the "
    "examples the trainer will see and store, per response token, their final hidden states, the top-k "
    "base-favored ids and the risk. `bft train` with teacher_cache.path then loads only the student."
)


def teacher_rows(trio, examples, pad_id: int, batch_size: int, on_rows=None):
    """(aligned_hidden, base_hidden) [n_e, H] of each example's valid rows, in the order of ``examples``, computed as
    the live path computes them (eval-mode frozen forwards; with LoRA the aligned pass is the student without its
    adapters), but never padded: examples of equal length share a batch. An unpadded forward's rows do not depend on
    the batch (they are bit-identical alone or batched), whereas a padded one's depend on the padded length at the
    level of float rounding; so the cache holds one canonical value per example."""
    from bft.trainer.data import collate
    from bft.trainer.modeling import frozen_hidden_states

    device = next(trio.student.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_length.setdefault(len(e.input_ids), []).append(i)
    out: list = [None] * len(examples)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            picked = indices[start : start + batch_size]
            batch = collate([examples[i] for i in picked], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            base = frozen_hidden_states(trio.base, ids, mask)
            if trio.lora:
                with trio.student.disable_adapter():
                    aligned = frozen_hidden_states(trio.student, ids, mask)
            else:
                aligned = frozen_hidden_states(trio.aligned, ids, mask)
            for row, i in enumerate(picked):
                e = examples[i]
                rows = slice(e.response_start - 1, len(e.input_ids) - 1)
                out[i] = (aligned[row, rows], base[row, rows])
                if on_rows is not None:
                    on_rows(rows.stop - rows.start)
    return out


def teacher_heads(trio, dtype: torch.dtype):
    """The [V, H] aligned and base heads as the loss receives them (cast to the student head's dtype)."""
    from bft.trainer.modeling import lm_head_weight

    V = trio.vocab_size
    aligned_model = trio.student if trio.lora else trio.aligned
    return lm_head_weight(aligned_model, V).detach().to(dtype), lm_head_weight(trio.base, V).detach().to(dtype)


def estimated_bytes(n_rows: int, H_a: int, H_b: int, element: int, top_k: int, V: int) -> int:
    """tokens × (H_a + H_b) × bytes + tokens × (4k + 4), plus the two heads."""
    return n_rows * ((H_a + H_b) * element + 4 * top_k + 4) + V * (H_a + H_b) * element


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def build(config, *, rebuild: bool = False, progress: bool = True, accelerator=None, log=print) -> Path:
    """Build (or finish building) the cache at ``config.teacher_cache.path``. Loads the frozen models, runs them
    once over the run's examples, and writes shards atomically; an interrupted build resumes where it stopped.
    A complete cache with the same fingerprint is left as it is; one with another fingerprint is refused unless
    ``rebuild``. Returns the cache folder."""
    from bft.trainer.data import encode_training_examples, generated_harmful_pairs, load_training_pairs
    from bft.trainer.modeling import build_teachers, check_vocab, load_tokenizers, torch_dtype

    if not config.teacher_cache.path:
        raise CacheError("no cache folder: set teacher_cache.path in the config (or pass --out DIR)")
    root = Path(config.teacher_cache.path)
    if rebuild:
        remove(root)
    device = accelerator.device if accelerator is not None else _default_device(config)

    harmful_pairs, utility_pairs = load_training_pairs(config)
    tokenizer, base_tokenizer = load_tokenizers(config)
    check_vocab(tokenizer, base_tokenizer)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("complete"):  # nothing to load when it is up to date
        pairs = cached_harmful_pairs(config, root, harmful_pairs)
        harmful, utility = encode_training_examples(config, tokenizer, pairs, utility_pairs)
        check_fingerprint(root, manifest, fingerprint(config, tokenizer, harmful, utility))
        log(f"teacher cache {root} is complete and up to date")
        return root

    trio = build_teachers(config, tokenizer, base_tokenizer, device)  # no student, no LoRA: the frozen two only
    if config.loss.top_k > trio.vocab_size:
        raise ValueError(f"loss.top_k={config.loss.top_k} exceeds the vocabulary size V={trio.vocab_size}")
    if config.data.harmful_response == "generate" and harmful_pairs:
        harmful_pairs = generated_harmful_pairs(
            config, trio.base, tokenizer, harmful_pairs, root / RESPONSES, accelerator=accelerator, progress=progress
        )
    harmful, utility = encode_training_examples(config, tokenizer, harmful_pairs, utility_pairs)
    fp = fingerprint(config, tokenizer, harmful, utility)
    if manifest is not None:
        check_fingerprint(root, manifest, fp)
        if manifest.get("complete"):
            log(f"teacher cache {root} is complete and up to date")
            return root

    pad_id = pad_token_id(tokenizer)
    write_cache(
        root,
        trio,
        list(harmful) + list(utility),
        fp,
        dtype=torch_dtype(config.model.dtype),
        top_k=config.loss.top_k,
        selection=config.loss.selection,
        selection_top_p=config.loss.selection_top_p,
        shard_bytes=int(config.teacher_cache.shard_mb * 2**20),
        batch_size=config.data.batch_size,
        pad_id=pad_id,
        manifest=manifest,
        progress=progress,
        log=log,
    )
    del trio
    return root


def write_cache(
    root: Path,
    trio,
    examples,
    fp: dict,
    *,
    dtype: torch.dtype,
    top_k: int,
    shard_bytes: int,
    batch_size: int,
    pad_id: int,
    manifest: dict | None = None,
    progress: bool = True,
    log=print,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
) -> dict:
    """Run the frozen models of ``trio`` over ``examples`` and write the cache into ``root`` (shards atomically,
    the manifest after each shard, ``complete`` at the end); shards already recorded in ``manifest`` with intact
    files are kept. The stored ids are M under ``selection`` (``loss.selection``; its parameter
    ``selection_top_p``), :func:`bft.chunked.base_favored_rows`. Returns the manifest."""
    from tqdm.auto import tqdm

    from bft.chunked import base_favored_rows

    head_a, head_b = teacher_heads(trio, dtype)
    H_a, H_b, V, k = head_a.shape[1], head_b.shape[1], trio.vocab_size, top_k
    element = torch.finfo(dtype).bits // 8
    row_bytes = (H_a + H_b) * element + 4 * k + 4
    layout = Layout.plan(examples, row_bytes, shard_bytes)
    by_key = {example_key(e): e for e in examples}
    total = sum(layout.rows)
    log(
        f"teacher cache {root}: {len(layout.keys)} examples, {total} response tokens, {len(layout.shards)} "
        f"shards; estimated size {_human(estimated_bytes(total, H_a, H_b, element, k, V))} "
        f"(tokens × (H_a + H_b) × {element} B + tokens × (4k + 4) + two [V, H] heads)"
    )
    dtype_name = str(dtype).removeprefix("torch.")

    if manifest is None:
        manifest = {
            "format": FORMAT,
            "complete": False,
            "fingerprint": fp,
            "dtype": dtype_name,
            "hidden_sizes": [H_a, H_b],
            "vocab_size": V,
            "top_k": k,
            "rows": total,
            "examples": [[key, n] for key, n in zip(layout.keys, layout.rows)],
            "shards": [
                {"examples": list(s), "rows": sum(layout.rows[s[0] : s[1]]), "files": None} for s in layout.shards
            ],
            "heads": None,
        }
    elif [list(s["examples"]) for s in manifest["shards"]] != [list(s) for s in layout.shards]:
        raise CacheError(
            f"the interrupted build in {root} planned other shards (teacher_cache.shard_mb changed?); "
            "pass --rebuild to start over"
        )
    root.mkdir(parents=True, exist_ok=True)
    if manifest["heads"] is None or not files_intact(root, manifest["heads"]):
        manifest["heads"] = {name: write_array(root / name, head) for name, head in zip(HEADS, (head_a, head_b))}
        write_manifest(root, manifest)

    todo = [i for i, s in enumerate(manifest["shards"]) if s["files"] is None or not files_intact(root, s["files"])]
    bar = tqdm(
        total=sum(manifest["shards"][i]["rows"] for i in todo),
        desc="bft cache",
        unit="tok",
        disable=not progress,
        dynamic_ncols=True,
    )
    for i in todo:
        start, end = manifest["shards"][i]["examples"]
        group = [by_key[key] for key in layout.keys[start:end]]
        rows = teacher_rows(trio, group, pad_id, batch_size, on_rows=bar.update)
        ha, hb = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        ids, risk = base_favored_rows(
            ha.to(dtype), head_a, hb.to(dtype), head_b, top_k=k, selection=selection, selection_top_p=selection_top_p
        )
        arrays = {"h_aligned": ha.to(dtype), "h_base": hb.to(dtype), "topk_ids": ids.to(torch.int32), "risk": risk}
        manifest["shards"][i]["files"] = {
            shard_file(i, name): write_array(root / shard_file(i, name), arrays[name]) for name in ARRAYS
        }
        write_manifest(root, manifest)  # after the shard's files are in place
    bar.close()
    manifest["complete"] = True
    write_manifest(root, manifest)
    log(f"teacher cache {root}: complete, {_human(cache_bytes(root, manifest))} on disk")
    return manifest


def cached_harmful_pairs(config, root: Path, harmful_pairs):
    """The harmful pairs as the cache was built on: with ``data.harmful_response: generate``, the base model's
    responses stored in the cache (the base model is not loaded when training from it)."""
    from bft.trainer.data import generated_harmful_pairs

    if config.data.harmful_response != "generate" or not harmful_pairs:
        return harmful_pairs
    if not (root / RESPONSES).is_file():
        raise CacheError(
            f"the teacher cache {root} lacks {RESPONSES} (the base model's harmful responses); rebuild "
            "it with `bft cache CONFIG --rebuild`"
        )
    return generated_harmful_pairs(config, None, None, harmful_pairs, root / RESPONSES)


def _default_device(config) -> torch.device:
    if config.train.device:
        return torch.device(config.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
