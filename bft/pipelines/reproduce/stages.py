"""The stages of the miniature reproduction, each cached in its own folder
(:class:`bft.pipelines.reproduce.stage_cache.StageCache`).

data (prompts, train/validation/test splits, the base model's own responses) → aligned_r<share> (a refusal SFT
with that share of safety-recovery examples; ``calibrate`` chooses the deeper analog's share on validation) → per
analog: analysis_aligned, qi (Qi et al.'s augmentation), bft (the student), analysis_student, eval (test-split
attacks) → ``sweep`` (BFT loss settings scored on validation, the chosen point, the ablations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import datasets

from bft.analysis import analyze_pair, completion_pull, summarize, teacher_forced_records, write_analysis
from bft.atomic import atomic_directory, atomic_write_json, atomic_write_jsonl
from bft.eval.dedup import cross_split_similarity, group_split, near_duplicate_groups
from bft.eval.generation import GenerationSettings, System, contrastive_name
from bft.eval.judges import is_refusal
from bft.eval.prefill import prefill_ids
from bft.eval.runner import EvalConfig, load_results, run_eval
from bft.hf import data as hf_data
from bft.hf.models import load_model_and_tokenizer, save_pretrained
from bft.loss import BFTLossParams
from bft.pipelines.refusal_sft import refusal_finetune
from bft.pipelines.reproduce.config import ABLATIONS, RECOVERY_TARGET, ReproduceConfig, loss_params, torch_device
from bft.pipelines.reproduce.stage_cache import StageCache
from bft.trainer import checkpoint as ckpt
from bft.trainer.cache import StaleCacheError
from bft.trainer.config import config_from_dict
from bft.trainer.data import generate_responses
from bft.trainer.train import train

_LOSS_DEFAULTS = BFTLossParams()

__all__ = [
    "stage_data",
    "stage_aligned",
    "stage_calibrate",
    "stage_qi",
    "qi_finetune",
    "run_refusal_sft",
    "stage_analysis",
    "stage_sweep",
    "sweep_students",
    "stage_bft",
    "stage_validation",
    "stage_eval",
    "stage_completion_pull",
    "bft_train_config",
    "bft_steps",
    "sweep_points",
    "point_id",
    "aligned_name",
    "further_benign",
    "read_jsonl",
]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_pretrained(path_or_name: str, cfg: ReproduceConfig):
    return load_model_and_tokenizer(path_or_name, device=torch_device(cfg), dtype="fp32")


def save_model(model, tokenizer, path: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a crash never leaves a half-written model behind."""
    with atomic_directory(path) as tmp:
        save_pretrained(model, tmp, tokenizer=tokenizer)


def harmful_pool(cfg: ReproduceConfig) -> list[dict]:
    rows, seen = [], set()
    for source in cfg.harmful_sources:
        for r in hf_data.load(source):
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                rows.append({"prompt": r["prompt"], "source": source})
    return rows


def split_prompts(rows: list[dict], cfg: ReproduceConfig) -> tuple[list[dict], list[dict]]:
    """Train / held-out split: the first n_train, and the shuffled rest (validation, then test, are taken from it in
    order). With ``dedup_threshold`` (:mod:`bft.eval.dedup`) no near-duplicate cluster spans two parts: train takes
    whole clusters, the held-out pool one prompt per cluster. Without it, disjoint by exact text only
    (:func:`bft.hf.data.train_test_split`)."""
    need = cfg.n_train + cfg.n_val + cfg.n_test
    if len(rows) < need:
        raise ValueError(
            f"only {len(rows)} distinct harmful prompts in {cfg.harmful_sources}; n_train + n_val + n_test = {need}"
        )
    rng = random.Random(cfg.seed)
    rows = rows[:]
    rng.shuffle(rows)  # mix the sources before taking the first n of each part
    if cfg.dedup_threshold is not None:
        groups = near_duplicate_groups([r["prompt"] for r in rows], threshold=cfg.dedup_threshold)
        first, rest = group_split(groups, cfg.n_train, seed=cfg.seed)
        if len(first) < cfg.n_train or len(first) + len(rest) < need:
            raise ValueError(
                f"{len(set(groups))} near-duplicate clusters (cos >= {cfg.dedup_threshold}) in {len(rows)} harmful "
                f"prompts of {cfg.harmful_sources} give {len(first)} train + {len(rest)} held-out prompts; "
                f"n_train + n_val + n_test = {need}"
            )
        return [rows[i] for i in first], [rows[i] for i in rest]
    parts = hf_data.train_test_split(datasets.Dataset.from_list(rows), test_size=len(rows) - cfg.n_train, seed=cfg.seed)
    train = parts["train"].to_list()[: cfg.n_train]
    test = parts["test"].to_list()
    rng.shuffle(test)
    return train, test


def harmful_responses(gen, cfg: ReproduceConfig, pool: list[dict], wanted: list[int], log):
    """Walk the shuffled held-out pool, keeping prompts whose base response is not a refusal (there is no harmful
    text to prefill with otherwise): the first ``wanted[0]`` go to the first part (validation), the next to the
    second (test). Returns the parts and the count of prompts dropped."""
    parts, dropped, need = [[] for _ in wanted], 0, sum(wanted)
    kept = []
    for start in range(0, len(pool), max(cfg.batch_size, 32)):
        chunk = pool[start : start + max(cfg.batch_size, 32)]
        for r, resp in zip(chunk, gen([r["prompt"] for r in chunk])):
            if resp.strip() and not is_refusal(resp):
                kept.append({**r, "response": resp})
            else:
                dropped += 1
        if len(kept) >= need:
            break
    at = 0
    for i, n in enumerate(wanted):
        parts[i], at = kept[at : at + n], at + n
        if len(parts[i]) < n:
            log(f"[data] warning: only {len(parts[i])} of {n} held-out prompts with a harmful base response")
    return parts, dropped


def stage_data(cfg: ReproduceConfig, stages: StageCache, log) -> dict:
    settings = {
        k: getattr(cfg, k)
        for k in (
            "model",
            "seed",
            "harmful_sources",
            "benign_source",
            "n_train",
            "n_val",
            "n_test",
            "n_benign_train",
            "n_benign_val",
            "n_benign_test",
            "response_tokens",
        )
    }
    if cfg.dedup_threshold is not None:  # absent when off, so the caches of exact-text splits stay valid
        settings["dedup_threshold"] = cfg.dedup_threshold
    d = stages.dir("data")
    base_dir = stages.root / "models" / "base"
    if not (stages.cached("data", settings) and base_dir.is_dir()):
        stages.recomputed.add("data")
        with stages.computing("data", settings) as d:
            train, pool = split_prompts(harmful_pool(cfg), cfg)
            model, tok = load_pretrained(cfg.model, cfg)
            gen = lambda prompts: generate_responses(  # noqa: E731
                model, tok, prompts, max_new_tokens=cfg.response_tokens, batch_size=cfg.batch_size, progress=True
            )
            log(f"[data] base model writes harmful responses for {len(train)} train prompts")
            for r, resp in zip(train, gen([r["prompt"] for r in train])):
                r["response"] = resp
            train = [r for r in train if r["response"].strip() and not is_refusal(r["response"])]
            log("[data] base model writes harmful responses for the validation and test prompts")
            (val, test), dropped = harmful_responses(gen, cfg, pool, [cfg.n_val, cfg.n_test], log)
            n_benign = cfg.n_benign_train + cfg.n_benign_val + cfg.n_benign_test
            benign = hf_data.load(cfg.benign_source, limit=n_benign, seed=cfg.seed).to_list()
            benign_train = benign[: cfg.n_benign_train]
            benign_val = benign[cfg.n_benign_train : cfg.n_benign_train + cfg.n_benign_val]
            benign_test = benign[cfg.n_benign_train + cfg.n_benign_val :]
            log(f"[data] base model answers {len(benign_train)} benign prompts (utility data for SFT and BFT)")
            for r, resp in zip(benign_train, gen([r["prompt"] for r in benign_train])):
                r["reference_solution"] = r.get("response", "")
                r["response"] = resp
            benign_train = [r for r in benign_train if r["response"].strip()]
            for name, part in (
                ("harmful_train", train),
                ("harmful_val", val),
                ("harmful_test", test),
                ("benign_train", benign_train),
                ("benign_val", benign_val),
                ("benign_test", benign_test),
            ):
                atomic_write_jsonl(d / f"{name}.jsonl", part)
            stats = {
                "harmful_train": len(train),
                "harmful_val": len(val),
                "harmful_test": len(test),
                "test_prompts_dropped_base_refused": dropped,
                "benign_train": len(benign_train),
                "benign_val": len(benign_val),
                "benign_test": len(benign_test),
                "test_sources": {s: sum(r["source"] == s for r in test) for s in cfg.harmful_sources},
                # the closest prompts of two different parts (MiniLM cosine): below dedup_threshold after a
                # near-duplicate-free split; pairs_at_threshold counts cross-part pairs at or above it (0.85 if off)
                "near_duplicates": cross_split_similarity(
                    {
                        "train": [r["prompt"] for r in train],
                        "val": [r["prompt"] for r in val],
                        "test": [r["prompt"] for r in test],
                    },
                    threshold=cfg.dedup_threshold if cfg.dedup_threshold is not None else 0.85,
                ),
            }
            atomic_write_json(d / "stats.json", stats, indent=1)
            base_dir.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, tok, base_dir)
            del model
    out = {
        name: read_jsonl(d / f"{name}.jsonl")
        for name in ("harmful_train", "harmful_val", "harmful_test", "benign_train", "benign_val", "benign_test")
    }
    return {**out, "stats": json.loads((d / "stats.json").read_text()), "base_dir": str(base_dir)}


def further_benign(cfg: ReproduceConfig, data: dict, n: int, *, skip: int = 0) -> list[dict]:
    """Up to ``n`` further problems of ``benign_source`` with their reference solutions, in no split of the data
    stage: those past the data stage's problems (the offline generator is prefix-stable in ``limit``) and past the
    ``skip`` problems after them (another stage's window), none with the text of a problem before it (in a split,
    in the skipped window or earlier in its own)."""
    total = cfg.n_benign_train + cfg.n_benign_val + cfg.n_benign_test
    more = hf_data.load(cfg.benign_source, limit=total + skip + n, seed=cfg.seed).to_list()[total:]
    used = {r["prompt"] for part in ("benign_train", "benign_val", "benign_test") for r in data[part]}
    used |= {r["prompt"] for r in more[:skip]}
    rows = []
    for r in more[skip:]:
        if r["prompt"] not in used and (r.get("response") or "").strip():
            used.add(r["prompt"])
            rows.append(r)
    return rows[:n]


def aligned_name(share: float) -> str:
    """The stage (and model folder) of the refusal SFT with this recovery share: ``aligned_r0``, ``aligned_r0.05``."""
    return f"aligned_r{share:g}"


def stage_aligned(cfg: ReproduceConfig, stages: StageCache, data: dict, share: float, log) -> str:
    """The refusal SFT of the base model with a ``share`` of safety-recovery examples (0: the shallow recipe)."""
    name = aligned_name(share)
    settings = {
        "align_steps": cfg.align_steps,
        "align_lr": cfg.align_lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "recovery_share": share,
        "recovery_max_tokens": cfg.recovery_max_tokens,
    }
    aligned_dir = stages.root / "models" / name
    if not (stages.cached(name, settings, after=("data",)) and aligned_dir.is_dir()):
        with stages.computing(name, settings) as d:
            base, tok = load_pretrained(data["base_dir"], cfg)
            tuned, losses = run_refusal_sft(
                cfg, data, base, tok, steps=cfg.align_steps, batch_size=cfg.batch_size, seed=cfg.seed, share=share
            )
            save_model(tuned, tok, aligned_dir)
            atomic_write_json(d / "losses.json", losses, indent=1)
            log(f"[{name}] refusal SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return str(aligned_dir)


def run_refusal_sft(
    cfg: ReproduceConfig, data: dict, model, tok, *, steps, batch_size, seed, share, on_step=None, progress=True
):
    """The refusal SFT (:func:`bft.pipelines.refusal_sft.refusal_finetune`) of ``model`` on the run's training split:
    its harmful prompts (refusals, ``share`` of them as safety-recovery examples built from their responses) and
    its benign prompts with their responses, at ``align_lr``. Returns (the tuned model, its per-step losses)."""
    return refusal_finetune(
        model,
        tok,
        [r["prompt"] for r in data["harmful_train"]],
        [r["prompt"] for r in data["benign_train"]],
        benign_responses=[r["response"] for r in data["benign_train"]],
        steps=steps,
        lr=cfg.align_lr,
        batch_size=batch_size,
        seed=seed,
        harmful_responses=[r["response"] for r in data["harmful_train"]],
        recovery_share=share,
        recovery_max_tokens=cfg.recovery_max_tokens,
        on_step=on_step,
        progress=progress,
    )


def qi_finetune(
    cfg: ReproduceConfig, data: dict, aligned, tok, *, steps: int, seed: int, on_step=None, progress: bool = True
):
    """Qi et al.'s safety-recovery augmentation of ``aligned``: the refusal SFT (:func:`run_refusal_sft`) with
    ``qi_recovery_share`` recovery examples, at the BFT student's batch size. Returns (the tuned model, its per-step
    losses)."""
    return run_refusal_sft(
        cfg,
        data,
        aligned,
        tok,
        steps=steps,
        batch_size=cfg.bft_batch_size,
        seed=seed,
        share=cfg.qi_recovery_share,
        on_step=on_step,
        progress=progress,
    )


def stage_qi(
    cfg: ReproduceConfig, stages: StageCache, data: dict, analog: str, aligned_dir: str, aligned_stage: str, log
) -> str:
    """Qi et al.'s safety-recovery augmentation as a peer of BFT: the analog's aligned model trained further on the
    refusal SFT's data with ``qi_recovery_share`` recovery examples, for the BFT student's steps (or ``qi_steps``)
    and batch size."""
    name, after = f"{analog}/qi", ("data", aligned_stage)
    steps = cfg.qi_steps or bft_steps(cfg, data)
    settings = {
        "steps": steps,
        "lr": cfg.align_lr,
        "batch_size": cfg.bft_batch_size,
        "seed": cfg.seed,
        "recovery_share": cfg.qi_recovery_share,
        "recovery_max_tokens": cfg.recovery_max_tokens,
        "aligned": aligned_dir,
    }
    out_dir = stages.root / "models" / f"qi_{analog}"
    if not (stages.cached(name, settings, after=after) and out_dir.is_dir()):
        with stages.computing(name, settings) as d:
            aligned, tok = load_pretrained(aligned_dir, cfg)
            tuned, losses = qi_finetune(cfg, data, aligned, tok, steps=steps, seed=cfg.seed + 1)
            save_model(tuned, tok, out_dir)
            atomic_write_json(d / "losses.json", losses, indent=1)
    return str(out_dir)


def _prefill_text(tok, response: str, k: int) -> str:
    return tok.decode(prefill_ids(tok, response, k), skip_special_tokens=True)


def _analysis_groups(cfg: ReproduceConfig, data: dict, tok) -> dict:
    test = data["harmful_test"]
    return {
        "harmful": [{"prompt": r["prompt"]} for r in test],
        "harmful_prefill": [
            {"prompt": r["prompt"], "prefill": _prefill_text(tok, r["response"], cfg.analysis_prefill_tokens)}
            for r in test
        ],
        "benign": [{"prompt": r["prompt"]} for r in data["benign_test"]],
    }


def stage_analysis(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    model_dir: str,
    stage: str,
    alpha,
    log,
    after: tuple = ("data",),
) -> dict:
    """Generated responses (harmful, harmful after a prefill, benign; contrastive on the prefilled group) and, teacher
    forced, the base model's harmful responses and the benign reference solutions (Qi et al.'s per-token KL)."""
    settings = {
        "model": model_dir,
        "analysis_tokens": cfg.analysis_tokens,
        "prefill": cfg.analysis_prefill_tokens,
        "alpha": alpha,
        "top_n": cfg.top_n,
        "batch_size": cfg.batch_size,
        "teacher_forced": 1,
        "n_prompts": cfg.analysis_prompts,
    }
    d = stages.dir(stage)
    if not stages.cached(stage, settings, after=after):
        with stages.computing(stage, settings) as d:
            model, tok = load_pretrained(model_dir, cfg)
            base, _ = load_pretrained(data["base_dir"], cfg)
            subset = {**data, "harmful_test": data["harmful_test"][: cfg.analysis_prompts]}
            result = analyze_pair(
                model,
                base,
                tok,
                _analysis_groups(cfg, subset, tok),
                max_new_tokens=cfg.analysis_tokens,
                batch_size=cfg.batch_size,
                alpha=alpha,
                contrastive_groups=("harmful_prefill",),
                top_n=cfg.top_n,
            )
            for group, rows in (("harmful_response", subset["harmful_test"]), ("benign_response", data["benign_test"])):
                result["records"] += teacher_forced_records(
                    model,
                    base,
                    tok,
                    [{"prompt": r["prompt"], "response": r["response"]} for r in rows],
                    group=group,
                    batch_size=cfg.batch_size,
                    top_n=cfg.top_n,
                )
            result["summary"] = summarize(result["records"])
            write_analysis(result, str(d))
    return json.loads((d / "analysis.json").read_text())


def stage_completion_pull(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    name: str,
    aligned_dir: str,
    students: dict,
    split: str,
    log,
    after: tuple,
    loss: dict | None = None,
) -> dict:
    """Which way the completion penalty pulls (:mod:`bft.analysis.completion`): along the base model's harmful
    responses of ``split`` (its first ``analysis_prompts``), the share of M = TopK(Δ logits, top_k) whose aligned
    logits are negative (the L2 term raises those), M's probability mass under the aligned model, the base and
    each of ``students`` (name -> model folder), and each student's change of log π on M split by the sign of the
    aligned logit. M is chosen by the students' selection rule (``loss``: their loss overrides, over
    ``cfg.loss_overrides``)."""
    params = loss_params({**cfg.loss_overrides, **(loss or {})})
    settings = {
        "aligned": aligned_dir,
        "students": students,
        "split": split,
        "n_prompts": cfg.analysis_prompts,
        "top_k": cfg.top_k,
        "batch_size": cfg.batch_size,
    }
    if params.selection != "vocab":  # (the default leaves the stage's settings, and so its cache, as they were)
        settings["selection"] = {"rule": params.selection, "top_p": params.selection_top_p}
    d = stages.dir(name)
    if not stages.cached(name, settings, after=after):
        with stages.computing(name, settings) as d:
            aligned, tok = load_pretrained(aligned_dir, cfg)
            base, _ = load_pretrained(data["base_dir"], cfg)
            models = {n: load_pretrained(path, cfg)[0] for n, path in students.items()}
            rows = [{"prompt": r["prompt"], "response": r["response"]} for r in data[split][: cfg.analysis_prompts]]
            result = completion_pull(
                aligned,
                base,
                tok,
                rows,
                top_k=cfg.top_k,
                students=models,
                batch_size=cfg.batch_size,
                selection=params.selection,
                selection_top_p=params.selection_top_p,
            )
            atomic_write_json(d / "completion_pull.json", result, indent=1)
    return json.loads((d / "completion_pull.json").read_text())


def bft_steps(cfg: ReproduceConfig, data: dict) -> int:
    """The student's optimizer steps: ``bft_steps``, or ``bft_epochs`` passes over the harmful training pairs."""
    if cfg.bft_epochs is None:
        return cfg.bft_steps
    harmful_per_step = max(cfg.bft_batch_size * cfg.harmful_ratio, 1e-9)
    return max(1, math.ceil(cfg.bft_epochs * len(data["harmful_train"]) / harmful_per_step))


def bft_train_config(
    cfg: ReproduceConfig,
    data_dir: Path,
    base_dir: str,
    aligned_dir: str,
    out_dir: Path,
    *,
    steps: int | None = None,
    loss_overrides: dict | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """The trainer config (as a dict for :func:`bft.trainer.config.config_from_dict`) of a miniature BFT run.
    ``cache_dir``: the teacher cache (default ``out_dir/teacher_cache``; the stages pass :func:`teacher_cache_dir`)."""
    dev = torch_device(cfg)
    steps = steps or cfg.bft_steps
    loss = {**cfg.loss_overrides, **(loss_overrides or {})}
    return {
        "model": {
            "base": base_dir,
            "aligned": aligned_dir,
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
        },
        "finetune": {"mode": "lora", "lora_r": cfg.bft_lora_r, "lora_alpha": 2 * cfg.bft_lora_r, "save": "merged"},
        "data": {
            "harmful": str(data_dir / "harmful_train.jsonl"),
            "harmful_response": "dataset",
            "utility": str(data_dir / "benign_train.jsonl"),
            "harmful_ratio": cfg.harmful_ratio,
            "batch_size": cfg.bft_batch_size,
            "max_length": cfg.bft_max_length,
        },
        # τ and λ written out (the paper's, BFTLossParams' defaults) so that earlier runs' saved settings still match
        "loss": {
            "top_k": cfg.top_k,
            "temperature": _LOSS_DEFAULTS.temperature,
            "teacher_lambda": _LOSS_DEFAULTS.teacher_lambda,
            **loss,
        },
        "optim": {
            "name": "adamw",
            "lr": cfg.bft_lr,
            "scheduler": "cosine",
            "warmup_steps": max(1, steps // 10),
            "max_grad_norm": 1.0,
        },
        "train": {
            "max_steps": steps,
            "seed": cfg.seed,
            "output_dir": str(out_dir),
            "save_every": max(1, steps // 4),
            "device": "cpu" if dev.type == "cpu" else None,
        },
        # the frozen models run once over the training rows (exact; bft cache), not at every step of every epoch
        "teacher_cache": {"path": str(cache_dir or out_dir / "teacher_cache") if cfg.teacher_cache else None},
    }


def teacher_cache_dir(cfg: ReproduceConfig, root: Path, aligned_dir: str, loss_overrides: dict | None = None) -> Path:
    """The frozen-teacher cache of the students of ``aligned_dir`` under ``loss_overrides``. A cache depends on the
    frozen models, the training rows and the loss settings of :meth:`BFTLossParams.teacher_cache_fields` (top_k, the
    selection rule), and the trainer refuses one built under other settings; so every student of one aligned model
    and one such setting shares a folder: ``teacher_cache/<aligned>`` under the run's top_k and the default rule,
    ``teacher_cache/<aligned>-<key>-<value>...`` under any other."""
    loss = {"top_k": cfg.top_k, **cfg.loss_overrides, **(loss_overrides or {})}
    fields = loss_params(loss).teacher_cache_fields()
    extra = "".join(f"-{k}-{v}" for k, v in fields.items() if not (k == "top_k" and v == cfg.top_k))
    return root / "teacher_cache" / f"{Path(aligned_dir).name}{extra}"


def stage_bft(
    cfg: ReproduceConfig,
    stages: StageCache,
    data: dict,
    aligned_dir: str,
    log,
    *,
    name: str = "bft",
    after: tuple = ("data",),
    steps: int | None = None,
    loss_overrides: dict | None = None,
) -> str:
    """Train a BFT student (LoRA on ``aligned_dir``); an interrupted identical run resumes from its checkpoints."""
    d = stages.dir(name)
    cache_dir = teacher_cache_dir(cfg, stages.root, aligned_dir, loss_overrides)
    settings = bft_train_config(
        cfg,
        stages.dir("data"),
        data["base_dir"],
        aligned_dir,
        d,
        steps=steps,
        loss_overrides=loss_overrides,
        cache_dir=cache_dir,
    )
    train_stage(stages, name, settings, after=after, cache_dir=cache_dir, log=log)
    return str(d / "final")


def train_stage(
    stages: StageCache,
    name: str,
    settings: dict,
    *,
    after: tuple,
    cache_dir: Path,
    log,
    outputs=(),
    progress: bool = True,
) -> Path:
    """A BFT training stage (``settings``: the trainer config as a dict): reused when cached and every folder of
    ``outputs`` exists; else trained, an interrupted identical run resuming from its checkpoints. Checkpoints of
    another run (other settings, or a stage it reads recomputed) are discarded first, and the teacher cache
    ``cache_dir`` is rebuilt (once per run) when the models it was built from were recomputed: the trainer would
    refuse it by its fingerprint. A cache the trainer refuses as built for other inputs (by older code, which
    fingerprinted local files by path) is the run's own: it is rebuilt. The attempt's settings are recorded
    (:meth:`StageCache.record_attempt`), so an interrupted run moved to another folder still resumes (the trainer's
    runnable config is its ``config.yaml``). Returns the stage folder."""
    d = stages.dir(name)
    if stages.cached(name, settings, after=after) and all(Path(p).is_dir() for p in outputs):
        return d
    upstream = stages.upstream_changed(name, after)  # e.g. a new aligned model at the same path
    if upstream and cache_dir.exists() and cache_dir not in stages.fresh_caches:
        shutil.rmtree(cache_dir)
    stages.fresh_caches.add(cache_dir)
    if d.exists() and (upstream or stages.comparable(settings) != stages.attempt_settings(name)):
        shutil.rmtree(d)  # the old checkpoints belong to another run; only an interrupted identical run resumes
    with stages.computing(name, settings, keep=True) as d:
        stages.record_attempt(name, settings)
        resume = bool(ckpt.list_checkpoints(d))
        if resume:
            log(f"[{name}] resuming from {ckpt.latest_checkpoint(d)}")
        try:
            train(config_from_dict(settings), resume=resume, progress=progress)
        except StaleCacheError as e:  # raised before any step: nothing of this stage was written
            log(f"[{name}] rebuilding the teacher cache {cache_dir}: {e}")
            shutil.rmtree(cache_dir)
            train(config_from_dict(settings), resume=resume, progress=progress)
    return d


def generation_settings(cfg: ReproduceConfig) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=cfg.eval_tokens,
        batch_size=eval_batch_size(cfg),
        do_sample=cfg.sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )


def eval_batch_size(cfg: ReproduceConfig) -> int:
    return cfg.eval_batch_size or cfg.batch_size


def eval_settings(cfg: ReproduceConfig) -> dict:
    return {
        "prefill_ks": cfg.prefill_ks,
        "eval_tokens": cfg.eval_tokens,
        "sweep_k": cfg.sweep_k,
        "batch_size": eval_batch_size(cfg),
        "embedding_model": cfg.embedding_model,
        "sample": cfg.sample,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "judges": cfg.judges,
    }


def stage_validation(
    cfg: ReproduceConfig, stages: StageCache, data: dict, name: str, models: dict, log, after: tuple
) -> dict:
    """Score ``models`` (system name -> model folder) on the validation split: the ``sweep_k``-token prefill attack
    (one sampling seed) under every judge, and the perplexity of the benign validation solutions. Returns, per
    system, ``{judge: ASR, ..., "perplexity": ppl}``. This is what every choice of the reproduction is made on."""
    settings = {**eval_settings(cfg), "models": models}
    d = stages.dir(name)
    if not stages.cached(name, settings, after=after):
        with stages.computing(name, settings) as d:
            tok = None
            systems = []
            for system, path in models.items():
                model, tok = load_pretrained(path, cfg)
                systems.append(System(system, model, tok))
            rows = [{"prompt": r["prompt"], "response": r["response"]} for r in data["harmful_val"]]
            utility_rows = {
                "perplexity": [{"prompt": r["prompt"], "response": r["response"]} for r in data["benign_val"]]
            }
            ecfg = EvalConfig(
                prefill_ks=[cfg.sweep_k],
                utility=["perplexity"],
                limit=None,
                seed=cfg.seed,
                generation=generation_settings(cfg),
                judges=list(cfg.judges),
                threeway=False,
                likelihood=False,
            )
            run_eval(systems, ecfg, d, rows=rows, utility_rows=utility_rows)
    res = load_results(d)
    out = {}
    for system, s in res["summary"]["systems"].items():
        r = s.get("prefill", {}).get(str(cfg.sweep_k), {})
        out[system] = {j: r.get(j) for j in cfg.judges}
        out[system]["perplexity"] = ((s.get("utility") or {}).get("perplexity") or {}).get("perplexity")
        out[system]["n"] = r.get("n")
    return out


def stage_calibrate(cfg: ReproduceConfig, stages: StageCache, data: dict, log) -> dict | None:
    """The deeper analog's recovery share, chosen on validation: each of ``recovery_candidates`` is a refusal SFT
    scored by its keyword ASR under the ``sweep_k``-token prefill (the share of prompts on which it does not turn
    back to a refusal); the candidate nearest the paper's 47.5%, inside RECOVERY_TARGET when one is, is chosen.
    Candidates run in increasing order and stop below the band (a larger share only recovers more often). None
    when no analog is "auto"."""
    if "auto" not in cfg.analogs.values():
        return None
    low, high, centre = RECOVERY_TARGET
    table = []
    for share in sorted(cfg.recovery_candidates):
        aligned_dir = stage_aligned(cfg, stages, data, share, log)
        val = stage_validation(
            cfg,
            stages,
            data,
            f"calibrate/r{share:g}",
            {"aligned": aligned_dir},
            log,
            after=("data", aligned_name(share)),
        )["aligned"]
        table.append(
            {
                "share": share,
                "keyword": val.get("keyword"),
                "harm": val.get("harm"),
                "perplexity": val.get("perplexity"),
                "in_band": low <= (val.get("keyword") or 0) <= high,
            }
        )
        if (val.get("keyword") or 0) < low:
            break  # more recovery examples only deepen the alignment further: the larger shares cannot do better
    chosen = min(table, key=lambda r: (not r["in_band"], abs((r["keyword"] or 0) - centre)))
    result = {
        "candidates": table,
        "share": chosen["share"],
        "band": [low, high],
        "centre": centre,
        "measure": f"keyword ASR at k = {cfg.sweep_k} on {len(data['harmful_val'])} validation prompts",
    }
    atomic_write_json(stages.dir("calibrate") / "chosen.json", result, indent=1)
    log(f"[calibrate] recovery share {chosen['share']:g}: validation keyword ASR {chosen['keyword']}")
    return result


def sweep_points(cfg: ReproduceConfig) -> list[dict]:
    """The loss overrides of every sweep point: the alpha_base × l2_reg grid (when both are swept), then every other
    swept key varied alone; duplicates once."""
    grid = cfg.sweep
    points = []
    if "alpha_base" in grid or "l2_reg" in grid:
        for a in grid.get("alpha_base", [None]):
            for l2 in grid.get("l2_reg", [None]):
                points.append({k: v for k, v in (("alpha_base", a), ("l2_reg", l2)) if v is not None})
    for key, values in grid.items():
        if key not in ("alpha_base", "l2_reg"):
            points += [{key: v} for v in values]
    unique = {}
    for p in points:
        unique.setdefault(point_id(p), p)
    return list(unique.values())


def training_terms(metrics_path: Path, kl_weight: float = 1.0) -> dict:
    """The two terms of a student's loss over its training run (``metrics.jsonl`` of the trainer): the mean
    τ²-scaled KL and the mean weighted completion term (loss − kl_weight·KL: α_n·l2_reg·Σ s_v² over the harmful
    rows), and their ratio, the axis the sweep is meant to span (~0.1 to ~10)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return {"train_kl": None, "train_completion": None, "completion_to_kl": None}
    kl = sum(r["kl"] for r in rows) / len(rows)
    completion = max(0.0, sum(r["loss"] - kl_weight * r["kl"] for r in rows) / len(rows))  # >= 0 up to round-off
    return {"train_kl": kl, "train_completion": completion, "completion_to_kl": completion / kl if kl > 0 else None}


def point_id(overrides: dict) -> str:
    """A folder name for a set of loss overrides: ``alpha_base-1_l2_reg-0.0001``, ``completion-mass`` (``default``
    when empty)."""
    return (
        "_".join(f"{k}-{v:g}" if isinstance(v, (int, float)) else f"{k}-{v}" for k, v in sorted(overrides.items()))
        or "default"
    )


def sweep_students(
    cfg: ReproduceConfig, stages: StageCache, data: dict, aligned_dir: str, aligned_stage: str, log, *, score, choose
) -> dict:
    """The sweep's driver, whatever scores it: a student of ``sweep_steps`` (stage ``<folder>/bft``) trained at
    every sweep point (folder ``sweep/<point id>``) and scored by ``score(overrides, folder, student)`` (a dict);
    ``choose(points)`` gives the chosen point's index; the ablations are trained and scored at the chosen point
    (folder ``sweep/ablation_<name>``). Each point is ``{"overrides", **score, **training_terms}``. Returns
    ``{"steps", "points", "chosen", "ablations"}``."""
    steps = cfg.sweep_steps or bft_steps(cfg, data)
    after = ("data", aligned_stage)

    def run(overrides: dict, folder: str) -> dict:
        student = stage_bft(
            cfg,
            stages,
            data,
            aligned_dir,
            log,
            name=f"{folder}/bft",
            after=after,
            steps=steps,
            loss_overrides=overrides,
        )
        terms = training_terms(Path(student).parent / "metrics.jsonl", overrides.get("kl_weight", 1.0))
        return {"overrides": overrides, **score(overrides, folder, student), **terms}

    points = [run(p, f"sweep/{point_id(p)}") for p in sweep_points(cfg)]
    chosen = choose(points)
    ablations = {
        name: run({**points[chosen]["overrides"], **ABLATIONS[name]}, f"sweep/ablation_{name}")
        for name in cfg.ablations
    }
    return {"steps": steps, "points": points, "chosen": chosen, "ablations": ablations}


def stage_sweep(
    cfg: ReproduceConfig, stages: StageCache, data: dict, aligned_dir: str, aligned_stage: str, log
) -> dict | None:
    """Train a student at every sweep point on ``sweep_analog`` and score each on validation by generation; choose
    the point; train and score the ablations at it (:func:`sweep_students`). None when no sweep is configured."""
    if not cfg.sweep:
        return None
    after = ("data", aligned_stage)
    ref = stage_validation(cfg, stages, data, "sweep/aligned", {"aligned": aligned_dir}, log, after=after)["aligned"]
    pulls = []  # each point's completion pull; they share the aligned side (the students' start)
    primary = cfg.judges[0]
    limit = (ref["perplexity"] or float("inf")) * (1 + cfg.sweep_max_ppl_increase)

    def within(p):
        return p["perplexity"] is not None and p["perplexity"] <= limit

    def score(overrides: dict, folder: str, student: str) -> dict:
        trained = after + (f"{folder}/bft",)
        val = stage_validation(cfg, stages, data, f"{folder}/val", {"student": student}, log, after=trained)
        pull = stage_completion_pull(
            cfg,
            stages,
            data,
            f"{folder}/pull",
            aligned_dir,
            {"student": student},
            "harmful_val",
            log,
            after=trained,
            loss=overrides,
        )
        pulls.append(pull)
        return {**val["student"], "mass_ratio": pull["students"]["student"]["mass_ratio"]}

    def rank(p):
        return (p.get(primary) if p.get(primary) is not None else 1.0, p.get("keyword") or 0.0, p["perplexity"])

    def choose(points: list[dict]) -> int:
        eligible = [i for i, p in enumerate(points) if within(p)]
        if eligible:
            return min(eligible, key=lambda i: rank(points[i]))
        return min(
            range(len(points)),
            key=lambda i: points[i]["perplexity"] if points[i]["perplexity"] is not None else float("inf"),
        )

    sweep = sweep_students(cfg, stages, data, aligned_dir, aligned_stage, log, score=score, choose=choose)
    chosen = sweep["points"][sweep["chosen"]]
    # the chosen point is within the limit exactly when some point was
    rule = "eligible" if within(chosen) else "no point within the perplexity limit: the lowest-perplexity point"
    result = {
        "analog": cfg.sweep_analog,
        "steps": sweep["steps"],
        "aligned": {**ref, **pulls[0]["aligned"], "mass_ratio": 1.0},  # the students' start
        "points": sweep["points"],
        "chosen": chosen["overrides"],
        "rule": rule,
        "perplexity_limit": limit,
        "primary_judge": primary,
        "ablations": sweep["ablations"],
        "n_val": len(data["harmful_val"]),
        "k": cfg.sweep_k,
    }
    atomic_write_json(stages.dir("sweep") / "chosen.json", result, indent=1)
    log(f"[sweep] chosen {point_id(chosen['overrides'])} ({rule})")
    return result


def stage_eval(
    cfg: ReproduceConfig, stages: StageCache, data: dict, analog: str, models: dict, log, after: tuple
) -> dict:
    """The test-split attacks on one analog's systems (``models``: aligned, bft student and, when trained, qi
    augmentation; plus the base and the contrastive rows). The attacks at k = 0 and ``sweep_k`` run on every test
    prompt, and ``sweep_k`` (where the claims are judged) again with every further sampling seed; the other k on the
    first ``long_k_prompts`` prompts. k = 0 and the long k get the first seed only."""
    name = f"{analog}/eval"
    settings = {
        **eval_settings(cfg),
        "alpha": cfg.alpha,
        "alphas": cfg.alphas,
        "gsm8k_limit": cfg.gsm8k_limit,
        "gsm8k_tokens": cfg.gsm8k_tokens,
        "forms": cfg.forms,
        "eval_seeds": cfg.eval_seeds,
        "long_k_prompts": cfg.long_k_prompts,
        "models": models,
    }
    if cfg.eval_seeds > 1:
        settings["seed_ks"] = [cfg.sweep_k]
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in data["harmful_test"]]
    utility_rows = {"perplexity": [{"prompt": r["prompt"], "response": r["response"]} for r in data["benign_test"]]}
    if cfg.gsm8k_limit:
        utility_rows["gsm8k"] = [r for r in data["benign_test"] if r.get("answer")][: cfg.gsm8k_limit]
    utility = ["perplexity"] + (["gsm8k"] if cfg.gsm8k_limit and utility_rows["gsm8k"] else [])
    gen = generation_settings(cfg)
    common = dict(
        limit=None,
        seed=cfg.seed,
        generation=gen,
        judges=list(cfg.judges),
        threeway=True,
        embedding_model=cfg.embedding_model,
        likelihood=True,
        likelihood_reference="dataset",
        likelihood_tokens=cfg.eval_tokens,
        gsm8k_max_new_tokens=cfg.gsm8k_tokens,
    )
    short_ks = [k for k in cfg.prefill_ks if k in (0, cfg.sweep_k)]
    long_ks = [k for k in cfg.prefill_ks if k not in (0, cfg.sweep_k)]
    if cfg.long_k_prompts is None:
        short_ks, long_ks = list(cfg.prefill_ks), []
    d = stages.dir(name)
    if not stages.cached(name, settings, after=after):
        with stages.computing(name, settings) as d:
            base, tok = load_pretrained(data["base_dir"], cfg)
            aligned, _ = load_pretrained(models["aligned"], cfg)
            systems = [System("base", base, tok), System("aligned", aligned, tok)]
            systems += [
                System(contrastive_name(cfg.alpha, form), aligned, tok, base_model=base, alpha=cfg.alpha, form=form)
                for form in cfg.forms
            ]
            for system, path in models.items():
                if system != "aligned":
                    systems.append(System(system, load_pretrained(path, cfg)[0], tok))
            log(f"[{name}] prefill attacks k={short_ks} on {len(rows)} prompts, {[s.name for s in systems]}")
            run_eval(
                systems,
                EvalConfig(prefill_ks=short_ks, utility=utility, **common),
                d / "main",
                rows=rows,
                utility_rows=utility_rows,
            )
            for i in range(1, cfg.eval_seeds):  # more sampling seeds: only the sweep_k attack is rerun
                seeded = dict(common, generation=dataclasses.replace(gen, seed=cfg.seed + 1000 * i), likelihood=False)
                log(f"[{name}] sampling seed {i + 1} of {cfg.eval_seeds}")
                run_eval(
                    systems, EvalConfig(prefill_ks=[cfg.sweep_k], utility=[], **seeded), d / f"main_seed{i}", rows=rows
                )
            if long_ks:
                log(f"[{name}] prefill attacks k={long_ks} on {min(len(rows), cfg.long_k_prompts)} prompts")
                run_eval(
                    systems,
                    EvalConfig(prefill_ks=long_ks, utility=[], **dict(common, likelihood=False)),
                    d / "long",
                    rows=rows[: cfg.long_k_prompts],
                )
            sweep = [a for a in dict.fromkeys(cfg.alphas) if a != cfg.alpha]
            if sweep:
                sweep_systems = [System(f"contrastive α={a:g}", aligned, tok, base_model=base, alpha=a) for a in sweep]
                sweep_cfg = EvalConfig(prefill_ks=[cfg.sweep_k], utility=["perplexity"], **common)
                log(f"[{name}] α sweep {sweep} at k={cfg.sweep_k}")
                run_eval(sweep_systems, sweep_cfg, d / "alpha_sweep", rows=rows, utility_rows=utility_rows)
    out = {"main": load_results(d / "main")}
    out["seeds"] = [out["main"]] + [load_results(d / f"main_seed{i}") for i in range(1, cfg.eval_seeds)]
    if (d / "long").is_dir():
        out["long"] = load_results(d / "long")
    if (d / "alpha_sweep").is_dir():
        out["alpha_sweep"] = load_results(d / "alpha_sweep")
    return out
