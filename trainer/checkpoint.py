"""Atomic, resumable checkpoints.

A checkpoint is a directory ``DIR/checkpoints/step-00000042/`` holding

    trainable.pt       the student's trainable parameters (LoRA adapters, or every weight in full fine-tuning),
                       whole tensors keyed by their names in the student module
    optimizer.pt       optimizer state, whole tensors keyed by parameter name
    scheduler.pt       LR-scheduler state
    rng-rank{r}.pt     python, numpy, torch CPU (and CUDA) RNG states of process r
    state.json         step, data position (micro-batches consumed), the config, versions — written last

It is written into ``DIR/checkpoints/.tmp-step-00000042/`` and then renamed into place with ``os.replace``
(a single atomic rename on POSIX), so a crash mid-save leaves a stray ``.tmp-*`` directory that is ignored and
removed on the next save, never a half-written ``step-*``. Old checkpoints are deleted only after the new one is
in place.

Model and optimizer states are *full* state dicts keyed by parameter name. Under several processes they go through
``torch.distributed.checkpoint.state_dict`` (under FSDP every rank takes part in gathering the shards and the main
process writes whole tensors); one process reads the same layout directly. So a checkpoint is the same file
whatever wrapped the model (none, DDP or FSDP) and resumes under any of them, with any number of processes.
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

from bft.atomic import atomic_write_text  # noqa: F401  (the trainer writes its text files through ckpt)

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


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def _raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP; FSDP2 keeps the module (and its parameter names) as they were


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_training_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(trainable parameters, optimizer state) as full tensors on the CPU, keyed by parameter name.

    Under several processes this goes through ``torch.distributed.checkpoint.state_dict`` — a collective that
    gathers FSDP's shards: every process must call it; the main process gets the dicts, the others may get empty
    ones. In one process the same dicts are read directly (no collective, and no optimizer step that DCP would run
    to initialise a state that bitsandbytes optimizers keep their own way). ``model`` is the module as wrapped
    (DDP/FSDP or plain), ``optimizer`` may be accelerate's wrapper.
    """
    if _distributed():
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, _raw_optimizer(optimizer), options=_state_dict_options(cpu_offload=True))
    inner = _unwrapped(model)
    params = {name: p.detach().cpu().clone() for name, p in inner.named_parameters() if p.requires_grad}
    return params, _optimizer_state_by_name(inner, _raw_optimizer(optimizer))


def _cpu(value):
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _names_in_optimizer_order(model: torch.nn.Module, optimizer) -> list[str]:
    """Parameter names in the order of the indices that ``optimizer.state_dict()`` uses."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_state_by_name(model: torch.nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` with parameter names for the indices torch uses (the layout DCP writes)."""
    order = _names_in_optimizer_order(model, optimizer)
    raw = optimizer.state_dict()
    state = {order[i]: {k: _cpu(v) for k, v in per_param.items()} for i, per_param in raw["state"].items()}
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer_state_by_name(model: torch.nn.Module, optimizer, named: dict) -> None:
    index = {name: i for i, name in enumerate(_names_in_optimizer_order(model, optimizer))}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise ValueError(f"the checkpoint's optimizer state names parameters this model does not train: {unknown[:5]}")
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    optimizer.load_state_dict({"state": {index[name]: v for name, v in named["state"].items()}, "param_groups": groups})


def restore_training_state(model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load what :func:`gather_training_state` returned into the (possibly wrapped) model and optimizer; under FSDP
    every process passes the whole dicts and keeps its own shard of them."""
    inner = _unwrapped(model)
    expected = {name for name, p in inner.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(model_state))
    unexpected = sorted(set(model_state) - expected)
    if missing or unexpected:
        raise ValueError(
            "the checkpoint does not match this model's trainable parameters (was the config changed, e.g. "
            f"finetune.mode or LoRA targets?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if not _distributed():
        params = dict(inner.named_parameters())
        with torch.no_grad():
            for name, value in model_state.items():
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        _load_optimizer_state_by_name(inner, _raw_optimizer(optimizer), optim_state)
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        _raw_optimizer(optimizer),
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=_state_dict_options(),
    )


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


def save_checkpoint(
    output_dir, step: int, *, model, optimizer, scheduler, state: dict, keep: int, accelerator=None, protect=()
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``, never the steps in ``protect``
    (``train.save_at_steps``: checkpoints along the budget). Returns its final path.

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
    model_state, optim_state = gather_training_state(model, optimizer)  # every process: FSDP gathers the shards
    if is_main:
        torch.save(model_state, tmp / "trainable.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    del model_state, optim_state
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
        for _, old in [c for c in list_checkpoints(output_dir) if c[0] not in set(protect)][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model/optimizer/scheduler/RNG from ``path``; returns its ``state.json`` dict. Every process calls it
    (a collective under FSDP). The weight files are memory-mapped, so processes on one machine share one copy of
    them in the page cache rather than each reading its own."""
    path = Path(path)
    with open(path / "state.json") as fh:
        state = json.load(fh)
    model_state = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True, mmap=True)
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False, mmap=True)
    restore_training_state(model, optimizer, model_state, optim_state)
    del model_state, optim_state
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():  # resumed with more processes than saved it
        rng_file = path / "rng-rank0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state
