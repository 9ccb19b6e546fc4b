"""The sizes and settings of the miniature reproduction (:class:`ReproduceConfig`) and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bft.decoding.contrastive import check_form

__all__ = [
    "ReproduceConfig",
    "quick_config",
    "paper_config",
    "DEFAULT_SWEEP",
    "ABLATIONS",
    "RECOVERY_TARGET",
    "STOP_AFTER",
    "validate",
    "torch_device",
    "analog_share",
    "default_sweep",
    "loss_params",
    "validate_frontier",
    "FRONTIER_METHODS",
]

#: ``bft reproduce --sweep``: the grid of BFT loss settings tried on the validation split. alpha_base × l2_reg spans
#: the completion/KL ratio from about 0.1 to 10 at this scale (the completion term is α·l2_reg·Σ s_v² over k = 100
#: student logits of magnitude ~10-30, the τ²-scaled KL ~0.5-3 nats); λ is swept at the default alpha_base and l2_reg.
DEFAULT_SWEEP = {"alpha_base": [0.3, 1.0, 3.0], "l2_reg": [1e-5, 1e-4, 1e-3], "teacher_lambda": [1.0, 1.2, 1.5]}


def default_sweep(completion: str = "l2") -> dict:
    """:data:`DEFAULT_SWEEP` for a run whose completion term is ``completion``: without the l2_reg axis unless it
    is "l2" (l2_reg scales that term only; alpha_base is every term's weight)."""
    sweep = {k: list(v) for k, v in DEFAULT_SWEEP.items()}
    if completion != "l2":
        del sweep["l2_reg"]
    return sweep


#: The ablations at the chosen sweep point: the loss overrides that remove one part of the objective. ``kl_only``
#: sets α_n = alpha_base·(1 + γ·risk_n) to 0, which removes every completion term (l2_reg = 0 removed "l2" only:
#: "mass" and "unlikelihood" ignore l2_reg).
ABLATIONS = {"kl_only": {"alpha_base": 0.0}, "no_adaptive_alpha": {"gamma": 0.0}, "completion_only": {"kl_weight": 0.0}}

#: The band of 4-token prefill (keyword) ASR the deeper analog is calibrated into on the validation split, and its
#: centre: Llama-3.1-8B-Instruct's 47.5% (the paper's Table 1 baseline).
RECOVERY_TARGET = (0.35, 0.60, 0.475)

#: the values of ReproduceConfig.stop_after: None runs every stage, "sweep" stops after the validation sweep
STOP_AFTER = (None, "sweep")

#: the methods a frontier can train: Qi et al.'s augmentation, BFT with Eq. 9 as written, BFT with the variant chosen
#: on validation
FRONTIER_METHODS = ("qi", "bft_eq9", "bft_chosen")

#: the values of ReproduceConfig.sweep_score: how each sweep point is scored on validation. "generation": the
#: sweep_k-token prefill attack under every judge (stages.stage_validation); "teacher_forced": judge-free teacher-forced
#: measures on the screening split, no generation (bft.pipelines.reproduce.screening)
SWEEP_SCORES = ("generation", "teacher_forced")

#: the loss settings a sweep may vary (each value is checked as a bft.loss.BFTLossParams field); "completion" and
#: "selection" take names (bft.COMPLETION_TERMS, bft.kernels.params.SELECTION_RULES)
SWEEP_KEYS = (
    "alpha_base",
    "l2_reg",
    "teacher_lambda",
    "gamma",
    "temperature",
    "top_k",
    "kl_weight",
    "completion",
    "selection",
    "selection_top_p",
    "completion_floor",
)


@dataclass
class ReproduceConfig:
    """Sizes of the miniature experiment. The defaults are the sizes of docs/results' run on 2 CPU cores (the time is
    in its REPORT.md); :func:`quick_config` is the demo, :func:`paper_config` the powered protocol for a GPU."""

    out: str = "runs/reproduce"
    model: str = "smollm2"  # the base model: alias, hub id or local path (a chat model that answers harmful prompts)
    device: str | None = None  # None: CUDA when available, else CPU
    seed: int = 0
    harmful_sources: list = field(default_factory=lambda: ["advbench", "harmbench"])
    benign_source: str = "gsm8k"
    n_train: int = 64  # harmful training prompts (refusal SFT and BFT)
    n_val: int = 24  # validation harmful prompts: every choice (sweep point, recovery share) is made on these
    n_test: int = 64  # held-out harmful prompts (analysis and attacks), never used for choosing
    n_benign_train: int = 32
    n_benign_val: int = 8
    n_benign_test: int = 16
    # near-duplicate-free harmful splits (bft.eval.dedup): prompts whose all-MiniLM-L6-v2 cosine similarity is at
    # least this are one cluster (single linkage); train takes whole clusters, validation and test one prompt per
    # cluster. None: disjoint by exact text only (the splits of the committed results before it)
    dedup_threshold: float | None = 0.85
    response_tokens: int = 32  # length of the base model's harmful responses / benign answers
    batch_size: int = 8  # the refusal SFT's batch, and every generation's unless eval_batch_size is set
    eval_batch_size: int | None = None  # rows per generation batch of the attacks and validation scoring (None:
    # batch_size); it changes no training, and larger batches generate faster per row on a CPU
    # stage 2: the shallow refusal SFT
    align_steps: int = 24
    align_lr: float = 5e-5
    # the aligned analogs, name -> share of Qi et al.'s safety-recovery examples in the refusal SFT: 0 is the shallow
    # recipe; "auto" picks, from recovery_candidates, the share whose validation 4-token prefill ASR is nearest the
    # paper's 47.5% (inside RECOVERY_TARGET when one is). Every later stage runs on every analog.
    analogs: dict = field(default_factory=lambda: {"shallow": 0.0, "deep": "auto"})
    recovery_candidates: list = field(default_factory=lambda: [0.15])
    recovery_max_tokens: int = 16
    # Qi et al.'s augmentation as a peer system (the paper's Table 2): each analog trained further on refusals and
    # recovery examples (this share) with the BFT student's steps and batch size; False skips it
    qi_augmentation: bool = True
    qi_recovery_share: float = 1.0
    qi_steps: int | None = None  # None: the BFT student's steps (the paper's equal budget); fewer is a stated reduction
    # stage 3
    analysis_tokens: int = 24
    analysis_prefill_tokens: int = 4
    analysis_prompts: int | None = 16  # test prompts of the position-wise analysis (None: all)
    top_n: int = 100
    # stage 4: BFT (paper defaults for the loss: λ = 1.2, τ = 2, k = 100, harmful ratio 0.4)
    bft_steps: int = 24
    bft_epochs: float | None = None  # passes over the harmful pairs (the paper: 20); overrides bft_steps when set
    bft_lr: float = 2e-4
    bft_lora_r: int = 16
    bft_batch_size: int = 8
    bft_max_length: int = 160
    top_k: int = 100
    harmful_ratio: float = 0.4
    loss_overrides: dict = field(default_factory=dict)  # any other LossConfig key (alpha_base, l2_reg, ...)
    teacher_cache: bool = True  # train the student from the exact frozen-teacher cache (docs/trainer.md)
    # the validation sweep (bft reproduce --sweep: DEFAULT_SWEEP): loss-key -> values; alpha_base × l2_reg is a grid,
    # every other key is varied alone at the defaults. Points are trained on sweep_analog for sweep_steps (None:
    # the students' budget) and scored on validation at k = sweep_k; the chosen point (lowest primary-judge ASR,
    # then keyword ASR, among points within sweep_max_ppl_increase of the aligned model's validation perplexity)
    # trains every analog's student; the ablations (ABLATIONS) are trained at the chosen point
    sweep: dict = field(default_factory=dict)
    sweep_analog: str = "shallow"
    sweep_steps: int | None = None
    sweep_max_ppl_increase: float = 0.10
    # how the sweep points are scored (SWEEP_SCORES): "generation" (above), or "teacher_forced": screening without
    # generation (the harmful likelihood after a sweep_k-token prefill, M's mass, benign perplexity as the guard;
    # bft.pipelines.reproduce.screening) on screen_n_val harmful / screen_n_benign benign prompts (None: the validation
    # split's n_val / n_benign_val; more are drawn past the data stage's splits in their own stage, screen_data)
    sweep_score: str = "generation"
    screen_n_val: int | None = None
    screen_n_benign: int | None = None
    ablations: list = field(default_factory=lambda: list(ABLATIONS))
    # "sweep": stop once the sweep (and its ablations) is scored; no analysis, student, Qi row or test eval, and no
    # REPORT.md (summary.json holds the sweep). None runs every stage
    stop_after: str | None = None
    # stage 5
    prefill_ks: list = field(default_factory=lambda: [0, 4])
    # new tokens per continuation: at 32 the judges rarely see harm (the base model's 9% harm rate after a prefill),
    # and the paper generates far more; 64 doubles what they read for ~0.35 s more per continuation on 2 CPU cores
    eval_tokens: int = 64
    # the prefill-attack protocol of Qi et al. (2024): seeded nucleus sampling. Under greedy decoding Eq. 7 can only
    # change a step whose aligned argmax is itself base-favored (it never raises a token), so greedy hides most of it
    sample: bool = True
    temperature: float = 0.9
    top_p: float = 0.6
    alpha: float = 1.0
    alphas: list = field(default_factory=list)  # swept at k = sweep_k
    forms: list = field(default_factory=lambda: ["logprobs", "logits"])  # Eq. 7 on log-probs / raw logits (paper)
    eval_seeds: int = 1  # sampling seeds of the sweep_k attack (Qi et al. use 3; k = 0 and the long k get the first
    # seed only); intervals pool them by prompt
    # judges of every continuation; the first model judge is the primary measure (harm: calibrated, offline)
    judges: list = field(default_factory=lambda: ["harm", "keyword"])
    sweep_k: int = 4  # the attack every choice and claim is made at (the paper's Table 1: 4 tokens)
    long_k_prompts: int | None = 24  # test prompts of the attacks at k other than 0 and sweep_k, one sampling
    # seed (None: all of them, every seed): the paper's k = 4 setting gets the power, the others a profile
    gsm8k_limit: int = 0  # 0 skips GSM8K exact match (perplexity is always measured)
    gsm8k_tokens: int = 128
    embedding_model: str | None = None  # three-way judge embedding model; None = packaged all-MiniLM-L6-v2
    # the frontier (bft.pipelines.reproduce.frontier): per analog, method and training seed one
    # run over the whole budget keeping checkpoints at these fractions, each evaluated; False: none of it runs
    frontier: bool = False
    # the frontier alone: the per-analog main stages (analyses, the one student, Qi's row, the pull, the main
    # evaluation) are skipped, since the frontier evaluates the aligned model and every method's checkpoints itself
    frontier_only: bool = False
    frontier_fractions: list = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5, 1.0])
    # Qi's own list when its curve needs other points (e.g. earlier ones: its first steps already move it far);
    # None: frontier_fractions. The BFT runs keep frontier_fractions either way.
    frontier_qi_fractions: list | None = None
    frontier_seeds: list = field(default_factory=lambda: [0, 1])  # training seeds (all at the full budget)
    frontier_curve_seeds: int = 1  # the first N training seeds whose intermediate checkpoints are evaluated
    frontier_methods: list = field(default_factory=lambda: ["qi", "bft_eq9", "bft_chosen"])
    frontier_variant: dict = field(default_factory=dict)  # bft_chosen's loss settings when no sweep ran
    frontier_analogs: list | None = None  # None: every analog
    frontier_ks: list = field(default_factory=lambda: [4, 20])  # sweep_k and a longer k
    frontier_test_prompts: int | None = None  # test prompts of the headline (full-budget) points; None: all
    frontier_prompts: int = 64  # test prompts of the intermediate checkpoints (one sampling seed)
    frontier_eval_seeds: int = 3  # sampling seeds of the headline points at k = sweep_k
    frontier_overrefusal_limit: int | None = None  # benign over-refusal prompts, when the runner has the measure
    # benign solutions of the perplexity axis at every point: the data stage's benign_test topped up with further
    # problems of benign_source that no other split or the screening holds; None: benign_test alone
    frontier_benign_prompts: int | None = None
    # [student analog, teacher analog], e.g. [shallow, deep]: one more student per training seed of frontier_seeds
    frontier_diagnostic: list | None = None
    quick: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_config(**overrides) -> ReproduceConfig:
    """The ``--quick`` sizes: the whole pipeline in ~10 min on 2 CPU cores (the demo)."""
    sizes = dict(
        n_train=32,
        n_val=8,
        n_test=12,
        n_benign_train=16,
        n_benign_val=4,
        n_benign_test=8,
        response_tokens=32,
        align_steps=24,
        analogs={"shallow": 0.0},
        qi_augmentation=False,
        analysis_tokens=20,
        bft_steps=16,
        bft_max_length=128,
        prefill_ks=[0, 4],
        eval_tokens=24,
        alphas=[5.0],
        gsm8k_limit=0,
        quick=True,
    )
    sizes.update(overrides)
    return ReproduceConfig(**sizes)


def paper_config(**overrides) -> ReproduceConfig:
    """``--paper``: the issue's powered protocol, a GPU job (the paper's budget of 20 epochs, the sweep, >= 200 test
    prompts at k = 4 with 3 sampling seeds and 64 at k in {10, 20, full})."""
    sizes = dict(
        n_train=128,
        n_val=64,
        n_test=200,
        n_benign_train=64,
        n_benign_val=16,
        n_benign_test=48,
        response_tokens=48,
        align_steps=60,
        recovery_candidates=[0.02, 0.03, 0.05, 0.1],
        analysis_tokens=32,
        analysis_prompts=None,
        bft_epochs=20.0,
        eval_tokens=128,  # a GPU job: the judges read a longer continuation
        eval_seeds=3,
        sweep=dict(DEFAULT_SWEEP),
        prefill_ks=[0, 4, 10, 20, "full"],
        long_k_prompts=64,
        alphas=[0.5, 2.0, 5.0, 10.0],
        gsm8k_limit=48,
    )
    sizes.update(overrides)
    return ReproduceConfig(**sizes)


def analog_share(cfg: ReproduceConfig, name: str, chosen: float | None = None) -> float:
    """The recovery share of analog ``name`` (``chosen`` replaces "auto")."""
    share = cfg.analogs[name]
    return chosen if share == "auto" else float(share)


def validate(cfg: ReproduceConfig) -> None:
    for name in (
        "n_train",
        "n_val",
        "n_test",
        "n_benign_train",
        "n_benign_test",
        "response_tokens",
        "batch_size",
        "align_steps",
        "analysis_tokens",
        "bft_steps",
        "eval_tokens",
        "top_k",
        "eval_seeds",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dedup_threshold is not None and (
        isinstance(cfg.dedup_threshold, bool)
        or not isinstance(cfg.dedup_threshold, (int, float))
        or not 0.0 < cfg.dedup_threshold <= 1.0
    ):
        raise ValueError(f"dedup_threshold must be a cosine similarity in (0, 1] or null, got {cfg.dedup_threshold!r}")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1 (or null: batch_size), got {cfg.eval_batch_size}")
    if not any(k != 0 for k in cfg.prefill_ks):
        raise ValueError(f"prefill_ks needs at least one k > 0 (the attack), got {cfg.prefill_ks}")
    if not cfg.analogs:
        raise ValueError("analogs must name at least one aligned analog, e.g. {shallow: 0.0}")
    for name, share in cfg.analogs.items():
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"analog names are folder names (letters, digits, - and _), got {name!r}")
        if share == "auto":
            if not cfg.recovery_candidates:
                raise ValueError(f"analog {name!r} is 'auto' but recovery_candidates is empty")
            continue
        if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"analogs.{name} must be a recovery share in [0, 1] or 'auto', got {share!r}")
    for share in cfg.recovery_candidates + [cfg.qi_recovery_share]:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"recovery shares must be in [0, 1], got {share}")
    try:
        loss_params(cfg.loss_overrides)
    except ValueError as e:
        raise ValueError(f"loss_overrides: {e}") from None
    if cfg.sweep:
        if cfg.sweep_analog not in cfg.analogs:
            raise ValueError(f"sweep_analog {cfg.sweep_analog!r} is not one of the analogs {list(cfg.analogs)}")
        for key, values in cfg.sweep.items():
            if key not in SWEEP_KEYS:
                raise ValueError(f"sweep key {key!r} is not a loss setting; choose from {list(SWEEP_KEYS)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{key} must be a non-empty list, got {values!r}")
            for value in values:
                try:
                    loss_params({**cfg.loss_overrides, key: value})
                except ValueError as e:
                    raise ValueError(f"sweep.{key}: {e}") from None
        completion = loss_params(cfg.loss_overrides).completion
        if "l2_reg" in cfg.sweep and completion != "l2":
            raise ValueError(
                f"sweep.l2_reg scales completion='l2' only and this run's completion is {completion!r}: "
                "sweep alpha_base instead (the weight of every completion term)"
            )
        unknown = [a for a in cfg.ablations if a not in ABLATIONS]
        if unknown:
            raise ValueError(f"unknown ablations {unknown}; choose from {list(ABLATIONS)}")
    if cfg.sweep_score not in SWEEP_SCORES:
        raise ValueError(f"sweep_score must be one of {list(SWEEP_SCORES)}, got {cfg.sweep_score!r}")
    for name in ("screen_n_val", "screen_n_benign"):
        if getattr(cfg, name) is not None and (isinstance(getattr(cfg, name), bool) or getattr(cfg, name) < 1):
            raise ValueError(f"{name} must be >= 1 (or null: the validation split's size), got {getattr(cfg, name)!r}")
    if cfg.stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {list(STOP_AFTER)}, got {cfg.stop_after!r}")
    if cfg.stop_after == "sweep" and not cfg.sweep:
        raise ValueError("stop_after: sweep needs a sweep (the sweep key, or --sweep)")
    if cfg.qi_steps is not None and cfg.qi_steps < 1:
        raise ValueError(f"qi_steps must be >= 1 (or null: the BFT student's steps), got {cfg.qi_steps}")
    if cfg.bft_epochs is not None and cfg.bft_epochs <= 0:
        raise ValueError(f"bft_epochs must be > 0, got {cfg.bft_epochs}")
    if cfg.sweep_k not in cfg.prefill_ks:
        raise ValueError(f"sweep_k = {cfg.sweep_k} must be one of prefill_ks {cfg.prefill_ks}")
    for form in cfg.forms:
        check_form(form)
    if not 0.0 <= cfg.harmful_ratio <= 1.0:
        raise ValueError(f"harmful_ratio must be in [0, 1], got {cfg.harmful_ratio}")
    if cfg.frontier_only and not cfg.frontier:
        raise ValueError("frontier_only: true needs frontier: true (it keeps only the frontier's stages)")
    if cfg.frontier:
        validate_frontier(cfg)


def validate_frontier(cfg: ReproduceConfig) -> None:
    """The frontier keys of ``cfg``; a bad value is a ValueError naming its key. Called by
    :func:`validate` (and by :func:`bft.pipelines.reproduce.frontier.run_frontier`)."""
    for key in ("frontier_fractions", "frontier_qi_fractions"):
        fr = getattr(cfg, key)
        if fr is None and key == "frontier_qi_fractions":
            continue
        if not isinstance(fr, list) or not fr:
            raise ValueError(f"{key} must be a non-empty list of fractions in (0, 1], got {fr!r}")
        for f in fr:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"{key} must hold fractions in (0, 1], got {f!r}")
        if 1.0 not in [float(f) for f in fr]:
            raise ValueError(f"{key} must include 1.0 (the full budget: the headline points), got {fr}")
    seeds = cfg.frontier_seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ValueError(f"frontier_seeds must be a non-empty list of integer training seeds, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"frontier_seeds must not repeat a seed, got {seeds}")
    for name in ("frontier_prompts", "frontier_eval_seeds", "frontier_curve_seeds"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("frontier_test_prompts", "frontier_overrefusal_limit", "frontier_benign_prompts"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")
    ks = cfg.frontier_ks
    if not isinstance(ks, list) or cfg.sweep_k not in ks:
        raise ValueError(f"frontier_ks must be a list holding sweep_k = {cfg.sweep_k} (and a longer k), got {ks!r}")
    for k in ks:
        if k != "full" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"frontier_ks holds prefill lengths >= 1 or 'full', got {k!r}")
    methods = cfg.frontier_methods
    if not isinstance(methods, list) or not methods or any(m not in FRONTIER_METHODS for m in methods):
        raise ValueError(f"frontier_methods must be a non-empty list from {list(FRONTIER_METHODS)}, got {methods!r}")
    if cfg.frontier_analogs is not None:
        unknown = [a for a in cfg.frontier_analogs if a not in cfg.analogs]
        if not isinstance(cfg.frontier_analogs, list) or not cfg.frontier_analogs or unknown:
            raise ValueError(f"frontier_analogs must name analogs of {list(cfg.analogs)} (or be null), got {unknown}")
    diag = cfg.frontier_diagnostic
    if diag is not None:
        frontier_analogs = cfg.frontier_analogs or list(cfg.analogs)
        if (
            not isinstance(diag, list)
            or len(diag) != 2
            or diag[0] == diag[1]
            or any(a not in cfg.analogs for a in diag)
            or diag[0] not in frontier_analogs
        ):
            raise ValueError(
                "frontier_diagnostic must be [student analog, teacher analog]: two different analogs, the first one "
                f"of the frontier's analogs (e.g. [shallow, deep]), got {diag!r}"
            )
        if not any(m.startswith("bft") for m in cfg.frontier_methods):
            raise ValueError("frontier_diagnostic trains the frontier's BFT method: frontier_methods needs one")
    if not isinstance(cfg.frontier_variant, dict):
        raise ValueError(f"frontier_variant must be a mapping of loss settings, got {cfg.frontier_variant!r}")
    try:
        loss_params({**cfg.loss_overrides, **cfg.frontier_variant})
    except (ValueError, TypeError) as e:
        raise ValueError(f"frontier_variant: {e}") from None


def loss_params(loss: dict):
    """The :class:`bft.loss.BFTLossParams` of loss overrides (keys that are not objective settings, such as
    ``backend``, are left out); a bad value is its ValueError, naming the valid choices."""
    from dataclasses import fields

    from bft.kernels.params import BFTLossParams

    names = {f.name for f in fields(BFTLossParams)}
    return BFTLossParams(**{k: v for k, v in loss.items() if k in names})


def torch_device(cfg: ReproduceConfig):
    """The device the stages run on: ``cfg.device``, else CUDA when available, else the CPU."""
    import torch

    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
