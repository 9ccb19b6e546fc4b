"""The teacher cache on disk: its layout, atomic writes, integrity checks and the reader.

Layout of a cache folder::

    manifest.json                  format, fingerprint, shard list with byte sizes and SHA-256 checksums; written
                                   last (atomically) after every shard, with "complete": true at the very end
    head-aligned.npy, head-base.npy   the [V, H] heads (16-bit as uint16 bits; numpy has no bfloat16)
    shard-00000-h_aligned.npy ...  one .npy file per array per shard, each written atomically
    harmful_responses.jsonl        the base model's responses (``data.harmful_response: generate``)

``.npy`` files are read with ``numpy.load(mmap_mode="r")``: no deserialisation, rows of one example are a slice
of a page-cached mapping, and the header (dtype, shape) makes a truncated file fail loudly. Checksums are verified
once per process, when a shard is first read (sizes at open), so a run does not re-read a whole cache up front.

What the arrays hold, and how they are computed, is :mod:`bft.trainer.cache`'s business; whether a cache fits a
run is decided by comparing fingerprints (:mod:`bft.trainer.cache_fingerprint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bft.trainer.cache_fingerprint import example_key, fingerprint_differences, sha256_file

from bft.atomic import atomic_write_json, atomic_write_npy

FORMAT = "bft-teacher-cache"
MANIFEST = "manifest.json"
RESPONSES = "harmful_responses.jsonl"
ARRAYS = ("h_aligned", "h_base", "topk_ids", "risk")
HEADS = ("head-aligned.npy", "head-base.npy")


class CacheError(ValueError):
    """A teacher cache that cannot be used for this run (absent, incomplete, stale, truncated or corrupted)."""


class StaleCacheError(CacheError):
    """A complete, intact teacher cache built for other inputs than this run's (its fingerprint differs)."""


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


def shard_file(shard: int, array: str) -> str:
    """The file name of one array of one shard."""
    return f"shard-{shard:05d}-{array}.npy"


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint16).numpy()
    return x.numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: the mapping is read-only
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


# ----------------------------------------------------------------------------------------------------- writing


def write_array(path: Path, x: torch.Tensor) -> dict:
    """Write a tensor as a ``.npy`` file atomically; returns its manifest record (byte size and SHA-256)."""
    sha = atomic_write_npy(path, _to_numpy(x))
    return {"bytes": path.stat().st_size, "sha256": sha}


def write_manifest(root: Path, manifest: dict) -> None:
    """Replace the manifest atomically: a reader sees the old one or the new one, never half of either."""
    atomic_write_json(root / MANIFEST, manifest)


def files_intact(root: Path, files: dict) -> bool:
    """Whether every recorded file is there with its recorded size and SHA-256 (an interrupted build keeps those)."""
    for name, record in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return False
        if sha256_file(path) != record["sha256"]:
            return False
    return True


def cache_bytes(root: Path, manifest: dict) -> int:
    """The bytes of every file the manifest records (heads and written shards)."""
    records = dict(manifest.get("heads") or {})
    for s in manifest["shards"]:
        records.update(s["files"] or {})
    return sum(r["bytes"] for r in records.values())


def remove(root: Path) -> None:
    """Delete what a cache build wrote in ``root`` (its own files only; other files are left alone)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        own = (
            p.name in (MANIFEST, RESPONSES, *HEADS)
            or (p.name.startswith("shard-") and p.name.endswith(".npy"))
            or p.name.endswith(".tmp")
        )
        if own and p.is_file():
            p.unlink()


# ----------------------------------------------------------------------------------------------------- checking


def cache_state(path: str | os.PathLike) -> str:
    """ "absent", "incomplete" (an interrupted build) or "complete"."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return "absent"
    try:
        return "complete" if json.loads(manifest.read_text()).get("complete") else "incomplete"
    except (json.JSONDecodeError, OSError):
        return "incomplete"


def read_manifest(root: Path) -> dict | None:
    """The manifest in ``root``, or None when there is none; CacheError when it is not a cache manifest."""
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


def check_fingerprint(root: Path, manifest: dict, now: dict) -> None:
    """CacheError naming every difference when the cache was built for other inputs than ``now``."""
    diffs = fingerprint_differences(manifest.get("fingerprint", {}), now)
    if diffs:
        raise StaleCacheError(
            f"the teacher cache {root} was built for other inputs than this config ({'; '.join(diffs)}); "
            "rebuild it with `bft cache CONFIG --rebuild`, or point teacher_cache.path elsewhere"
        )


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
            raise CacheError(
                f"the teacher cache {self.root} is incomplete (an interrupted build?); run "
                "`bft cache CONFIG` to finish it"
            )
        self.manifest = read_manifest(self.root)
        check_fingerprint(self.root, self.manifest, expected)
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
                    raise CacheError(
                        f"teacher cache file {path} is truncated or overwritten: "
                        f"{path.stat().st_size} bytes, the manifest says {r['bytes']}; rebuild with "
                        "`bft cache CONFIG --rebuild`"
                    )
        self._open: dict[int, dict] = {}

    def _verified(self, name: str, record: dict) -> Path:
        path = self.root / name
        if sha256_file(path) != record["sha256"]:
            raise CacheError(
                f"teacher cache file {path} is corrupted (SHA-256 differs from the manifest's); rebuild "
                "with `bft cache CONFIG --rebuild`"
            )
        return path

    def _shard(self, i: int) -> dict:
        if i not in self._open:
            files = self.manifest["shards"][i]["files"]
            arrays = {}
            for name in ARRAYS:
                file = shard_file(i, name)
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
        for name in HEADS:
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
            raise CacheError(
                f"the teacher cache {self.root} holds no rows for a {role} example of "
                f"{len(example.input_ids)} tokens that this run asks for: it was built for other rows; "
                "rebuild it with `bft cache CONFIG --rebuild`"
            )
        shard, offset, n = self.where[key]
        want = len(example.input_ids) - example.response_start
        if n != want:
            raise CacheError(
                f"the teacher cache {self.root} holds {n} rows for an example with {want} response "
                "tokens: it was built for other rows; rebuild it"
            )
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
                raise CacheError(
                    f"the teacher cache {self.root} has {got['risk'].shape[0]} rows for batch row {row}, "
                    f"which has {positions.numel()} response positions: it was built for other rows"
                )
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
