"""The whole routing study: budgets, every run of every experiment in one task pool, then the
JSON, the figures, the claim verdicts and the markdown page (logic of tools/routing_study.py)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moe_dist.study import comet_width, common_mode, digits_gates, figures, language_model
from moe_dist.study.claims import evaluate_claims
from moe_dist.study.report import render_report
from moe_dist.study.tasks import run_tasks

PARTS = ("common_mode", "digits_gates", "comet_width", "language_model")
DESIGN_MINUTES = 60  # the full study's wall-time budget on a 2-core machine (2 workers)
SUMMARIZERS = {"common_mode": common_mode.summarize, "digits_gates": digits_gates.summarize,
               "comet_width": comet_width.summarize, "language_model": language_model.summarize}


@dataclass(frozen=True)
class StudyBudget:
    common_mode: common_mode.CommonModeBudget
    digits_gates: digits_gates.DigitsGatesBudget
    comet_width: comet_width.CometWidthBudget
    language_model: language_model.LanguageModelBudget


FULL = StudyBudget(common_mode.FULL, digits_gates.FULL, comet_width.FULL, language_model.FULL)
QUICK = StudyBudget(common_mode.QUICK, digits_gates.QUICK, comet_width.QUICK, language_model.QUICK)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass  # not Linux: keep platform's description
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_study(*, out_dir: str, data_dir: str, doc_path: str | None, quick: bool, workers: int, command: str,
              parts: tuple[str, ...] = PARTS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `parts`, write `<out_dir>/routing_study.json` and the figures, and (with `doc_path`)
    the page, with its figures and a copy of the JSON in `<doc dir>/figures/routing_study/`."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown study part(s) {unknown}; choose from {PARTS}")
    budget = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    start, load_start = time.perf_counter(), _load()
    tasks = []
    if "common_mode" in parts:
        tasks += common_mode.tasks(budget.common_mode)
    if "digits_gates" in parts:
        tasks += digits_gates.tasks(budget.digits_gates)
    if "comet_width" in parts:
        tasks += comet_width.tasks(budget.comet_width)
    if "language_model" in parts:
        log("tokenizing the language-model corpora")
        paths = language_model.prepare_corpora(budget.language_model, data_dir, os.path.join(out_dir, "lm_data"))
        tasks += language_model.tasks(budget.language_model, paths)
    log(f"{len(tasks)} runs on {workers} worker(s)")
    cpu_seconds: list[float] = []
    results = run_tasks(tasks, workers, log, cpu_seconds=cpu_seconds)
    records = {p: [r for t, r in zip(tasks, results) if t.part == p] for p in parts}
    study = {
        "meta": {"command": command, "quick": quick, "workers": workers, "design_minutes": DESIGN_MINUTES,
                 "wall_seconds": time.perf_counter() - start,
                 # CPU seconds of each part's runs, summed: the measure the next budget is sized by.
                 "part_seconds": {p: sum(c for t, c in zip(tasks, cpu_seconds) if t.part == p) for p in parts},
                 "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                 "machine": machine_description(), "load_start": load_start, "load_end": _load(),
                 "software": f"Python {platform.python_version()}, torch {torch.__version__}"},
        "budget": {p: asdict(getattr(budget, p)) for p in parts},
        "summary": {p: SUMMARIZERS[p](records[p]) for p in parts},
        "claims": evaluate_claims(records),
        "records": records,
    }
    json_path = os.path.join(out_dir, "routing_study.json")
    with open(json_path, "w") as f:
        json.dump(study, f, indent=1)
    drawn = draw_figures(study, out_dir)
    log(f"results: {json_path}; figures: {', '.join(sorted(drawn.values()))}")
    if doc_path:
        write_page(study, drawn, json_path, doc_path)
        log(f"page: {doc_path}")
    return study


def render_study(json_path: str, out_dir: str, doc_path: str) -> dict[str, Any]:
    """The figures and the page again from an earlier run's JSON, nothing trained: for a change to
    the page's text or figures (or an arm's settings column) that leaves every measurement as it
    was. The page keeps the run's own command, date and wall time."""
    with open(json_path) as f:
        study = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    kept = os.path.join(out_dir, "routing_study.json")
    if os.path.abspath(kept) != os.path.abspath(json_path):
        shutil.copyfile(json_path, kept)
    write_page(study, draw_figures(study, out_dir), kept, doc_path)
    return study


def draw_figures(study: dict[str, Any], folder: str) -> dict[str, str]:
    """{figure name: PNG path} of every figure the parts that were run allow."""
    summary = study["summary"]
    drawn = {}
    if "common_mode" in summary:
        drawn["common_mode"] = figures.common_mode_figure(summary["common_mode"], os.path.join(folder, "common_mode.png"))
    if "digits_gates" in summary:
        drawn["digits_gates"] = figures.digits_gates_figure(summary["digits_gates"],
                                                            os.path.join(folder, "digits_gates.png"))
    if "comet_width" in summary:
        drawn["comet_width"] = figures.comet_width_figure(summary["comet_width"], os.path.join(folder, "comet_width.png"))
    if "language_model" in summary:
        lm = summary["language_model"]
        drawn["language_model"] = figures.language_model_figure(lm, os.path.join(folder, "language_model.png"))
        drawn["language_model_curves"] = figures.language_model_curves_figure(
            lm, os.path.join(folder, "language_model_curves.png"))
        if any("route_stability" in e for arms in lm.values() for e in arms.values()):
            drawn["route_stability"] = figures.route_stability_figure(lm, os.path.join(folder, "route_stability.png"))
        for record in study["records"]["language_model"]:
            corpus = record["corpus"]
            labelled = any("expert_label_counts_seed0" in e for e in lm[corpus].values())
            if labelled and f"heatmap_{corpus}" not in drawn:
                domains = list(record["val_loss_by_domain"])
                drawn[f"heatmap_{corpus}"] = figures.language_heatmaps_figure(
                    lm, corpus, domains, os.path.join(folder, f"heatmap_{corpus}.png"))
    return drawn


def write_page(study: dict[str, Any], drawn: dict[str, str], json_path: str, doc_path: str) -> None:
    doc_dir = os.path.dirname(os.path.abspath(doc_path))
    fig_dir = os.path.join(doc_dir, "figures", "routing_study")
    os.makedirs(fig_dir, exist_ok=True)
    relative = {}
    for name, path in drawn.items():
        target = os.path.join(fig_dir, os.path.basename(path))
        shutil.copyfile(path, target)
        relative[name] = os.path.relpath(target, doc_dir)
    json_copy = os.path.join(fig_dir, os.path.basename(json_path))
    if os.path.abspath(json_copy) != os.path.abspath(json_path):
        shutil.copyfile(json_path, json_copy)
    with open(doc_path, "w") as f:
        f.write(render_report(study, relative, os.path.relpath(json_copy, doc_dir)) + "\n")
