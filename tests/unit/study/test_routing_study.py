"""The routing study (tools/routing_study.py): statistics over seeds, claim verdicts, the task
pool's independence from the number of workers, and the whole --quick run (every arm of every
experiment for a few steps) on tiny corpora written here, checked for shapes and finiteness."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from moe_dist.study import comet_width, common_mode, digits_gates, language_model
from moe_dist.study.claims import direction_verdict, language_model_claims, renormalize_decision, strongest_topk
from moe_dist.study.lm_arms import ARMS, OVERFLOW_PAIR, SCOPE_PAIR, Arm
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
    assert lm.arms == tuple(ARMS)  # the quick run trains every arm
    assert set(lm.reduced_seed_arms) == {SCOPE_PAIR[0], *OVERFLOW_PAIR}  # the quick run covers their seed rule
    assert len(records["language_model"]) == len(lm.corpora) * sum(len(lm.seeds_of(a)) for a in ARMS)
    curve_steps = list(range(0, lm.steps, lm.eval_every)) + [lm.steps]
    for r in records["language_model"]:
        assert [p["step"] for p in r["curve"]] == curve_steps
        # Route stability between consecutive curve points, per MoE layer, for every arm with a router.
        stability = r["route_stability"]
        if r["arm"] == "dense":
            assert stability == []
        else:
            assert [(p["from_step"], p["to_step"]) for p in stability] == list(zip(curve_steps, curve_steps[1:]))
            for p in stability:
                for key in ("top1_unchanged", "topk_set_unchanged"):
                    assert len(p[key]) == lm.n_layers and all(0.0 <= v <= 1.0 for v in p[key])
                if r["arm"] == "hash":  # a fixed token table routes the probe tokens the same at every point
                    assert p["top1_unchanged"] == [1.0] * lm.n_layers == p["topk_set_unchanged"]
        budgeted = r["arm"] in OVERFLOW_PAIR
        assert all(("train_over_budget_fraction" in row) == budgeted for row in r["layers"].values())
        assert (r["router_params"] == 0) == (r["arm"] in ("dense", "fixed_projection", "fixed_projection center",
                                                          "hash"))
        assert len(r["layers"]) == (0 if r["arm"] == "dense" else lm.n_layers)
        for row in r["layers"].values():
            assert 0.0 <= row["dropped_fraction"] <= 1.0 and 0.0 <= row["train_dropped_fraction"] <= 1.0
            if r["corpus"] == "fortunes":
                counts = row["expert_label_counts"]
                assert len(counts) == lm.num_experts and all(len(c) == 3 for c in counts)
    # BPE stops short of the vocabulary size on a corpus this small.
    assert all(r["tokenizer"].startswith("sentencepiece ") for r in records["language_model"] if r["corpus"] == "fortunes")

    assert study["claims"] and all(c["verdict"].startswith(VERDICT_STARTS) for c in study["claims"])
    lm_summary = summary["language_model"]["fortunes"]
    assert list(lm_summary) == list(ARMS)
    assert all(len(e["curve"]["val_loss"]) == len(curve_steps) for e in lm_summary.values())
    assert study["meta"]["part_seconds"]["language_model"] > 0
    lm_claims = [c for c in study["claims"] if c["experiment"] == "LM"]
    research = [a for a, spec in ARMS.items() if spec.router_type not in (None, "topk")]
    for arm in research:  # loss and I on the labelled fortunes, loss alone on the unlabelled shakespeare
        mine = [c["claim"] for c in lm_claims if c["claim"].startswith((f"{arm} lowers", f"{arm} raises"))]
        assert len(mine) == 3 and sum("I(expert; language)" in c and "fortunes" in c for c in mine) == 1
    scope = [c["claim"] for c in lm_claims if c["claim"].startswith("global-batch balance")]
    overflow = [c["claim"] for c in lm_claims if c["claim"].startswith("spill lowers")]
    assert len(scope) == 3 and sum("I(expert; language)" in c for c in scope) == 1  # I on fortunes only
    assert len(overflow) == 4
    assert all("route_stability" in e for a, e in lm_summary.items() if a != "dense")
    assert "route_stability" not in lm_summary["dense"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["comet_width.png", "common_mode.png", "digits_gates.png", "heatmap_fortunes.png",
                    "language_model.png", "language_model_curves.png", "route_stability.png"]
    for name in pngs:
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) < 200_000
    page = (out / "routing_study.md").read_text()
    for heading in ("## Claims checked", "## Reading", "## 1. Common-mode", "## 2. Digits", "## 3. COMET",
                    "## 4. MoE language model", "**Arms and their cost**", "Decision for `router.renormalize`",
                    "**Balance scope**", "**Bounded dispatch**", "**Route stability over training.**"):
        assert heading in page
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)
    for name in pngs:
        assert f"figures/routing_study/{name}" in page
        assert (out / "figures" / "routing_study" / name).is_file()

    # --render: the same page again from the run's JSON, nothing trained, into another folder.
    again = tmp_path / "again"
    assert cli.main(["--render", str(out / "routing_study.json"), "--out", str(again),
                     "--doc", str(again / "page.md")]) == 0
    assert (again / "page.md").read_text() == page
    assert sorted(p.name for p in (again / "figures" / "routing_study").glob("*.png")) == pngs
    assert cli.main(["--render", str(tmp_path / "missing.json")]) == 2


def lm_records(val_loss: dict[str, list[float]], mi: dict[str, list[float]],
               dropped: dict[str, list[float]] | None = None) -> list[dict]:
    """Per-seed LM records of the shape run_one writes (two MoE layers with the given I/H and
    training dropped fraction each; seeds 0, 1, ... as many as an arm's losses)."""
    dropped = dropped or {}
    return [{"corpus": "fortunes", "arm": arm, "seed": seed, "val_loss": loss,
             "layers": {str(layer): {"mi_label_normalized": mi[arm][seed],
                                     "train_dropped_fraction": dropped[arm][seed] if arm in dropped else 0.0}
                        for layer in range(2)}}
            for arm, losses in val_loss.items() for seed, loss in enumerate(losses)]


def claim(claims, start: str) -> dict:
    (found,) = [c for c in claims if c.claim.startswith(start)]
    return found


def test_lm_claims_judge_each_research_router_against_the_strongest_topk():
    topk = [3.00, 3.10, 3.05, 3.02, 3.08]
    renorm = [v - 0.05 + 0.002 * i for i, v in enumerate(topk)]  # lower in every seed: the strongest topk
    val_loss = {"topk": topk, "topk renormalize": renorm,
                "inhibition": [v - 0.03 + 0.001 * i for i, v in enumerate(renorm)],  # lower than it: reproduced
                "hash": [v + 0.2 + 0.01 * i for i, v in enumerate(renorm)],  # higher: opposite
                "fixed_projection": [v + d for v, d in zip(renorm, (0.05, -0.05, 0.04, -0.06, 0.01))]}  # mixed
    mi = {"topk": [0.3] * 5, "topk renormalize": [0.20, 0.22, 0.21, 0.19, 0.20],
          "inhibition": [0.30, 0.33, 0.31, 0.32, 0.30], "hash": [0.20, 0.23, 0.20, 0.18, 0.21],
          "fixed_projection": [0.10, 0.12, 0.09, 0.11, 0.10]}
    records = lm_records(val_loss, mi)
    assert strongest_topk(records, "fortunes") == "topk renormalize"
    claims = language_model_claims(records)
    base = "vs the strongest topk (topk renormalize; fortunes"
    assert claim(claims, f"inhibition lowers the validation loss {base}").verdict == "reproduced"
    assert claim(claims, f"hash lowers the validation loss {base}").verdict == "opposite"
    assert claim(claims, f"fixed_projection lowers the validation loss {base}").verdict.startswith("inconclusive")
    # I(expert; language) against the same baseline (not against the default topk, whose I is higher).
    assert claim(claims, f"inhibition raises I(expert; language) {base}").verdict == "reproduced"
    assert claim(claims, f"hash raises I(expert; language) {base}").verdict.startswith("inconclusive")
    assert claim(claims, f"fixed_projection raises I(expert; language) {base}").verdict == "opposite"
    renormalize = claim(claims, "renormalizing topk's K = 2 weights")
    assert renormalize.verdict == "reproduced"
    assert renormalize_decision([renormalize.verdict]) == "renormalize: true for K > 1"
    # No research router is judged against a topk arm, and no topk arm gets a research claim.
    assert not [c for c in claims if c.claim.startswith("topk") and "strongest" in c.claim]

    # When the default topk is the strongest, it is the baseline, and renormalizing is judged opposite.
    swapped = lm_records({**val_loss, "topk": renorm, "topk renormalize": topk}, mi)
    assert strongest_topk(swapped, "fortunes") == "topk"
    claims = language_model_claims(swapped)
    assert claim(claims, "inhibition lowers the validation loss vs the strongest topk (topk;")
    verdict = claim(claims, "renormalizing topk's K = 2 weights").verdict
    assert verdict == "opposite" and renormalize_decision([verdict]).startswith("renormalize: false (")


def test_renormalize_decision_rule():
    assert renormalize_decision(["reproduced", "reproduced"]) == "renormalize: true for K > 1"
    assert renormalize_decision(["reproduced", "inconclusive (CI contains 0)"]).startswith("renormalize: false kept")
    assert renormalize_decision(["reproduced", "opposite"]).startswith("renormalize: false (")
    assert renormalize_decision(["one seed: no verdict"]).startswith("no decision")
    assert renormalize_decision([]).startswith("no decision")


def test_arm_specs_are_checked():
    with pytest.raises(ValueError, match="dense arm has no MoE layer"):
        Arm(None, {"aux_loss": {"switch": 0.0}})
    with pytest.raises(ValueError, match=r"moe keys \['num_experts'\] are set by the budget"):
        Arm({"type": "topk"}, {"num_experts": 8})
    with pytest.raises(ValueError, match="needs a type"):
        Arm({"renormalize": True})
    budget = language_model.QUICK
    for name, arm in ARMS.items():  # every arm builds a model: its keys are the config's own
        cfg = language_model.model_config(budget, arm, vocab_size=64, num_labels=3)
        assert (cfg.moe is None) == (arm.router is None), name
    bias = language_model.model_config(budget, ARMS["topk bias-balanced"], 64, 3).moe
    assert bias.aux_loss.switch == 0.0 and bias.router.bias_balancing and bias.router.renormalize
    with pytest.raises(Exception, match="switchh"):  # a misspelt override is refused, not ignored
        language_model.model_config(budget, Arm({"type": "topk"}, {"aux_loss": {"switchh": 0.0}}), 64, 3)
    with pytest.raises(ValueError, match="unknown language-model arm"):
        language_model.LanguageModelBudget(arms=("topk", "nope"))
    with pytest.raises(ValueError, match="must split into micro_batches"):
        language_model.LanguageModelBudget(batch=6, micro_batches=4)


def test_micro_batches_accumulate_the_one_batch_gradient_and_load():
    """The study's accumulation loop: two micro batches give the one-batch gradient of the LM loss
    (aux losses off: a micro-batch balance loss differs by definition), the same mean loss and the
    step's whole load for `after_step`."""
    from dataclasses import replace

    base = replace(language_model.QUICK, batch=8)
    arm = Arm({"type": "topk"}, {"aux_loss": {"switch": 0.0, "z_loss": 0.0}, "capacity_factor": 0.0})
    cfg = language_model.model_config(base, arm, vocab_size=50, num_labels=0)
    tokens = torch.randint(50, (base.batch, base.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results = []
    for micro_batches in (1, 2, 4):
        model = language_model.MoETransformer(cfg, seed=0)
        loss, load, stats = language_model.accumulate_gradients(model, tokens, None, micro_batches)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        assert len(stats) == micro_batches
        results.append((loss, load, grad))
    (loss1, load1, grad1) = results[0]
    assert sum(load1[0].tolist()) == base.batch * base.seq_len * base.top_k
    for loss, load, grad in results[1:]:
        assert loss == pytest.approx(loss1, rel=1e-5)
        assert all(torch.equal(load[layer], load1[layer]) for layer in load1)
        torch.testing.assert_close(grad, grad1, rtol=1e-4, atol=1e-6)


def test_scope_and_overflow_claims_pair_the_seeds_both_arms_ran():
    """The new arms run on 3 seeds, their twins on 5: each claim pairs seeds 0-2 (n=3), and the
    verdict follows the rule on known cases. The twins' seeds 3 and 4 would flip the loss claims
    if they were averaged in unpaired."""
    glob, micro = SCOPE_PAIR
    spill, drop = OVERFLOW_PAIR
    twin = [3.00, 3.10, 3.05, 2.00, 2.00]
    val_loss = {"topk": [3.2] * 5, micro: twin,
                glob: [v + 0.05 + 0.001 * i for i, v in enumerate(twin[:3])],  # higher in every seed: opposite
                drop: twin, spill: [v + d for v, d in zip(twin[:3], (0.04, -0.05, 0.01))]}  # mixed: inconclusive
    mi = {"topk": [0.2] * 5, micro: [0.20, 0.22, 0.21, 0.9, 0.9], glob: [0.30, 0.33, 0.31],  # higher: reproduced
          drop: [0.2] * 5, spill: [0.2] * 3}
    dropped = {drop: [0.10, 0.12, 0.11, 0.0, 0.0], spill: [0.02, 0.03, 0.02]}  # lower: reproduced
    records = lm_records(val_loss, mi, dropped)
    claims = language_model_claims(records)
    scope = claim(claims, "global-batch balance raises I(expert; language) vs micro-batch balance")
    assert scope.verdict == "reproduced" and "n=3" in scope.measured
    assert claim(claims, "global-batch balance lowers the validation loss").verdict == "opposite"
    assert claim(claims, "spill lowers the validation loss vs drop").verdict.startswith("inconclusive")
    dropped_claim = claim(claims, "spill lowers the dropped fraction vs drop")
    assert dropped_claim.verdict == "reproduced" and "drop(spill) - drop(drop) = -0.087" in dropped_claim.measured
    # The twins' extra seeds are lower than anything: the new arms are never the research routers'
    # baseline (the micro twin at seeds 3, 4 makes topk renormalize the strongest candidate).
    assert strongest_topk(records, "fortunes") == micro
    # Reversed differences give the opposite verdicts: the rule, not the inputs' order, decides.
    swapped = lm_records({**val_loss, glob: [v - 0.05 for v in twin[:3]]}, {**mi, glob: [0.1, 0.12, 0.11]},
                         {**dropped, spill: [0.2, 0.3, 0.25]})
    claims = language_model_claims(swapped)
    assert claim(claims, "global-batch balance raises I(expert; language)").verdict == "opposite"
    assert claim(claims, "global-batch balance lowers the validation loss").verdict == "reproduced"
    assert claim(claims, "spill lowers the dropped fraction vs drop").verdict == "opposite"


def test_route_stability_of_known_probe_snapshots():
    from moe_dist.evaluate.trace_analysis import route_stability

    # Four probe tokens, top-2, two MoE layers. Layer 0: tokens 1 and 2 change their first choice
    # (1 keeps its set {2, 3} reordered, 2 keeps {0, 1}); token 3 changes its second choice.
    before = {0: np.array([[0, 1], [2, 3], [1, 0], [3, 2]]), 1: np.array([[0, 1], [0, 1], [2, 3], [2, 3]])}
    after = {0: np.array([[0, 1], [3, 2], [0, 1], [3, 1]]), 1: np.array([[0, 1], [0, 1], [2, 3], [2, 3]])}
    assert language_model.stability_between(before, after) == {"top1_unchanged": [0.5, 1.0],
                                                               "topk_set_unchanged": [0.75, 1.0]}
    assert route_stability(before[0], after[0]) == {"top1_unchanged": 0.5, "topk_set_unchanged": 0.75}
    with pytest.raises(ValueError, match="same N > 0 tokens"):
        route_stability(before[0], after[0][:3])


def global_batch_model(tokens):
    from dataclasses import replace

    base = replace(language_model.QUICK, batch=tokens.shape[0])
    cfg = language_model.model_config(base, ARMS[SCOPE_PAIR[0]], vocab_size=50, num_labels=0)
    return language_model.MoETransformer(cfg, seed=0)


def test_the_study_loop_hands_the_global_batch_counts_on_and_restarts_each_step():
    """The second micro batch's Switch loss is the one the layer gives with the first micro batch's
    running counts (and not the one it gives without them); a new step starts from none."""
    tokens = torch.randint(50, (8, language_model.QUICK.seq_len + 1), generator=torch.Generator().manual_seed(1))
    model = global_batch_model(tokens)
    _, _, stats = language_model.accumulate_gradients(model, tokens, None, micro_batches=2)
    with torch.no_grad():  # no optimizer step ran: the weights are the ones the loop saw
        first = model(tokens[:4, :-1], tokens[:4, 1:])
        handed = model(tokens[4:, :-1], tokens[4:, 1:], step_counts=first.step_counts)
        alone = model(tokens[4:, :-1], tokens[4:, 1:])
    for layer in stats[1]:
        loop = stats[1][layer]["loss_switch"]
        torch.testing.assert_close(loop, handed.moe_stats[layer]["loss_switch"])
        assert not torch.allclose(loop, alone.moe_stats[layer]["loss_switch"])
    # The next step's first micro batch sees no counts of the previous step.
    _, _, again = language_model.accumulate_gradients(model, tokens, None, micro_batches=2)
    for layer in again[0]:
        torch.testing.assert_close(again[0][layer]["loss_switch"], first.moe_stats[layer]["loss_switch"])


def test_dp_global_balance_is_micro_batch_balance_in_one_process():
    """Why `topk renormalize` is the global-batch arm's micro-batch twin: with one rank its default
    dp_global scope gives the micro_batch scope's losses and gradients, so a run of its own would
    repeat the same numbers."""
    from dataclasses import replace

    base = replace(language_model.QUICK, batch=8)
    twin = ARMS[SCOPE_PAIR[1]]
    assert twin.moe.get("aux_loss", {}).get("switch_scope", "dp_global") == "dp_global"
    micro_arm = Arm(twin.router, {**twin.moe, "aux_loss": {"switch_scope": "micro_batch"}})
    tokens = torch.randint(50, (base.batch, base.seq_len + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for arm in (twin, micro_arm):
        model = language_model.MoETransformer(language_model.model_config(base, arm, 50, 0), seed=0)
        loss, _, stats = language_model.accumulate_gradients(model, tokens, None, micro_batches=2)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        results.append((loss, [s[layer]["loss_switch"] for s in stats for layer in s], grad))
    (loss_a, switch_a, grad_a), (loss_b, switch_b, grad_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    torch.testing.assert_close(torch.stack(switch_a), torch.stack(switch_b))
    torch.testing.assert_close(grad_a, grad_b)


def test_the_receive_budget_binds_only_over_stand_in_ranks_and_the_policies_differ():
    """At the layer's own ep_size 1 a rank's budget is all T x K pairs: nothing is ever over it.
    Over 4 stand-in ranks (one expert each) a batch of one repeated token (every token routed
    alike: a hot expert) overflows; spill moves pairs where drop drops them. The two arms differ
    only in `overflow`."""
    from dataclasses import replace

    spill_arm, drop_arm = (ARMS[a] for a in OVERFLOW_PAIR)
    assert spill_arm.router == drop_arm.router and spill_arm.moe["overflow"] == "spill"
    assert {**spill_arm.moe, "overflow": "drop"} == drop_arm.moe
    base = replace(language_model.QUICK, batch=4, budget_ranks=4)
    tokens = torch.full((base.batch, base.seq_len + 1), 7)
    counts = {}
    for name, arm in zip(OVERFLOW_PAIR, (spill_arm, drop_arm)):
        for ranks in (0, base.budget_ranks):
            model = language_model.MoETransformer(language_model.model_config(base, arm, 50, 0), seed=0)
            _, _, stats = language_model.accumulate_gradients(model, tokens, None, 1, budget_ranks=ranks)
            counts[name, ranks] = [{k: float(row[k]) for k in ("pairs_over_budget", "pairs_spilled")}
                                   for row in stats[0].values()]
    for name in OVERFLOW_PAIR:
        assert all(row["pairs_over_budget"] == 0 for row in counts[name, 0])
        assert all(row["pairs_over_budget"] > 0 for row in counts[name, 4])
    assert all(row["pairs_spilled"] > 0 for row in counts[OVERFLOW_PAIR[0], 4])
    assert all(row["pairs_spilled"] == 0 for row in counts[OVERFLOW_PAIR[1], 4])


def test_new_arms_run_on_fewer_seeds_in_the_full_budget():
    full = language_model.FULL
    tasks = language_model.tasks(full, {c: f"{c}.pt" for c in full.corpora})
    seeds = {}
    for t in tasks:
        seeds.setdefault(t.kwargs["arm"], []).append(t.kwargs["seed"])
    reduced = {SCOPE_PAIR[0], *OVERFLOW_PAIR}
    assert set(full.reduced_seed_arms) == reduced and full.reduced_seeds >= 3  # issue 22's minimum
    assert all(seeds[a] == list(full.seeds[:full.reduced_seeds]) for a in reduced)
    assert all(seeds[a] == list(full.seeds) for a in full.arms if a not in reduced)
    with pytest.raises(ValueError, match="reduced_seed_arms"):
        language_model.LanguageModelBudget(arms=("topk",), reduced_seed_arms=("hash",))
    with pytest.raises(ValueError, match="reduced_seeds"):
        language_model.LanguageModelBudget(seeds=(0, 1), reduced_seed_arms=("hash",), reduced_seeds=3)
    with pytest.raises(ValueError, match="budget_ranks"):
        language_model.LanguageModelBudget(budget_ranks=3)
