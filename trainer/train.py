"""Train a student with the BFT objective (paper Eq. 8-14) — the whole recipe, top to bottom.

    bft train CONFIG [--max-steps N] [--output-dir DIR] [--resume] [key.sub=value ...]
    python trainer/train.py CONFIG ...                 (the same)
    accelerate launch trainer/train.py CONFIG ...      (DDP or FSDP on several GPUs, as `accelerate config` says)

Per optimizer step, for each of ``optim.grad_accum`` micro-batches (B rows, ``data.harmful_ratio`` of them harmful):

    1. base (and, in full fine-tuning, aligned) forwards under ``torch.no_grad`` -> final hidden states only;
       with LoRA the aligned forward is the student with its adapters disabled;
    2. student forward -> final hidden states, and the fused :func:`bft.bft_loss` on hidden states and lm_head
       weights (never [N, V] logits), with ``valid`` = rows predicting a response token and ``harmful`` = rows of
       harmful examples (the completion penalty applies to those, the KL to every valid row);
    3. backward;

then gradient clipping, the optimizer and LR-scheduler steps, one line of ``metrics.jsonl``, and every
``train.save_every`` steps (and at the end) an atomic checkpoint. ``--resume`` restores the latest checkpoint —
weights, optimizer, scheduler, RNG and data position — so the loss curve equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: keep trainer/ off sys.path so its modules never shadow top-level ones
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import torch
from bft.trainer import cache as teacher_cache
from bft.trainer import checkpoint as ckpt
from bft.trainer.config import Config, dump_config
from bft.trainer.data import (
    MixedBatches,
    encode_training_examples,
    generated_harmful_pairs,
    load_training_pairs,
)
from bft.trainer.modeling import (
    BFTStudent,
    Trio,
    build_trio,
    check_quantization_available,
    check_vocab,
    disable_activation_checkpointing,
    lm_head_weight,
    load_tokenizers,
    teacher_hidden_states,
)

from bft.hf.batching import pad_token_id

METRIC_KEYS = (
    "step",
    "loss",
    "kl",
    "completion",
    "risk",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "peak_memory",
    "epoch",
    "elapsed_s",
)


def train(config: Config, *, resume: bool = False, callbacks=(), progress: bool = True) -> dict:
    """Run (or resume) training as configured. Returns a summary: steps, paths, the last metrics line.

    ``callbacks``: callables ``cb(step, metrics)`` run after each optimizer step's metrics line is written (an
    exception raised there stops the run like a crash would — the tests use it to interrupt a run).

    Under a multi-process launch the process group outlives this call (the caller may go on with collectives); a
    script runs it inside :func:`ending_process_group`, as ``bft train`` does.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t, o = config.train, config.optim
    out = Path(t.output_dir)

    # ---------------------------------------------------------------- set up: checks that need nothing loaded
    accelerator = Accelerator(
        cpu=t.device == "cpu", mixed_precision=t.mixed_precision, gradient_accumulation_steps=o.grad_accum
    )
    main = accelerator.is_main_process
    check_distributed_type(accelerator, config)
    resume_from = ckpt.latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        warnings.warn(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", stacklevel=2)
    if not resume and ckpt.list_checkpoints(out):
        raise ValueError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose another --output-dir"
        )
    check_engine(config)
    check_quantization_available(config.model.frozen_quantization)
    check_optimizer_available(o.name)
    writer = make_tensorboard_writer(out) if t.tensorboard and main else None
    set_seed(t.seed)

    # ---------------------------------------------------------------- data, tokenizers, models, batches
    run = prepare_run(config, accelerator, out, progress)
    trio, batches, total_steps, micro_per_step = run.trio, run.batches, run.total_steps, run.micro_per_step
    world = accelerator.num_processes

    # ---------------------------------------------------------------- optimizer, schedule, accelerate
    student = BFTStudent(trio.student, loss_module(config), trio.vocab_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(o, params)
    scheduler = make_scheduler(o, optimizer, total_steps)
    student, optimizer = accelerator.prepare(student, optimizer)  # the scheduler is stepped once per optimizer step
    # FSDP replaces each parameter by a sharded one (the optimizer is re-pointed by accelerate): clip those
    params = [p for p in student.parameters() if p.requires_grad]

    step = _restore_or_start(resume_from, student, optimizer, scheduler, config, micro_per_step, accelerator, out)

    # ---------------------------------------------------------------- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="bft train", disable=not (progress and main), dynamic_ncols=True)
    device = accelerator.device
    peak = PeakMemory(device)
    started = time.perf_counter()
    metrics = None
    while step < total_steps:
        step_start = time.perf_counter()
        indices = [(step * o.grad_accum + micro) * world + accelerator.process_index for micro in range(o.grad_accum)]
        sums, grad_norm, lr = _optimizer_step(
            run, student, optimizer, scheduler, params, indices, accelerator, o.max_grad_norm
        )
        scheduler.step()
        step += 1
        sums = accelerator.reduce(sums, reduction="sum")
        seconds = time.perf_counter() - step_start
        metrics = metrics_line(step, sums, micro_per_step, lr, grad_norm, seconds, peak, batches, started)
        if main:
            _log_step(out, writer, bar, metrics, lr, step == total_steps or step % t.log_every == 0)
        bar.update(1)
        if step % t.save_every == 0 or step == total_steps or step in t.save_at_steps:
            save(out, step, student, optimizer, scheduler, config, micro_per_step, accelerator)
        for callback in callbacks:
            callback(step, metrics)
    bar.close()
    if writer is not None:
        writer.close()

    # ---------------------------------------------------------------- the final student, as a normal HF checkpoint
    final_dir = save_final_student(config, trio, student, out / "final", accelerator)
    return {
        "steps": step,
        "total_steps": total_steps,
        "output_dir": str(out),
        "final_dir": str(final_dir),
        "last_metrics": metrics,
    }


def _optimizer_step(run, student, optimizer, scheduler, params, indices, accelerator, max_grad_norm):
    """One optimizer step over the micro-batches ``indices`` (gradient accumulation through accelerate). Returns
    the summed (loss, kl, n_valid, completion, n_harmful, risk, tokens), the gradient norm and the step's lr."""
    device = accelerator.device
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    grad_norm = lr = None
    for index in indices:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in run.batches[index].items()}
        with accelerator.accumulate(student):
            result, micro_sums = micro_batch_step(run, student, batch, index)
            accelerator.backward(result["loss"])
            if accelerator.sync_gradients:
                max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
                grad_norm = accelerator.clip_grad_norm_(params, max_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()  # a no-op until the last micro-batch of the step (accelerate)
            optimizer.zero_grad(set_to_none=True)
        sums += micro_sums
    return sums, grad_norm, lr


@dataclass
class Run:
    """What a run trains on, whichever engine drives the steps (``train.engine``: bft's loop here, or TRL's
    trainer in :mod:`bft.integrations.trl`): the models, the mixed batches, the teacher cache (``None`` when the
    frozen forwards run live) and the run's length."""

    trio: Trio
    batches: MixedBatches
    cache: object | None
    frozen_heads: tuple | None
    total_steps: int
    micro_per_step: int  # micro-batches per optimizer step, all processes together (grad_accum × processes)


def prepare_run(config: Config, accelerator, out: Path, progress: bool = True) -> Run:
    """Data, tokenizers, models (or the teacher cache) and batches of a run, in the order the recipe needs them.
    ``accelerator``: an ``accelerate.Accelerator`` or ``PartialState`` (device, process index and count)."""
    d, t, o = config.data, config.train, config.optim
    harmful_pairs, utility_pairs = load_training_pairs(config)  # data before any model is loaded
    tokenizer, base_tokenizer = load_tokenizers(config)
    check_vocab(tokenizer, base_tokenizer)  # cheap, before loading any weights
    trio, harmful, utility, cache, frozen_heads = _models_and_examples(
        config, tokenizer, base_tokenizer, harmful_pairs, utility_pairs, accelerator, out, progress
    )
    check_loss_vocab(config, trio.vocab_size)
    batches = MixedBatches(
        harmful,
        utility,
        batch_size=d.batch_size,
        harmful_ratio=d.harmful_ratio,
        seed=t.seed,
        pad_id=pad_token_id(tokenizer),
    )
    micro_per_step = o.grad_accum * accelerator.num_processes
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * batches.batches_per_epoch / micro_per_step))
    return Run(trio, batches, cache, frozen_heads, total_steps, micro_per_step)


def micro_batch_step(run: Run, student, batch: dict, index: int) -> tuple[dict, torch.Tensor]:
    """The per-micro-batch step of both engines (bft's loop and :class:`bft.integrations.trl.BFTTrainer`): the
    frozen forwards under ``no_grad`` — or their outputs read from the teacher cache — then the student's forward
    and the fused loss (:func:`micro_batch_loss`). ``batch`` is ``run.batches[index]`` on the device. Returns the
    student's output dict (``loss`` is what to backpropagate, before any gradient-accumulation scaling) and the
    micro-batch's float64 sums (loss, kl, n_valid, completion, n_harmful, risk, tokens) for :func:`metrics_line`."""
    device = batch["input_ids"].device
    teacher = None
    if run.cache is not None:
        teacher = cache_teacher_inputs(run.cache, run.frozen_heads, run.batches.examples(index), batch, device)
    result = micro_batch_loss(run.trio, student, batch, teacher)
    valid = batch["valid"].reshape(-1)
    harm = (batch["harmful"] & batch["valid"]).reshape(-1)
    sums = torch.stack(
        [
            result["loss"].detach().double(),
            result["kl"].double().sum(),
            valid.sum().double(),
            result["completion"].double()[harm].sum(),
            harm.sum().double(),
            result["risk"].double().sum(),
            torch.tensor(float(batch["n_tokens"]), dtype=torch.float64, device=device),
        ]
    )
    return result, sums


def _models_and_examples(
    config: Config, tokenizer, base_tokenizer, harmful_pairs, utility_pairs, accelerator, out, progress
):
    """The models (only the student and the heads when a teacher cache is used, built on first use) and the
    encoded training examples: ``(trio, harmful, utility, cache, frozen_heads)``."""
    d = config.data
    main = accelerator.is_main_process
    cache = frozen_heads = None
    if config.teacher_cache.path:  # the frozen teachers come from the cache: only the student is loaded
        cache_dir = Path(config.teacher_cache.path)
        if teacher_cache.cache_state(cache_dir) != "complete":  # first use (or an interrupted build): build it
            if main:  # the build draws random numbers (LoRA init): the run's RNG must not see it
                rng = ckpt.rng_state()
                teacher_cache.build(config, progress=progress, log=lambda text: print(text, file=sys.stderr))
                ckpt.set_rng_state(rng)
            accelerator.wait_for_everyone()
        harmful_pairs = teacher_cache.cached_harmful_pairs(config, cache_dir, harmful_pairs)
        harmful, utility = encode_training_examples(config, tokenizer, harmful_pairs, utility_pairs)
        cache = teacher_cache.TeacherCache(cache_dir, teacher_cache.fingerprint(config, tokenizer, harmful, utility))
        trio = build_trio(config, tokenizer, base_tokenizer, accelerator.device, frozen=False)
        if cache.vocab_size != trio.vocab_size:
            raise teacher_cache.CacheError(
                f"the teacher cache {cache_dir} has V={cache.vocab_size}, the student V={trio.vocab_size}"
            )
        head_dtype = lm_head_weight(trio.student, trio.vocab_size).dtype
        # LoRA: the aligned head is the student's own, unless the student starts elsewhere (model.student)
        frozen_heads = cache.heads(accelerator.device, head_dtype, aligned=not trio.lora or bool(config.model.student))
    else:
        trio = build_trio(config, tokenizer, base_tokenizer, accelerator.device)
        if d.harmful_response == "generate" and harmful_pairs:
            harmful_pairs = generated_harmful_pairs(
                config,
                trio.base,
                trio.tokenizer,
                harmful_pairs,
                out / "harmful_responses.jsonl",
                accelerator=accelerator,
                progress=progress,
            )
        harmful, utility = encode_training_examples(config, tokenizer, harmful_pairs, utility_pairs)
    return trio, harmful, utility, cache, frozen_heads


def _restore_or_start(
    resume_from, student, optimizer, scheduler, config: Config, micro_per_step: int, accelerator, out: Path
) -> int:
    """Load the checkpoint to resume from (returning its step), or start a fresh metrics file (step 0)."""
    main = accelerator.is_main_process
    step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(
            resume_from, model=student, optimizer=optimizer, scheduler=scheduler, rank=accelerator.process_index
        )
        step = int(state["step"])
        warn_config_changes(state.get("config", {}), config)
        consumed = state.get("batches_consumed")
        if consumed is not None and int(consumed) != step * micro_per_step:
            warnings.warn(
                f"resuming with {micro_per_step} micro-batches per step (grad_accum × processes) where the "
                f"checkpoint consumed {consumed} over {step} steps: the data order after step {step} differs "
                "from an uninterrupted run",
                stacklevel=2,
            )
        if main:
            truncate_metrics(out / "metrics.jsonl", step)
    elif main:
        ckpt.atomic_write_text(out / "metrics.jsonl", "")
    if main:
        ckpt.atomic_write_text(out / "config.yaml", dump_config(config))

    return step


def metrics_line(step, sums, micro_per_step, lr, grad_norm, seconds, peak, batches, started) -> dict:
    """One ``metrics.jsonl`` line from the step's summed (loss, kl, n_valid, completion, n_harmful, risk, tokens)."""
    metrics = {
        "step": step,
        "loss": float(sums[0] / micro_per_step),
        "kl": float(sums[1] / sums[2]) if sums[2] > 0 else None,
        "completion": float(sums[3] / sums[4]) if sums[4] > 0 else None,
        "risk": float(sums[5] / sums[2]) if sums[2] > 0 else None,
        "lr": float(lr),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": float(sums[6]) / seconds,
        "peak_memory": peak.read(),
        "epoch": step * micro_per_step / batches.batches_per_epoch,
        "elapsed_s": time.perf_counter() - started,
    }
    return metrics


def _log_step(out: Path, writer, bar, metrics: dict, lr: float, refresh_bar: bool) -> None:
    """Append the metrics line, mirror it to TensorBoard, and refresh the progress bar's postfix."""
    append_metrics(out / "metrics.jsonl", metrics)
    if writer is not None:
        for key in ("loss", "kl", "completion", "risk", "lr", "grad_norm", "tokens_per_s"):
            if metrics[key] is not None:
                writer.add_scalar(f"train/{key}", metrics[key], metrics["step"])
    if refresh_bar:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl'] or 0:.4f}", lr=f"{lr:.2e}")


# -------------------------------------------------------------------------------------------------------------
# helpers of the recipe, in the order it uses them


@contextlib.contextmanager
def ending_process_group():
    """Run the block, then end the default process group that a multi-process launch (torchrun, ``accelerate
    launch``) started, while the interpreter is still whole: gloo's worker threads left to interpreter finalization
    can abort a finished process (SIGABRT, "terminate called without an active exception"). After a block that
    finished, every process waits for the others first (no process tears the group down while another still writes
    through it), and the objects that hold the group (DDP / FSDP modules in reference cycles) are collected. After
    a block that raised, no waiting: the others may be stuck in a collective, and the launcher stops them when this
    process exits. A no-op in a single process."""

    def end(wait: bool) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if wait:
                torch.distributed.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()

    try:
        yield
    except BaseException:
        end(wait=False)
        raise
    end(wait=True)


def is_fsdp(accelerator) -> bool:
    return "FSDP" in str(getattr(accelerator, "distributed_type", "NO")).upper()


def check_distributed_type(accelerator, config: Config) -> None:
    """Single process, DDP and FSDP (``accelerate config``) run unchanged. Under FSDP the student — its weights,
    gradients and optimizer state — is sharded; the frozen base (and, in full fine-tuning, aligned) model is a
    replica on every GPU (quantize it with ``model.frozen_quantization`` to shrink it). Two combinations cannot be
    sharded and are refused before anything loads."""
    if not is_fsdp(accelerator):
        return
    if config.finetune.mode == "lora" and config.model.frozen_quantization:
        raise ValueError(
            "FSDP with finetune.mode=lora and model.frozen_quantization is not supported: the LoRA "
            "student's own weights would be quantized (QLoRA), and bitsandbytes weights cannot be "
            "sharded by FSDP here. Use DDP, or model.frozen_quantization: null"
        )
    if config.optim.name != "adamw":
        raise ValueError(
            f"optim.name={config.optim.name!r} with FSDP is not supported: bitsandbytes optimizers do "
            "not take FSDP's sharded parameters. Use optim.name: adamw (FSDP already shards its "
            "state across the GPUs)"
        )


def check_engine(config: Config) -> None:
    """This loop is ``train.engine: bft``; ``trl`` runs through ``bft train`` (``bft.commands.train``), which hands
    the config to :func:`bft.integrations.trl.train` (trainer/ does not import the integrations)."""
    if config.train.engine != "bft":
        raise ValueError(
            f"train.engine={config.train.engine!r}: run it with `bft train CONFIG --engine "
            f"{config.train.engine}` (or bft.integrations.trl.train); this loop is engine 'bft'"
        )


def check_optimizer_available(name: str) -> None:
    if name != "adamw":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                f"optim.name={name!r} needs bitsandbytes (CUDA): pip install bitsandbytes, or use optim.name: adamw"
            )


def make_tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("train.tensorboard: true needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def check_loss_vocab(config: Config, V: int) -> None:
    """The loss settings' checks that need the vocabulary size (top_k <= V; "unlikelihood" needs top_k < V), before
    any step runs. Raises ``ValueError`` naming the ``loss.`` key."""
    try:
        config.loss.check_vocab(V)
    except ValueError as error:
        raise ValueError(f"loss.{error}") from None


def loss_module(config: Config):
    """The :class:`bft.BFTLoss` that ``config.loss`` describes: its one :class:`bft.loss.BFTLossParams` (already
    validated) with the backend and chunk size (what :class:`BFTStudent` applies)."""
    from bft.loss import BFTLoss

    return BFTLoss(config.loss.params, backend=config.loss.backend, chunk_rows=config.loss.chunk_rows)


def cache_teacher_inputs(cache, frozen_heads, examples, batch: dict, device) -> dict:
    """What the frozen forwards would give one micro-batch, read from the teacher cache: the aligned and base
    hidden states and heads (aligned head ``None`` with LoRA: the student's own), and the given top-k ids / risk."""
    rows = cache.batch_inputs(examples, batch, device)
    aligned_head, base_head = frozen_heads
    return {
        "aligned_hidden": rows["aligned_hidden"],
        "aligned_weight": aligned_head,
        "base_hidden": rows["base_hidden"],
        "base_weight": base_head,
        "topk_ids": rows["topk_ids"],
        "risk": rows["risk"],
    }


def micro_batch_loss(trio, student, batch: dict, teacher: dict | None = None) -> dict:
    """Steps 1-2 of one micro-batch (module docstring): the frozen teacher forwards, then the student's forward
    with the fused loss (and, with LoRA, the aligned teacher pass: the student without adapters). ``student`` is
    the (possibly accelerate-wrapped) :class:`BFTStudent`, ``batch`` a :class:`MixedBatches` item on the device.
    ``teacher``: the frozen models' inputs to the loss read from the teacher cache (:func:`cache_teacher_inputs`)
    instead of computed. Returns the student's output dict; ``loss`` is what to backpropagate.
    ``benchmarks/trainer_bench.py`` times exactly this."""
    harmful = batch["harmful"] & batch["valid"]
    if teacher is not None:
        return student(batch["input_ids"], batch["attention_mask"], harmful=harmful, valid=batch["valid"], **teacher)
    frozen = teacher_hidden_states(trio, batch["input_ids"], batch["attention_mask"], trio.vocab_size)
    return student(batch["input_ids"], batch["attention_mask"], *frozen, harmful=harmful, valid=batch["valid"])


def make_optimizer(o, params):
    if not params:
        raise ValueError("the student has no trainable parameters")
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
    }[o.name](params, **kwargs)


def make_scheduler(o, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)
    return get_scheduler(o.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class PeakMemory:
    """Peak memory in bytes: CUDA allocator peak on GPU, the process's peak resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def read(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def append_metrics(path: Path, metrics: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
        fh.flush()


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl (a torn last line from a crash is dropped)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps ≤ ``step`` (those after the checkpoint will be recomputed by the resumed run)."""
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    ckpt.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def save(out: Path, step: int, model, optimizer, scheduler, config: Config, micro_per_step: int, accelerator):
    from bft import __version__ as bft_version

    state = {
        "step": step,
        "batches_consumed": step * micro_per_step,  # the data position: batch i is a pure function of (seed, i)
        "config": config.to_dict(),
        "versions": {"bft": bft_version, "torch": torch.__version__},
    }
    ckpt.save_checkpoint(
        out,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        keep=config.train.keep_checkpoints,
        protect=config.train.save_at_steps,
        accelerator=accelerator,
    )


def warn_config_changes(saved: dict, config: Config) -> None:
    """Resuming with a different config is allowed (e.g. more steps) but the curve then differs: say what changed."""
    ignore = {
        ("train", "max_steps"),
        ("train", "output_dir"),
        ("train", "save_every"),
        ("train", "log_every"),
        ("train", "tensorboard"),
        ("train", "keep_checkpoints"),
        ("train", "save_at_steps"),
        ("teacher_cache", "path"),
        ("teacher_cache", "shard_mb"),
    }  # where the cache lives: the same objective
    now = config.to_dict()
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if section in saved and key in saved[section] and saved[section][key] != value and (section, key) not in ignore
    ]
    old_steps = saved.get("train", {}).get("max_steps")
    if old_steps != now["train"]["max_steps"] and now["optim"]["scheduler"] != "constant":
        # more steps stretch a decaying schedule: the LR at every resumed step differs from the first run's
        changed.append(
            f"train.max_steps: {old_steps!r} -> {now['train']['max_steps']!r} (the {now['optim']['scheduler']} "
            "LR schedule is recomputed for the new length)"
        )
    if changed:
        warnings.warn("resuming with a changed config: " + "; ".join(changed), stacklevel=3)


def save_final_student(config: Config, trio, student, final_dir: Path, accelerator) -> Path:
    """The trained student as a normal Hugging Face checkpoint (+ tokenizer), written atomically.

    LoRA with ``finetune.save: merged``: the adapters are merged into the weights (``merge_and_unload``) — into a
    fresh 16-bit copy of the aligned model when the student's weights were quantized. ``adapter``: the peft
    adapter only (load it onto the aligned model with ``PeftModel.from_pretrained``). ``student`` is the
    accelerate-prepared :class:`BFTStudent`; under FSDP its shards are gathered (every process takes part) into a
    whole copy on the main process's CPU.
    """
    accelerator.wait_for_everyone()
    if is_fsdp(accelerator):
        student_model = gather_unsharded_student(config, student, accelerator)
    else:
        student_model = accelerator.unwrap_model(student).model  # the HF / peft model inside
    if not accelerator.is_main_process:
        return final_dir
    tmp = final_dir.with_name(f".tmp-{final_dir.name}-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model = student_model
    if trio.lora and config.finetune.save == "merged":
        if config.model.frozen_quantization:
            model = merge_into_fresh_copy(config, student_model)
        else:
            model = student_model.merge_and_unload()  # end of training: merging in place is fine
    disable_activation_checkpointing(model)
    model.config.use_cache = True
    from bft.hf.models import save_pretrained

    save_pretrained(model, str(tmp), tokenizer=trio.tokenizer, safe_serialization=True)  # GGUF-loaded models too
    if final_dir.exists():
        import shutil

        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    return final_dir


def gather_unsharded_student(config: Config, student, accelerator):
    """The FSDP-sharded student as an ordinary model on the main process's CPU (``None`` on the others).

    Every process takes part in gathering the full state dict; the main process loads it into a skeleton of the
    same architecture built on the meta device (no second random init) and copies the non-persistent buffers
    (rotary frequencies), which are not sharded, from the live model.
    """
    from bft.trainer.modeling import torch_dtype
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    live = accelerator.unwrap_model(student).model  # the HF / peft model, sharded
    is_peft = hasattr(live, "get_base_model")
    hf_config = (live.get_base_model() if is_peft else live).config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
        if is_peft:
            from bft.hf.models import get_peft_model

            skeleton = get_peft_model(skeleton, live.peft_config[live.active_adapter])
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}  # BFTStudent.model.<name>
    skeleton.load_state_dict(state, strict=False, assign=True)
    skeleton.tie_weights()
    live_buffers = dict(live.named_buffers())
    for name, buf in skeleton.named_buffers():
        if buf.is_meta and name in live_buffers:
            module_name, _, buf_name = name.rpartition(".")
            skeleton.get_submodule(module_name)._buffers[buf_name] = live_buffers[name].detach().cpu().clone()
    left = [name for name, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"gathering the FSDP student left tensors unset: {left[:5]}")
    return skeleton.to(torch_dtype(config.model.dtype))


def merge_into_fresh_copy(config: Config, student_model):
    """Merge LoRA adapters trained on a quantized model into an unquantized copy of the aligned model (on CPU)."""
    import tempfile

    from bft.trainer.modeling import load_causal_lm, torch_dtype

    from bft.hf.models import load_peft_adapter

    with tempfile.TemporaryDirectory() as adapter_dir:
        student_model.save_pretrained(adapter_dir)
        fresh = load_causal_lm(
            config.model.student or config.model.aligned,
            gguf_file=None if config.model.student else config.model.aligned_gguf_file,
            dtype=torch_dtype(config.model.dtype),
            quantization=None,
            attn_implementation="sdpa",
            device=torch.device("cpu"),
            trainable=False,
        )
        return load_peft_adapter(fresh, adapter_dir).merge_and_unload()


def run_from_arguments(args) -> int:
    """``bft train`` / ``python trainer/train.py`` with parsed :func:`bft.trainer.config.add_train_arguments`."""
    from bft.trainer.config import config_from_train_arguments

    with ending_process_group():
        summary = train(config_from_train_arguments(args), resume=args.resume, progress=not args.no_progress)
    print(
        f"trained {summary['steps']} steps; metrics: {summary['output_dir']}/metrics.jsonl; "
        f"student: {summary['final_dir']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python trainer/train.py ...`` / ``accelerate launch trainer/train.py ...``: the same as ``bft train``."""
    import argparse

    from bft.trainer.config import TRAIN_DESCRIPTION, add_train_arguments

    parser = argparse.ArgumentParser(prog="python trainer/train.py", description=TRAIN_DESCRIPTION)
    add_train_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
