"""The trainer's configuration: nested dataclasses read from YAML, with strict keys and ``key.sub=value`` overrides.

A config file has up to seven sections, each a dataclass below (every field has a default, so a file only lists what
it changes)::

    model:     which base / aligned models, their dtype, quantization of the frozen weights, attention, checkpointing
    finetune:  full fine-tuning or LoRA (rank, alpha, targets) and how the final student is saved
    data:      harmful and utility datasets, the harmful ratio per batch, batch size, max length
    loss:      the BFT hyper-parameters (paper defaults: λ = 1.2, τ = 2, k = 100), the completion term, the backend
    optim:     optimizer (AdamW / 8-bit / paged), lr (paper: 1e-5), schedule, clipping, gradient accumulation
    train:     epochs / max_steps, seed, output directory, checkpointing, logging
    teacher_cache: where the exact frozen-teacher cache lives (``bft cache``), when training from one

Unknown keys are errors (with a "did you mean" hint), values are checked against the field types (YAML 1.1 reads
``1e-5`` as a string; a float field accepts it), and :func:`load_config` applies command-line overrides such as
``optim.lr=2e-5`` or ``finetune.mode=full`` before validating.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bft.config import (  # noqa: F401  (ConfigError, parse_override: part of this module's API)
    ConfigError,
    accept_overrides,
    apply_overrides,
    build_dataclass,
    load_yaml_mapping,
    parse_override,
)
from bft.loss import BACKENDS, BFTLossParams

FINETUNE_MODES = ("lora", "full")
QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")
SAVE_FORMATS = ("merged", "adapter")
HARMFUL_RESPONSES = ("dataset", "generate")
MIXED_PRECISION = ("no", "bf16", "fp16")
#: What drives the optimizer steps (``train.engine``): bft's own loop (trainer/train.py), or TRL's ``SFTTrainer``
#: subclass :class:`bft.integrations.trl.BFTTrainer` (``pip install 'bft[trl]'``); the same per-micro-batch step.
ENGINES = ("bft", "trl")
#: ``transformers.get_scheduler`` names that run from (warmup steps, total steps) alone; the others need extra
#: arguments (min_lr, decay steps) or a metric at every step, which the trainer does not pass.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)

#: Model names that build the tiny random models of :mod:`bft.hf.testing` instead of loading anything.
TINY_BASE = "tiny-random-base"
TINY_ALIGNED = "tiny-random-aligned"


@dataclass
class ModelConfig:
    """The frozen base model, the aligned model the student starts from, and how they are loaded."""

    base: str = ""  # hub id, local path, "smollm2", or "tiny-random-base"
    aligned: str = ""  # hub id, local path, "smollm2", or "tiny-random-aligned"
    student: str | None = None  # the model the student starts from when it is not the aligned teacher (a diagnostic:
    # the shallow analog's student distilling the deep analog's teacher); needs the teacher cache. None: aligned
    base_gguf_file: str | None = None  # for GGUF checkpoints (transformers' gguf_file=)
    aligned_gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to the aligned model's tokenizer (it has the chat template)
    dtype: str = "bfloat16"  # dtype of all three models' weights (the student's too)
    frozen_quantization: str | None = None  # None | "8bit" | "4bit" (bitsandbytes; lm_head stays 16-bit)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed (CUDA, 16-bit), else sdpa
    gradient_checkpointing: bool = True
    tiny_hidden_size: int = 32  # only for the tiny-random models
    tiny_num_layers: int = 2
    tiny_seed: int = 0


@dataclass
class FinetuneConfig:
    """Full fine-tuning or LoRA. With LoRA the aligned teacher is the student with its adapters disabled."""

    mode: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    save: str = "merged"  # final student: "merged" (a plain HF model) or "adapter" (peft adapter only; LoRA)


@dataclass
class DataConfig:
    """Harmful (prompt, response) pairs and utility data, mixed per batch at ``harmful_ratio``."""

    harmful: str = "advbench"  # bft.hf.data.load name (advbench, harmbench, hexphi path, ...) or a local file
    harmful_split: str | None = None
    harmful_limit: int | None = None
    harmful_columns: dict[str, str] | None = None  # e.g. {"prompt": "instruction", "response": "output"}
    harmful_response: str = "dataset"  # "dataset": use the dataset's responses; "generate": the base model writes them
    generate_max_new_tokens: int = 128
    utility: str = "gsm8k"
    utility_split: str | None = None
    utility_limit: int | None = None
    utility_columns: dict[str, str] | None = None
    harmful_ratio: float = 0.4  # fraction of each batch that is harmful (paper: 0.4)
    batch_size: int = 8  # rows per micro-batch per process
    max_length: int = 512  # tokens per row (prompt + response); longer responses are cut at the end
    system: str | None = None  # optional system prompt for the chat template


@dataclass(frozen=True)
class LossConfig(BFTLossParams):
    """The ``loss:`` section: the objective's settings, declared, defaulted and validated once in
    :class:`bft.loss.BFTLossParams` (top_k, temperature, teacher_lambda, alpha_base, gamma, l2_reg, kl, kl_weight,
    completion), plus how :func:`bft.bft_loss` runs. :attr:`params` is what travels to the loss."""

    backend: str = "auto"  # one of bft.loss.BACKENDS
    chunk_rows: int | None = None  # rows per chunk of the fused backends (None: from their memory budgets)

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 or null, got {self.chunk_rows}")

    @property
    def params(self) -> BFTLossParams:
        """The objective's settings alone, as :func:`bft.bft_loss` takes them."""
        return BFTLossParams(**self.as_kwargs())


@dataclass
class TeacherCacheConfig:
    """The exact frozen-teacher cache (``bft cache``; docs/trainer.md). ``path`` set: the frozen models' hidden
    states, base-favored ids and risk are read from ``path`` (built there on first use) and the frozen bodies are
    never loaded."""

    path: str | None = None
    shard_mb: float = 256.0  # target size of one shard of hidden states (MiB)


@dataclass
class OptimConfig:
    """Optimizer, schedule (``transformers.get_scheduler``), clipping and gradient accumulation."""

    name: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit | paged_adamw (the last three need bitsandbytes)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # one of SCHEDULERS: linear, cosine, cosine_with_restarts, polynomial, constant, ...
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0  # None disables clipping
    grad_accum: int = 1


@dataclass
class TrainConfig:
    """Length of training, reproducibility, outputs."""

    epochs: float = 20.0  # passes over the harmful set (over the utility set when harmful_ratio is 0)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    output_dir: str = "runs/bft"
    save_every: int = 100  # optimizer steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    save_at_steps: list[int] = field(default_factory=list)  # steps that also get a checkpoint, kept whatever
    # keep_checkpoints says (checkpoints along the budget: bft.pipelines.reproduce.frontier)
    log_every: int = 1  # tqdm postfix refresh; metrics.jsonl always gets every step
    tensorboard: bool = False
    mixed_precision: str = "no"  # accelerate autocast: "no" | "bf16" | "fp16" (with dtype float32 master weights)
    device: str | None = None  # None: accelerate's choice (CUDA when available); "cpu" forces CPU
    engine: str = "bft"  # one of ENGINES: "bft" (trainer/train.py) or "trl" (TRL's trainer, bft.integrations.trl)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(config: Config) -> Config:
    """Range and choice checks that types alone cannot express. Raises :class:`ConfigError`."""
    m, f, d, lo, o, t = config.model, config.finetune, config.data, config.loss, config.optim, config.train

    def choice(name, value, options):
        if value not in options:
            raise ConfigError(f"{name} must be one of {list(options)}, got {value!r}")

    if not m.base:
        raise ConfigError("model.base is required: the base (pre-trained) model, a hub id or a local path")
    if not m.aligned:
        raise ConfigError("model.aligned is required: the aligned (instruct) model the student starts from")
    if m.student is not None and not (m.student and config.teacher_cache.path and m.base != TINY_BASE):
        raise ConfigError(
            "model.student (a student that does not start from the aligned teacher) needs teacher_cache.path (the "
            "teachers are read from the cache) and a model on disk, not the tiny random pair"
        )
    choice("model.dtype", m.dtype, DTYPES)
    choice("model.frozen_quantization", m.frozen_quantization, QUANTIZATIONS)
    choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    choice("finetune.mode", f.mode, FINETUNE_MODES)
    choice("finetune.save", f.save, SAVE_FORMATS)
    if f.mode == "full" and f.save == "adapter":
        raise ConfigError("finetune.save='adapter' needs finetune.mode='lora' (full fine-tuning has no adapter)")
    if f.mode == "lora" and (f.lora_r < 1 or f.lora_alpha <= 0):
        raise ConfigError(f"LoRA needs lora_r >= 1 and lora_alpha > 0, got r={f.lora_r}, alpha={f.lora_alpha}")
    if not 0.0 <= f.lora_dropout < 1.0:
        raise ConfigError(f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if not 0.0 <= d.harmful_ratio <= 1.0:
        raise ConfigError(f"data.harmful_ratio must be in [0, 1] (paper: 0.4), got {d.harmful_ratio}")
    choice("data.harmful_response", d.harmful_response, HARMFUL_RESPONSES)
    for name in ("batch_size", "max_length", "generate_max_new_tokens"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1, got {getattr(d, name)}")
    if d.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 (a prompt token and a response token), got {d.max_length}")
    for name in ("harmful_limit", "utility_limit"):
        if getattr(d, name) is not None and getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1 or null, got {getattr(d, name)}")
    if not isinstance(lo, LossConfig):  # built elsewhere than build_dataclass (which validates it on construction)
        raise ConfigError(f"config.loss must be a LossConfig, got {type(lo).__name__}")
    choice("optim.name", o.name, OPTIMIZERS)
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    if o.warmup_steps < 0 or not 0 <= o.warmup_ratio <= 1:
        raise ConfigError(
            f"optim.warmup_steps must be >= 0 and warmup_ratio in [0, 1], got {o.warmup_steps}, {o.warmup_ratio}"
        )
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        raise ConfigError(f"optim.max_grad_norm must be > 0 or null, got {o.max_grad_norm}")
    choice("optim.scheduler", o.scheduler, SCHEDULERS)
    if t.epochs <= 0 and t.max_steps is None:
        raise ConfigError(f"train.epochs must be > 0 (or set train.max_steps), got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1, got {t.max_steps}")
    for name in ("save_every", "keep_checkpoints", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if not isinstance(t.save_at_steps, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in t.save_at_steps
    ):
        raise ConfigError(f"train.save_at_steps must be a list of steps >= 1, got {t.save_at_steps!r}")
    if t.save_at_steps and t.engine != "bft":
        raise ConfigError("train.save_at_steps is the bft engine's (trainer/train.py); TRL saves on its own schedule")
    choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    choice("train.engine", t.engine, ENGINES)
    if not config.teacher_cache.shard_mb > 0:
        raise ConfigError(f"teacher_cache.shard_mb must be > 0, got {config.teacher_cache.shard_mb}")
    if config.teacher_cache.path == "":
        raise ConfigError("teacher_cache.path must be a directory or null, got an empty string")
    if (m.base == TINY_BASE) != (m.aligned == TINY_ALIGNED):
        raise ConfigError(
            f"the tiny random models come as a pair: set model.base={TINY_BASE!r} and "
            f"model.aligned={TINY_ALIGNED!r} together"
        )
    return config


def config_from_dict(data: dict | None) -> Config:
    return validate(build_dataclass(Config, data or {}))


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate.

    ``path`` may also be the name of a bundled config, e.g. ``"tiny-cpu"`` for ``trainer/configs/tiny-cpu.yaml``.
    """
    data = load_yaml_mapping(resolve_config_path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a bundled config (``tiny-cpu``, ``llama-3.1-8b-lora``, ...)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    bundled = CONFIG_DIR / f"{candidate.name.removesuffix('.yaml')}.yaml"
    if candidate.parent == Path(".") and bundled.is_file():
        return bundled
    raise FileNotFoundError(f"config file {str(path)!r} not found (bundled configs: {', '.join(bundled_configs())})")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


TRAIN_DESCRIPTION = (
    "Train a student with the BFT objective (paper Eq. 8-14) from a YAML config. CONFIG is a file or the name of a "
    "bundled config (tiny-cpu, smollm2-135m, llama-3.1-8b-lora, llama-3.1-8b-full, qwen-2.5-7b-lora). Writes "
    "DIR/metrics.jsonl, checkpoints in DIR/checkpoints/ and the final student in DIR/final/."
)


def add_train_arguments(parser) -> None:
    """The arguments of ``bft train`` / ``python trainer/train.py`` (both parse them here)."""
    parser.add_argument("config", help="YAML config file, or a bundled config name such as tiny-cpu")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=2e-5 finetune.mode=full data.batch_size=4",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument("--output-dir", default=None, help="output directory (overrides train.output_dir)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in the output directory"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--engine",
        default=None,
        metavar="{bft,trl}",
        help="what runs the steps (overrides train.engine): bft's loop, or TRL's trainer (pip install 'bft[trl]')",
    )
    accept_overrides(parser)


def config_from_train_arguments(args) -> Config:
    """The validated config that parsed :func:`add_train_arguments` describe (file, overrides, then options)."""
    config = load_config(args.config, args.overrides)
    if args.max_steps is not None:
        config.train.max_steps = args.max_steps
    if args.output_dir is not None:
        config.train.output_dir = args.output_dir
    if getattr(args, "engine", None) is not None:
        config.train.engine = args.engine
    return validate(config)
