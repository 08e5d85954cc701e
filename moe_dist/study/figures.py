"""The study's PNG figures, drawn from the summaries (never from anything else), small enough to
commit (about 100 dpi, a few hundred KB at most)."""

from __future__ import annotations

import io
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or a server
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

DPI = 100


def _save(fig, path: str) -> str:
    """PNG with a 256-colour palette: plots use few colours, and the file is a third of the RGBA one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def _mean_std(stats: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s["mean"] for s in stats]), np.array([s["std"] for s in stats])


def common_mode_figure(summary: dict[str, Any], path: str) -> str:
    """I(expert; cluster), load CV and dropped fraction against the shared norm S, one line per
    router, error bars one std over seeds."""
    norms = summary["shared_norms"]
    panels = [("mi_label_normalized", "I(expert; cluster) / H(cluster)"), ("load_cv", "load CV"),
              ("dropped_fraction", "dropped fraction (cf 1.25)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    for ax, (metric, title) in zip(axes, panels):
        for i, (arm, metrics) in enumerate(summary["arms"].items()):
            mean, std = _mean_std(metrics[metric])
            style = "--" if arm.startswith("fixed_projection") else "-"
            ax.errorbar(norms, mean, yerr=std, label=arm, linestyle=style, marker="o", markersize=4, capsize=2,
                        color=plt.cm.tab10(i))
        ax.set_xscale("symlog", linthresh=0.5)
        ax.set_xticks(norms)
        ax.set_xticklabels([f"{s:g}" for s in norms])
        ax.set_xlabel("norm S of the shared component")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Common-mode synthetic: K=8 clusters, 8 experts, top-1 (mean ± std over seeds)")
    return _save(fig, path)


def digits_gates_figure(summary: dict[str, Any], path: str) -> str:
    """Grouped bars per gate arm, one bar per routing (dense, top-1, top-2), for the four metrics."""
    routings = list(summary)
    arms = list(summary[routings[0]])
    panels = [("test_error", "test error"), ("mi_label_normalized", "I(first expert; class) / H(class)"),
              ("entropy_token", "H_s: mean per-input gate entropy (nats)"),
              ("entropy_mean", "H_u: entropy of the mean gate (nats)")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    width = 0.8 / len(routings)
    x = np.arange(len(arms))
    for ax, (metric, title) in zip(axes.flat, panels):
        for j, routing in enumerate(routings):
            mean, std = _mean_std([summary[routing][a][metric] for a in arms])
            ax.bar(x + (j - (len(routings) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=routing,
                   color=plt.cm.Set2(j))
        ax.set_xticks(x)
        ax.set_xticklabels(arms, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if metric == "entropy_mean":
            ax.axhline(0.5, color="red", linewidth=1, linestyle=":", label="collapse threshold 0.5")
            ax.axhline(np.log(5), color="grey", linewidth=1, linestyle=":", label="log 5 (uniform)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Digits, 5 experts: original softmax gate vs attentive gate, with regularizers "
                 "(mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def comet_width_figure(summary: dict[str, Any], path: str) -> str:
    """Test error against width, one panel per p_k: dense (width w), smaller dense (p_k w units)
    and the COMET-masked width-w MLP."""
    widths = summary["widths"]
    fractions = summary["active_fractions"]
    curves = summary["curves"]
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], fractions):
        for name, label, color, style in (("dense", "dense, width w", "black", "-"),
                                          (f"smaller dense p_k={p:g}", f"dense, width {p:g}·w", "tab:blue", "--"),
                                          (f"comet p_k={p:g}", f"COMET mask, width w, p_k={p:g}", "tab:red", "-")):
            mean, std = _mean_std(curves[name])
            ax.errorbar(widths, mean, yerr=std, label=label, color=color, linestyle=style, marker="o",
                        markersize=4, capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5]))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(widths)
        ax.set_xticklabels([str(w) for w in widths])
        ax.set_xlabel("hidden width w")
        ax.set_title(f"p_k = {p:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test error (log scale)")
    fig.suptitle("COMET width sweep on digits (mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def language_heatmaps_figure(summary: dict[str, Any], corpus: str, domain_names: list[str], path: str) -> str:
    """p(language | expert) per router (rows) and MoE layer (columns), seed 0, annotated; the
    title of each panel gives I(expert; language) / H(language) (over seeds)."""
    arms = [a for a, entry in summary[corpus].items() if "expert_label_counts_seed0" in entry]
    num_layers = len(summary[corpus][arms[0]]["expert_label_counts_seed0"])
    fig, axes = plt.subplots(len(arms), num_layers, figsize=(3.6 * num_layers + 1.2, 2.3 * len(arms) + 0.8),
                             squeeze=False, layout="constrained")
    image = None
    for r, arm in enumerate(arms):
        entry = summary[corpus][arm]
        for layer in range(num_layers):
            counts_EL = np.array(entry["expert_label_counts_seed0"][layer], dtype=float)
            share_EL = counts_EL / np.clip(counts_EL.sum(1, keepdims=True), 1.0, None)
            load_E = counts_EL.sum(1) / max(counts_EL.sum(), 1.0)
            ax = axes[r][layer]
            image = ax.imshow(share_EL.T, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(domain_names)))
            ax.set_yticklabels(domain_names)
            ax.set_xticks(range(len(load_E)))
            ax.set_xticklabels([f"{e}\n{100 * l:.0f}%" for e, l in enumerate(load_E)], fontsize=7)
            mi = entry["mi_label_normalized"][layer]
            ax.set_title(f"layer {layer}: I/H = {mi['mean']:.3f} ± {mi['std']:.3f}", fontsize=9)
            if layer == 0:
                ax.set_ylabel(arm, fontsize=10, fontweight="bold")
            for e in range(share_EL.shape[0]):
                for d in range(share_EL.shape[1]):
                    ax.text(e, d, f"{share_EL[e, d]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if share_EL[e, d] < 0.6 else "black")
    fig.supxlabel("expert (and its share of the routed slots)")
    fig.colorbar(image, ax=axes, shrink=0.5, label="p(language | expert)")
    fig.suptitle(f"{corpus}: which languages each expert serves (validation, seed 0;\n"
                 "I/H = I(expert; language) / H(language), mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def language_model_figure(summary: dict[str, Any], path: str) -> str:
    """Validation loss per router and corpus, and I(expert; language) per layer on the labelled
    corpus (mean ± std over seeds)."""
    corpora = list(summary)
    colors = _arm_colors(summary)
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(5.5 * (len(corpora) + 1), 4))
    for ax, corpus in zip(axes, corpora):
        arms = list(summary[corpus])
        mean, std = _mean_std([summary[corpus][a]["val_loss"] for a in arms])
        ax.bar(range(len(arms)), mean, yerr=std, capsize=3, color=[colors[a] for a in arms])
        ax.set_ylim(min(mean - std) - 0.05, max(mean + std) + 0.03)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{corpus}: validation loss (nats/token)")
        ax.grid(axis="y", alpha=0.3)
    labelled = [c for c in corpora if any("mi_label_normalized" in e for e in summary[c].values())]
    ax = axes[-1]
    if labelled:
        corpus = labelled[0]
        arms = [a for a, e in summary[corpus].items() if "mi_label_normalized" in e]
        num_layers = len(summary[corpus][arms[0]]["mi_label_normalized"])
        width = 0.8 / num_layers
        for layer in range(num_layers):
            mean, std = _mean_std([summary[corpus][a]["mi_label_normalized"][layer] for a in arms])
            ax.bar(np.arange(len(arms)) + (layer - (num_layers - 1) / 2) * width, mean, width, yerr=std, capsize=2,
                   label=f"layer {layer}", color=plt.cm.Set2(layer))
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{corpus}: I(expert; language) / H(language)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("MoE LM, equal tokens and active expert compute (mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def _arm_colors(summary: dict[str, Any]) -> dict[str, Any]:
    """One colour per arm over every corpus (tab20 once arms outnumber tab10's colours)."""
    arms = list(dict.fromkeys(a for corpus in summary.values() for a in corpus))
    cmap = plt.cm.tab10 if len(arms) <= 10 else plt.cm.tab20
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(arms)}


def language_model_curves_figure(summary: dict[str, Any], path: str) -> str:
    """Validation loss on the fixed curve set over training, one line per router (mean over seeds)
    with a band of one std, one panel per corpus; the second row zooms on the last half of training,
    where the routers' differences are smaller than the early drop."""
    corpora = list(summary)
    colors = _arm_colors(summary)
    fig, axes = plt.subplots(2, len(corpora), figsize=(7 * len(corpora), 8), squeeze=False)
    for col, corpus in enumerate(corpora):
        for row, ax in enumerate(axes[:, col]):
            tail_lows, tail_highs = [], []
            for arm, e in summary[corpus].items():
                steps = np.array(e["curve"]["steps"])
                mean, std = _mean_std(e["curve"]["val_loss"])
                keep = steps >= steps[-1] / 2 if row else np.ones_like(steps, dtype=bool)
                style = "--" if arm == "dense" else "-"
                ax.plot(steps[keep], mean[keep], style, color=colors[arm], label=arm, linewidth=1.3)
                ax.fill_between(steps[keep], (mean - std)[keep], (mean + std)[keep], color=colors[arm], alpha=0.15)
                tail_lows.append(float((mean - std)[keep].min()))
                tail_highs.append(float((mean + std)[keep].max()))
            if row:
                ax.set_ylim(min(tail_lows) - 0.01, max(tail_highs) + 0.01)
                ax.set_title(f"{corpus}: second half of training")
            else:
                ax.set_title(f"{corpus}: validation loss over training (nats/token)")
                ax.legend(fontsize=7, ncol=2)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.suptitle("MoE LM validation loss over training (mean, band: ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def route_stability_figure(summary: dict[str, Any], path: str) -> str:
    """Route stability over training: the fraction of the fixed probe tokens whose top-1 expert is
    unchanged since the previous curve point (mean over MoE layers), one line per router with a
    band of one std over seeds, one panel per corpus. A fixed table (hash) stays at 1."""
    corpora = list(summary)
    colors = _arm_colors(summary)
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for arm, e in summary[corpus].items():
            if "route_stability" not in e:
                continue  # the dense arm routes nothing
            steps = np.array(e["route_stability"]["steps"])
            mean, std = _mean_std(e["route_stability"]["top1_unchanged"])
            ax.plot(steps, mean, "-", color=colors[arm], label=arm, linewidth=1.3)
            ax.fill_between(steps, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=colors[arm], alpha=0.15)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step (stability since the previous curve point)")
        ax.set_ylabel("top-1 unchanged (fraction of probe tokens)")
        ax.set_title(f"{corpus}: route stability, mean over MoE layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("MoE LM route stability over training (mean, band: ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)
