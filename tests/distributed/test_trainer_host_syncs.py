"""The trainer's host reads (moe_dist/common/host_sync.py's census) over a log interval: a fixed
handful, whatever the number of MoE layers and micro batches (issue 21, acceptance 2, the trainer's
part). The trainer's own step loop runs on one gloo rank (DeepSpeed engine, real data, real
safety guard) on the tiny config with 1 and 2 MoE layers, 1 and 2 micro batches, and 2 and 4 steps
in one log interval, and with multi-token prediction.

Counted: reads whose immediate caller is trainer code (moe_dist/train/, evaluate/, parallel/,
checkpoint/training/). Not counted: the MoE layer's and model's own reads (moe/, model/, routing/,
kernels/: the layer's budget, tests/unit/moe), DeepSpeed's reads inside its engine (its ZeRO
optimizer reads its overflow flag each step: outside moe_dist, printed for the record) and the
torch DataLoader's (a CPU seed drawn when an iterator starts, no device involved). The
census's own `where` names the innermost moe_dist frame, which for a read inside DeepSpeed is the
trainer's `engine.step()` line; this census therefore classifies by the read's immediate caller."""

from __future__ import annotations

import json
import sys
from collections import Counter

from tests.harness.train import run_deepspeed_ranks, tiny_config

from moe_dist.common.host_sync import HostSyncCensus

TRAINER_CODE = ("moe_dist/train/", "moe_dist/evaluate/", "moe_dist/parallel/", "moe_dist/checkpoint/training/")


class ImmediateCallerCensus(HostSyncCensus):
    """The census, with each read also filed under the code that made it (the first frame outside
    torch and the census): "moe_dist/<path>:<line>", "deepspeed", "torch DataLoader" or "other"."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kinds = dict(self.kinds)
        result = super().__torch_function__(func, types, args, kwargs)
        read = [k for k, n in self.kinds.items() if n != kinds.get(k, 0)]
        if read:
            frame = sys._getframe(1)
            loader = False
            while frame is not None and ("/torch/" in frame.f_code.co_filename
                                         or frame.f_code.co_filename.endswith("host_sync.py")):
                loader |= "/torch/utils/data/" in frame.f_code.co_filename
                frame = frame.f_back
            name = frame.f_code.co_filename if frame is not None else ""
            if loader:  # the DataLoader's own (its base seed, drawn on the CPU per iterator)
                where = "torch DataLoader"
            elif "/moe_dist/" in name:
                where = "moe_dist/" + name.split("/moe_dist/", 1)[1] + f":{frame.f_lineno} ({frame.f_code.co_name})"
            else:
                where = "deepspeed" if "/deepspeed/" in name else "other"
            self.callers[f"{read[0]} at {where}"] += 1
        return result

    def trainer_reads(self) -> dict[str, int]:
        return {k: n for k, n in self.callers.items() if " at moe_dist/" in k
                and k.split(" at ", 1)[1].startswith(TRAINER_CODE)}


CASES = {"base": (1, 1, 2), "two_layers": (2, 1, 2), "two_micro_batches": (1, 2, 2), "four_steps": (1, 1, 4),
         "all_doubled": (2, 2, 4),
         # Multi-token prediction: its MoE block is the second MoE layer, its loss one more logged value.
         "mtp": (2, 1, 2)}


def _worker(rank: int, world: int, out: str) -> None:
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import preflight
    from moe_dist.train.trainer import Trainer

    results = {}
    for case, (moe_layers, accum, steps) in CASES.items():
        layout = dict(moe_every=2, moe_offset=1) if moe_layers == 1 else dict(moe_every=1, moe_offset=0)
        if case == "mtp":
            layout = dict(moe_every=1, moe_offset=1, mtp_layers=1)
        cfg = parse_run_config(tiny_config(model=layout, moe=dict(ep_size=1),
                                           train=dict(steps=steps, log_interval=steps, grad_accum=accum,
                                                      eval_interval=0)))
        trainer = Trainer(cfg, preflight(cfg, world, cfg.train.deepspeed_config))
        assert len(trainer.model.moe_layers()) == moe_layers
        trainer.evaluate = lambda: None  # the run's final evaluation: counted on its own below
        census = ImmediateCallerCensus()
        try:
            with census:
                trainer.run()
        finally:
            trainer.safety.close()
        eval_census = ImmediateCallerCensus()
        with eval_census:
            Trainer.evaluate(trainer)
        results[case] = {"trainer": census.trainer_reads(),
                         "deepspeed": sum(n for k, n in census.callers.items() if k.endswith(" at deepspeed")),
                         "evaluation": eval_census.trainer_reads()}
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def test_the_trainer_reads_the_host_a_fixed_handful_of_times_per_log_interval(tmp_path):
    out = str(tmp_path / "census.json")
    run_deepspeed_ranks(_worker, 1, out)
    with open(out) as f:
        results = json.load(f)
    print(json.dumps(results, indent=1))
    total = {case: sum(r["trainer"].values()) for case, r in results.items()}
    detail = json.dumps({case: r["trainer"] for case, r in results.items()}, indent=1)
    # Independent of the number of MoE layers and of micro batches ...
    assert total["two_layers"] == total["base"], detail
    assert total["two_micro_batches"] == total["base"], detail
    assert total["mtp"] == total["base"], detail
    # ... and a + b * steps with b <= 1 (the safety guard's per-step row) and a small a.
    per_step = (total["four_steps"] - total["base"]) / 2
    fixed = total["base"] - 2 * per_step
    assert per_step <= 1 and fixed <= 3, detail
    assert total["all_doubled"] == total["four_steps"], detail
    # An evaluation: one read, whatever the layers.
    evaluation = {case: sum(r["evaluation"].values()) for case, r in results.items()}
    assert set(evaluation.values()) == {1}, json.dumps({c: r["evaluation"] for c, r in results.items()}, indent=1)
