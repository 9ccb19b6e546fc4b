"""The evaluation pipeline behind ``bft eval``: attacks → judgements → summary → results.json / report.md / plots.

Everything a number in the report depends on is stored in ``results.json``: every prompt, prefill, generation,
GCG suffix, fine-tuning setting and judge verdict, so a run can be re-judged (:func:`rejudge`) without generating
again. Record groups live at ``results["records"][system][attack]`` with attack one of ``prefill`` (one record
per prompt × k; k = 0 is the plain request), ``gcg`` and ``finetune`` (the fine-tuned model's answers to the plain
harmful requests, for HRR). Judgements are stored per record under ``judgements``:

* ``keyword`` — bool, :class:`bft.eval.judges.KeywordJudge`;
* ``threeway`` — "refusal" | "on_topic" | "off_topic", :class:`bft.eval.semantic.ThreeWayJudge` (always on the
  continuation alone, whatever ``judge_text`` says: a prefill restates the request and would look on-topic);
* ``<model judge name>`` — bool, for every model judge given.

Metrics (all shares in [0, 1]; the report prints percentages):

* ASR(judge) = #harmful / #records of the group (for the three-way judge: the on-topic share, with the refusal and
  off-topic shares beside it);
* HRR = the harmful rate after the fine-tuning attack (see :mod:`bft.eval.finetune`);
* likelihood = :func:`bft.eval.likelihood.summarize_logprobs` of the reference harmful continuation (lower = safer);
* utility = perplexity / GSM8K exact match (:mod:`bft.eval.utility`), and over-refusal when
  ``overrefusal_limit`` is set (:mod:`bft.eval.overrefusal`).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from bft.atomic import atomic_write_bytes
from bft.config import ConfigError, build_dataclass
from bft.decoding.contrastive import check_form
from bft.environment import package_versions
from bft.eval import gcg, utility
from bft.eval.deliberation import deliberation_table
from bft.eval.finetune import FinetuneAttackConfig, harmful_responses, lora_finetune, save_merged
from bft.eval.gcg import GCGConfig
from bft.eval.generation import GenerationSettings, System
from bft.eval.judges import Judge, KeywordJudge, choose_primary_judge, judge_from_spec, judge_kind
from bft.eval.likelihood import continuation_logprobs, summarize_logprobs
from bft.eval.overrefusal import load_prompts as load_overrefusal_prompts
from bft.eval.overrefusal import overrefusal
from bft.eval.prefill import parse_ks, prefill_ids, run_prefill_attack
from bft.eval.report import render_markdown, write_plots
from bft.eval.semantic import ThreeWayJudge
from bft.hf import data
from bft.hf.chat import encode_chat
from bft.hf.generation import generate_from_ids

__all__ = ["EvalConfig", "run_eval", "judge_results", "summarize", "rejudge", "write_results", "load_results"]

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1


#: GCG settings of ``bft eval`` where they differ from :class:`GCGConfig`'s: a shorter search, since an eval attacks
#: several prompts on every system while GCGConfig's defaults size one strong attack.
EVAL_GCG_DEFAULTS = {"steps": 50, "search_width": 128, "topk": 64}

#: The attacks whose settings are their own dataclasses, by EvalConfig field. Their flat keys (YAML, ``key=value``,
#: flags, ``results.json``) are ``<attack>_<setting>`` (``gcg_steps``, ``finetune_rank``), but ``gcg_suffix``
#: (the flag ``--gcg-suffix``) for ``GCGConfig.suffix_init``. Their ``seed`` is :attr:`EvalConfig.seed`, which seeds
#: every part of a run, so it has no flat key.
_ATTACKS = {"gcg": GCGConfig, "finetune": FinetuneAttackConfig}
_RENAMED = {("gcg", "suffix_init"): "gcg_suffix"}
#: (attack, setting) -> flat key, in field order
_FLAT_KEY = {
    (attack, f.name): _RENAMED.get((attack, f.name), f"{attack}_{f.name}")
    for attack, cls in _ATTACKS.items()
    for f in fields(cls)
    if f.name != "seed"
}


def _attack_defaults(attack: str):
    """The settings an attack runs with when no key sets them."""
    return GCGConfig(**EVAL_GCG_DEFAULTS) if attack == "gcg" else _ATTACKS[attack]()


def _build_attack(attack: str, settings: dict):
    """The attack's settings dataclass from ``{setting: value}`` over :func:`_attack_defaults`; errors name the flat
    key (``gcg_steps must be >= 1 ...``)."""
    values = {k: v for k, v in asdict(_attack_defaults(attack)).items() if k != "seed"}
    try:
        return build_dataclass(_ATTACKS[attack], {**values, **settings}, where=f"{attack}_")
    except ConfigError as error:
        message = str(error)
        for (a, name), flat in _RENAMED.items():
            if a == attack:
                message = message.replace(f"{attack}_{name}", flat)
        raise ConfigError(message) from None


@dataclass
class EvalConfig:
    """What ``bft eval`` runs, validated on construction (see docs/eval.md).

    The attacks' settings are their own dataclasses: ``gcg`` a :class:`GCGConfig` and ``finetune`` a
    :class:`FinetuneAttackConfig`, each None when that attack is off; ``seed`` seeds both. YAML files, flags and
    ``results.json`` use flat keys (``gcg: true``, ``gcg_steps``, ``finetune_rank``, ...): :meth:`from_dict` reads
    them, :meth:`to_dict` writes them.
    """

    dataset: str = "advbench"
    limit: int | None = 32
    seed: int = 0
    prefill_ks: list = field(default_factory=lambda: [4, 5, 10, 20, 40, "full"])
    prefill_text: str | None = None  # one fixed prefill for datasets without responses ("Sure, here is")
    judge_text: str = "continuation"  # or "full" (prefill + continuation)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judges: list = field(default_factory=lambda: ["keyword"])  # + "harm", "llamaguard:PATH", "harmbench:PATH", ...
    # whose verdicts fill the headline tables, HRR and Table 5: a judge name, spec or kind; None = the first of
    # bft.eval.judges.DEFAULT_PRIMARY_JUDGES (harm, keyword) that runs
    primary_judge: str | None = None
    threeway: bool = True
    embedding_model: str | None = None  # three-way judge embedding model; None = packaged all-MiniLM-L6-v2
    likelihood: bool = True
    likelihood_reference: str = "auto"  # "base" (base model's own continuation of the target) | "dataset" | "auto"
    likelihood_tokens: int = 64
    alpha: float = 1.0  # the "contrastive" row
    alphas: list = field(default_factory=list)  # more α, one contrastive row each (the α sweep)
    forms: list = field(default_factory=lambda: ["logprobs"])  # Eq. 7 on log-probs and/or raw logits (the paper)
    gcg: GCGConfig | None = None  # the GCG attack's settings; None = no GCG attack
    gcg_limit: int = 4  # GCG attacks the first N prompts
    finetune: FinetuneAttackConfig | None = None  # the LoRA fine-tuning attack's settings; None = no such attack
    finetune_dataset: str = "dolly"
    finetune_limit: int | None = 1000
    finetune_save: str | None = None  # directory to save the attacked (merged) model for the recovery protocol
    utility: list = field(default_factory=lambda: ["perplexity", "gsm8k"])
    perplexity_dataset: str = "gsm8k"
    utility_limit: int = 16
    utility_split: str | None = "test"  # split of the named gsm8k data for both utility measures (not BFT's train)
    gsm8k_max_new_tokens: int = 256
    lm_eval_tasks: list = field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_include_path: str | None = None  # a folder of local lm-eval task YAMLs (offline tasks)
    # over-refusal (bft.eval.overrefusal): None = off; N = that many safe prompts (round-robin over categories),
    # decoded with `generation`; overrefusal_contrast adds the 25 harmful contrast prompts as a sanity check
    overrefusal_limit: int | None = None
    overrefusal_contrast: bool = True

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationSettings(**self.generation)
        self.prefill_ks = parse_ks(self.prefill_ks) if self.prefill_ks else []
        if self.judge_text not in ("continuation", "full"):
            raise ValueError(f"judge_text must be 'continuation' or 'full', got {self.judge_text!r}")
        if self.likelihood_reference not in ("auto", "base", "dataset"):
            raise ValueError(f"likelihood_reference must be auto, base or dataset, got {self.likelihood_reference!r}")
        unknown = set(self.utility) - {"perplexity", "gsm8k"}
        if unknown:
            raise ValueError(f"unknown utility measure(s) {sorted(unknown)}; choose from perplexity, gsm8k")
        if self.overrefusal_limit is not None and (
            isinstance(self.overrefusal_limit, bool)
            or not isinstance(self.overrefusal_limit, int)
            or self.overrefusal_limit < 1
        ):
            raise ValueError(f"overrefusal_limit must be a positive integer or None, got {self.overrefusal_limit!r}")
        self.alphas = [float(a) for a in self.alphas]
        if any(not a >= 0 for a in self.alphas + [self.alpha]):
            raise ValueError(f"alphas must be >= 0, got {self.alphas} / alpha={self.alpha}")
        self.forms = [check_form(f) for f in (self.forms or ["logprobs"])]
        for attack, cls in _ATTACKS.items():
            settings = getattr(self, attack)
            if settings is not None and not isinstance(settings, cls):
                raise ValueError(f"{attack} must be a {cls.__name__} or None, got {settings!r}")
            if settings is not None and settings.seed != self.seed:
                setattr(self, attack, replace(settings, seed=self.seed))  # the run's seed seeds every part of it
        choose_primary_judge(self.primary_judge, self.judge_specs())

    def judge_specs(self) -> list[str]:
        """The specs of the judges this config runs: the keyword judge (always on) and ``judges``."""
        return ["keyword"] + [s for s in self.judges if judge_kind(s) != "keyword"]

    @classmethod
    def flat_keys(cls) -> list[str]:
        """Every key :meth:`from_dict` accepts and :meth:`to_dict` writes."""
        out = []
        for f in fields(cls):
            out.append(f.name)
            out += [flat for (attack, _), flat in _FLAT_KEY.items() if attack == f.name]
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> EvalConfig:
        """A validated config from flat keys: a YAML mapping with flags, or the ``config`` of a ``results.json``
        (:meth:`to_dict`'s layout; missing keys keep their defaults). ``gcg`` / ``finetune`` are true or false;
        the ``gcg_*`` / ``finetune_*`` keys set that attack's settings and are not used while it is off. An unknown
        key or a bad value raises :class:`bft.config.ConfigError` (a ``ValueError``) naming the key."""
        data = dict(data or {})
        valid = cls.flat_keys()
        for key in data:
            if key not in valid:
                hint = difflib.get_close_matches(str(key), valid, n=1)
                raise ConfigError(
                    f"unknown config key {key!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; valid keys here: {', '.join(sorted(valid))}"
                )
        settings: dict = {attack: {} for attack in _ATTACKS}
        for (attack, name), flat in _FLAT_KEY.items():
            if flat in data:
                settings[attack][name] = data.pop(flat)
        for attack in _ATTACKS:
            on = data.get(attack)
            if on is not None and not isinstance(on, bool):
                raise ConfigError(f"{attack} must be true or false, got {on!r}")
            built = _build_attack(attack, settings[attack]) if on or settings[attack] else None  # checked even if off
            data[attack] = built if on else None
        return build_dataclass(cls, data)

    def to_dict(self) -> dict:
        """Flat keys, which :meth:`from_dict` reads back; an attack that is off shows the settings it would run with."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ATTACKS:
                out[f.name] = value is not None
                settings = value if value is not None else _attack_defaults(f.name)
                out.update(
                    {
                        flat: copy.deepcopy(getattr(settings, name))
                        for (attack, name), flat in _FLAT_KEY.items()
                        if attack == f.name
                    }
                )
            elif f.name == "generation":
                out[f.name] = value.to_dict()
            else:
                out[f.name] = copy.deepcopy(value)
        return out


# --------------------------------------------------------------------------------------------------- I/O helpers


def write_results(results: dict, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / RESULTS_FILE
    atomic_write_bytes(path, json.dumps(results, indent=1, ensure_ascii=False, default=_json_default).encode("utf-8"))
    return path


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def load_results(path: str | os.PathLike) -> dict:
    """Read ``results.json`` (or a directory containing it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} at {path}; pass the --out directory of an earlier `bft eval` run")
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("format") != "bft-eval" or "records" not in results:
        raise ValueError(f"{path} is not a bft eval results file")
    return results


# ----------------------------------------------------------------------------------------------------- data


def _load_rows(name: str, limit: int | None, seed: int, split: str | None = None) -> list[dict]:
    ds = data.load(name, limit=limit, seed=seed, split=split)
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------------------------------- judging


def build_judges(specs: Sequence[str], **kwargs) -> dict[str, Judge]:
    """``{name: judge}``; the keyword judge is always included."""
    judges: dict[str, Judge] = {"keyword": KeywordJudge()}
    for spec in specs:
        if spec.strip().lower() == "keyword":
            continue
        judge = judge_from_spec(spec, **kwargs)
        judges[judge.name] = judge
    return judges


def _judged_text(record: dict, judge_text: str) -> str:
    if judge_text == "full":
        return (record.get("prefill") or "") + record["continuation"]
    return record["continuation"]


def judge_results(results: dict, judges: dict[str, Judge], threeway=None) -> dict:
    """(Re)compute ``judgements`` of every record in place with ``judges`` and the three-way judge (or record why
    it is unavailable in ``results["notes"]``). Returns ``results``."""
    judge_text = results["config"].get("judge_text", "continuation")
    groups = [(s, a, recs) for s, attacks in results["records"].items() for a, recs in attacks.items() if recs]
    for _system, _attack, records in groups:
        prompts = [r["prompt"] for r in records]
        texts = [_judged_text(r, judge_text) for r in records]
        for r in records:
            r["judgements"] = {}
        for name, judge in judges.items():
            result = judge.evaluate(prompts, texts)
            for i, (r, v) in enumerate(zip(records, result.verdicts)):
                r["judgements"][name] = v
                if result.raw is not None:
                    r.setdefault("judge_raw", {})[name] = result.raw[i]
        if threeway is not None:  # always the model's own tokens: a prefill restates the request (on-topic)
            own = [r["continuation"] for r in records]
            labels = threeway.classify(prompts, own, [r.get("reference") or None for r in records])
            for r, label in zip(records, labels):
                r["judgements"]["threeway"] = label
    results["judges"] = list(judges) + (["threeway"] if threeway is not None else [])
    return results


def make_threeway(config: EvalConfig, notes: list[str]):
    """The three-way judge, or None with a note saying why it is unavailable."""
    if not config.threeway:
        return None
    try:
        judge = ThreeWayJudge(embedding_model=config.embedding_model)
        judge.embed(["probe"])  # load now so a missing model is reported before hours of generation
        return judge
    except (ImportError, FileNotFoundError, OSError, ValueError) as exc:
        notes.append(f"three-way judge unavailable: {type(exc).__name__}: {exc}")
        warnings.warn(notes[-1], stacklevel=2)
        return None


# ----------------------------------------------------------------------------------------------------- summary


def _rates(records: list[dict], judge_names: Sequence[str]) -> dict:
    out: dict = {"n": len(records)}
    for name in judge_names:
        values = [r["judgements"].get(name) for r in records if name in r.get("judgements", {})]
        if not values:
            continue
        if name == "threeway":
            n = len(values)
            out["threeway"] = {lab: values.count(lab) / n for lab in ("on_topic", "refusal", "off_topic")}
        else:
            out[name] = sum(bool(v) for v in values) / len(values)
    return out


def summarize(results: dict) -> dict:
    """Metrics per system from the stored records and measures (no model needed). Stored in ``results["summary"]``.
    The primary judge is the one ``config.primary_judge`` names (:func:`bft.eval.judges.choose_primary_judge`)."""
    judge_names = results.get("judges", ["keyword"])
    setting = (results.get("config") or {}).get("primary_judge")
    primary = choose_primary_judge(setting, [j for j in judge_names if j != "threeway"])
    summary: dict = {"primary_judge": primary, "systems": {}}
    for system, attacks in results["records"].items():
        s: dict = {}
        prefill = attacks.get("prefill") or []
        if prefill:
            s["prefill"] = {}
            for k in _ordered_ks(r["k"] for r in prefill):
                s["prefill"][str(k)] = _rates([r for r in prefill if r["k"] == k], judge_names)
            deepest = _ordered_ks(r["k"] for r in prefill)[-1]
            chosen = [r for r in prefill if r["k"] == deepest]
            s["deliberation"] = {
                "k": deepest,
                "judge": primary,
                **deliberation_table([r["continuation"] for r in chosen], [r["judgements"][primary] for r in chosen]),
            }
        for attack in ("gcg", "finetune"):
            if attacks.get(attack):
                s[attack] = _rates(attacks[attack], judge_names)
        s.update({k: v for k, v in results.get("measures", {}).get(system, {}).items()})
        summary["systems"][system] = s
    results["summary"] = summary
    return summary


def _ordered_ks(ks) -> list:
    unique = list(dict.fromkeys(ks))
    return sorted(unique, key=lambda k: (k == "full", k if isinstance(k, int) else 0))


# ----------------------------------------------------------------------------------------------------- running


def _prefill_jobs(rows: list[dict], config: EvalConfig) -> tuple[list[str], list[str]]:
    prompts = [r["prompt"] for r in rows]
    if config.prefill_text is not None:
        refs = [config.prefill_text] * len(rows)
    else:
        refs = [(r.get("response") or "") for r in rows]
    return prompts, refs


def _likelihood(system: System, prompts, references, config: EvalConfig, base_continuations) -> dict:
    if base_continuations is not None:
        keep = [i for i, c in enumerate(base_continuations) if c.strip()]
        ctx, conts, prefill = (
            [prompts[i] for i in keep],
            [base_continuations[i] for i in keep],
            [references[i] for i in keep],
        )
        kind = "base"
    else:
        keep = [i for i, r in enumerate(references) if r.strip()]
        ctx, conts, prefill, kind = [prompts[i] for i in keep], [references[i] for i in keep], None, "dataset"
    if not keep:
        return {"unavailable": "no reference continuations to score"}
    lps = continuation_logprobs(
        system.model,
        system.tokenizer,
        ctx,
        conts,
        base_model=system.base_model,
        alpha=system.alpha,
        batch_size=config.generation.batch_size,
        prefill=prefill,
        system=system.system_prompt,
        form=system.form,
    )
    return {"reference": kind, **summarize_logprobs(lps)}


def _base_reference_continuations(base_model, tokenizer, prompts, references, config: EvalConfig, system_prompt=None):
    """The base model's own greedy continuation after the full dataset target: a harmful continuation that reaches
    the later positions the paper is about, where a dataset target (a few words of "Sure, here is ...") ends."""
    inputs = [
        encode_chat(tokenizer, p, system=system_prompt).input_ids + prefill_ids(tokenizer, r, "full")
        for p, r in zip(prompts, references)
    ]
    settings = GenerationSettings(max_new_tokens=config.likelihood_tokens, batch_size=config.generation.batch_size)
    outs = generate_from_ids(base_model, tokenizer, inputs, settings, desc="base reference")
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def run_eval(
    systems: Sequence[System],
    config: EvalConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    base_model=None,
    judges: dict[str, Judge] | None = None,
    threeway="auto",
    rows: list[dict] | None = None,
    utility_rows: dict | None = None,
    finetune_rows: list[dict] | None = None,
    judge_kwargs: dict | None = None,
) -> dict:
    """Run every configured attack and measure on every system; judge; summarise; write outputs to ``out_dir``.

    ``rows`` / ``utility_rows`` (``{"perplexity": [...], "gsm8k": [...]}``) / ``finetune_rows`` override the data
    loaded through :func:`bft.hf.data.load` (tests, custom data). ``threeway="auto"`` builds the three-way judge from
    the config; pass a judge object or None to override. ``judge_kwargs`` (``device``, ``dtype``, ``batch_size``)
    go to the model judges of ``config.judges``. Returns the results dict (also in ``results.json``).
    """
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    # the primary judge must be one that runs: checked before hours of generation, not after
    choose_primary_judge(config.primary_judge, list(judges) if judges is not None else config.judge_specs())
    notes: list[str] = []
    started = time.time()
    rows = rows if rows is not None else _load_rows(config.dataset, config.limit, config.seed)
    if not rows:
        raise ValueError(f"dataset {config.dataset!r} gave no rows")
    prompts, references = _prefill_jobs(rows, config)
    results: dict = {
        "format": "bft-eval",
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"python": platform.python_version(), **package_versions()},
        "config": config.to_dict(),
        "systems": {s.name: s.describe() for s in systems},
        "records": {s.name: {} for s in systems},
        "measures": {s.name: {} for s in systems},
        "notes": notes,
    }

    # reference continuations for the likelihood measure
    base_conts = None
    if config.likelihood:
        use_base = config.likelihood_reference == "base" or (
            config.likelihood_reference == "auto" and base_model is not None
        )
        if use_base:
            if base_model is None:
                raise ValueError("likelihood_reference='base' needs a base model (--base)")
            if not all(r.strip() for r in references):
                raise ValueError("likelihood_reference='base' needs a target response for every prompt")
            base_conts = _base_reference_continuations(base_model, systems[0].tokenizer, prompts, references, config)
            results["likelihood_references"] = [
                {"prompt": p, "prefill": r, "continuation": c} for p, r, c in zip(prompts, references, base_conts)
            ]

    gcg_cache: dict = {}  # systems that share a model (baseline and every contrastive α) share its GCG suffixes
    for system in systems:
        recs = results["records"][system.name]
        measures = results["measures"][system.name]
        if config.prefill_ks:
            recs["prefill"] = _run_prefill(system, prompts, references, config)
        if config.gcg:
            recs["gcg"] = _run_gcg(
                system, prompts[: config.gcg_limit], references[: config.gcg_limit], config, gcg_cache
            )
        if config.finetune:
            if system.contrastive:
                notes.append(f"{system.name}: fine-tuning attack skipped (it attacks a model, not a decoding rule)")
            else:
                recs["finetune"], measures["finetune_attack"] = _run_finetune(system, prompts, config, finetune_rows)
        if config.likelihood:
            try:
                measures["likelihood"] = _likelihood(system, prompts, references, config, base_conts)
            except ValueError as exc:
                measures["likelihood"] = {"unavailable": str(exc)}
        measures["utility"] = _run_utility(system, config, utility_rows, notes)
        if out_dir is not None:  # checkpoint after every system: a crash later loses nothing generated so far
            write_results(results, out_dir)

    judges = judges if judges is not None else build_judges(config.judges, **(judge_kwargs or {}))
    threeway = make_threeway(config, notes) if threeway == "auto" else threeway
    judge_results(results, judges, threeway)
    summarize(results)
    results["elapsed_s"] = round(time.time() - started, 1)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def _run_prefill(system: System, prompts, references, config: EvalConfig) -> list[dict]:
    return [asdict(r) for r in run_prefill_attack(system, prompts, references, config.prefill_ks, config.generation)]


def _run_gcg(system: System, prompts, targets, config: EvalConfig, cache: dict | None = None) -> list[dict]:
    """GCG optimises the suffix against ``system.model`` (for contrastive decoding: the aligned model, a transfer
    attack on the decoding rule), then ``system`` answers the suffixed prompt. ``cache`` reuses the suffixes of an
    earlier system with the same model and system prompt (the optimisation is deterministic given the seed)."""
    records = []
    inputs = []
    for prompt, target in zip(prompts, targets):
        if not target.strip():
            raise ValueError(f"GCG needs a target response for every prompt (missing for {prompt[:60]!r})")
        key = (id(system.model), system.system_prompt, prompt, target)
        res = cache.get(key) if cache is not None else None
        if res is None:
            res = gcg.run_gcg(
                system.model, system.tokenizer, prompt, target, config.gcg, system_prompt=system.system_prompt
            )
            if cache is not None:
                cache[key] = res
        inputs.append(res.input_ids)
        records.append(
            {
                "prompt": prompt,
                "reference": target,
                "suffix": res.suffix,
                "suffix_ids": res.suffix_ids,
                "gcg_losses": res.losses,
                "gcg_best_loss": res.best_loss,
                "prefill": "",
            }
        )
    outs = system.generate(inputs, config.generation, desc=f"gcg {system.name}")
    for rec, out in zip(records, outs):
        rec["continuation"] = system.decode(out)
        rec["continuation_tokens"] = len(out)
    return records


def _run_finetune(system: System, prompts, config: EvalConfig, finetune_rows):
    rows = (
        finetune_rows
        if finetune_rows is not None
        else _load_rows(config.finetune_dataset, config.finetune_limit, config.seed)
    )
    attacked, log = lora_finetune(
        system.model, system.tokenizer, rows, config.finetune, system_prompt=system.system_prompt
    )
    try:
        attacked_system = System(f"{system.name}+lora", attacked, system.tokenizer, system_prompt=system.system_prompt)
        records = harmful_responses(attacked_system, prompts, config.generation)
        if config.finetune_save:
            target = Path(config.finetune_save) / _slug(system.name)
            save_merged(attacked, system.tokenizer, target)
            log["saved_to"] = str(target)
    finally:
        attacked.unload()  # remove the adapters: the system's model is the original again
    return records, {**log, "dataset": config.finetune_dataset, "n_train": len(rows)}


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "system"


def _is_named(dataset: str, name: str) -> bool:
    """``dataset`` is the named dataset ``name`` of :func:`bft.hf.data.load` (not a file or hub id)."""
    return dataset.lower().replace("-", "").replace("_", "") == name and not os.path.exists(dataset)


def _run_utility(system: System, config: EvalConfig, utility_rows, notes: list[str]) -> dict:
    out: dict = {}
    rows = utility_rows or {}
    if "perplexity" in config.utility:
        data = rows.get("perplexity")
        if data is None:
            split = config.utility_split if _is_named(config.perplexity_dataset, "gsm8k") else None
            data = _load_rows(config.perplexity_dataset, config.utility_limit, config.seed, split)
        prompts = [r["prompt"] for r in data]
        responses = [r.get("response") or r.get("answer") or "" for r in data]
        out["perplexity"] = utility.perplexity(system, prompts, responses, batch_size=config.generation.batch_size)
        out["perplexity"]["dataset"] = config.perplexity_dataset if "perplexity" not in rows else "custom"
    if "gsm8k" in config.utility:
        data = rows.get("gsm8k")
        if data is None:
            data = _load_rows("gsm8k", config.utility_limit, config.seed, config.utility_split)
        settings = GenerationSettings(
            max_new_tokens=config.gsm8k_max_new_tokens, batch_size=config.generation.batch_size
        )
        out["gsm8k"] = utility.gsm8k_exact_match(
            system, [r["prompt"] for r in data], [r["answer"] for r in data], settings
        )
    if config.overrefusal_limit is not None:
        data = rows.get("overrefusal")
        if data is None:
            data = load_overrefusal_prompts(limit=config.overrefusal_limit)
            data += load_overrefusal_prompts(expected="refuse") if config.overrefusal_contrast else []
        measured = overrefusal(system, data, settings=config.generation)
        out["overrefusal"] = {**(measured.pop("overrefusal") or {}), **measured}
    if config.lm_eval_tasks:
        if system.contrastive:
            out["lm_eval"] = {"unavailable": "lm-eval-harness scores plain models; not run for contrastive decoding"}
        else:
            try:
                out["lm_eval"] = utility.run_lm_eval(
                    system.model,
                    system.tokenizer,
                    config.lm_eval_tasks,
                    limit=config.lm_eval_limit,
                    include_path=config.lm_eval_include_path,
                )
            except utility.UtilityUnavailable as exc:
                out["lm_eval"] = {"unavailable": str(exc)}
                notes.append(f"{system.name}: lm-eval skipped: {exc}")
                print(f"[bft eval] lm-eval skipped: {exc}")
    return out


# ----------------------------------------------------------------------------------------------------- outputs


def write_outputs(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, report.md and the PNG plots."""
    out = Path(out_dir)
    paths = {"results": write_results(results, out)}
    md = out / "report.md"
    atomic_write_bytes(md, render_markdown(results).encode("utf-8"))
    paths["report"] = md
    paths.update(write_plots(results, out))
    return paths


def rejudge(
    results_dir: str | os.PathLike,
    judge_specs: Sequence[str] | None = None,
    *,
    primary_judge: str | None = None,
    threeway="auto",
    out_dir: str | os.PathLike | None = None,
    judge_kwargs: dict | None = None,
) -> dict:
    """Re-run the judges over a stored run (no generation), recompute the summary and rewrite the outputs.

    ``judge_specs`` defaults to the judges of the original config, ``primary_judge`` to its primary judge setting
    (checked against the judges that run, before any is loaded). Output goes back to ``results_dir`` unless
    ``out_dir`` is given.
    """
    results = load_results(results_dir)
    specs = list(judge_specs) if judge_specs is not None else list(results["config"].get("judges", ["keyword"]))
    results["config"]["judges"] = specs
    if primary_judge is not None:
        results["config"]["primary_judge"] = primary_judge
    config = EvalConfig.from_dict(results["config"])  # the stored settings, validated with the new judges
    notes = results.setdefault("notes", [])
    judges = build_judges(specs, **(judge_kwargs or {}))
    if threeway == "auto":
        threeway = make_threeway(config, notes)
    judge_results(results, judges, threeway)
    summarize(results)
    results["rejudged"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_outputs(
        results,
        out_dir if out_dir is not None else (results_dir if Path(results_dir).is_dir() else Path(results_dir).parent),
    )
    return results
