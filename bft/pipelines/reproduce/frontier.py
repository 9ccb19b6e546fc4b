"""Curves, not points: attack success against utility along each method's training budget.

Per analog, per method and per training seed, **one** training run keeps the model at fractions of the budget
(:func:`method_fractions`: ``frontier_fractions``; Qi's own ``frontier_qi_fractions`` when given); every kept
checkpoint is evaluated; the points form one curve per method, and the summary says which points no other method's
point dominates.

Methods (``frontier_methods``):

- ``qi``: Qi et al.'s augmentation (:func:`bft.pipelines.reproduce.stages.qi_finetune` on the analog's aligned
  model, ``qi_recovery_share`` recovery examples, the student's steps and batch size: the equal budget;
  ``qi_steps`` sizes only the main pipeline's Qi row). Its ``on_step`` hook saves
  the full model at each fraction into ``models/frontier/<analog>/qi/seed<s>/step-<n>`` (atomically). The run is
  deterministic for its seed, so an interrupted run is replayed from step 0 and only the checkpoints it lacks are
  written; a finished run is reused (its stage marker), and checkpoints added to it replay only the steps up to
  the last new one (the learning rate is constant: the first n steps are the whole run's).
- ``bft_eq9``: the BFT student with Eq. 9 as written (``completion: l2``, ``selection: vocab``) over
  ``loss_overrides`` (the weights chosen on validation).
- ``bft_chosen``: the student with the completion term / selection rule chosen on validation: the sweep's chosen
  point when the sweep ran, else ``frontier_variant`` over ``loss_overrides``. When it resolves to the same loss as
  ``bft_eq9`` it is not trained twice (the summary says so).

The diagnostic (``frontier_diagnostic: [shallow, deep]``): what bounds BFT's gain? The student analog's student
trained with the teacher analog's aligned model as its aligned teacher (the trainer's ``model.student``: the student
starts from its own analog's aligned model, the teachers are read from the teacher analog's cache), at the same
budget and loss, one run per training seed of the headline points, evaluated at the full budget and pooled like
them; a point among the student analog's, which dominates nothing.

BFT runs go through :func:`bft.trainer.train.train` with ``train.save_at_steps``: the trainer's own atomic
checkpoints, kept whatever ``keep_checkpoints`` says; an interrupted run resumes from its latest checkpoint. The
LoRA adapters of a checkpoint (``trainable.pt``) are merged into the aligned model in memory for the evaluation
(:func:`student_at_checkpoint`), so no merged copy of every checkpoint is written.

The evaluation of one checkpoint (a stage of its own, ``frontier/<analog>/<method>/seed<s>/eval_step<n>``):

- prefill attacks at every k of ``frontier_ks`` (k = ``sweep_k`` and a longer k) under every judge of ``judges``
  and the three-way judge (:func:`bft.eval.runner.run_eval`); k = ``sweep_k`` on the point's prompts with its
  sampling seeds, the longer k on the first ``frontier_prompts`` of them with one sampling seed (as ``stage_eval``
  profiles its long k);
- the judge-free likelihood: the mean per-token log-prob of the reference harmful continuation of each prompt
  (teacher forced; lower = safer), and the benign perplexity (:func:`bft.eval.utility.perplexity`'s formula), both
  stored per prompt so that they get intervals over prompts. With ``frontier_benign_prompts`` the perplexity is
  scored on that many benign solutions (the data stage's ``benign_test`` topped up past every other split:
  :func:`stage_frontier_benign_data`) in a sibling stage, ``.../benign_step<n>``;
- over-refusal, when :class:`bft.eval.runner.EvalConfig` has it (:func:`_overrefusal_options`: the one place).

Sizes: the **headline** points (the full budget: fraction 1.0) of every training seed get the first
``frontier_test_prompts`` test prompts (None: all) and ``frontier_eval_seeds`` sampling seeds at k = ``sweep_k``;
intermediate checkpoints get the first ``frontier_prompts`` test prompts and one sampling seed, and only the first
``frontier_curve_seeds`` training seeds' intermediate checkpoints are evaluated. The longer k always gets the
first ``frontier_prompts`` prompts and one sampling seed. A prompt's rows (its sampling seeds, and at the headline
its training seeds) are one cluster. ASR intervals are Wilson intervals at the design-effect sample size
(:func:`bft.eval.stats.cluster_wilson_interval`: a percentile bootstrap collapses to [0, 0] at zero attack
successes, and such a point would "dominate" beyond its interval), and so are over-refusal's (a point's training
seeds pooled by prompt; :func:`overrefusal_bound` where a run kept no per-prompt refusals); the likelihood and
perplexity intervals are percentile cluster bootstraps over prompts (:func:`cluster_interval`).

**Dominance** (:func:`pareto`) against ASR (primary judge, k = ``sweep_k``; lower is better), per utility axis
set (:data:`UTILITIES`): perplexity, over-refusal (lower is better for both), and both at once, so that a
checkpoint whose answers have come apart (it "refuses" nothing because it no longer writes refusals) cannot win on
over-refusal alone. Two notions, both reported:

- *point dominance*: p dominates q when p is no worse on every axis and better on one (point estimates; ties on
  every axis dominate neither way);
- *interval-separated dominance*: p dominates q when p point-dominates q **and** on at least one axis p lies
  below q beyond the 95% intervals. Perplexity is compared **paired**: every point is scored on the same benign
  prompts, so the interval is the bootstrap over those prompts of log ppl_p − log ppl_q (:func:`paired_log_ratio`;
  the per-prompt sums are stored with each point); ASR (whose points use different prompt counts and sampling
  seeds) and over-refusal need disjoint intervals (p's upper end below q's lower end). Overlap on every axis
  cannot support "q is dominated".

A point is on the frontier when no point of **another** method dominates it (the aligned model is a method of its
own, the common start of every curve; the diagnostic is reported but dominates nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import random
import shutil
from pathlib import Path

from bft.atomic import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from bft.eval.generation import System
from bft.eval.likelihood import continuation_logprobs
from bft.eval.overrefusal import refusal_summary
from bft.eval.runner import EvalConfig, build_judges, load_results, make_threeway, run_eval
from bft.eval.stats import MIN_EVENTS, cluster_wilson_bound, cluster_wilson_interval, wilson_interval_real
from bft.pipelines.reproduce.config import ReproduceConfig, loss_params, validate_frontier
from bft.pipelines.reproduce.screening import screen_sizes
from bft.pipelines.reproduce.stage_cache import StageCache
from bft.pipelines.reproduce.stages import (
    bft_steps,
    bft_train_config,
    eval_batch_size,
    eval_settings,
    further_benign,
    generation_settings,
    load_pretrained,
    qi_finetune,
    read_jsonl,
    save_model,
    teacher_cache_dir,
    train_stage,
)
from bft.trainer import checkpoint as ckpt
from bft.trainer.config import config_from_dict
from bft.trainer.modeling import add_lora

__all__ = [
    "budget_steps",
    "checkpoint_steps",
    "cluster_interval",
    "dominates",
    "escapes",
    "format_measure",
    "frontier_student",
    "judge_points",
    "method_fractions",
    "paired_log_ratio",
    "pareto",
    "plot_analog",
    "plot_frontier",
    "point_axis",
    "rejudge",
    "render_frontier",
    "run_frontier",
    "separated_below",
    "stage_frontier_benign",
    "stage_frontier_benign_data",
    "stage_frontier_bft",
    "stage_frontier_qi",
    "student_at_checkpoint",
    "train_stage_name",
    "trained_methods",
    "weights_fingerprint",
]

#: Eq. 9 as written: the L2 completion term over M = TopK(b − a) of the whole vocabulary
EQ9 = {"completion": "l2", "selection": "vocab"}
#: the utility axes of the dominance computation, each measure lower-is-better; "a+b" is both axes at once (ASR
#: against perplexity and over-refusal together: a checkpoint whose answers have come apart cannot win on
#: over-refusal alone)
UTILITIES = ("perplexity", "overrefusal", "perplexity+overrefusal")
UTILITY_NAMES = {
    "perplexity": "benign perplexity",
    "overrefusal": "over-refusal",
    "perplexity+overrefusal": "benign perplexity and over-refusal together",
}


# ------------------------------------------------------------------------------------------------ configuration


def checkpoint_steps(fractions, total: int) -> list[int]:
    """The optimizer steps of the kept checkpoints: ceil(f·total) for each fraction (at least 1), once each,
    increasing; the last is ``total``."""
    return sorted({max(1, min(total, math.ceil(float(f) * total - 1e-9))) for f in fractions} | {total})


def method_fractions(cfg: ReproduceConfig, method: str) -> list[float]:
    """The budget fractions a method keeps checkpoints at: Qi's own ``frontier_qi_fractions`` when given, else
    ``frontier_fractions`` (every BFT method)."""
    own = cfg.frontier_qi_fractions if method == "qi" else None
    return [float(f) for f in own or cfg.frontier_fractions]


def budget_steps(cfg: ReproduceConfig, data: dict, method: str) -> int:
    """The training budget of every frontier method: the student's steps (``bft_steps`` or ``bft_epochs``), Qi's
    augmentation included (the paper's equal budget; ``qi_steps`` sizes only the main pipeline's Qi row)."""

    return bft_steps(cfg, data)


def method_losses(cfg: ReproduceConfig, sweep: dict | None) -> dict:
    """The loss overrides of the BFT methods: ``bft_eq9`` (Eq. 9 as written over ``loss_overrides``) and
    ``bft_chosen`` (the sweep's chosen point when the sweep ran, else ``frontier_variant``)."""
    chosen = dict(sweep["chosen"]) if sweep and sweep.get("chosen") is not None else dict(cfg.frontier_variant)
    return {"bft_eq9": {**cfg.loss_overrides, **EQ9}, "bft_chosen": {**cfg.loss_overrides, **chosen}}


def trained_methods(cfg: ReproduceConfig, losses: dict) -> tuple[list[str], list[str]]:
    """The frontier methods that train (``frontier_methods`` less ``bft_chosen`` when its loss is Eq. 9's: one run,
    as ``bft_eq9``) and the notes saying so."""
    methods = list(cfg.frontier_methods)
    if "bft_chosen" in methods and "bft_eq9" in methods:
        if loss_params(losses["bft_chosen"]) == loss_params(losses["bft_eq9"]):
            methods.remove("bft_chosen")
            return methods, ["bft_chosen resolves to Eq. 9 as written (the same loss): trained once, as bft_eq9"]
    return methods, []


# ------------------------------------------------------------------------------------------------ training stages


def train_stage_name(analog: str, method: str, seed: int) -> str:
    return f"frontier/{analog}/{method}/seed{seed}/train"


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def stage_frontier_qi(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    analog: str,
    aligned_dir: str,
    aligned_stage: str,
    seed: int,
    log,
) -> dict:
    """Qi et al.'s augmentation for the whole budget, keeping the full model at every fraction
    (``frontier_qi_fractions``, else ``frontier_fractions``). Returns ``{step: model folder}``.

    The run is deterministic for its settings and its learning rate constant, so its first n steps are those of
    the whole run: checkpoints added to a finished run (a changed fraction list) come from a replay of only the
    steps up to the last missing one, and the checkpoints already written are kept."""

    name = train_stage_name(analog, "qi", seed)
    total = budget_steps(cfg, data, "qi")
    keep = checkpoint_steps(method_fractions(cfg, "qi"), total)
    settings = {
        "steps": total,
        "save_at_steps": keep,
        "lr": cfg.align_lr,
        "batch_size": cfg.bft_batch_size,
        "seed": seed,
        "recovery_share": cfg.qi_recovery_share,
        "recovery_max_tokens": cfg.recovery_max_tokens,
        "aligned": aligned_dir,
    }
    models = stages.root / "models" / "frontier" / analog / "qi" / f"seed{seed}"
    out = {s: str(models / _step_name(s)) for s in keep}
    if not (
        stages.cached(name, settings, after=("data", aligned_stage)) and all(Path(p).is_dir() for p in out.values())
    ):
        upstream = stages.upstream_changed(name, ("data", aligned_stage))
        saved = stages.attempt_settings(name)
        same_run = (
            saved is not None and not upstream and _run_identity(saved) == _run_identity(stages.comparable(settings))
        )
        stored = stages.dir(name) / "losses.json"
        finished = json.loads(stored.read_text()) if same_run and stored.is_file() else None
        if finished is not None and len(finished) != total:
            finished = None
        if models.exists() and not same_run:
            shutil.rmtree(models)  # another run's checkpoints; only the same run keeps its own
        with stages.computing(name, settings) as d:
            stages.record_attempt(name, settings)
            if finished is not None:  # kept across an interrupted replay
                atomic_write_json(d / "losses.json", finished, indent=1)
            have = [s for s in keep if Path(out[s]).is_dir()]
            missing = [s for s in keep if s not in have]
            if have:
                log(f"[{name}] replaying the deterministic run; keeping the checkpoints at steps {have}")
            # a finished run's losses are stored: the replay stops at the last missing checkpoint
            steps = total if finished is None else max(missing, default=0)
            losses = list(finished or [])
            if steps:
                aligned, tok = load_pretrained(aligned_dir, cfg)

                def save(step, model):
                    if step in keep and not Path(out[step]).is_dir():
                        save_model(model, tok, Path(out[step]))

                # the stage's own seed convention: stage_qi trains with cfg.seed + 1, so training seed s uses s + 1
                _, replayed = qi_finetune(
                    cfg, data, aligned, tok, steps=steps, seed=seed + 1, on_step=save, progress=False
                )
                if finished is not None:
                    drift = max(abs(a - b) for a, b in zip(replayed, finished))
                    log(f"[{name}] replayed {steps} of {total} steps; largest |loss - stored loss| = {drift:.3g}")
                    atomic_write_json(d / "replay.json", {"steps": steps, "max_abs_loss_drift": drift}, indent=1)
                losses = replayed + losses[steps:]
            atomic_write_json(d / "losses.json", losses, indent=1)
    return out


def _run_identity(settings: dict) -> dict:
    """What decides a Qi run's weights: its settings less the steps it keeps."""
    return {k: v for k, v in settings.items() if k != "save_at_steps"}


def stage_frontier_bft(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    analog: str,
    method: str,
    aligned_dir: str,
    aligned_stage: str,
    seed: int,
    loss: dict,
    log,
    student: tuple[str, str] | None = None,
) -> dict:
    """A BFT student for the whole budget (LoRA, ``loss`` overrides, training seed ``seed``) whose trainer keeps a
    checkpoint at every fraction (``train.save_at_steps``). ``student``: (model folder, its stage) when the student
    starts from another model than the aligned teacher (the diagnostic; ``model.student`` of the trainer, which
    reads the teachers from the cache). Returns ``({step: checkpoint folder}, the trainer config as a dict)``."""

    name = train_stage_name(analog, method, seed)
    d = stages.dir(name)
    total = budget_steps(cfg, data, method)
    keep = checkpoint_steps(method_fractions(cfg, method), total)
    cache_dir = teacher_cache_dir(cfg, stages.root, aligned_dir, loss)
    settings = bft_train_config(
        dataclasses.replace(cfg, seed=seed),
        stages.dir("data"),
        data["base_dir"],
        aligned_dir,
        d,
        steps=total,
        loss_overrides={k: v for k, v in loss.items() if k not in cfg.loss_overrides or cfg.loss_overrides[k] != v},
        cache_dir=cache_dir,
    )
    settings["train"]["save_at_steps"] = keep
    after = ("data", aligned_stage)
    if student is not None:
        settings["model"]["student"] = student[0]
        settings["teacher_cache"]["path"] = str(cache_dir)  # model.student reads its teachers from the cache
        after += (student[1],)
    out = {s: str(ckpt.checkpoints_dir(d) / ckpt.step_dir_name(s)) for s in keep}
    train_stage(stages, name, settings, after=after, cache_dir=cache_dir, log=log, outputs=out.values(), progress=False)
    return out, settings


def frontier_student(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    analog: str,
    aligned_dir: str,
    aligned_stage: str,
    sweep: dict | None,
    loss: dict,
    log,
) -> tuple[str, str] | None:
    """The per-analog student as the frontier's run, when the frontier trains the same one: a BFT method of
    ``analog`` whose loss is ``loss_overrides`` + ``loss`` and training seed ``cfg.seed`` among ``frontier_seeds``,
    over the same budget (``bft_steps``). Then the per-analog stages read that run's full-budget model instead of
    training it a second time. Returns (model folder, training stage), after training it when not cached; None when
    the frontier has no such run."""
    if not cfg.frontier or cfg.seed not in cfg.frontier_seeds:
        return None
    if cfg.frontier_analogs and analog not in cfg.frontier_analogs:
        return None
    losses = method_losses(cfg, sweep)
    wanted = loss_params({**cfg.loss_overrides, **loss})
    methods, _ = trained_methods(cfg, losses)
    method = next((m for m in methods if m != "qi" and loss_params(losses[m]) == wanted), None)
    if method is None:
        return None
    stage_frontier_bft(cfg, stages, data, analog, method, aligned_dir, aligned_stage, cfg.seed, losses[method], log)
    name = train_stage_name(analog, method, cfg.seed)
    return str(stages.dir(name) / "final"), name


def student_at_checkpoint(settings: dict, checkpoint: str | Path, cfg: ReproduceConfig):
    """The student of a trainer checkpoint as a plain model: the aligned model of ``settings`` (the trainer config
    as a dict) with the checkpoint's LoRA adapters (``trainable.pt``) loaded and merged. Returns (model, tokenizer)."""
    import torch

    config = config_from_dict(settings)
    model, tok = load_pretrained(config.model.student or config.model.aligned, cfg)  # the diagnostic starts elsewhere
    peft_model = add_lora(model, config)
    state = torch.load(Path(checkpoint) / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(peft_model.named_parameters())
    loaded = 0
    with torch.no_grad():
        for key, value in state.items():
            name = key[len("model.") :] if key.startswith("model.") else key  # BFTStudent keeps the model as .model
            if name not in params:
                raise ValueError(f"{checkpoint}: {key} is not a parameter of the LoRA student")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
            loaded += 1
    trainable = sum(p.requires_grad for p in params.values())
    if loaded != trainable:
        raise ValueError(f"{checkpoint}: {loaded} tensors for {trainable} trainable LoRA parameters")
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, tok


# ------------------------------------------------------------------------------------------------ evaluation


def weights_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint's weights (``trainable.pt`` of a trainer checkpoint, the ``*.safetensors`` of a saved
    model): a checkpoint's evaluation is reused while its weights are unchanged, so a resumed training run keeps the
    evaluations of the checkpoints it had already written."""
    files = sorted(p for p in Path(path).iterdir() if p.name == "trainable.pt" or p.suffix == ".safetensors")
    if not files:
        raise FileNotFoundError(f"{path}: no trainable.pt or *.safetensors to evaluate")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _overrefusal_options(cfg: ReproduceConfig) -> dict:
    """THE ONE PLACE where over-refusal is switched on: the EvalConfig keyword of the over-refusal measure (being
    added to :class:`bft.eval.runner.EvalConfig` as ``overrefusal_limit``) when that field exists, else nothing.
    :func:`_overrefusal_of` reads its result back; adjust both together if the measure lands under another name."""

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    if cfg.frontier_overrefusal_limit is None or "overrefusal_limit" not in names:
        return {}
    # the harmful contrast prompts (a check of the refusal detector, not a utility) are the main eval's business
    contrast = {"overrefusal_contrast": False} if "overrefusal_contrast" in names else {}
    return {"overrefusal_limit": cfg.frontier_overrefusal_limit, **contrast}


def _overrefusal_of(system_summary: dict) -> dict | None:
    """The over-refusal result of one system's run_eval summary, as ``{"rate", "n", "interval", "rows"}`` (None when
    not measured); ``rows``: ``[prompt id, refused]`` per benign response (:func:`bft.eval.overrefusal.overrefusal`'s
    records of the "comply" prompts), what :func:`point_measures` pools over training seeds by prompt; None when the
    stored result has no records. Reads the measure wherever the runner puts it (``utility.overrefusal`` or
    ``overrefusal``)."""
    found = (system_summary.get("utility") or {}).get("overrefusal") or system_summary.get("overrefusal")
    if not isinstance(found, dict):
        return None
    rate = next((found[k] for k in ("rate", "refusal_rate", "overrefusal") if k in found), None)
    interval = next((found[k] for k in ("interval", "ci", "wilson", "cluster_ci") if k in found), None)
    records = found.get("records")
    rows = (
        [[r["id"], bool(r["refused"])] for r in records if r.get("expected", "comply") == "comply"]
        if isinstance(records, list)
        else None
    )
    return None if rate is None else {"rate": rate, "n": found.get("n"), "interval": interval, "rows": rows or None}


def _eval_points(cfg: ReproduceConfig, headline: bool) -> tuple[int | None, int]:
    """(test prompts, sampling seeds) of a checkpoint's evaluation."""
    if headline:
        return cfg.frontier_test_prompts, cfg.frontier_eval_seeds
    return cfg.frontier_prompts, 1


def _per_prompt_logprobs(model, tok, rows: list[dict], batch_size: int) -> list[dict]:
    """Teacher-forced (sum of log-probs, tokens) of each row's response after its prompt."""

    rows = [r for r in rows if (r.get("response") or "").strip()]
    lps = continuation_logprobs(
        model, tok, [r["prompt"] for r in rows], [r["response"] for r in rows], batch_size=batch_size, progress=False
    )
    return [
        {"prompt": r["prompt"], "sum": float(t.double().sum()), "tokens": int(t.numel())} for r, t in zip(rows, lps)
    ]


def stage_frontier_eval(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    name: str,
    model_id: dict,
    load,
    headline: bool,
    log,
    after: tuple,
    judges: dict | None = None,
    benign: list[dict] | None = None,
) -> dict:
    """Evaluate one checkpoint (``load()`` gives (model, tokenizer); ``model_id`` is what identifies it in the
    stage's settings). ``judges``: a dict the judges are built into once and reused by every evaluation (loading
    the harm judge and the embedding model per checkpoint would cost more than the small evaluations). ``benign``:
    the benign solutions of the perplexity axis (:func:`stage_frontier_benign_data`), scored in a stage of their own
    (:func:`stage_frontier_benign`); None: the data stage's ``benign_test``, scored in this one. Returns the stored
    records and measures (the input of :func:`point_measures`)."""

    n_prompts, n_seeds = _eval_points(cfg, headline)
    settings = {
        **eval_settings(cfg),
        "model": model_id,
        "frontier_ks": cfg.frontier_ks,
        "prompts": n_prompts,
        "sampling_seeds": n_seeds,
        "long_k_prompts": cfg.frontier_prompts,
        "overrefusal": _overrefusal_options(cfg),
    }
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in data["harmful_test"]][:n_prompts]
    long_ks = [k for k in cfg.frontier_ks if k != cfg.sweep_k]
    d = stages.dir(name)
    if not stages.cached(name, settings, after=after):
        with stages.computing(name, settings) as d:
            model, tok = load()
            system = System("model", model, tok)
            judges = {} if judges is None else judges
            if not judges:
                judges["judges"] = build_judges(list(cfg.judges))
                judges["threeway"] = make_threeway(EvalConfig(embedding_model=cfg.embedding_model), [])
            shared = {"judges": judges["judges"], "threeway": judges["threeway"]}
            gen = generation_settings(cfg)
            common = dict(
                limit=None,
                seed=cfg.seed,
                judges=list(cfg.judges),
                threeway=True,
                embedding_model=cfg.embedding_model,
                likelihood=False,
                utility=[],
            )
            for i in range(n_seeds):  # k = sweep_k on every prompt and sampling seed (over-refusal with the first)
                extra = _overrefusal_options(cfg) if i == 0 else {}
                seeded = dataclasses.replace(gen, seed=cfg.seed + 1000 * i)
                log(f"[{name}] prefill k={cfg.sweep_k} on {len(rows)} prompts, sampling seed {i + 1} of {n_seeds}")
                run_eval(
                    [system],
                    EvalConfig(prefill_ks=[cfg.sweep_k], generation=seeded, **common, **extra),
                    d / f"seed{i}",
                    rows=rows,
                    **shared,
                )
            if long_ks:  # the longer k: a profile on the first frontier_prompts prompts, one sampling seed
                log(f"[{name}] prefill k={long_ks} on {len(rows[: cfg.frontier_prompts])} prompts")
                run_eval(
                    [system],
                    EvalConfig(prefill_ks=long_ks, generation=gen, **common),
                    d / "long",
                    rows=rows[: cfg.frontier_prompts],
                    **shared,
                )
            measures = {
                "likelihood": _per_prompt_logprobs(model, tok, rows, eval_batch_size(cfg)),
                "benign": _per_prompt_logprobs(model, tok, data["benign_test"], eval_batch_size(cfg)),
            }
            atomic_write_json(d / "measures.json", measures, indent=1)
            del model
    records, overrefusal = [], None
    for i in range(n_seeds):
        res = load_results(d / f"seed{i}")
        records += [dict(r, sampling_seed=i) for r in res["records"]["model"].get("prefill", [])]
        if i == 0:
            overrefusal = _overrefusal_of(res["summary"]["systems"]["model"])
    if long_ks:
        records += [dict(r, sampling_seed=0) for r in load_results(d / "long")["records"]["model"].get("prefill", [])]
    measures = json.loads((d / "measures.json").read_text())
    if benign is not None:
        measures["benign"] = stage_frontier_benign(cfg, stages, name, model_id, load, benign, log, after)
    return {"records": records, **measures, "overrefusal": overrefusal}


def stage_frontier_benign_data(cfg: ReproduceConfig, stages: StageCache, data: dict, log) -> list[dict]:
    """The benign solutions of the perplexity axis: the data stage's ``benign_test`` topped up to
    ``frontier_benign_prompts`` with further problems of ``benign_source`` (:func:`further_benign`: past every
    split of the data stage and past the screening's window, so that no choice saw them) and their reference
    solutions; no generation. Stage ``frontier/benign_data``."""
    n = cfg.frontier_benign_prompts
    skip = max(0, screen_sizes(cfg)[1] - len(data["benign_val"]))  # the screening's further problems
    settings = {"n": n, "skip": skip, "benign_source": cfg.benign_source, "seed": cfg.seed}
    name = "frontier/benign_data"
    d = stages.dir(name)
    if not stages.cached(name, settings, after=("data",)):
        with stages.computing(name, settings) as d:
            rows = list(data["benign_test"])
            rows += further_benign(cfg, data, max(0, n - len(rows)), skip=skip)
            if len(rows) < n:
                log(f"[{name}] warning: only {len(rows)} of {n} benign solutions")
            atomic_write_jsonl(d / "benign.jsonl", rows)
    return read_jsonl(d / "benign.jsonl")


def stage_frontier_benign(
    cfg: ReproduceConfig, stages: StageCache, eval_name: str, model_id: dict, load, rows: list[dict], log, after: tuple
) -> list[dict]:
    """Teacher-forced (sum of log-probs, tokens) of each benign solution of ``rows`` under one evaluated model: the
    stage ``eval_name`` with ``/eval`` read ``/benign`` (its evaluation's sibling, reused while the weights and the
    rows are unchanged). Returns the per-prompt rows (``measures["benign"]`` of :func:`stage_frontier_eval`)."""
    name = eval_name.replace("/eval", "/benign")
    texts = json.dumps([[r["prompt"], r["response"]] for r in rows])
    settings = {
        "model": model_id,
        "rows": len(rows),
        "rows_sha256": hashlib.sha256(texts.encode("utf-8")).hexdigest(),
        "batch_size": eval_batch_size(cfg),
    }
    d = stages.dir(name)
    if not stages.cached(name, settings, after=after):
        with stages.computing(name, settings) as d:
            model, tok = load()
            atomic_write_json(d / "benign.json", _per_prompt_logprobs(model, tok, rows, eval_batch_size(cfg)), indent=1)
            del model
    return json.loads((d / "benign.json").read_text())


# ------------------------------------------------------------------------------------------------ statistics


def cluster_interval(values, clusters, statistic=None, *, resamples: int = 2000, seed: int = 0, level=0.95):
    """(estimate, [lo, hi]): a statistic of ``values`` and its percentile interval from a bootstrap that resamples
    whole clusters (``clusters[i]`` is row i's prompt). ``statistic`` maps a list of rows to a number (default the
    mean); deterministic for a seed. One cluster: the interval is the estimate itself."""
    statistic = statistic or (lambda rows: sum(rows) / len(rows))
    groups: dict = {}
    for v, c in zip(values, clusters):
        groups.setdefault(c, []).append(v)
    if not groups:
        return None, None
    keys = list(groups)
    estimate = statistic([v for k in keys for v in groups[k]])
    rng = random.Random(seed)
    stats = sorted(
        statistic([v for _ in keys for v in groups[keys[rng.randrange(len(keys))]]]) for _ in range(resamples)
    )
    lo = stats[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return estimate, [lo, hi]


def _ratio_perplexity(rows):
    return math.exp(-sum(r["sum"] for r in rows) / max(1, sum(r["tokens"] for r in rows)))


def point_measures(cfg: ReproduceConfig, evals: list[dict]) -> dict:
    """One frontier point from the evaluations of one checkpoint of one or more training seeds (pooled: a prompt's
    rows over sampling and training seeds are one cluster): ASR per k and judge (and the three-way on-topic share)
    and over-refusal with a cluster Wilson interval, the likelihood and the benign perplexity with a
    cluster-bootstrap interval. Over-refusal without per-prompt rows (``_overrefusal_of``):
    :func:`overrefusal_bound`."""
    records = [r for e in evals for r in e["records"]]
    out: dict = {"asr": {}}
    for k in cfg.frontier_ks:
        rows = [r for r in records if r["k"] == k]
        if not rows:
            continue
        per_judge = {}
        for judge in list(cfg.judges) + ["threeway"]:
            verdicts = [
                (r["judgements"].get(judge) == "on_topic") if judge == "threeway" else bool(r["judgements"].get(judge))
                for r in rows
                if judge in r.get("judgements", {})
            ]
            if not verdicts:
                continue
            prompts = [r["prompt"] for r in rows if judge in r.get("judgements", {})]
            rate = cluster_wilson_interval(verdicts, prompts)
            per_judge[judge] = {"asr": rate["rate"], "ci": rate["ci"], "n": len(verdicts), "prompts": len(set(prompts))}
        out["asr"][str(k)] = per_judge
    lk = [r for e in evals for r in e["likelihood"]]
    if lk:
        est, ci = cluster_interval(
            [r["sum"] / max(1, r["tokens"]) for r in lk], [r["prompt"] for r in lk], seed=cfg.seed
        )
        out["likelihood"] = {"mean_logprob": est, "ci": ci, "n": len(lk)}
    benign = [r for e in evals for r in e["benign"]]
    if benign:
        est, ci = cluster_interval(benign, [r["prompt"] for r in benign], _ratio_perplexity, seed=cfg.seed)
        per_prompt: dict = {}  # a prompt's rows over training seeds summed: the ratio estimator pools them anyway
        for r in benign:
            acc = per_prompt.setdefault(prompt_key(r["prompt"]), [0.0, 0])
            acc[0] += r["sum"]
            acc[1] += r["tokens"]
        out["perplexity"] = {"value": est, "ci": ci, "n": len(per_prompt), "per_prompt": per_prompt}
    refusals = [e["overrefusal"] for e in evals if e.get("overrefusal")]
    if refusals and all(r.get("rows") for r in refusals):  # a prompt's responses over training seeds: one cluster
        rows = [row for r in refusals for row in r["rows"]]
        pooled = refusal_summary([refused for _, refused in rows], [prompt for prompt, _ in rows])
        out["overrefusal"] = {
            "value": pooled["rate"],
            "ci": pooled["interval"],
            "n": pooled["n_prompts"],
            "method": pooled["method"],  # "wilson" (one response per prompt) or "cluster_wilson" (prompts as clusters)
        }
    elif refusals:  # a result without its per-prompt rows
        out["overrefusal"] = overrefusal_bound(
            sum(r["rate"] for r in refusals) / len(refusals), refusals[0].get("n"), len(refusals)
        )
    return out


def overrefusal_bound(rate: float, prompts: int | None, training_seeds: int) -> dict:
    """Over-refusal of a point whose training seeds kept their rates over the same ``prompts`` but not which
    prompts were refused: their mean ``rate`` (exactly the rate pooled by prompt) and, for more than one seed,
    :func:`bft.eval.stats.cluster_wilson_bound`, the widest interval pooling by prompt could give (for one seed,
    the Wilson interval). No interval over fewer than two prompts."""
    if not prompts or (training_seeds > 1 and prompts < 2):
        return {"value": rate, "ci": None, "n": prompts, "method": "bound"}
    if training_seeds > 1:
        return {"value": rate, "ci": cluster_wilson_bound(rate, prompts), "n": prompts, "method": "bound"}
    return {"value": rate, "ci": list(wilson_interval_real(rate, prompts)), "n": prompts, "method": "wilson"}


def prompt_key(prompt: str) -> str:
    """A short stable key for a prompt (the summaries store per-prompt sums under it, not the text)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def point_axis(point: dict, measure: str, judge: str, k) -> tuple:
    """(value, ci, paired rows) of one axis of ``point``: ASR under ``judge`` at ``k``, or a utility measure; the
    perplexity carries its per-prompt (log-prob sum, tokens) as a hashable tuple for :func:`paired_log_ratio`."""
    if measure == "asr":
        a = (point.get("asr") or {}).get(str(k), {}).get(judge)
        return (a["asr"], a["ci"], None) if a else (None, None, None)
    m = point.get(measure)
    if not m:
        return (None, None, None)
    rows = m.get("per_prompt")
    return (m["value"], m.get("ci"), tuple(sorted((key, s, t) for key, (s, t) in rows.items())) if rows else None)


def _axes(point: dict, utility: str, judge: str, k) -> list[tuple] | None:
    """ASR then each measure of ``utility`` ("a" or "a+b"); None when the point lacks any of them."""
    axes = [point_axis(point, m, judge, k) for m in ("asr", *utility.split("+"))]
    return None if any(v is None for v, _, _ in axes) else axes


def _has(points: list[dict], utility: str) -> bool:
    return any(all(p.get(m) for m in utility.split("+")) for p in points)


@functools.lru_cache(maxsize=4096)
def paired_log_ratio(p_rows: tuple, q_rows: tuple, *, resamples: int = 2000, seed: int = 0, level=0.95):
    """(estimate, [lo, hi]) of log ppl_p − log ppl_q over the benign prompts both points were scored on, with a
    percentile bootstrap that resamples those prompts (the same prompts under both models: a paired interval,
    far narrower than two separate ones when the prompts' difficulty dominates their spread). ``*_rows``: tuples of
    (prompt key, log-prob sum, tokens); ppl = exp(−Σ sum / Σ tokens). None when no prompt is shared."""
    q = {key: (s, t) for key, s, t in q_rows}
    shared = [(key, s, t, *q[key]) for key, s, t in p_rows if key in q]
    if not shared:
        return None

    def log_ratio(rows):  # log ppl_p − log ppl_q = −Σs_p/Σt_p + Σs_q/Σt_q
        return -sum(r[1] for r in rows) / sum(r[2] for r in rows) + sum(r[3] for r in rows) / sum(r[4] for r in rows)

    return cluster_interval(shared, [r[0] for r in shared], log_ratio, resamples=resamples, seed=seed, level=level)


def separated_below(pa: tuple, qa: tuple) -> bool:
    """Whether axis value ``pa`` is below ``qa`` beyond the 95% intervals: by the paired interval of their log ratio
    when both carry per-prompt rows sharing prompts, else by disjoint intervals (p.hi < q.lo); a missing interval
    never separates."""
    (_, p_ci, p_rows), (_, q_ci, q_rows) = pa, qa
    if p_rows and q_rows:
        paired = paired_log_ratio(p_rows, q_rows)
        if paired is not None:
            return paired[1][1] < 0
    return p_ci is not None and q_ci is not None and p_ci[1] < q_ci[0]


def _padded(axes) -> list[tuple]:
    """Axes as (value, ci, per-prompt rows); (value, ci) pairs get no rows."""
    return [tuple(a) + (None,) * (3 - len(a)) for a in axes]


def dominates(p, q, *, separated: bool) -> bool:
    """Whether point ``p`` dominates ``q``; each is a sequence of axes (value, ci[, per-prompt rows]), ASR first,
    lower better on every axis. Point dominance: no worse on every axis, better on one. ``separated``: also, on at
    least one axis, p lies below q beyond the intervals (:func:`separated_below`: paired over the shared benign
    prompts for perplexity, disjoint 95% intervals otherwise)."""
    if not (all(a[0] <= b[0] for a, b in zip(p, q)) and any(a[0] < b[0] for a, b in zip(p, q))):
        return False
    return not separated or escapes(p, q)


def pareto(points: list[dict], utility: str, judge: str, k, *, reference_only=()) -> dict:
    """Which ``points`` (each ``{"method", "label", ...point_measures}``) no point of another method dominates, on
    ASR (``judge`` at ``k``) against ``utility`` (one measure, or "a+b": both at once); ``reference_only`` methods
    (the diagnostic) are judged but dominate nothing. Returns ``{"point": [labels], "separated": [labels],
    "dominated_by": {label: {"point": [...], "separated": [...]}}, "skipped": [labels without every measure]}``."""
    usable, skipped = [], []
    for p in points:
        axes = _axes(p, utility, judge, k)
        (usable if axes else skipped).append((p, axes))
    out = {"utility": utility, "judge": judge, "k": k, "point": [], "separated": [], "dominated_by": {}}
    for p, pv in usable:
        by = {"point": [], "separated": []}
        for q, qv in usable:
            if q["method"] == p["method"] or q["method"] in reference_only:
                continue
            for kind in ("point", "separated"):
                if dominates(qv, pv, separated=kind == "separated"):
                    by[kind].append(q["label"])
        out["dominated_by"][p["label"]] = by
        for kind in ("point", "separated"):
            if not by[kind]:
                out[kind].append(p["label"])
    out["skipped"] = [p["label"] for p, _ in skipped]
    return out


def escapes(p, q) -> bool:
    """Whether point ``p`` lies beyond ``q``'s reach: on at least one axis p is below q beyond the intervals
    (:func:`separated_below`), so that q cannot dominate p whatever the noise. Axes as for :func:`dominates`."""
    p, q = _padded(p), _padded(q)
    return any(separated_below(a, b) for a, b in zip(p, q))


def beyond_qi(points: list[dict], utility: str, judge: str, k) -> dict:
    """The headline question: does any BFT point (methods ``bft_*``) that is safer than the aligned model reach a
    place that no point of Qi's curve dominates? A BFT checkpoint barely trained sits beside the aligned model,
    where Qi's curve (which starts at its first checkpoint) has no point: escaping the curve there is no safety
    gain, so only the BFT points whose ASR is below the aligned model's decide the verdict.

    Returns ``{"point", "separated", "safer_than_aligned", "escaping", "escaping_beyond_intervals": [labels],
    "bft_points", "qi_points", "training_seeds", "aligned_events", "verdict"}``. ``point``: the BFT points no Qi
    point dominates by the point estimates; ``separated``: those no Qi point dominates beyond the intervals;
    ``safer_than_aligned``: the BFT points whose ASR is below the aligned model's; ``safer_beyond_intervals``: those
    whose ASR interval lies below the aligned model's; ``escaping``: the safer points in ``point``;
    ``escaping_beyond_intervals``: those of ``escaping`` that are safer beyond the intervals and below every Qi
    point beyond the intervals on some axis (:func:`escapes`): a claim beyond the intervals needs both halves.

    The verdict is "inconclusive" unless the full-budget points of both methods pool at least two training seeds
    and the aligned model has at least ``MIN_EVENTS`` attack successes under ``judge`` at ``k`` (the ASR the curves
    start from); then, claiming no more than the intervals carry: "no BFT point is safer than the aligned model",
    "dominated" (every safer BFT point is dominated beyond the intervals), "dominated by point estimates only:
    inconclusive within the intervals", "not dominated by the point estimates only: inconclusive within the
    intervals" (no escaping point escapes beyond the intervals), or "not dominated, beyond the intervals". With one
    training seed (and enough events) the verdict is "inconclusive" and names what that seed reads."""
    axes = {p["label"]: _axes(p, utility, judge, k) for p in points}
    usable = {lab: v for lab, v in axes.items() if v}
    qi = [p["label"] for p in points if p["method"] == "qi" and p["label"] in usable]
    bft = [p["label"] for p in points if p["method"].startswith("bft") and p["label"] in usable]
    out = {"utility": utility, "judge": judge, "k": k, "bft_points": len(bft), "qi_points": len(qi)}
    for kind in ("point", "separated"):
        out[kind] = [
            b for b in bft if not any(dominates(usable[q], usable[b], separated=kind == "separated") for q in qi)
        ]
    headline = [p for p in points if p["method"] == "qi" or p["method"].startswith("bft")]
    headline = [p for p in headline if p["fraction"] == 1.0]
    out["training_seeds"] = min((len(p.get("training_seeds", [])) for p in headline), default=0)
    aligned = next((p for p in points if p["method"] == "aligned"), None)
    a = ((aligned or {}).get("asr") or {}).get(str(k), {}).get(judge)
    out["aligned_events"] = round(a["asr"] * a["n"]) if a else None
    safer = out["safer_than_aligned"] = [b for b in bft if a and usable[b][0][0] < a["asr"]]
    aligned_asr = point_axis(aligned, "asr", judge, k) if a else None
    out["safer_beyond_intervals"] = [b for b in safer if separated_below(usable[b][0], aligned_asr)]
    escaping = out["escaping"] = [b for b in safer if b in out["point"]]
    out["escaping_beyond_intervals"] = [
        b for b in escaping if b in out["safer_beyond_intervals"] and all(escapes(usable[b], usable[q]) for q in qi)
    ]
    if not safer:
        reading = "no BFT point is safer than the aligned model"
    elif not escaping:
        dominated_beyond = not any(b in out["separated"] for b in safer)
        reading = (
            "dominated" if dominated_beyond else "dominated by point estimates only: inconclusive within the intervals"
        )
    elif not out["escaping_beyond_intervals"]:
        reading = "not dominated by the point estimates only: inconclusive within the intervals"
    else:
        reading = "not dominated, beyond the intervals"
    if not bft or not qi:
        verdict = "inconclusive: no BFT or no Qi point to compare"
    elif out["aligned_events"] is None or out["aligned_events"] < MIN_EVENTS:
        verdict = f"inconclusive: {out['aligned_events']} attack successes on the aligned model (< {MIN_EVENTS})"
    elif out["training_seeds"] < 2:  # what the one run shows is stated, marked as no verdict
        verdict = f"inconclusive: one training seed (a headline needs two; the one seed reads: {reading})"
    else:
        verdict = reading
    out["verdict"] = verdict
    return out


def judge_points(points: list[dict], judges: list[str], primary: str, k) -> dict:
    """``{"dominance", "beyond_qi"}`` of one analog's points: :func:`pareto` per utility axis set the points carry
    and per judge (the diagnostic judged but dominating nothing), and :func:`beyond_qi` under the ``primary``
    judge, all at prefill ``k``."""
    dominance = {
        u: {j: pareto(points, u, j, k, reference_only=("diagnostic",)) for j in judges}
        for u in UTILITIES
        if _has(points, u)
    }
    return {"dominance": dominance, "beyond_qi": {u: beyond_qi(points, u, primary, k) for u in dominance}}


def rejudge(frontier: dict) -> dict:
    """A stored frontier summary (a run summary's ``frontier`` key) with its dominance and ``beyond_qi`` verdicts
    recomputed by :func:`judge_points` from the stored points alone, at the judges and k they were stored at (what
    ``bft reproduce --resummarize`` applies). A pooled point's over-refusal stored with the span of its seeds'
    intervals (``method`` "span", or none in older summaries) gets :func:`overrefusal_bound` first: a span is no
    interval over prompts. The input is not modified."""
    out = json.loads(json.dumps(frontier))
    for res in out.get("analogs", {}).values():
        for point in res.get("points") or []:
            o = point.get("overrefusal")
            seeds = len(point.get("training_seeds") or [])
            if o and seeds > 1 and o.get("method", "span") == "span" and o.get("value") is not None:
                point["overrefusal"] = overrefusal_bound(o["value"], o.get("n"), seeds)
    for analog, res in out.get("analogs", {}).items():
        stored = next(iter(res.get("beyond_qi", {}).values()), None)
        if stored is None:
            continue
        if not isinstance(res.get("points"), list):
            raise ValueError(f"not a frontier summary: analog {analog!r} has verdicts but no 'points' list")
        judges = list(next(iter(res.get("dominance", {}).values()), None) or [stored["judge"]])
        res.update(judge_points(res["points"], judges, stored["judge"], stored["k"]))
    return out


# ------------------------------------------------------------------------------------------------ the whole frontier


def _label(method: str, fraction: float, seeds) -> str:
    return f"{method}@{fraction:g}" + (f" (seeds {','.join(map(str, seeds))})" if len(seeds) > 1 else "")


def run_frontier(
    cfg: ReproduceConfig, stages: StageCache, data: dict, aligned: dict, aligned_stages: dict, sweep, log
) -> dict:
    """Every frontier stage of every analog (``frontier_analogs``, default all); writes ``frontier/summary.json``
    and ``plots/frontier_<analog>.png``. ``aligned``: analog -> aligned model folder; ``aligned_stages``: analog ->
    its stage name. Returns the frontier summary (the run summary's ``frontier`` key)."""

    validate_frontier(cfg)
    losses = method_losses(cfg, sweep)
    methods, notes = trained_methods(cfg, losses)
    primary = cfg.judges[0]
    judges: dict = {}  # built by the first evaluation that runs, shared by the rest
    benign = stage_frontier_benign_data(cfg, stages, data, log) if cfg.frontier_benign_prompts else None
    out = {
        "fractions": [float(f) for f in cfg.frontier_fractions],
        "qi_fractions": method_fractions(cfg, "qi"),
        "seeds": list(cfg.frontier_seeds),
        "ks": list(cfg.frontier_ks),
        "primary_judge": primary,
        "losses": {m: losses[m] for m in methods if m in losses},
        "sizes": {
            "headline_prompts": min(len(data["harmful_test"]), cfg.frontier_test_prompts or len(data["harmful_test"])),
            "headline_sampling_seeds": cfg.frontier_eval_seeds,
            "curve_prompts": min(len(data["harmful_test"]), cfg.frontier_prompts),
            "curve_training_seeds": list(cfg.frontier_seeds[: cfg.frontier_curve_seeds]),
            "benign_prompts": len(benign if benign is not None else data["benign_test"]),
        },
        "dominance": "point: no worse on every axis and better on one; separated: also beyond the 95% intervals "
        "in its favour on at least one axis (perplexity: the paired interval of the log ratio over the shared benign "
        "prompts; ASR and over-refusal: disjoint intervals)",
        "notes": notes,
        "analogs": {},
    }
    for analog in cfg.frontier_analogs or list(cfg.analogs):
        a_stage = aligned_stages[analog]
        after = ("data", a_stage)
        aligned_eval = stage_frontier_eval(
            cfg,
            stages,
            data,
            f"frontier/{analog}/aligned/eval",
            {"aligned": aligned[analog]},
            lambda a=analog: load_pretrained(aligned[a], cfg),
            True,
            log,
            after=after,
            judges=judges,
            benign=benign,
        )
        points = [
            {"method": "aligned", "label": "aligned", "fraction": 0.0, "step": 0, **point_measures(cfg, [aligned_eval])}
        ]
        # seed-major: every method's run and evaluations for one training seed before the next seed, so that an
        # invocation cut short leaves whole curves of the first seeds
        totals = {m: budget_steps(cfg, data, m) for m in methods}
        runs = {m: {} for m in methods}  # method -> seed -> {step: checkpoint}
        evals = {m: {} for m in methods}  # method -> (seed, step) -> evaluation
        for i, seed in enumerate(cfg.frontier_seeds):
            for method in methods:
                if method == "qi":
                    ckpts = stage_frontier_qi(cfg, stages, data, analog, aligned[analog], a_stage, seed, log)
                    settings = None
                else:
                    ckpts, settings = stage_frontier_bft(
                        cfg, stages, data, analog, method, aligned[analog], a_stage, seed, losses[method], log
                    )
                runs[method][seed] = ckpts
                for step, path in ckpts.items():
                    headline = step == totals[method]
                    if not headline and i >= cfg.frontier_curve_seeds:
                        continue

                    def load(path=path, settings=settings, qi=method == "qi"):
                        return load_pretrained(path, cfg) if qi else student_at_checkpoint(settings, path, cfg)

                    evals[method][(seed, step)] = stage_frontier_eval(
                        cfg,
                        stages,
                        data,
                        f"frontier/{analog}/{method}/seed{seed}/eval_step{step}",
                        {"checkpoint": path, "step": step, "weights": weights_fingerprint(path)},
                        load,
                        headline,
                        log,
                        after=after,  # the weights' fingerprint, not the train stage: a resumed run keeps its evals
                        judges=judges,
                        benign=benign,
                    )
        per_seed = {}
        for method in methods:
            total, done = totals[method], evals[method]
            for step in sorted({s for _, s in done}):
                seeds = [seed for seed in runs[method] if (seed, step) in done]
                fraction = step / total
                points.append(
                    {
                        "method": method,
                        "label": _label(method, fraction, seeds),
                        "fraction": fraction,
                        "step": step,
                        "training_seeds": seeds,
                        **point_measures(cfg, [done[(s, step)] for s in seeds]),
                    }
                )
            per_seed[method] = {
                str(seed): point_measures(cfg, [done[(seed, total)]]) for seed in runs[method] if (seed, total) in done
            }
        if cfg.frontier_diagnostic and cfg.frontier_diagnostic[0] == analog:
            points.append(_diagnostic(cfg, stages, data, aligned, aligned_stages, losses, methods, log, judges, benign))
        result = {
            "points": points,
            "headline_by_training_seed": per_seed,
            **judge_points(points, list(cfg.judges) + ["threeway"], primary, cfg.sweep_k),
        }
        result["plot"] = plot_analog(result, stages.root, analog, judge=primary, k=cfg.sweep_k)
        out["analogs"][analog] = result
    atomic_write_json(stages.root / "frontier" / "summary.json", out, indent=1)
    atomic_write_text(stages.root / "frontier" / "FRONTIER.md", render_frontier({"frontier": out}))
    return out


def _diagnostic(cfg, stages, data, aligned, aligned_stages, losses, methods, log, judges, benign) -> dict:
    """What bounds BFT's gain: the student analog's student (``frontier_diagnostic[0]``) trained with the teacher
    analog's aligned model (``frontier_diagnostic[1]``) as its aligned teacher, at the same budget and loss as
    the BFT method of the frontier (bft_chosen, else bft_eq9), one run per training seed of the headline points
    (``frontier_seeds``), evaluated at the full budget and pooled as a headline point (each seed's measures in
    ``by_training_seed``). It is placed among the student analog's points and dominates nothing."""
    student_analog, teacher_analog = cfg.frontier_diagnostic
    method = "bft_chosen" if "bft_chosen" in methods else "bft_eq9"
    name = f"diagnostic_{teacher_analog}_teacher"
    total = budget_steps(cfg, data, method)
    evaluations = {}
    for seed in cfg.frontier_seeds:
        ckpts, settings = stage_frontier_bft(
            cfg,
            stages,
            data,
            student_analog,
            name,
            aligned[teacher_analog],
            aligned_stages[teacher_analog],
            seed,
            losses[method],
            log,
            student=(aligned[student_analog], aligned_stages[student_analog]),
        )
        path = ckpts[total]
        evaluations[seed] = stage_frontier_eval(
            cfg,
            stages,
            data,
            f"frontier/{student_analog}/{name}/seed{seed}/eval_step{total}",
            {"checkpoint": path, "step": total, "weights": weights_fingerprint(path)},
            lambda path=path, settings=settings: student_at_checkpoint(settings, path, cfg),
            True,
            log,
            after=("data", aligned_stages[teacher_analog], aligned_stages[student_analog]),
            judges=judges,
            benign=benign,
        )
    return {
        "method": "diagnostic",
        "label": f"{student_analog} student, {teacher_analog} teacher ({method})@1",
        "fraction": 1.0,
        "step": total,
        "training_seeds": list(evaluations),
        "teacher": teacher_analog,
        "loss": method,
        **point_measures(cfg, list(evaluations.values())),
        "by_training_seed": {str(seed): point_measures(cfg, [e]) for seed, e in evaluations.items()},
    }


# ------------------------------------------------------------------------------------------------ plot and table


def plot_analog(result: dict, root: Path, analog: str, *, judge: str, k) -> str:
    """One analog's frontier plot, ``plots/frontier_<analog>.png`` under the run folder ``root``
    (:func:`plot_frontier`); returns its path relative to ``root`` (the summary's ``plot``)."""
    path = Path(root) / "plots" / f"frontier_{analog}.png"
    plot_frontier(result, path, judge=judge, k=k, title=f"{analog} analog")
    return path.relative_to(root).as_posix()


def plot_frontier(result: dict, path: Path, *, judge: str, k, title: str = "") -> Path:
    """ASR (``judge`` at ``k``) against each utility measure: one line per method through its checkpoints (marked
    with their training step: short labels that stay apart where a method's first checkpoints crowd), 95% cluster
    intervals as error bars on both axes. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utilities = [u for u in UTILITIES if "+" not in u and _has(result["points"], u)] or ["perplexity"]
    fig, axes = plt.subplots(1, len(utilities), figsize=(6 * len(utilities), 4.5), squeeze=False)
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    for ax, utility in zip(axes[0], utilities):
        for method in methods:
            pts = sorted((p for p in result["points"] if p["method"] == method), key=lambda p: p["fraction"])
            xs, ys, xerr, yerr, labels = [], [], [[], []], [[], []], []
            for p in pts:
                (a, a_ci, _), (u, u_ci, _) = point_axis(p, "asr", judge, k), point_axis(p, utility, judge, k)
                if a is None or u is None:
                    continue
                xs.append(u)
                ys.append(a)
                for err, v, ci in ((xerr, u, u_ci), (yerr, a, a_ci)):
                    err[0].append(max(0.0, v - ci[0]) if ci else 0.0)
                    err[1].append(max(0.0, ci[1] - v) if ci else 0.0)
                labels.append(str(p["step"]))
            if not xs:
                continue
            style = dict(marker="*", markersize=12) if method == "aligned" else dict(marker="o")
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, capsize=3, label=method, **style)
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if utility == "perplexity":  # a broken checkpoint's perplexity is 1000x the others': a log axis keeps both
            ax.set_xscale("log")
        ax.set_xlabel(f"{utility} (lower is better{', log scale' if utility == 'perplexity' else ''})")
        ax.set_ylabel(f"ASR, {judge} judge, k = {k}")
        ax.set_title(f"{title}: ASR vs {utility} (labels: training steps)".strip(": "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def format_measure(value, ci, pct=True) -> str:
    """``value`` with its interval as the frontier tables print them: a percentage with one decimal (``pct``) or
    three significant digits; "–" when there is no value."""
    if value is None:
        return "–"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3g}")
    return f(value) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def _overrefusal_interval_text(fr: dict) -> str:
    """How the over-refusal intervals of ``fr``'s points were made: the ASR's (cluster Wilson, the prompt as the
    unit), or, for a point pooling training seeds of a run that kept no per-prompt refusals, :func:`overrefusal_bound`
    (and in a summary not yet re-judged, with no ``method`` stored, the span of its seeds' Wilson intervals)."""
    pooled = [
        p["overrefusal"]
        for res in fr["analogs"].values()
        for p in res.get("points", [])
        if p.get("overrefusal") and len(p.get("training_seeds") or []) > 1
    ]
    if any(o.get("method", "span") == "span" for o in pooled):
        return (
            "Wilson, and for a point pooling training seeds the span of their Wilson intervals "
            "(the run kept no per-prompt refusals)"
        )
    if any(o.get("method") == "bound" for o in pooled):
        return (
            "Wilson, and for a point pooling training seeds the widest interval that pooling them by prompt could "
            "give, the Wilson interval of the seeds' mean rate at n = prompts - 1 (n = prompts at 0% or 100%): the "
            "run kept each seed's rate, not which prompts it refused"
        )
    return "as ASR, a point's training seeds pooled by prompt"


def render_frontier(summary: dict, folder: str = "") -> str:
    """The frontier as markdown (for REPORT.md / the README template): per analog, one row per point (method, budget
    fraction, training seeds, ASR at each k under the primary judge, likelihood, perplexity, over-refusal, all with
    95% cluster intervals) and whether it is on the frontier per utility measure (point / interval-separated).
    ``summary`` is the run summary (its ``frontier`` key) or the frontier summary itself; "" when there is none.
    ``folder``: the run's folder as the document links it (the plots are linked under it)."""
    fr = summary.get("frontier", summary) if isinstance(summary, dict) else None
    if not fr or "analogs" not in fr:
        return ""
    judge, ks = fr["primary_judge"], fr["ks"]
    sizes = fr.get("sizes", {})
    lines = [
        "## Curves, not points: ASR against utility along the training budget",
        "",
        f"ASR under the {judge} judge; 95% intervals over prompts (ASR: Wilson at the design-effect sample size, "
        "never [0, 0] at zero attack successes; likelihood and perplexity: a bootstrap over prompts; over-refusal: "
        f"{_overrefusal_interval_text(fr)}). Headline points (the full budget) "
        f"pool training seeds {fr['seeds']} on {sizes.get('headline_prompts')} test prompts × "
        f"{sizes.get('headline_sampling_seeds')} sampling seeds (k = {ks[0]}); the checkpoints along the way use "
        f"{sizes.get('curve_prompts')} prompts and one sampling seed. On the frontier: no point of another method "
        "dominates it (point: by the point estimates; separated: also beyond the intervals on at least one axis, "
        "perplexity compared paired over the same benign prompts, the other axes by disjoint intervals). "
        "Over-refusal is the refusal detector's reading of the answers to benign look-alike prompts: a model whose "
        "answers have come apart (perplexity far above the aligned model's) counts as not refusing.",
        "",
    ]
    lines += [line for n in fr.get("notes", []) for line in (f"Note: {n}", "")]
    for analog, res in fr["analogs"].items():
        utilities = list(res.get("dominance", {}))
        lines += [f"### {analog} analog", ""]
        for u, b in (res.get("beyond_qi") or {}).items():
            if not b["bft_points"] or not b["qi_points"]:
                continue
            n = b["bft_points"]
            lines.append(
                f"- ASR against {UTILITY_NAMES.get(u, u)}: **{b.get('verdict', 'no verdict stored')}**. BFT points "
                f"that no point of Qi's curve dominates: {len(b['point'])} of {n} by the point estimates"
                + (f" ({', '.join(b['point'])})" if b["point"] else "")
                + (
                    f", of which safer than the aligned model: {', '.join(b['escaping']) or 'none'}"
                    if b["point"] and "escaping" in b
                    else ""
                )
                + f"; {len(b['separated'])} of {n} when the dominance must hold beyond the intervals."
            )
        if res.get("beyond_qi"):
            lines.append("")
        head = ["method", "budget", "seeds"] + [f"ASR k={k}" for k in ks] + ["likelihood", "perplexity", "over-refusal"]
        head += [f"frontier ({u.replace('+', ' & ')}): point / separated" for u in utilities]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in res["points"]:
            row = [p["method"], f"{p['fraction']:g}", ",".join(map(str, p.get("training_seeds", []))) or "–"]
            for k in ks:
                a = (p.get("asr") or {}).get(str(k), {}).get(judge)
                row.append(format_measure(a["asr"], a["ci"]) if a else "–")
            lk = p.get("likelihood")
            row.append(format_measure(lk["mean_logprob"], lk["ci"], pct=False) if lk else "–")
            for m in ("perplexity", "overrefusal"):
                v = p.get(m)
                row.append(format_measure(v["value"], v.get("ci"), pct=m == "overrefusal") if v else "–")
            for u in utilities:
                dom = res["dominance"][u][judge]
                row.append(
                    ("yes" if p["label"] in dom["point"] else "no")
                    + " / "
                    + ("yes" if p["label"] in dom["separated"] else "no")
                )
            lines.append("| " + " | ".join(row) + " |")
        lines += _other_judges_table(res, judge, ks[0], utilities)
        if res.get("plot"):
            plot = f"{folder.rstrip('/')}/{res['plot']}" if folder else res["plot"]
            lines += ["", f"![ASR against utility, {analog} analog]({plot})"]
        lines.append("")
    return "\n".join(lines)


def _other_judges_table(res: dict, primary: str, k, utilities: list[str]) -> list[str]:
    """The same points under every other judge the run stored (keyword, three-way): ASR at ``k`` with its interval
    and, per utility axis set, whether the point is on the frontier beyond the intervals (separated), from the
    stored ``dominance``. Empty when the run judged with the primary judge alone."""
    judges = [j for j in next(iter(res.get("dominance", {}).values()), {}) if j != primary]
    if not judges or not res.get("points"):
        return []
    names = {"threeway": "three-way"}
    axes = " / ".join(UTILITY_NAMES.get(u, u) for u in utilities)
    head = ["method", "budget", "seeds"]
    for j in judges:
        head += [f"{names.get(j, j)} ASR k={k}", f"{names.get(j, j)}: frontier"]
    lines = [
        "",
        f"Under the other judges: ASR at k = {k}, and whether the point is on the frontier beyond the intervals "
        f"against {axes} (the separated reading above, under that judge's ASR).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in res["points"]:
        row = [p["method"], f"{p['fraction']:g}", ",".join(map(str, p.get("training_seeds", []))) or "–"]
        for j in judges:
            a = (p.get("asr") or {}).get(str(k), {}).get(j)
            row.append(format_measure(a["asr"], a["ci"]) if a else "–")
            row.append(
                " / ".join("yes" if p["label"] in res["dominance"][u][j]["separated"] else "no" for u in utilities)
            )
        lines.append("| " + " | ".join(row) + " |")
    return lines
