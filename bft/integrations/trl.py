"""BFT inside TRL: one config, two engines (``train.engine: bft | trl``; ``bft train CONFIG --engine trl``).

:class:`BFTConfig` is TRL's ``SFTConfig`` plus the loss settings, held in one field (``bft_loss``: the trainer's
``loss:`` section, i.e. a :class:`bft.loss.BFTLossParams` plus ``backend`` / ``chunk_rows``; never redeclared here).
:class:`BFTTrainer` is TRL's ``SFTTrainer`` whose :meth:`~BFTTrainer.compute_loss` is bft's own per-micro-batch
step, :func:`bft.trainer.train.micro_batch_step` — the very function bft's loop calls: frozen forwards under
``no_grad`` to final hidden states (or the teacher cache), the student's forward, and the fused loss on hidden
states and lm_head weights with the ``valid`` / ``harmful`` masks. With LoRA the aligned teacher is the student with
its adapters disabled; in full fine-tuning a frozen copy (both built by :func:`bft.trainer.train.prepare_run`).

The data are bft's own mixed batches (:class:`bft.trainer.data.MixedBatches`, ``data.harmful_ratio``), not SFT's
tokenization: TRL's train dataset is the list of micro-batch indices, read in order (each process takes every
``world``-th, as bft's loop does) and turned into ``batches[i]`` by the collator. So both engines see the same rows
in the same order, and resuming (TRL's ``resume_from_checkpoint``, which skips the consumed indices) is exact.

    from bft.trainer.config import load_config
    from bft.integrations.trl import train
    summary = train(load_config("tiny-cpu", ["train.engine=trl", "train.output_dir=runs/tiny-trl"]))

Needs TRL (``pip install 'bft[trl]'``); importing this module without it raises ``ModuleNotFoundError`` naming the
extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bft.trainer import checkpoint as ckpt
from bft.trainer.config import Config, LossConfig, dump_config
from bft.trainer.modeling import BFTStudent
from bft.trainer.train import (
    PeakMemory,
    Run,
    append_metrics,
    check_optimizer_available,
    check_quantization_available,
    ending_process_group,
    metrics_line,
    micro_batch_step,
    prepare_run,
    save_final_student,
    truncate_metrics,
)

INSTALL_HINT = "pip install 'bft[trl]'"

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # one line that names the extra (bft's console prints it and exits 2)
    raise ModuleNotFoundError(f"train.engine=trl needs TRL: {INSTALL_HINT}", name="trl") from error

#: bft's ``optim.name`` -> ``TrainingArguments.optim`` (the same optimizer classes)
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw": "paged_adamw_32bit",
}

#: the name TRL's checkpoints of an engine-trl run live under, in DIR/checkpoints/ (bft's are ``step-N``)
CHECKPOINT_PREFIX = "checkpoint"


@dataclass
class BFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus ``bft_loss``: the objective's settings as one mapping (the keys of bft's ``loss:``
    section — :class:`bft.loss.BFTLossParams` and ``backend`` / ``chunk_rows``), validated once by
    :class:`bft.trainer.config.LossConfig` (a :class:`~bft.loss.BFTLossParams` or a ``LossConfig`` is accepted
    too). SFT's own data settings (packing, padding-free, max_length, ...) do not apply: the batches are bft's."""

    bft_loss: dict | None = field(
        default=None, metadata={"help": "BFT loss settings (bft.loss.BFTLossParams keys, plus backend and chunk_rows)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.bft_loss = dataclasses.asdict(self.loss_settings)  # validated here, kept JSON-friendly

    @property
    def loss_settings(self) -> LossConfig:
        value = self.bft_loss
        if isinstance(value, LossConfig):
            return value
        if dataclasses.is_dataclass(value):  # a BFTLossParams
            return LossConfig(**dataclasses.asdict(value))
        return LossConfig(**dict(value or {}))

    def bft_objective(self):
        """The :class:`bft.BFTLoss` these settings describe (what :func:`bft.trainer.train.loss_module` builds)."""
        from bft.loss import BFTLoss

        settings = self.loss_settings
        return BFTLoss(settings.params, backend=settings.backend, chunk_rows=settings.chunk_rows)


def bft_config_from(config: Config, total_steps: int, *, progress: bool = True, **overrides) -> BFTConfig:
    """The :class:`BFTConfig` that runs ``config`` exactly as bft's loop does: the same optimizer, schedule
    (warmup resolved to steps), clipping, accumulation, seed and length; checkpoints in DIR/checkpoints/; nothing
    of TRL's own data pipeline or loss scaling."""
    o, t = config.optim, config.train
    kwargs = {
        "output_dir": str(Path(t.output_dir) / "checkpoints"),
        "bft_loss": dataclasses.asdict(config.loss),
        "per_device_train_batch_size": 1,  # one item = one bft micro-batch (data.batch_size rows)
        "gradient_accumulation_steps": o.grad_accum,
        "max_steps": total_steps,
        "learning_rate": o.lr,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.betas[0],
        "adam_beta2": o.betas[1],
        "adam_epsilon": o.eps,
        "optim": OPTIMIZERS[o.name],
        "lr_scheduler_type": o.scheduler,
        "warmup_steps": o.warmup_steps or math.ceil(o.warmup_ratio * total_steps),
        "max_grad_norm": o.max_grad_norm if o.max_grad_norm is not None else float("inf"),  # bft logs the norm anyway
        "seed": t.seed,
        "data_seed": t.seed,
        "use_cpu": t.device == "cpu",
        "bf16": t.mixed_precision == "bf16",
        "fp16": t.mixed_precision == "fp16",
        "activation_checkpointing": False,  # bft enables it on the student itself (model.gradient_checkpointing)
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": t.save_every,
        "save_total_limit": t.keep_checkpoints,
        "report_to": "tensorboard" if t.tensorboard else "none",  # TRL's TensorBoard logs: DIR/checkpoints/runs/
        "disable_tqdm": not progress,
        "remove_unused_columns": False,  # the collator's "index" is not a model input
        "dataset_kwargs": {"skip_prepare_dataset": True},  # no SFT tokenization: bft's batches
        "packing": False,
        "padding_free": False,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return BFTConfig(**kwargs)


class _BatchCollator:
    """Micro-batch indices -> bft's mixed batches (each dataset item is one micro-batch index)."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, items):
        if len(items) != 1:
            raise ValueError(
                "BFTTrainer needs per_device_train_batch_size=1: one item is one bft micro-batch (data.batch_size rows)"
            )
        index = int(items[0]["index"])
        return {"index": index, **self.batches[index]}


class BFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` running bft's per-micro-batch step (:func:`bft.trainer.train.micro_batch_step`).

    ``run``: what to train (:func:`bft.trainer.train.prepare_run`: the student, the frozen teachers or the teacher
    cache, bft's mixed batches). The trainer trains ``run.trio.student``; metrics.jsonl (``metrics_path``) gets bft's
    line per optimizer step (loss, kl, completion, risk, lr, grad_norm, ...) and TRL's loggers get kl, completion and
    risk beside its own loss and grad_norm.
    """

    loss_is_scaled_for_ga = False  # the loss of one micro-batch; the Trainer divides by grad_accum (as bft's loop)

    def __init__(self, args: BFTConfig, run: Run, *, metrics_path=None, callbacks=None, step_callbacks=()):
        from datasets import Dataset

        self.bft_run = run
        world = args.world_size
        n_items = args.max_steps * args.gradient_accumulation_steps * world
        super().__init__(
            model=run.trio.student,
            args=args,
            data_collator=_BatchCollator(run.batches),
            train_dataset=Dataset.from_dict({"index": list(range(n_items))}),
            processing_class=run.trio.tokenizer,
            callbacks=callbacks,
        )
        self.bft_student = BFTStudent(self.model, args.bft_objective(), run.trio.vocab_size)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.step_callbacks = list(step_callbacks)
        self.last_metrics = None
        self._sums = None
        self._lr = None
        self._step_started = self._started = None
        self._peak = PeakMemory(args.device)

    def _get_train_sampler(self, train_dataset=None):
        """In order: item i of process r is micro-batch ``i·world + r`` (accelerate shards the sequence), as in
        bft's loop; the shuffling is inside bft's batches (seeded per pass)."""
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, _ in model.named_parameters()]  # as bft's loop: weight decay on every trained tensor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """bft's step on one micro-batch (``inputs``: the collator's ``batches[index]`` on the device). ``model`` is
        the trainer's (maybe wrapped) model; the student module around the same weights does the forwards."""
        if self._started is None:
            self._started = time.perf_counter()
        if self._step_started is None:
            self._step_started = time.perf_counter()
        with _student_through(model, self.bft_student) as student:
            result, sums = micro_batch_step(self.bft_run, student, inputs, int(inputs["index"]))
        if self.model.training:
            self._sums = sums if self._sums is None else self._sums + sums
            self._lr = self.lr_scheduler.get_last_lr()[0]  # the lr this optimizer step uses (bft's loop reads it so)
        return (result["loss"], result) if return_outputs else result["loss"]

    def log(self, logs: dict, start_time=None) -> None:
        if "grad_norm" in logs and self._sums is not None:  # the log of one optimizer step
            sums = self.accelerator.reduce(self._sums, reduction="sum")
            micro_per_step = self.args.gradient_accumulation_steps * self.accelerator.num_processes
            seconds = time.perf_counter() - self._step_started
            metrics = metrics_line(
                self.state.global_step,
                sums,
                micro_per_step,
                self._lr,
                logs["grad_norm"],
                seconds,
                self._peak,
                self.bft_run.batches,
                self._started,
            )
            self._sums = self._step_started = None
            self.last_metrics = metrics
            logs.update({key: metrics[key] for key in ("kl", "completion", "risk") if metrics[key] is not None})
            if self.metrics_path is not None and self.is_world_process_zero():
                append_metrics(self.metrics_path, metrics)
            for callback in self.step_callbacks:
                callback(metrics["step"], metrics)
        super().log(logs, start_time)


@contextlib.contextmanager
def _student_through(model, bft_student: BFTStudent):
    """The module to call for the student's forward: ``bft_student`` itself, or — when the trainer's ``model`` is a
    ``DistributedDataParallel`` around the student — that wrapper with the :class:`BFTStudent` put in as its module
    for the call. DDP all-reduces the gradients only of a backward that follows its own forward (its reducer is
    armed there); a forward around the bare student, as bft_student's alone, leaves every process with its own
    gradients and the replicas drift apart. bft's loop wraps BFTStudent itself (accelerator.prepare); here TRL's
    Trainer wraps the HF student, so the BFTStudent (same parameters, the loss inside) stands in for the call."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or model.module is not bft_student.model:
        yield bft_student
        return
    inner = model.module
    model.module = bft_student  # the same parameters: DDP's buckets and hooks are keyed by them
    try:
        yield model
    finally:
        model.module = inner


def _latest_trl_checkpoint(folder: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(config: Config, *, resume: bool = False, callbacks=(), progress: bool = True) -> dict:
    """Run ``config`` through TRL's trainer (engine ``trl``): what :func:`bft.trainer.train.train` does, with
    :class:`BFTTrainer` driving the steps. The output folder is bft's: DIR/metrics.jsonl (the same keys),
    DIR/config.yaml, DIR/checkpoints/ (TRL's ``checkpoint-N`` folders; ``resume`` continues from the latest) and
    DIR/final/ (the student as bft saves it). Returns the same summary."""
    import warnings

    from accelerate import PartialState
    from accelerate.utils import set_seed

    t, o = config.train, config.optim
    out = Path(t.output_dir)
    state = PartialState(cpu=t.device == "cpu")
    checkpoints = out / "checkpoints"
    resume_from = _latest_trl_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        warnings.warn(f"--resume: no checkpoint in {checkpoints}; starting from scratch", stacklevel=2)
    if not resume and _latest_trl_checkpoint(checkpoints) is not None:
        raise ValueError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose another --output-dir"
        )
    check_quantization_available(config.model.frozen_quantization)
    check_optimizer_available(o.name)
    set_seed(t.seed)
    out.mkdir(parents=True, exist_ok=True)

    run = prepare_run(config, state, out, progress)  # checks the loss settings against V too
    metrics_path = out / "metrics.jsonl"
    if state.is_main_process:
        if resume_from is not None:
            truncate_metrics(metrics_path, int(Path(resume_from).name.rsplit("-", 1)[1]))
        else:
            ckpt.atomic_write_text(metrics_path, "")
        ckpt.atomic_write_text(out / "config.yaml", dump_config(config))
    args = bft_config_from(config, run.total_steps, progress=progress)
    trainer = BFTTrainer(args, run, metrics_path=metrics_path, step_callbacks=callbacks)
    if not progress:  # quiet as bft's loop: no printed log dicts either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume_from)
    final_dir = save_final_student(config, run.trio, trainer.bft_student, out / "final", trainer.accelerator)
    return {
        "steps": trainer.state.global_step,
        "total_steps": run.total_steps,
        "output_dir": str(out),
        "final_dir": str(final_dir),
        "last_metrics": trainer.last_metrics,
    }


def run_from_arguments(args) -> int:
    """``bft train CONFIG --engine trl`` (or ``train.engine: trl`` in CONFIG)."""
    from bft.trainer.config import config_from_train_arguments

    with ending_process_group():
        summary = train(config_from_train_arguments(args), resume=args.resume, progress=not args.no_progress)
    print(
        f"trained {summary['steps']} steps (engine trl); metrics: {summary['output_dir']}/metrics.jsonl; "
        f"student: {summary['final_dir']}"
    )
    return 0
