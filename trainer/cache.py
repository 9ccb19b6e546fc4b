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

Layout of DIR::

    manifest.json                  format, fingerprint, shard list with byte sizes and SHA-256 checksums; written
                                   last (atomically) after every shard, with "complete": true at the very end
    head-aligned.npy, head-base.npy   the [V, H] heads (16-bit as uint16 bits; numpy has no bfloat16)
    shard-00000-h_aligned.npy ...  one .npy file per array per shard, each written atomically
    harmful_responses.jsonl        the base model's responses (``data.harmful_response: generate``)

``.npy`` files are read with ``numpy.load(mmap_mode="r")``: no deserialisation, rows of one example are a slice
of a page-cached mapping, and the header (dtype, shape) makes a truncated file fail loudly. Checksums are verified
once per process, when a shard is first read (sizes at open), so a run does not re-read a whole cache up front.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bft.atomic import atomic_write_json, atomic_write_npy
from bft.hf.batching import pad_token_id
from bft.reference import DEFAULT_SELECTION_TOP_P

#: Bump when what the cache holds, or how the loss reads it, changes: old caches are then refused as stale.
OBJECTIVE_VERSION = 1
FORMAT = "bft-teacher-cache"
MANIFEST = "manifest.json"
RESPONSES = "harmful_responses.jsonl"
ARRAYS = ("h_aligned", "h_base", "topk_ids", "risk")
_HASH_WHOLE_BELOW = 64 * 2**20  # weight files up to this size are hashed whole; larger ones by sampled blocks
_SAMPLE_BYTES = 2**20

DESCRIPTION = (
    "Build the exact frozen-teacher cache of a BFT config: run the frozen base and aligned models once over the "
    "examples the trainer will see and store, per response token, their final hidden states, the top-k "
    "base-favored ids and the risk. `bft train` with teacher_cache.path then loads only the student."
)


class CacheError(ValueError):
    """A teacher cache that cannot be used for this run (absent, incomplete, stale, truncated or corrupted)."""


# ----------------------------------------------------------------------------------------------------- fingerprint


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= _HASH_WHOLE_BELOW:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
        else:  # sampled: the size plus 16 blocks spread over the file (weights of 7-8B models are ~16 GB)
            for i in range(16):
                fh.seek((size - _SAMPLE_BYTES) * i // 15)
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
    SHA-256 (sampled for large files) of a local folder, GGUF file or cached Hub snapshot; a Hub id that is not in
    the local cache is identified by its name only."""
    from bft.trainer.config import TINY_ALIGNED, TINY_BASE

    m = config.model
    if name in (TINY_BASE, TINY_ALIGNED):
        from bft.hf import testing

        source = Path(testing.__file__).read_bytes()
        return {"tiny": name, "hidden_size": m.tiny_hidden_size, "num_layers": m.tiny_num_layers,
                "seed": m.tiny_seed, "code": hashlib.sha256(source).hexdigest()}  # fmt: skip
    from bft.hf.models import resolve_model_source

    source, gguf = resolve_model_source(name, gguf_file)
    directory = Path(source)
    if not directory.exists():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached locally: the name is all we know
            return {"hub_id": source, "gguf_file": gguf}
    files = {p.name: [p.stat().st_size, _sha256_file(p)] for p in _model_files(directory, gguf)}
    return {"name": name, "gguf_file": gguf, "files": files}


def tokenizer_identity(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    parts = {"vocab": vocab, "chat_template": getattr(tokenizer, "chat_template", None),
             "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def example_key(example) -> str:
    """A key of one encoded example: its tokens, where its response starts and its role."""
    digest = hashlib.sha256(np.asarray(example.input_ids, dtype=np.int64).tobytes())
    digest.update(f"{example.response_start}:{int(example.harmful)}".encode())
    return digest.hexdigest()[:32]


def examples_digest(examples) -> str:
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
        out = {"source": getattr(d, role), "split": getattr(d, f"{role}_split"), "limit": limit,
               "columns": getattr(d, f"{role}_columns")}  # fmt: skip
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
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: cache {_short(saved.get(key))} vs config {_short(now.get(key))}")
    return diffs


# ----------------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Where each example's rows live: shards of consecutive examples, rows in example order."""

    keys: list[str]  # unique examples, canonical order (harmful, then utility)
    rows: list[int]  # valid rows per example
    shards: list[tuple[int, int]]  # [start, end) example ranges

    @classmethod
    def plan(cls, examples, row_bytes: int, shard_bytes: int) -> Layout:
        keys, rows, seen = [], [], set()
        for e in examples:
            key = example_key(e)
            if key in seen:  # the same example twice (a repeated prompt): stored once
                continue
            seen.add(key)
            keys.append(key)
            rows.append(len(e.input_ids) - e.response_start)  # positions response_start-1 .. len-2
        budget = max(1, shard_bytes // max(1, row_bytes))
        shards, start, filled = [], 0, 0
        for i, n in enumerate(rows):
            if i > start and filled + n > budget:
                shards.append((start, i))
                start, filled = i, 0
            filled += n
        if start < len(rows):
            shards.append((start, len(rows)))
        return cls(keys, rows, shards)


def _shard_file(shard: int, array: str) -> str:
    return f"shard-{shard:05d}-{array}.npy"


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint16).numpy()
    return x.numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: the mapping is read-only
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def cache_state(path: str | os.PathLike) -> str:
    """"absent", "incomplete" (an interrupted build) or "complete"."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return "absent"
    try:
        return "complete" if json.loads(manifest.read_text()).get("complete") else "incomplete"
    except (json.JSONDecodeError, OSError):
        return "incomplete"


def _file_record(path: Path, sha: str) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha}


# ----------------------------------------------------------------------------------------------------- building


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
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("complete"):  # nothing to load when it is up to date
        pairs = cached_harmful_pairs(config, root, harmful_pairs)
        harmful, utility = encode_training_examples(config, tokenizer, pairs, utility_pairs)
        _check_fingerprint(root, manifest, fingerprint(config, tokenizer, harmful, utility))
        log(f"teacher cache {root} is complete and up to date")
        return root

    trio = build_teachers(config, tokenizer, base_tokenizer, device)  # no student, no LoRA: the frozen two only
    if config.loss.top_k > trio.vocab_size:
        raise ValueError(f"loss.top_k={config.loss.top_k} exceeds the vocabulary size V={trio.vocab_size}")
    if config.data.harmful_response == "generate" and harmful_pairs:
        harmful_pairs = generated_harmful_pairs(config, trio.base, tokenizer, harmful_pairs, root / RESPONSES,
                                                accelerator=accelerator, progress=progress)  # fmt: skip
    harmful, utility = encode_training_examples(config, tokenizer, harmful_pairs, utility_pairs)
    fp = fingerprint(config, tokenizer, harmful, utility)
    if manifest is not None:
        _check_fingerprint(root, manifest, fp)
        if manifest.get("complete"):
            log(f"teacher cache {root} is complete and up to date")
            return root

    pad_id = pad_token_id(tokenizer)
    write_cache(root, trio, list(harmful) + list(utility), fp, dtype=torch_dtype(config.model.dtype),
                top_k=config.loss.top_k, selection=config.loss.selection, selection_top_p=config.loss.selection_top_p,
                shard_bytes=int(config.teacher_cache.shard_mb * 2**20),
                batch_size=config.data.batch_size, pad_id=pad_id, manifest=manifest, progress=progress, log=log)
    del trio
    return root


def write_cache(root: Path, trio, examples, fp: dict, *, dtype: torch.dtype, top_k: int, shard_bytes: int,
                batch_size: int, pad_id: int, manifest: dict | None = None, progress: bool = True, log=print,
                selection: str = "vocab", selection_top_p: float = DEFAULT_SELECTION_TOP_P) -> dict:  # fmt: skip
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
    log(f"teacher cache {root}: {len(layout.keys)} examples, {total} response tokens, {len(layout.shards)} "
        f"shards; estimated size {_human(estimated_bytes(total, H_a, H_b, element, k, V))} "
        f"(tokens × (H_a + H_b) × {element} B + tokens × (4k + 4) + two [V, H] heads)")  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")

    if manifest is None:
        manifest = {"format": FORMAT, "complete": False, "fingerprint": fp, "dtype": dtype_name,
                    "hidden_sizes": [H_a, H_b], "vocab_size": V, "top_k": k, "rows": total,
                    "examples": [[key, n] for key, n in zip(layout.keys, layout.rows)],
                    "shards": [{"examples": list(s), "rows": sum(layout.rows[s[0]:s[1]]), "files": None}
                               for s in layout.shards], "heads": None}  # fmt: skip
    elif [list(s["examples"]) for s in manifest["shards"]] != [list(s) for s in layout.shards]:
        raise CacheError(f"the interrupted build in {root} planned other shards (teacher_cache.shard_mb changed?); "
                         "pass --rebuild to start over")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    if manifest["heads"] is None or not _files_intact(root, manifest["heads"]):
        heads = {}
        for name, head in (("head-aligned.npy", head_a), ("head-base.npy", head_b)):
            heads[name] = _file_record(root / name, atomic_write_npy(root / name, _to_numpy(head)))
        manifest["heads"] = heads
        atomic_write_json(root / MANIFEST, manifest)

    todo = [i for i, s in enumerate(manifest["shards"]) if s["files"] is None or not _files_intact(root, s["files"])]
    bar = tqdm(total=sum(manifest["shards"][i]["rows"] for i in todo), desc="bft cache", unit="tok",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    for i in todo:
        start, end = manifest["shards"][i]["examples"]
        group = [by_key[key] for key in layout.keys[start:end]]
        rows = teacher_rows(trio, group, pad_id, batch_size, on_rows=bar.update)
        ha, hb = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        ids, risk = base_favored_rows(ha.to(dtype), head_a, hb.to(dtype), head_b, top_k=k, selection=selection,
                                      selection_top_p=selection_top_p)  # fmt: skip
        arrays = {"h_aligned": ha.to(dtype), "h_base": hb.to(dtype), "topk_ids": ids.to(torch.int32), "risk": risk}
        files = {}
        for name in ARRAYS:
            path = root / _shard_file(i, name)
            files[path.name] = _file_record(path, atomic_write_npy(path, _to_numpy(arrays[name])))
        manifest["shards"][i]["files"] = files
        atomic_write_json(root / MANIFEST, manifest)  # after the shard's files are in place
    bar.close()
    manifest["complete"] = True
    atomic_write_json(root / MANIFEST, manifest)
    log(f"teacher cache {root}: complete, {_human(cache_bytes(root, manifest))} on disk")
    return manifest


def cached_harmful_pairs(config, root: Path, harmful_pairs):
    """The harmful pairs as the cache was built on: with ``data.harmful_response: generate``, the base model's
    responses stored in the cache (the base model is not loaded when training from it)."""
    from bft.trainer.data import generated_harmful_pairs

    if config.data.harmful_response != "generate" or not harmful_pairs:
        return harmful_pairs
    if not (root / RESPONSES).is_file():
        raise CacheError(f"the teacher cache {root} lacks {RESPONSES} (the base model's harmful responses); rebuild "
                         "it with `bft cache CONFIG --rebuild`")  # fmt: skip
    return generated_harmful_pairs(config, None, None, harmful_pairs, root / RESPONSES)


def _default_device(config) -> torch.device:
    if config.train.device:
        return torch.device(config.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_bytes(root: Path, manifest: dict) -> int:
    records = dict(manifest.get("heads") or {})
    for s in manifest["shards"]:
        records.update(s["files"] or {})
    return sum(r["bytes"] for r in records.values())


def _files_intact(root: Path, files: dict) -> bool:
    for name, record in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            return False
    return True


def remove(root: Path) -> None:
    """Delete what a cache build wrote in ``root`` (its own files only; other files are left alone)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        own = p.name in (MANIFEST, RESPONSES, "head-aligned.npy", "head-base.npy") or (
            p.name.startswith("shard-") and p.name.endswith(".npy")) or p.name.endswith(".tmp")  # fmt: skip
        if own and p.is_file():
            p.unlink()


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}); pass --rebuild to build the cache again") from e
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a bft teacher cache manifest (format {manifest.get('format')!r})")
    return manifest


def _check_fingerprint(root: Path, manifest: dict, now: dict) -> None:
    diffs = fingerprint_differences(manifest.get("fingerprint", {}), now)
    if diffs:
        raise CacheError(f"the teacher cache {root} was built for other inputs than this config ({'; '.join(diffs)}); "
                         "rebuild it with `bft cache CONFIG --rebuild`, or point teacher_cache.path elsewhere")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache opened for reading, checked against this run's fingerprint.

    :meth:`batch_inputs` gives, for one micro-batch, what the live path's frozen forwards give the loss (hidden
    states [B, L, H], zero on rows the loss ignores) plus the given ``topk_ids`` / ``risk`` of every row. Each
    process reads only the rows of its own micro-batches; a shard's checksums are verified when it is first read.
    """

    def __init__(self, root: str | os.PathLike, expected: dict):
        self.root = Path(root)
        state = cache_state(self.root)
        if state == "absent":
            raise CacheError(f"no teacher cache at {self.root} (no {MANIFEST}); build it with `bft cache CONFIG`")
        if state == "incomplete":
            raise CacheError(f"the teacher cache {self.root} is incomplete (an interrupted build?); run "
                             "`bft cache CONFIG` to finish it")  # fmt: skip
        self.manifest = _read_manifest(self.root)
        _check_fingerprint(self.root, self.manifest, expected)
        m = self.manifest
        self.dtype = m["dtype"]
        self.top_k = int(m["top_k"])
        self.vocab_size = int(m["vocab_size"])
        self.hidden_sizes = tuple(m["hidden_sizes"])
        self.where = {}  # key -> (shard, first row in shard, rows)
        rows_of = {key: n for key, n in m["examples"]}
        for i, s in enumerate(m["shards"]):
            offset = 0
            for key, n in m["examples"][s["examples"][0] : s["examples"][1]]:
                self.where[key] = (i, offset, n)
                offset += n
        assert len(rows_of) == len(self.where)
        for record in [m["heads"]] + [s["files"] for s in m["shards"]]:  # every file there, at its full size
            for name, r in record.items():
                path = self.root / name
                if not path.is_file():
                    raise CacheError(f"teacher cache file {path} is missing; rebuild with `bft cache CONFIG --rebuild`")
                if path.stat().st_size != r["bytes"]:
                    raise CacheError(f"teacher cache file {path} is truncated or overwritten: "
                                     f"{path.stat().st_size} bytes, the manifest says {r['bytes']}; rebuild with "
                                     "`bft cache CONFIG --rebuild`")  # fmt: skip
        self._open: dict[int, dict] = {}

    def _verified(self, name: str, record: dict) -> Path:
        path = self.root / name
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(16 * 2**20), b""):
                digest.update(block)
        if digest.hexdigest() != record["sha256"]:
            raise CacheError(f"teacher cache file {path} is corrupted (SHA-256 differs from the manifest's); rebuild "
                             "with `bft cache CONFIG --rebuild`")  # fmt: skip
        return path

    def _shard(self, i: int) -> dict:
        if i not in self._open:
            files = self.manifest["shards"][i]["files"]
            arrays = {}
            for name in ARRAYS:
                file = _shard_file(i, name)
                try:
                    arrays[name] = np.load(self._verified(file, files[file]), mmap_mode="r", allow_pickle=False)
                except ValueError as e:
                    raise CacheError(f"teacher cache file {self.root / file} cannot be read ({e})") from e
            self._open[i] = arrays
        return self._open[i]

    def heads(self, device, dtype: torch.dtype, aligned: bool = True):
        """(aligned_head, base_head) [V, H], as the live path's frozen heads; ``aligned=False`` (LoRA, whose
        aligned head is the student's own): ``(None, base_head)``."""
        out = []
        for name in ("head-aligned.npy", "head-base.npy"):
            if name == "head-aligned.npy" and not aligned:
                out.append(None)
                continue
            array = np.load(self._verified(name, self.manifest["heads"][name]), allow_pickle=False)
            out.append(_from_numpy(array, self.dtype).to(device=device, dtype=dtype))
        return out[0], out[1]

    def example_rows(self, example) -> dict:
        """The cached rows of one example (CPU tensors)."""
        key = example_key(example)
        if key not in self.where:
            role = "harmful" if example.harmful else "utility"
            raise CacheError(f"the teacher cache {self.root} holds no rows for a {role} example of "
                             f"{len(example.input_ids)} tokens that this run asks for: it was built for other rows; "
                             "rebuild it with `bft cache CONFIG --rebuild`")  # fmt: skip
        shard, offset, n = self.where[key]
        want = len(example.input_ids) - example.response_start
        if n != want:
            raise CacheError(f"the teacher cache {self.root} holds {n} rows for an example with {want} response "
                             "tokens: it was built for other rows; rebuild it")  # fmt: skip
        arrays = self._shard(shard)
        rows = slice(offset, offset + n)
        return {
            "h_aligned": _from_numpy(arrays["h_aligned"][rows], self.dtype),
            "h_base": _from_numpy(arrays["h_base"][rows], self.dtype),
            "topk_ids": torch.from_numpy(np.array(arrays["topk_ids"][rows])),
            "risk": torch.from_numpy(np.array(arrays["risk"][rows])),
        }

    def batch_inputs(self, examples, batch: dict, device) -> dict:
        """Teacher inputs of one collated micro-batch: ``aligned_hidden``, ``base_hidden`` [B, L, H] and
        ``topk_ids`` [B·L, k], ``risk`` [B·L], filled at the batch's valid rows."""
        B, L = batch["input_ids"].shape
        H_a, H_b = self.hidden_sizes
        dt = torch.bfloat16 if self.dtype == "bfloat16" else getattr(torch, self.dtype)
        aligned = torch.zeros(B, L, H_a, dtype=dt)
        base = torch.zeros(B, L, H_b, dtype=dt)
        ids = torch.zeros(B, L, self.top_k, dtype=torch.int32)
        risk = torch.zeros(B, L, dtype=torch.float32)
        valid = batch["valid"].cpu()
        for row, e in enumerate(examples):
            got = self.example_rows(e)
            positions = valid[row].nonzero().squeeze(1)
            if positions.numel() != got["risk"].shape[0]:
                raise CacheError(f"the teacher cache {self.root} has {got['risk'].shape[0]} rows for batch row {row}, "
                                 f"which has {positions.numel()} response positions: it was built for other rows")  # fmt: skip
            aligned[row, positions] = got["h_aligned"]
            base[row, positions] = got["h_base"]
            ids[row, positions] = got["topk_ids"]
            risk[row, positions] = got["risk"]
        return {
            "aligned_hidden": aligned.to(device),
            "base_hidden": base.to(device),
            "topk_ids": ids.reshape(B * L, self.top_k).to(device),
            "risk": risk.reshape(B * L).to(device),
        }
