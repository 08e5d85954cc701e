"""The routing study (tools/routing_study.py): statistics over seeds, claim verdicts, the task
pool's independence from the number of workers, and the whole --quick run (every arm of every
experiment for a few steps) on tiny corpora written here, checked for shapes and finiteness."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict

import pytest
import torch

from moe_dist.study import comet_width, common_mode, digits_gates, language_model
from moe_dist.study.claims import direction_verdict
from moe_dist.study.seeds import difference_stats, seed_stats
from moe_dist.study.study import QUICK
from moe_dist.study.tasks import run_tasks
from tests.harness import load_tool

VERDICT_STARTS = ("reproduced", "opposite", "inconclusive", "partly", "not reproduced", "one seed")


def load_cli():
    return load_tool("routing_study")


def test_seed_stats_by_hand():
    s = seed_stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3 and (s["min"], s["max"]) == (1.0, 3.0)
    assert s["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} = 4.3027
    assert seed_stats([5.0])["ci95"] == 0.0
    d = difference_stats([3.0, 5.0], [1.0, 2.0])
    assert d["mean"] == 2.5 and d["n"] == 2
    with pytest.raises(ValueError, match=r"non-finite values \[nan\]"):
        seed_stats([1.0, float("nan")])
    with pytest.raises(ValueError, match="paired seeds differ in number: 2 vs 1"):
        difference_stats([1.0, 2.0], [1.0])


def test_direction_verdicts():
    assert direction_verdict(seed_stats([-1.0, -1.1, -0.9]), -1) == "reproduced"
    assert direction_verdict(seed_stats([-1.0, -1.1, -0.9]), +1) == "opposite"
    assert direction_verdict(seed_stats([-1.0, 1.0, 0.1]), -1).startswith("inconclusive")
    assert direction_verdict(seed_stats([-1.0]), -1).startswith("one seed")


def test_results_do_not_depend_on_the_number_of_workers():
    budget = asdict(comet_width.QUICK)
    tasks = comet_width.tasks(comet_width.QUICK)[:3]
    assert all(t.kwargs["budget"] == budget for t in tasks)
    threads = torch.get_num_threads()
    alone = run_tasks(tasks, workers=1, log=lambda line: None)
    assert torch.get_num_threads() == threads  # the in-process run restores the caller's setting
    pooled = run_tasks(tasks, workers=2, log=lambda line: None)
    assert alone == pooled
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run_tasks(tasks, workers=0)


def write_tiny_corpora(folder) -> None:
    rng = random.Random(0)
    words = {"de": "der die das und ist nicht ein Haus Katze Hund schön groß klein".split(),
             "en": "the a and is not one house cat dog nice big small".split(),
             "es": "el la los y es no uno casa gato perro bonito grande pequeño".split()}
    for lang, vocab in words.items():
        with open(folder / f"fortunes_{lang}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(60):
                text = " ".join(rng.choice(vocab) for _ in range(30))
                f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    lines = (" ".join(rng.choice(words["en"]) for _ in range(12)) for _ in range(300))
    (folder / "tinyshakespeare.txt").write_text("\n".join(lines), encoding="utf-8")


def test_quick_run_writes_finite_results_of_every_arm_figures_and_page(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_corpora(data)
    out = tmp_path / "out"
    cli = load_cli()
    assert cli.main(["--quick", "--out", str(out), "--data-dir", str(data), "--workers", "1"]) == 0

    study = json.loads((out / "routing_study.json").read_text())
    records, summary = study["records"], study["summary"]
    assert cli.non_finite(records) == [] and cli.non_finite(summary) == []
    assert cli.non_finite({"a": [1.0, float("inf")], "b": 2}) == [".a[1]"]  # the check itself can fail

    cm = QUICK.common_mode
    assert len(records["common_mode"]) == len(common_mode.ARMS) * len(cm.shared_norms) * len(cm.seeds)
    assert list(summary["common_mode"]["arms"]) == list(common_mode.ARMS)
    for metrics in summary["common_mode"]["arms"].values():
        assert all(len(metrics[m]) == len(cm.shared_norms) for m in common_mode.METRICS)

    dg = QUICK.digits_gates
    arms = len(digits_gates.GATES) * len(digits_gates.REGULARIZERS)
    assert len(records["digits_gates"]) == len(digits_gates.ROUTINGS) * arms * len(dg.seeds)
    assert all(len(summary["digits_gates"][r]) == arms for r in digits_gates.ROUTINGS)
    assert all(0.0 <= r["test_error"] <= 1.0 for r in records["digits_gates"])
    top1 = [r for r in records["digits_gates"] if r["routing"] == "top-1"]
    assert all(r["entropy_token"] == pytest.approx(0.0, abs=1e-6) for r in top1)  # one expert per input

    cw = QUICK.comet_width
    assert len(records["comet_width"]) == len(comet_width.configurations(cw)) * len(cw.seeds)
    assert all(len(curve) == len(cw.widths) for curve in summary["comet_width"]["curves"].values())

    lm = QUICK.language_model
    assert len(records["language_model"]) == len(lm.corpora) * len(language_model.ARMS) * len(lm.seeds)
    for r in records["language_model"]:
        assert len(r["layers"]) == (0 if r["arm"] == "dense" else lm.n_layers)
        for row in r["layers"].values():
            assert 0.0 <= row["dropped_fraction"] <= 1.0 and 0.0 <= row["train_dropped_fraction"] <= 1.0
            if r["corpus"] == "fortunes":
                counts = row["expert_label_counts"]
                assert len(counts) == lm.num_experts and all(len(c) == 3 for c in counts)
    # BPE stops short of the vocabulary size on a corpus this small.
    assert all(r["tokenizer"].startswith("sentencepiece ") for r in records["language_model"] if r["corpus"] == "fortunes")

    assert study["claims"] and all(c["verdict"].startswith(VERDICT_STARTS) for c in study["claims"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["comet_width.png", "common_mode.png", "digits_gates.png", "heatmap_fortunes.png",
                    "language_model.png"]
    for name in pngs:
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) < 200_000
    page = (out / "routing_study.md").read_text()
    for heading in ("## Claims checked", "## Reading", "## 1. Common-mode", "## 2. Digits", "## 3. COMET",
                    "## 4. Small MoE language model"):
        assert heading in page
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)
    for name in pngs:
        assert f"figures/routing_study/{name}" in page
        assert (out / "figures" / "routing_study" / name).is_file()
