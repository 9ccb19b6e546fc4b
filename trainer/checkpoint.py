"""Atomic, resumable checkpoints.

A checkpoint is a directory ``DIR/checkpoints/step-00000042/`` holding

    trainable.pt       the student's trainable parameters (LoRA adapters, or every weight in full fine-tuning)
    optimizer.pt       optimizer state
    scheduler.pt       LR-scheduler state
    rng-rank{r}.pt     python, numpy, torch CPU (and CUDA) RNG states of process r
    state.json         step, data position (micro-batches consumed), the config, versions — written last

It is written into ``DIR/checkpoints/.tmp-step-00000042/`` and then renamed into place with ``os.replace``
(a single atomic rename on POSIX), so a crash mid-save leaves a stray ``.tmp-*`` directory that is ignored and
removed on the next save, never a half-written ``step-*``. Old checkpoints are deleted only after the new one is
in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Temp dirs of interrupted saves are not listed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (for LoRA: the adapters), on CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            "the checkpoint does not match this model's trainable parameters (was the config changed, e.g. "
            f"finetune.mode or LoRA targets?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir, step: int, *, model, optimizer, scheduler, state: dict, keep: int,
                    accelerator=None) -> Path:  # fmt: skip
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``. Returns its final path.

    Under several processes every rank writes its RNG state into the temp dir of the main process; the main
    process writes everything else and performs the rename.
    """
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    root = checkpoints_dir(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if is_main:
        torch.save(trainable_state_dict(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        with open(tmp / "state.json", "w") as fh:
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run that was already complete)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model/optimizer/scheduler/RNG from ``path``; returns its ``state.json`` dict."""
    path = Path(path)
    with open(path / "state.json") as fh:
        state = json.load(fh)
    load_trainable_state_dict(model, torch.load(path / "trainable.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():  # resumed with more processes than saved it
        rng_file = path / "rng-rank0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
