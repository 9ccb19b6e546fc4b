"""``bft judge fit``: fit the offline harm judge on PyRIT's human labels and measure it on the held-out split.

    bft judge fit                                  # rewrite the packaged coefficients bft/eval/data/harm_judge.json
    bft judge fit --out /tmp/harm.json --compare   # elsewhere; also fit and measure the MLP design
    bft judge fit --report runs/harm.json --plot docs/harm_judge_calibration.png

Deterministic (fixed split, fixed folds, float64 L-BFGS); a few minutes on 2 CPU cores, almost all of it embedding
~1,000 responses with MiniLM. Use the result with ``--judge harm:PATH`` (``harm`` alone = the packaged file).
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
    fit.add_argument("--compare", action="store_true", help="also fit the MLP design and report it beside")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def fit_and_measure(*, compare: bool = False, log=print) -> tuple[dict, dict]:
    """(model dict, held-out figures) — the whole fit, as ``bft judge fit`` runs it."""
    import torch

    from bft.eval import harm_fit
    from bft.eval.harm_data import load_harm_rows
    from bft.eval.harm_judge import featurize

    rows = load_harm_rows()
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    log(f"[bft judge] {len(rows)} labelled rows: {len(train)} train, {len(held)} held-out; embedding ...")
    e_train, e_held = harm_fit.embed_rows(train), harm_fit.embed_rows(held)
    x = featurize([r["objective"] for r in train], [r["response"] for r in train], embeddings=e_train)
    y = torch.tensor([r["harmful"] for r in train], dtype=torch.float64)
    objectives = [r["objective"] for r in train]
    model = harm_fit.fit_harm_model(x, y, objectives, log=log)
    extra = {}
    if compare:
        predict = harm_fit.fit_mlp_model(x, y, objectives, log=log)
        xh = featurize([r["objective"] for r in held], [r["response"] for r in held], embeddings=e_held)
        extra["mlp"] = predict(xh).tolist()
    figures = harm_fit.evaluate(held, e_held, model, extra)
    figures["_truth"] = [bool(r["harmful"]) for r in held]
    figures["_extra_probs"] = extra
    return model, figures


def _table(figures: dict) -> str:
    keys = ("accuracy", "precision", "recall", "f1", "brier", "ece")
    lines = ["| judge | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in figures.items():
        if name.startswith("_"):
            continue
        cells = ["n/a" if m.get(k) is None or (isinstance(m[k], float) and math.isnan(m[k])) else f"{m[k]:.3f}"
                 for k in keys]  # fmt: skip
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
        curves = {"harm judge (logistic)": figures["_probs"], **figures["_extra_probs"]}
        print(f"[bft judge] calibration plot: {calibration_plot(figures['_truth'], curves, args.plot)}")
    return 0
