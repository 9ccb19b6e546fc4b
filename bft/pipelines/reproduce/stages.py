"""The stages of the miniature reproduction, each cached in its own folder (:class:`StageCache`).

1. data (prompts, splits, the base model's own responses), 2. aligned (the shallow refusal SFT), 3. analysis
(position-wise profile), 4. bft (the BFT student), 5. eval (prefill attacks, judges, likelihood, utility).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import datasets

from bft.analysis import analyze_pair, summarize, teacher_forced_records, write_analysis
from bft.atomic import atomic_directory, atomic_write_json, atomic_write_jsonl
from bft.eval.generation import GenerationSettings, System, contrastive_name
from bft.eval.judges import is_refusal
from bft.eval.prefill import prefill_ids
from bft.eval.runner import EvalConfig, load_results, run_eval
from bft.hf import data as hf_data
from bft.hf.models import load_model_and_tokenizer, save_pretrained
from bft.pipelines.refusal_sft import refusal_finetune
from bft.pipelines.reproduce.config import ReproduceConfig, torch_device
from bft.trainer import checkpoint as ckpt
from bft.trainer.config import config_from_dict
from bft.trainer.data import generate_responses
from bft.trainer.train import train

__all__ = ["StageCache", "stage_data", "stage_aligned", "stage_analysis", "stage_bft", "stage_eval",
           "bft_train_config"]  # fmt: skip


class StageCache:
    """Stage folders with a ``stage.json`` holding the settings they were computed with.

    A stage is reused when its ``stage.json`` exists (it is written last, atomically) and records the same settings;
    once a stage is recomputed, every later stage is recomputed too (its inputs changed).
    """

    def __init__(self, root: Path, log):
        self.root = root
        self.dirty = False
        self.log = log

    def dir(self, name: str) -> Path:
        return self.root / name

    def cached(self, name: str, settings: dict) -> bool:
        marker = self.dir(name) / "stage.json"
        if not self.dirty and marker.is_file():
            try:
                if json.loads(marker.read_text())["settings"] == json.loads(json.dumps(settings)):
                    self.log(f"[{name}] cached: {self.dir(name)}")
                    return True
            except (json.JSONDecodeError, KeyError):
                pass
        self.dirty = True
        return False

    def start(self, name: str) -> Path:
        """A clean folder for a stage about to run (a half-written earlier attempt is removed)."""
        d = self.dir(name)
        if name != "bft" and d.exists():  # bft keeps its checkpoints: an interrupted training run resumes
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running ...")
        return d

    def finish(self, name: str, settings: dict, seconds: float) -> None:
        atomic_write_json(self.dir(name) / "stage.json", {"settings": settings, "seconds": round(seconds, 1)}, indent=1)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _load(path_or_name: str, cfg: ReproduceConfig):
    return load_model_and_tokenizer(path_or_name, device=torch_device(cfg), dtype="fp32")


def _save_model(model, tokenizer, path: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a crash never leaves a half-written model behind."""
    with atomic_directory(path) as tmp:
        save_pretrained(model, tmp, tokenizer=tokenizer)


def _harmful_pool(cfg: ReproduceConfig) -> list[dict]:
    rows, seen = [], set()
    for source in cfg.harmful_sources:
        for r in hf_data.load(source):
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                rows.append({"prompt": r["prompt"], "source": source})
    return rows


def _split(rows: list[dict], cfg: ReproduceConfig) -> tuple[list[dict], list[dict]]:
    """Prompt-disjoint train/test split (:func:`bft.hf.data.train_test_split`), then the first n of each (shuffled)."""
    need = cfg.n_train + cfg.n_test
    if len(rows) < need:
        raise ValueError(f"only {len(rows)} distinct harmful prompts in {cfg.harmful_sources}; n_train + n_test = "
                         f"{need}")  # fmt: skip
    rng = random.Random(cfg.seed)
    rows = rows[:]
    rng.shuffle(rows)  # mix the sources before taking the first n of each part
    parts = hf_data.train_test_split(datasets.Dataset.from_list(rows), test_size=len(rows) - cfg.n_train, seed=cfg.seed)
    train = parts["train"].to_list()[: cfg.n_train]
    test = parts["test"].to_list()
    rng.shuffle(test)
    return train, test


def stage_data(cfg: ReproduceConfig, stages: StageCache, log) -> dict:
    settings = {k: getattr(cfg, k) for k in ("model", "seed", "harmful_sources", "benign_source", "n_train", "n_test",
                                             "n_benign_train", "n_benign_test", "response_tokens")}  # fmt: skip
    d = stages.dir("data")
    base_dir = stages.root / "models" / "base"
    if not (stages.cached("data", settings) and base_dir.is_dir()):
        t0 = time.time()
        stages.dirty = True
        d = stages.start("data")
        train, pool = _split(_harmful_pool(cfg), cfg)
        model, tok = _load(cfg.model, cfg)
        # harmful responses of the base model itself; test prompts whose response is a refusal are dropped (there is
        # no harmful text to prefill with), taking the next held-out prompt instead
        gen = lambda prompts: generate_responses(  # noqa: E731
            model, tok, prompts, max_new_tokens=cfg.response_tokens, batch_size=cfg.batch_size, progress=True
        )
        log(f"[data] base model writes harmful responses for {len(train)} train prompts")
        for r, resp in zip(train, gen([r["prompt"] for r in train])):
            r["response"] = resp
        train = [r for r in train if r["response"].strip() and not is_refusal(r["response"])]
        test, dropped = [], 0
        for start in range(0, len(pool), cfg.n_test):
            chunk = pool[start : start + cfg.n_test]
            for r, resp in zip(chunk, gen([r["prompt"] for r in chunk])):
                if resp.strip() and not is_refusal(resp):
                    test.append({**r, "response": resp})
                else:
                    dropped += 1
            if len(test) >= cfg.n_test:
                break
        test = test[: cfg.n_test]
        if len(test) < cfg.n_test:
            log(f"[data] warning: only {len(test)} held-out prompts with a harmful base response")
        benign = hf_data.load(cfg.benign_source, limit=cfg.n_benign_train + cfg.n_benign_test, seed=cfg.seed).to_list()
        benign_train = benign[: cfg.n_benign_train]
        benign_test = benign[cfg.n_benign_train :]
        log(f"[data] base model answers {len(benign_train)} benign prompts (utility data for SFT and BFT)")
        for r, resp in zip(benign_train, gen([r["prompt"] for r in benign_train])):
            r["reference_solution"] = r.get("response", "")
            r["response"] = resp
        benign_train = [r for r in benign_train if r["response"].strip()]
        atomic_write_jsonl(d / "harmful_train.jsonl", train)
        atomic_write_jsonl(d / "harmful_test.jsonl", test)
        atomic_write_jsonl(d / "benign_train.jsonl", benign_train)
        atomic_write_jsonl(d / "benign_test.jsonl", benign_test)
        stats = {"harmful_train": len(train), "harmful_test": len(test), "test_prompts_dropped_base_refused": dropped,
                 "benign_train": len(benign_train), "benign_test": len(benign_test),
                 "test_sources": {s: sum(r["source"] == s for r in test) for s in cfg.harmful_sources}}  # fmt: skip
        atomic_write_json(d / "stats.json", stats, indent=1)
        base_dir.parent.mkdir(parents=True, exist_ok=True)
        _save_model(model, tok, base_dir)
        del model
        stages.finish("data", settings, time.time() - t0)
    return {
        "harmful_train": _read_jsonl(d / "harmful_train.jsonl"),
        "harmful_test": _read_jsonl(d / "harmful_test.jsonl"),
        "benign_train": _read_jsonl(d / "benign_train.jsonl"),
        "benign_test": _read_jsonl(d / "benign_test.jsonl"),
        "stats": json.loads((d / "stats.json").read_text()),
        "base_dir": str(base_dir),
    }


def stage_aligned(cfg: ReproduceConfig, stages: StageCache, data: dict, log) -> str:
    settings = {"align_steps": cfg.align_steps, "align_lr": cfg.align_lr, "batch_size": cfg.batch_size,
                "seed": cfg.seed}  # fmt: skip
    if cfg.recovery_share:  # the deeper analog (only then in the settings, so shallow caches stay valid)
        settings.update(recovery_share=cfg.recovery_share, recovery_max_tokens=cfg.recovery_max_tokens)
    aligned_dir = stages.root / "models" / "aligned"
    if not (stages.cached("aligned", settings) and aligned_dir.is_dir()):
        t0 = time.time()
        d = stages.start("aligned")
        base, tok = _load(data["base_dir"], cfg)
        tuned, losses = refusal_finetune(
            base, tok, [r["prompt"] for r in data["harmful_train"]], [r["prompt"] for r in data["benign_train"]],
            benign_responses=[r["response"] for r in data["benign_train"]], steps=cfg.align_steps, lr=cfg.align_lr,
            batch_size=cfg.batch_size, seed=cfg.seed, harmful_responses=[r["response"] for r in data["harmful_train"]],
            recovery_share=cfg.recovery_share, recovery_max_tokens=cfg.recovery_max_tokens,
        )  # fmt: skip
        _save_model(tuned, tok, aligned_dir)
        atomic_write_json(d / "losses.json", losses, indent=1)
        log(f"[aligned] refusal SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
        stages.finish("aligned", settings, time.time() - t0)
    return str(aligned_dir)


def _prefill_text(tok, response: str, k: int) -> str:
    return tok.decode(prefill_ids(tok, response, k), skip_special_tokens=True)


def _analysis_groups(cfg: ReproduceConfig, data: dict, tok) -> dict:
    test = data["harmful_test"]
    return {
        "harmful": [{"prompt": r["prompt"]} for r in test],
        "harmful_prefill": [{"prompt": r["prompt"], "prefill": _prefill_text(tok, r["response"],
                                                                             cfg.analysis_prefill_tokens)}
                            for r in test],  # fmt: skip
        "benign": [{"prompt": r["prompt"]} for r in data["benign_test"]],
    }


def stage_analysis(cfg: ReproduceConfig, stages: StageCache, data: dict, model_dir: str, name: str, alpha, log) -> dict:
    """Generated responses (harmful, harmful after a prefill, benign; contrastive on the prefilled group) and, teacher
    forced, the base model's harmful responses and the benign reference solutions (Qi et al.'s per-token KL)."""
    settings = {"model": name, "analysis_tokens": cfg.analysis_tokens, "prefill": cfg.analysis_prefill_tokens,
                "alpha": alpha, "top_n": cfg.top_n, "batch_size": cfg.batch_size, "teacher_forced": 1}  # fmt: skip
    stage = f"analysis_{name}"
    d = stages.dir(stage)
    if not stages.cached(stage, settings):
        t0 = time.time()
        d = stages.start(stage)
        model, tok = _load(model_dir, cfg)
        base, _ = _load(data["base_dir"], cfg)
        result = analyze_pair(
            model, base, tok, _analysis_groups(cfg, data, tok), max_new_tokens=cfg.analysis_tokens,
            batch_size=cfg.batch_size, alpha=alpha, contrastive_groups=("harmful_prefill",), top_n=cfg.top_n,
        )  # fmt: skip
        for group, rows in (("harmful_response", data["harmful_test"]), ("benign_response", data["benign_test"])):
            result["records"] += teacher_forced_records(
                model, base, tok, [{"prompt": r["prompt"], "response": r["response"]} for r in rows], group=group,
                batch_size=cfg.batch_size, top_n=cfg.top_n,
            )  # fmt: skip
        result["summary"] = summarize(result["records"])
        write_analysis(result, str(d))
        stages.finish(stage, settings, time.time() - t0)
    return json.loads((d / "analysis.json").read_text())


def bft_train_config(cfg: ReproduceConfig, data_dir: Path, base_dir: str, aligned_dir: str, out_dir: Path) -> dict:
    """The trainer config (as a dict for :func:`bft.trainer.config.config_from_dict`) of the miniature BFT run."""
    dev = torch_device(cfg)
    return {
        "model": {"base": base_dir, "aligned": aligned_dir, "dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False},
        "finetune": {"mode": "lora", "lora_r": cfg.bft_lora_r, "lora_alpha": 2 * cfg.bft_lora_r, "save": "merged"},
        "data": {"harmful": str(data_dir / "harmful_train.jsonl"), "harmful_response": "dataset",
                 "utility": str(data_dir / "benign_train.jsonl"), "harmful_ratio": cfg.harmful_ratio,
                 "batch_size": cfg.bft_batch_size, "max_length": cfg.bft_max_length},
        "loss": {"top_k": cfg.top_k, "temperature": 2.0, "teacher_lambda": 1.2, **cfg.loss_overrides},
        "optim": {"name": "adamw", "lr": cfg.bft_lr, "scheduler": "cosine", "warmup_steps": max(1, cfg.bft_steps // 10),
                  "max_grad_norm": 1.0},
        "train": {"max_steps": cfg.bft_steps, "seed": cfg.seed, "output_dir": str(out_dir),
                  "save_every": max(1, cfg.bft_steps // 4), "device": "cpu" if dev.type == "cpu" else None},
        # the frozen models run once over the training rows (exact; bft cache), not at every step of every epoch
        "teacher_cache": {"path": str(out_dir / "teacher_cache") if cfg.teacher_cache else None},
    }  # fmt: skip


def stage_bft(cfg: ReproduceConfig, stages: StageCache, data: dict, aligned_dir: str, log) -> str:
    d = stages.dir("bft")
    settings = bft_train_config(cfg, stages.dir("data"), data["base_dir"], aligned_dir, d)
    final = d / "final"
    upstream_recomputed = stages.dirty  # e.g. a new aligned model under the same path
    if not stages.cached("bft", settings):
        t0 = time.time()
        if d.exists() and (upstream_recomputed or json.loads(json.dumps(settings)) != _saved_bft_settings(d)):
            shutil.rmtree(d)  # the old checkpoints belong to another run; only an interrupted identical run resumes
        d = stages.start("bft")
        atomic_write_json(d / "settings.json", settings, indent=1)
        resume = bool(ckpt.list_checkpoints(d))
        if resume:
            log(f"[bft] resuming from {ckpt.latest_checkpoint(d)}")
        train(config_from_dict(settings), resume=resume)
        stages.finish("bft", settings, time.time() - t0)
    return str(final)


def _saved_bft_settings(d: Path):
    try:
        return json.loads((d / "settings.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stage_eval(cfg: ReproduceConfig, stages: StageCache, data: dict, aligned_dir: str, student_dir: str, log) -> dict:
    settings = {"prefill_ks": cfg.prefill_ks, "eval_tokens": cfg.eval_tokens, "alpha": cfg.alpha,
                "alphas": cfg.alphas, "sweep_k": cfg.sweep_k, "gsm8k_limit": cfg.gsm8k_limit,
                "gsm8k_tokens": cfg.gsm8k_tokens, "batch_size": cfg.batch_size,
                "embedding_model": cfg.embedding_model, "sample": cfg.sample, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "seed": cfg.seed, "forms": cfg.forms, "eval_seeds": cfg.eval_seeds,
                "judges": cfg.judges}  # fmt: skip
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in data["harmful_test"]]
    utility_rows = {"perplexity": [{"prompt": r["prompt"], "response": r["response"]} for r in data["benign_test"]]}
    if cfg.gsm8k_limit:
        utility_rows["gsm8k"] = [r for r in data["benign_test"] if r.get("answer")][: cfg.gsm8k_limit]
    utility = ["perplexity"] + (["gsm8k"] if cfg.gsm8k_limit and utility_rows["gsm8k"] else [])
    gen = GenerationSettings(max_new_tokens=cfg.eval_tokens, batch_size=cfg.batch_size, do_sample=cfg.sample,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)  # fmt: skip
    common = dict(limit=None, seed=cfg.seed, generation=gen, judges=list(cfg.judges), threeway=True,
                  embedding_model=cfg.embedding_model, likelihood=True, likelihood_reference="dataset",
                  likelihood_tokens=cfg.eval_tokens, gsm8k_max_new_tokens=cfg.gsm8k_tokens)  # fmt: skip
    out = {}
    if not stages.cached("eval", settings):
        t0 = time.time()
        d = stages.start("eval")
        base, tok = _load(data["base_dir"], cfg)
        aligned, _ = _load(aligned_dir, cfg)
        student, _ = _load(student_dir, cfg)
        systems = [System("base", base, tok), System("aligned", aligned, tok)]
        systems += [System(contrastive_name(cfg.alpha, form), aligned, tok, base_model=base, alpha=cfg.alpha, form=form)
                    for form in cfg.forms]  # fmt: skip
        systems.append(System("bft student", student, tok))
        main_cfg = EvalConfig(prefill_ks=cfg.prefill_ks, utility=utility, **common)
        log(f"[eval] prefill attacks k={cfg.prefill_ks} on {[s.name for s in systems]}")
        run_eval(systems, main_cfg, d / "main", rows=rows, utility_rows=utility_rows)
        for i in range(1, cfg.eval_seeds):  # more sampling seeds: only the (seed-dependent) attacks are rerun
            seeded = dict(common, generation=dataclasses.replace(gen, seed=cfg.seed + 1000 * i), likelihood=False)
            log(f"[eval] sampling seed {i + 1} of {cfg.eval_seeds}")
            run_eval(systems, EvalConfig(prefill_ks=cfg.prefill_ks, utility=[], **seeded), d / f"main_seed{i}",
                     rows=rows)  # fmt: skip
        sweep = [a for a in dict.fromkeys(cfg.alphas) if a != cfg.alpha]
        if sweep:
            sweep_systems = [System(f"contrastive α={a:g}", aligned, tok, base_model=base, alpha=a) for a in sweep]
            sweep_cfg = EvalConfig(prefill_ks=[cfg.sweep_k], utility=["perplexity"], **common)
            log(f"[eval] α sweep {sweep} at k={cfg.sweep_k}")
            run_eval(sweep_systems, sweep_cfg, d / "alpha_sweep", rows=rows, utility_rows=utility_rows)
        stages.finish("eval", settings, time.time() - t0)
    d = stages.dir("eval")
    out["main"] = load_results(d / "main")
    out["seeds"] = [out["main"]] + [load_results(d / f"main_seed{i}") for i in range(1, cfg.eval_seeds)]
    if (d / "alpha_sweep").is_dir():
        out["alpha_sweep"] = load_results(d / "alpha_sweep")
    return out
