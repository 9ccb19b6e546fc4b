"""The sizes and settings of the miniature reproduction (:class:`ReproduceConfig`) and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bft.decoding.contrastive import check_form

__all__ = ["ReproduceConfig", "quick_config", "validate", "torch_device"]


@dataclass
class ReproduceConfig:
    """Sizes of the miniature experiment. The defaults take ~40 min on 2 CPU cores; see :func:`quick_config`."""

    out: str = "runs/reproduce"
    model: str = "smollm2"  # the base model: alias, hub id or local path (a chat model that answers harmful prompts)
    device: str | None = None  # None: CUDA when available, else CPU
    seed: int = 0
    harmful_sources: list = field(default_factory=lambda: ["advbench", "harmbench"])
    benign_source: str = "gsm8k"
    n_train: int = 128  # harmful training prompts (refusal SFT and BFT)
    n_test: int = 32  # held-out harmful prompts (analysis and attacks)
    n_benign_train: int = 64
    n_benign_test: int = 24
    response_tokens: int = 48  # length of the base model's harmful responses / benign answers
    batch_size: int = 8
    # stage 2: the shallow refusal SFT
    align_steps: int = 60
    align_lr: float = 5e-5
    # the deeper analog: a share of Qi et al.'s safety-recovery examples in the refusal SFT (0 = the shallow one)
    recovery_share: float = 0.0
    recovery_max_tokens: int = 16
    # stage 3
    analysis_tokens: int = 32
    analysis_prefill_tokens: int = 4
    top_n: int = 100
    # stage 4: BFT (paper defaults for the loss: λ = 1.2, τ = 2, k = 100, harmful ratio 0.4)
    bft_steps: int = 80
    bft_lr: float = 2e-4
    bft_lora_r: int = 16
    bft_batch_size: int = 8
    bft_max_length: int = 160
    top_k: int = 100
    harmful_ratio: float = 0.4
    loss_overrides: dict = field(default_factory=dict)  # any other LossConfig key (alpha_base, l2_reg, ...)
    teacher_cache: bool = True  # train the student from the exact frozen-teacher cache (docs/trainer.md)
    # stage 5
    prefill_ks: list = field(default_factory=lambda: [0, 4, 10, 20])
    eval_tokens: int = 48
    # the prefill-attack protocol of Qi et al. (2024): seeded nucleus sampling. Under greedy decoding Eq. 7 can only
    # change a step whose aligned argmax is itself base-favored (it never raises a token), so greedy hides most of it
    sample: bool = True
    temperature: float = 0.9
    top_p: float = 0.6
    alpha: float = 1.0
    alphas: list = field(default_factory=lambda: [0.5, 2.0, 5.0, 10.0])  # swept at k = sweep_k
    forms: list = field(default_factory=lambda: ["logprobs", "logits"])  # Eq. 7 on log-probs / raw logits (paper)
    eval_seeds: int = 1  # sampling seeds of every prefill attack (Qi et al. use 3); intervals pool them by prompt
    # judges of every continuation; the first model judge is the primary measure (harm: calibrated, offline)
    judges: list = field(default_factory=lambda: ["harm", "keyword"])
    sweep_k: int = 4
    gsm8k_limit: int = 8  # 0 skips GSM8K exact match (perplexity is always measured)
    gsm8k_tokens: int = 128
    embedding_model: str | None = None  # three-way judge embedding model; None = packaged all-MiniLM-L6-v2
    quick: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_config(**overrides) -> ReproduceConfig:
    """The ``--quick`` sizes: the whole pipeline in ~10 min on 2 CPU cores (the demo)."""
    sizes = dict(
        n_train=32, n_test=12, n_benign_train=16, n_benign_test=8, response_tokens=32, align_steps=24,
        analysis_tokens=20, bft_steps=16, bft_max_length=128, prefill_ks=[0, 4], eval_tokens=24,
        alphas=[5.0], gsm8k_limit=0, quick=True,
    )  # fmt: skip
    sizes.update(overrides)
    return ReproduceConfig(**sizes)


def validate(cfg: ReproduceConfig) -> None:
    for name in ("n_train", "n_test", "n_benign_train", "n_benign_test", "response_tokens", "batch_size",
                 "align_steps", "analysis_tokens", "bft_steps", "eval_tokens", "top_k", "eval_seeds"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not any(k != 0 for k in cfg.prefill_ks):
        raise ValueError(f"prefill_ks needs at least one k > 0 (the attack), got {cfg.prefill_ks}")
    if not 0.0 <= cfg.recovery_share <= 1.0:
        raise ValueError(f"recovery_share must be in [0, 1], got {cfg.recovery_share}")
    for form in cfg.forms:
        check_form(form)
    if not 0.0 <= cfg.harmful_ratio <= 1.0:
        raise ValueError(f"harmful_ratio must be in [0, 1], got {cfg.harmful_ratio}")


def torch_device(cfg: ReproduceConfig):
    """The device the stages run on: ``cfg.device``, else CUDA when available, else the CPU."""
    import torch

    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
