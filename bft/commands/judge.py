"""``bft judge fit``: fit the offline harm judge on PyRIT's human labels and measure it on the held-out split.

    bft judge fit                                  # rewrite the packaged coefficients bft/eval/data/harm_judge.json
    bft judge fit --out /tmp/harm.json --compare   # elsewhere; also fit and measure the MLP and the MiniLM designs
    bft judge fit --report benchmarks/results/harm_judge.json --plot benchmarks/results/harm_judge_calibration.png

Deterministic (fixed split, fixed folds, float64 L-BFGS); about 8 minutes on 2 CPU cores, almost all of it running
SmolLM2-135M over ~1,000 (request, response) pairs (and MiniLM over the held-out rows, for the three-way judge).
Use the result with ``--judge harm:PATH`` (``harm`` alone = the packaged file).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["add_arguments", "run", "fit_and_measure"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    fit = sub.add_parser("fit", help="fit the harm judge on PyRIT's human-labelled scorer-evaluation sets")
    fit.add_argument("--out", help="coefficients JSON to write (default: the packaged bft/eval/data/harm_judge.json)")
    fit.add_argument("--report", help="also write the held-out figures (JSON) here")
    fit.add_argument("--plot", help="also write the held-out calibration plot (PNG) here")
    fit.add_argument(
        "--compare",
        action="store_true",
        help="also fit an MLP on the same features and the MiniLM pair-feature design, and report them beside the chosen one",
    )
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def fit_and_measure(*, compare: bool = False, log=print) -> tuple[dict, dict]:
    """(model dict, held-out figures) — the whole fit, as ``bft judge fit`` runs it."""
    import time

    import torch

    from bft.eval import harm_fit
    from bft.eval.harm_data import load_harm_rows
    from bft.eval.harm_judge import featurize, minilm_featurize, predict_proba, shared_lm

    start = time.perf_counter()
    rows = load_harm_rows()
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    log(f"[bft judge] {len(rows)} labelled rows: {len(train)} train, {len(held)} held-out; SmolLM2 states ...")
    lm = shared_lm()
    s_train, s_held = harm_fit.lm_states(train, lm), harm_fit.lm_states(held, lm)
    log(f"[bft judge] states in {time.perf_counter() - start:.0f}s; MiniLM embeddings (three-way judge) ...")
    e_held = harm_fit.embed_rows(held)
    q_train, r_train = [r["objective"] for r in train], [r["response"] for r in train]
    q_held, r_held = [r["objective"] for r in held], [r["response"] for r in held]
    x = featurize(q_train, r_train, states=s_train)
    y = torch.tensor([r["harmful"] for r in train], dtype=torch.float64)
    model = harm_fit.fit_harm_model(x, y, q_train, log=log)
    model["cv_accuracy"] = round(harm_fit.cv_accuracy(model, x, y, q_train), 5)
    log(f"[harm fit] chosen l2={model['l2']:g}: cross-validated accuracy {model['cv_accuracy']:.3f}")
    extra = {}
    if compare:
        xh = featurize(q_held, r_held, states=s_held)
        extra["mlp"] = harm_fit.fit_mlp_model(x, y, q_train, log=log)(xh).tolist()
        e_train = harm_fit.embed_rows(train)
        xm = minilm_featurize(q_train, r_train, embeddings=e_train)
        minilm = harm_fit.fit_harm_model(xm, y, q_train, log=lambda s: None, lm_spec=None)
        log(
            f"[harm fit] minilm pair-feature design: cross-validated accuracy "
            f"{harm_fit.cv_accuracy(minilm, xm, y, q_train):.3f}"
        )
        extra["minilm-logistic"] = predict_proba(minilm, minilm_featurize(q_held, r_held, embeddings=e_held)).tolist()
    figures = harm_fit.evaluate(held, s_held, e_held, model, extra)
    figures["_truth"] = [bool(r["harmful"]) for r in held]
    figures["_extra_probs"] = extra
    log(f"[bft judge] fitted and measured in {time.perf_counter() - start:.0f}s")
    return model, figures


def _table(figures: dict) -> str:
    keys = ("accuracy", "precision", "recall", "f1", "brier", "ece")
    lines = ["| judge | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in figures.items():
        if name.startswith("_"):
            continue
        cells = [
            "n/a" if m.get(k) is None or (isinstance(m[k], float) and math.isnan(m[k])) else f"{m[k]:.3f}" for k in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from bft.atomic import atomic_write_json
    from bft.eval.harm_fit import calibration_plot
    from bft.eval.harm_judge import DEFAULT_MODEL_PATH

    if args.threads:
        torch.set_num_threads(args.threads)
    model, figures = fit_and_measure(compare=args.compare)
    out = args.out or DEFAULT_MODEL_PATH
    atomic_write_json(out, model, indent=None)
    n = figures["harm"]["n"]
    print(f"[bft judge] held-out figures (n={n}, harmful = mean human score >= 0.5):\n{_table(figures)}")
    print(f"[bft judge] coefficients written to {out} (l2={model['l2']:g})")
    if args.report:
        atomic_write_json(args.report, {k: v for k, v in figures.items() if not k.startswith("_")})
    if args.plot:
        curves = {"harm judge (SmolLM2 logistic)": figures["_probs"], **figures["_extra_probs"]}
        print(f"[bft judge] calibration plot: {calibration_plot(figures['_truth'], curves, args.plot)}")
    return 0
