"""The figures of the position-wise analysis (paper Fig. 1, 2, 3) and the writer of ``analysis.json``."""

from __future__ import annotations

import os

from bft.atomic import atomic_save_figure, atomic_write_json

__all__ = ["plot_analysis", "write_analysis"]

_LABELS = {
    "kl": "KL(aligned ‖ base) [nats]",
    "js": "Jensen-Shannon [nats]",
    "top_overlap": "top-n overlap (fraction)",
    "bf_count_top": "base-favored among aligned top-n",
    "bf_count": "base-favored over full vocabulary",
    "kl_decoded": "KL(decoded ‖ base) [nats]",
}


def plot_analysis(result: dict, out_dir: str) -> list[str]:
    """Write fig1_position_profile.png, fig2_base_favored_tokens.png and (when contrastive runs exist)
    fig3_contrastive_kl.png under ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    return [p for plot in (_fig1_profile, _fig2_tokens, _fig3_contrastive) for p in plot(plt, result, out_dir)]


def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _fig1_profile(plt, result: dict, out_dir: str) -> list[str]:
    """Fig. 1: metrics vs position, every group under normal decoding."""
    summary, top_n = result["summary"], result["config"]["top_n"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, name in zip(axes.flat, ["kl", "js", "top_overlap", "bf_count_top", "bf_count", None]):
        for key, entry in sorted(summary.items()):
            if not key.endswith("/normal"):
                continue
            group = key.split("/")[0]
            ys = entry["n"] if name is None else entry[name]
            xs = [t for t, y in enumerate(ys) if y is not None]
            ax.plot(xs, [ys[t] for t in xs], marker=".", label=group)
        label = "prompts still generating" if name is None else _LABELS[name].replace("top-n", f"top-{top_n}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("response position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Position-wise aligned vs base (normal decoding)")
    return [_save(plt, fig, out_dir, "fig1_position_profile.png")]


def _fig2_tokens(plt, result: dict, out_dir: str) -> list[str]:
    """Fig. 2: the most frequent base-favored tokens among the aligned top-n, per group."""
    top_n = result["config"]["top_n"]
    keys = [k for k in sorted(result["top_base_favored"]) if k.endswith("/normal")]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 6.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        items = result["top_base_favored"][key]["in_aligned_top_n"][:20][::-1]
        ax.barh(range(len(items)), [it["count"] for it in items], color="tab:red")
        ax.set_yticks(range(len(items)), [repr(it["token"]) for it in items], fontsize=8)
        ax.set_xlabel("positions where base-favored")
        ax.set_title(f"{key.split('/')[0]}: most frequent base-favored tokens\n(in aligned top-{top_n})", fontsize=10)
    return [_save(plt, fig, out_dir, "fig2_base_favored_tokens.png")]


def _fig3_contrastive(plt, result: dict, out_dir: str) -> list[str]:
    """Fig. 3: KL(decoded ‖ base) vs position, normal vs contrastive decoding."""
    summary = result["summary"]
    groups = sorted({k.split("/")[0] for k in summary if k.endswith("/contrastive")})
    if not groups:
        return []
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    alpha = result["config"]["alpha"]
    for ax, group in zip(axes[0], groups):
        for mode, color in (("normal", "tab:blue"), ("contrastive", "tab:orange")):
            entry = summary.get(f"{group}/{mode}")
            if entry is None:
                continue
            ys = entry["kl_decoded"]
            xs = [t for t, y in enumerate(ys) if y is not None]
            label = "normal decoding" if mode == "normal" else f"contrastive decoding (α={alpha:g})"
            ax.plot(xs, [ys[t] for t in xs], marker=".", color=color, label=label)
            if mode == "contrastive":
                ys = entry["kl"]
                ax.plot(
                    xs,
                    [ys[t] for t in xs],
                    ls="--",
                    color=color,
                    alpha=0.6,
                    label="KL(aligned ‖ base) on contrastive tokens",
                )
        ax.set_title(f"{group}: KL(decoded ‖ base) per position", fontsize=10)
        ax.set_xlabel("response position")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(plt, fig, out_dir, "fig3_contrastive_kl.png")]


def write_analysis(result: dict, out_dir: str, *, plots: bool = True) -> dict[str, str]:
    """Write ``analysis.json`` (atomically) and the plots; returns {"json": path, "plots": [...]}."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "analysis.json")
    atomic_write_json(path, result, indent=1)
    return {"json": path, "plots": plot_analysis(result, out_dir) if plots else []}
