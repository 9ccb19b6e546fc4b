"""``bft eval``: attacks, judges and utility on baseline / contrastive / trained systems (docs/eval.md).

    bft eval --aligned smollm2 --base BASE --trained OUT/student --limit 32 --alphas 0.5,1,2,5,10 --out runs/eval
    bft eval config.yaml --out runs/eval            # the same keys in YAML (flags override the file)
    bft eval --rejudge runs/eval --judge llamaguard:meta-llama/Llama-Guard-3-8B

Systems: ``baseline`` = the aligned model decoded plainly; ``contrastive α=A`` = the aligned model with Eq. 7
against ``--base`` (α = ``--alpha`` and every α of ``--alphas``); ``trained`` = each ``--trained`` model.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from bft.config import accept_overrides, apply_overrides, load_yaml_mapping
from bft.eval import runner
from bft.eval.generation import GenerationSettings, System, contrastive_name
from bft.eval.runner import EvalConfig
from bft.hf import models as loader

__all__ = ["add_arguments", "run", "build_config", "build_systems"]

# YAML-only / model keys that are not EvalConfig fields
_MODEL_KEYS = ("aligned", "base", "trained", "gguf_file", "device", "dtype", "system_prompt", "out")


def _csv(cast):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [cast(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r}: {exc}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="YAML file with any of the options below (underscored keys); "
        "KEY=VALUE arguments anywhere override it (e.g. generation.top_p=0.6 limit=64)",
    )
    accept_overrides(parser)
    parser.add_argument("--out", help="output directory (results.json, report.md, *.png)")
    parser.add_argument("--rejudge", metavar="DIR", help="re-judge a stored run (no generation) and rewrite its report")
    m = parser.add_argument_group("models")
    m.add_argument("--aligned", help="aligned (instruct) model: hub id, local path, .gguf or 'smollm2' (row: baseline)")
    m.add_argument("--base", help="base model for contrastive decoding and the likelihood reference")
    m.add_argument("--trained", action="append", help="BFT-trained model(s) to evaluate (row: trained); repeatable")
    m.add_argument("--gguf-file", help="GGUF file name inside the model directories")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    m.add_argument("--dtype", help="bf16, fp16, fp32 or auto")
    m.add_argument("--system-prompt", help="system prompt for every chat")
    d = parser.add_argument_group("data and decoding")
    d.add_argument("--dataset", help="harmful prompts for bft.hf.data.load (default advbench)")
    d.add_argument("--limit", type=int, help="number of harmful prompts (default 32; 0 = all)")
    d.add_argument("--seed", type=int, help="seeds sampling, the GSM8K generator, GCG and the fine-tuning attack")
    d.add_argument(
        "--prefill-k",
        type=_csv(str),
        dest="prefill_ks",
        help="prefill lengths in response tokens, 0 = plain request, full = whole target (default 4,5,10,20,40,full)",
    )
    d.add_argument("--prefill-text", help="one fixed prefill for every prompt (datasets without target responses)")
    d.add_argument("--judge-text", choices=["continuation", "full"], help="judge the continuation or prefill+it")
    d.add_argument("--max-new-tokens", type=int)
    d.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    d.add_argument("--temperature", type=float)
    d.add_argument("--top-p", type=float)
    d.add_argument("--batch-size", type=int)
    j = parser.add_argument_group("judges and measures")
    j.add_argument(
        "--judge",
        action="append",
        dest="judges",
        help="keyword (always on), harm[:PATH] (on unless --no-harm-judge), llamaguard:PATH, harmbench:PATH, "
        "strongreject:PATH, qwen3guard:PATH; repeatable",
    )
    j.add_argument(
        "--no-harm-judge",
        dest="harm_judge",
        action="store_false",
        default=None,
        help="skip the offline harm judge (calibrated to human labels; the primary offline measure)",
    )
    j.add_argument(
        "--primary-judge",
        metavar="NAME",
        help="the judge whose ASR fills the paper-shaped table, HRR and Table 5: keyword, harm or a --judge "
        "given (its spec or kind, e.g. llamaguard); default harm, or keyword with --no-harm-judge",
    )
    j.add_argument(
        "--no-threeway",
        dest="threeway",
        action="store_false",
        default=None,
        help="skip the three-way (refusal / on-topic / off-topic) judge",
    )
    j.add_argument("--embedding-model", help="sentence-embedding model for the three-way judge")
    j.add_argument(
        "--no-likelihood",
        dest="likelihood",
        action="store_false",
        default=None,
        help="skip the judge-free likelihood measure",
    )
    j.add_argument("--likelihood-reference", choices=["auto", "base", "dataset"])
    j.add_argument(
        "--likelihood-tokens", type=int, help="length of the base model's reference continuation (default 64)"
    )
    j.add_argument("--alpha", type=float, help="α of the contrastive row (default 1)")
    j.add_argument("--alphas", type=_csv(float), help="α sweep for contrastive decoding, e.g. 0.5,1,2,5,10")
    j.add_argument(
        "--forms",
        type=_csv(str),
        help="Eq. 7 forms: logprobs (default), logits (the paper's text), or logprobs,logits for both side by side",
    )
    a = parser.add_argument_group("GCG and fine-tuning attacks")
    a.add_argument("--gcg", action="store_true", default=None, help="run the GCG attack")
    a.add_argument("--gcg-limit", type=int, help="prompts attacked with GCG (default 4)")
    a.add_argument("--gcg-steps", type=int)
    a.add_argument("--gcg-search-width", type=int)
    a.add_argument("--gcg-topk", type=int)
    a.add_argument("--gcg-suffix", help="initial adversarial suffix (default 20 x '! ')")
    a.add_argument(
        "--finetune",
        "--finetune-attack",
        dest="finetune",
        action="store_true",
        default=None,
        help="LoRA fine-tuning attack, then HRR",
    )
    a.add_argument("--finetune-dataset", help="benign instruction data (default dolly)")
    a.add_argument("--finetune-limit", type=int)
    a.add_argument("--finetune-rank", type=int)
    a.add_argument("--finetune-lr", type=float)
    a.add_argument("--finetune-epochs", type=float)
    a.add_argument("--finetune-batch-size", type=int)
    a.add_argument("--finetune-micro-batch-size", type=int)
    a.add_argument("--finetune-max-length", type=int, help="tokens per training example (default 512)")
    a.add_argument("--finetune-save", help="save each attacked model (merged) under this directory")
    u = parser.add_argument_group("utility")
    u.add_argument("--utility", type=_csv(str), help="perplexity,gsm8k (default both; 'none' for neither)")
    u.add_argument("--perplexity-dataset", help="benign prompt/response data for perplexity (default gsm8k)")
    u.add_argument("--utility-limit", type=int, help="benign examples per utility measure (default 16)")
    u.add_argument("--utility-split", help="split of gsm8k for both utility measures (default test)")
    u.add_argument("--gsm8k-max-new-tokens", type=int, help="answer length budget for GSM8K (default 256)")
    u.add_argument("--lm-eval-tasks", type=_csv(str), help="lm-eval-harness tasks (optional extra)")
    u.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task (default: all)")
    u.add_argument("--lm-eval-include-path", help="folder of local lm-eval task YAMLs (offline tasks)")
    u.add_argument(
        "--overrefusal-limit",
        type=int,
        help="measure over-refusal on N safe prompts (bft.eval.overrefusal; default off)",
    )
    u.add_argument(
        "--no-overrefusal-contrast",
        dest="overrefusal_contrast",
        action="store_false",
        default=None,
        help="over-refusal without the 25 harmful contrast prompts",
    )


def build_config(args) -> tuple:
    """``(EvalConfig, model options dict)`` from the YAML file (if any) overridden by the flags given, then by
    ``key=value`` overrides (``generation.top_p=0.6``), through :mod:`bft.config` like every bft command. The
    judges include the harm judge unless ``--no-harm-judge`` (:func:`with_harm_judge`)."""
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "config", None) and "=" in args.config and not os.path.exists(args.config):
        overrides.insert(0, args.config)  # a KEY=VALUE override in CONFIG's place
        args.config = None
    raw = load_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    raw = apply_overrides(raw, overrides)
    gen = dict(raw.pop("generation", None) or {})
    flags = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("config", "rejudge", "command", "overrides", "harm_judge")
    }
    if "sample" in flags:
        flags["do_sample"] = flags.pop("sample")
    merged = {**raw, **flags}
    if merged.get("utility") == ["none"]:
        merged["utility"] = []
    if merged.get("limit") == 0:
        merged["limit"] = None
    config_fields = {f.name for f in fields(EvalConfig)}
    for key in list(merged):
        if key in {f.name for f in fields(GenerationSettings)}:  # "seed" is both: sampling and data / GCG / LoRA
            gen[key] = merged[key] if key in config_fields else merged.pop(key)
    models = {k: merged.pop(k) for k in _MODEL_KEYS if k in merged}
    merged["judges"] = with_harm_judge(merged.get("judges", EvalConfig().judges), args)
    config = EvalConfig.from_dict({**merged, "generation": gen})
    if isinstance(models.get("trained"), str):
        models["trained"] = [models["trained"]]
    return config, models


def build_systems(models: dict, config) -> tuple[list, object]:
    """Load the models and return ``([System, ...], base_model)``."""
    if not models.get("aligned"):
        raise ValueError("bft eval needs --aligned MODEL (or 'aligned:' in the config)")
    kw = {"gguf_file": models.get("gguf_file"), "device": models.get("device"), "dtype": models.get("dtype")}
    sp = models.get("system_prompt")
    aligned, tokenizer = loader.load_model_and_tokenizer(models["aligned"], **kw)
    systems = [System("baseline", aligned, tokenizer, system_prompt=sp)]
    base = None
    if models.get("base"):
        base, base_tok = loader.load_model_and_tokenizer(models["base"], **kw)
        loader.check_same_vocab(tokenizer, base_tok, aligned, base)
        alphas = list(dict.fromkeys([config.alpha] + list(config.alphas)))
        for form, alpha in ((f, a) for f in config.forms for a in alphas):
            systems.append(
                System(
                    contrastive_name(alpha, form),
                    aligned,
                    tokenizer,
                    base_model=base,
                    alpha=alpha,
                    form=form,
                    system_prompt=sp,
                )
            )
    elif config.alphas:
        raise ValueError("--alphas needs --base (contrastive decoding runs against the base model)")
    trained = models.get("trained") or []
    for path in trained:
        model, tok = loader.load_model_and_tokenizer(path, **kw)
        loader.check_same_vocab(tokenizer, tok, aligned, model)
        name = "trained" if len(trained) == 1 else f"trained:{path}"
        systems.append(System(name, model, tokenizer, system_prompt=sp))
    return systems, base


def with_harm_judge(specs, args) -> list:
    """``specs`` plus ``"harm"`` (the offline harm judge) unless ``--no-harm-judge`` or a ``harm`` spec is there."""
    specs = list(specs or [])
    if getattr(args, "harm_judge", None) is not False and not any(
        str(s).partition(":")[0].strip().lower() == "harm" for s in specs
    ):
        specs.append("harm")
    return specs


def run(args) -> int:
    if args.rejudge:  # model judges go where --device / --dtype say; --no-threeway skips the three-way judge
        judge_kwargs = {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k, None)}
        threeway = None if args.threeway is False else "auto"
        specs = args.judges or runner.load_results(args.rejudge)["config"].get("judges", ["keyword"])
        results = runner.rejudge(
            args.rejudge,
            with_harm_judge(specs, args),
            primary_judge=args.primary_judge,
            threeway=threeway,
            out_dir=args.out,
            judge_kwargs=judge_kwargs,
        )
        print(f"[bft eval] re-judged {args.rejudge} with {results['judges']}; report in {args.out or args.rejudge}")
        return 0
    config, models = build_config(args)
    out = models.get("out")
    if not out:
        print("bft eval: --out DIR is required", file=sys.stderr)
        return 2
    systems, base = build_systems(models, config)
    judge_kwargs = {k: models[k] for k in ("device", "dtype") if models.get(k)}
    results = runner.run_eval(systems, config, out, base_model=base, judge_kwargs=judge_kwargs)
    with open(f"{out}/report.md", encoding="utf-8") as f:
        print(f.read())
    print(f"[bft eval] {len(systems)} systems in {results['elapsed_s']} s; outputs in {out}")
    return 0
