"""The reading of a study run: sentences assembled from the claim verdicts and the summaries, so
that what the page says about the results is computed from them and changes with them. Only the
explanations of mechanisms (why a frozen projection cannot separate clusters, why a top-1-masked
gate gets no task gradient) are fixed text, and each is printed only when the numbers call for it."""

from __future__ import annotations

from typing import Any

from moe_dist.study.claims import NEAR_ONE


def _ms(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _verdict_lines(claims: list[dict[str, str]]) -> list[str]:
    groups: dict[str, list[str]] = {"reproduced": [], "partly": [], "inconclusive": [], "not reproduced or opposite": []}
    for c in claims:
        v = c["verdict"]
        key = ("reproduced" if v == "reproduced" else "partly" if v.startswith("partly")
               else "inconclusive" if v.startswith(("inconclusive", "one seed")) else "not reproduced or opposite")
        groups[key].append(f"{c['experiment']}: {c['claim']}")
    return [f"- **{key.capitalize()}** ({len(items)}): " + "; ".join(items) + "." for key, items in groups.items() if items]


def _common_mode_lines(summary: dict[str, Any]) -> list[str]:
    arms, norms = summary["arms"], summary["shared_norms"]
    lines = []
    for arm in ("topk", "fixed_projection"):
        if arm in arms:
            mi, drop = arms[arm]["mi_label_normalized"], arms[arm]["dropped_fraction"]
            lines.append(f"- Common mode, {arm} (no inhibition): I(expert; cluster) {_ms(mi[0])} at S = {norms[0]:g} "
                         f"and {_ms(mi[-1])} at S = {norms[-1]:g}; dropped fraction {_ms(drop[0])} and {_ms(drop[-1])}.")
    modes = [a for a in arms if a.startswith("inhibition")]
    held = [a for a in modes if min(s["mean"] for s in arms[a]["mi_label_normalized"]) >= NEAR_ONE]
    weak = {a: min(s["mean"] for s in arms[a]["mi_label_normalized"]) for a in modes if a not in held}
    if modes:
        text = (f"- Common mode, inhibition: mean I >= {NEAR_ONE} at every S for "
                f"{', '.join(held) if held else 'no mode'}")
        if weak:
            text += "; lowest mean I of the others: " + ", ".join(f"{a} {v:.3f}" for a, v in weak.items())
        lines.append(text + ".")
    if "fixed_projection center" in arms:
        mi = [s["mean"] for s in arms["fixed_projection center"]["mi_label_normalized"]]
        drop = [s["mean"] for s in arms["fixed_projection center"]["dropped_fraction"]]
        text = (f"- Common mode, centred fixed projection: I between {min(mi):.3f} and {max(mi):.3f} and dropped "
                f"fraction between {min(drop):.3f} and {max(drop):.3f} over all S")
        if mi[0] < NEAR_ONE:
            text += (f"; I is below {NEAR_ONE} already at S = {norms[0]:g}, where centring has nothing to remove: "
                     "the frozen random projection sends several clusters to the same expert and nothing is "
                     "trained to separate them, so centring removes the dependence on S but cannot lift I to 1")
        lines.append(text + ".")
    return lines


def _digits_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    dense = summary.get("dense", {})
    if {"softmax", "attentive"} <= set(dense):
        lines.append(f"- Digits, dense mixture: test error {_ms(dense['softmax']['test_error'])} (original gate) vs "
                     f"{_ms(dense['attentive']['test_error'])} (attentive); H_s {_ms(dense['softmax']['entropy_token'])}"
                     f" vs {_ms(dense['attentive']['entropy_token'])}; with L_s "
                     f"{_ms(dense.get('softmax + sample_similarity', dense['softmax'])['test_error'])} and "
                     f"{_ms(dense.get('attentive + sample_similarity', dense['attentive'])['test_error'])} "
                     "(paper, MNIST: 0.038 -> 0.029).")
    top1 = summary.get("top-1", {})
    if {"softmax", "attentive"} <= set(top1):
        plain = [top1[g] for g in ("softmax", "attentive")]
        collapsed = sum(e["collapsed"] for e in plain)
        text = (f"- Digits, top-1 without a regularizer: {collapsed} of {sum(e['seeds'] for e in plain)} runs "
                f"collapsed (H_u {_ms(plain[0]['entropy_mean'])} original, {_ms(plain[1]['entropy_mean'])} "
                f"attentive), and the first expert says little about the class (I(E;Y) "
                f"{_ms(plain[0]['mi_label_normalized'])} and {_ms(plain[1]['mi_label_normalized'])})")
        if collapsed == 0:
            text += (". Under the paper's top-1 masking the chosen expert's weight is always 1, so the task loss "
                     "gives the gate no gradient and an unregularized gate keeps roughly its initial routing: it "
                     "neither collapses nor specializes through training here")
        regs = [(f"{g} + {r}", top1.get(f"{g} + {r}")) for g in ("softmax", "attentive")
                for r in ("sample_similarity", "importance")]
        text += ". With a regularizer (which sees the unmasked distribution) I(E;Y) becomes " + ", ".join(
            f"{name} {_ms(e['mi_label_normalized'])}" for name, e in regs if e) + "."
        lines.append(text)
    return lines


def _comet_lines(summary: dict[str, Any]) -> list[str]:
    widths, curves = summary["widths"], summary["curves"]
    lines = []
    for p in summary["active_fractions"]:
        comet, smaller = curves[f"comet p_k={p:g}"], curves[f"smaller dense p_k={p:g}"]
        lines.append(f"- COMET p_k = {p:g}: test error {comet[0]['mean']:.3f} -> {comet[-1]['mean']:.3f} from width "
                     f"{widths[0]} to {widths[-1]}; dense {curves['dense'][0]['mean']:.3f} -> "
                     f"{curves['dense'][-1]['mean']:.3f}; dense with p_k w units {smaller[0]['mean']:.3f} -> "
                     f"{smaller[-1]['mean']:.3f}.")
    return lines


def _language_model_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for corpus, arms in summary.items():
        ranked = sorted(arms, key=lambda a: arms[a]["val_loss"]["mean"])
        lines.append(f"- LM {corpus}: validation loss, best to worst: "
                     + ", ".join(f"{a} {_ms(arms[a]['val_loss'])}" for a in ranked) + ".")
        if "dense" in arms:
            better = [a for a in arms if a != "dense" and arms[a]["val_loss"]["mean"] < arms["dense"]["val_loss"]["mean"]]
            lines.append(f"- LM {corpus}: MoE arms below the dense baseline of equal active parameters: "
                         f"{', '.join(better) if better else 'none'}.")
        drops = {a: sum(s["mean"] for s in e["train_dropped_fraction"]) / len(e["train_dropped_fraction"])
                 for a, e in arms.items() if e.get("train_dropped_fraction")}
        if drops:
            lines.append(f"- LM {corpus}: training dropped fraction (cf 1.25; the budget arms: dropless experts "
                         "behind their receive budget; mean over layers): "
                         + ", ".join(f"{a} {v:.3f}" for a, v in sorted(drops.items(), key=lambda kv: kv[1])) + ".")
        settled = {a: e["route_stability"]["top1_unchanged"][-1]["mean"] for a, e in arms.items()
                   if "route_stability" in e}
        if settled:
            lines.append(f"- LM {corpus}: route stability over the last curve interval (top-1 unchanged, mean over "
                         "layers): " + ", ".join(f"{a} {v:.3f}" for a, v in sorted(settled.items(),
                                                                                key=lambda kv: -kv[1])) + ".")
        with_mi = {a: max(s["mean"] for s in e["mi_label_normalized"]) for a, e in arms.items()
                   if "mi_label_normalized" in e}
        if with_mi:
            lines.append(f"- LM {corpus}: I(expert; language)/H(language), best layer: "
                         + ", ".join(f"{a} {v:.3f}" for a, v in sorted(with_mi.items(), key=lambda kv: -kv[1]))
                         + (": experts are at most weakly language-specific at this scale" if max(with_mi.values())
                            < 0.3 else "") + ".")
    return lines


def reading_section(study: dict[str, Any]) -> list[str]:
    summary = study["summary"]
    lines = ["## Reading", "",
             "Assembled by `moe_dist/study/reading.py` from this run's verdicts and tables.", "",
             *_verdict_lines(study["claims"]), ""]
    if "common_mode" in summary:
        lines += _common_mode_lines(summary["common_mode"])
    if "digits_gates" in summary:
        lines += _digits_lines(summary["digits_gates"])
    if "comet_width" in summary:
        lines += _comet_lines(summary["comet_width"])
    if "language_model" in summary:
        lines += _language_model_lines(summary["language_model"])
    return lines + ["", "All of this is at toy scale (at most a few 10^5 parameters, minutes of CPU per run): a claim "
                    "that does not reproduce here may still hold at the papers' scale, and one that does is "
                    "evidence at this scale only.", ""]
