"""The checkpoint directory over a run's life, on 2 gloo ranks (ep_size 2): a step that both
evaluates and checkpoints saves first (an evaluation that crashes keeps that step's checkpoint);
a partial tag a crashed save left is flagged by `inspect` (exit 3) and removed by the next start;
`train.keep_last` keeps the newest N; every file of every tag carries the run id, which --resume
keeps."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tests.harness.train import run_deepspeed_ranks, tiny_config

from moe_dist.checkpoint import cli
from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import MARKER, file_run_ids, list_tags, read_marker, tag_problems
from moe_dist.parallel import runtime
from moe_dist.train.config import parse_run_config
from moe_dist.train.trainer import Trainer, pretrain


class EvaluationCrash(RuntimeError):
    pass


def _worker(rank: int, world: int, tmp: str) -> None:
    ckpt = os.path.join(tmp, "ckpt")
    cfg = parse_run_config(tiny_config(train=dict(steps=6, eval_interval=3, checkpoint_interval=1, keep_last=2,
                                                  checkpoint_dir=ckpt)))
    evaluate = Trainer.evaluate

    def crash_at_3(self):
        if self.step == 3:
            raise EvaluationCrash("evaluation failed at step 3")
        return evaluate(self)

    Trainer.evaluate = crash_at_3
    try:
        pretrain(cfg)
        raise AssertionError("the evaluation at step 3 did not raise")
    except EvaluationCrash:
        pass
    finally:
        Trainer.evaluate = evaluate
    report = {}
    if rank == 0:
        report["latest_after_crash"] = read_latest(ckpt)
        report["tags_after_crash"] = [s.tag for s in list_tags(ckpt)]
        report["run_id_first"] = read_marker(os.path.join(ckpt, "step_00000003"))["run_id"]
        # What a save that died half way leaves: a newer tag without the completion marker.
        shutil.copytree(os.path.join(ckpt, "step_00000003"), os.path.join(ckpt, "step_00000004"))
        os.remove(os.path.join(ckpt, "step_00000004", MARKER))
        report["inspect_partial"] = cli.main(["inspect", ckpt, "--tag", "step_00000004"])
        report["inspect_latest"] = cli.main(["inspect", ckpt])
    runtime.barrier()
    pretrain(cfg, resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f)


@pytest.mark.slow  # three trainings of 2 ranks
def test_save_before_eval_partial_tags_keep_last_and_run_id(tmp_path):
    run_deepspeed_ranks(_worker, 2, str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    ckpt = str(tmp_path / "ckpt")
    # Saved before the evaluation that crashed; keep_last=2 had already removed step 1.
    assert report["latest_after_crash"] == "step_00000003"
    assert report["tags_after_crash"] == ["step_00000002", "step_00000003"]
    assert report["inspect_partial"] == cli.EXIT_INCOMPLETE
    assert report["inspect_latest"] == 0
    # The resumed run removed the partial step 4, rewrote it, and kept the newest two.
    assert read_latest(ckpt) == "step_00000006"
    tags = list_tags(ckpt)
    assert [(s.tag, s.status) for s in tags] == [("step_00000005", "complete"), ("step_00000006", "complete")]
    # Nothing else is left: the lock released, the partial and deleted tags gone (DeepSpeed adds its
    # zero_to_fp32 scripts).
    assert sorted(n for n in os.listdir(ckpt) if not n.endswith(".py")) == ["latest", "step_00000005",
                                                                            "step_00000006"]
    for state in tags:
        tag_dir = os.path.join(ckpt, state.tag)
        assert state.run_id == report["run_id_first"], "--resume must keep the run id"
        assert tag_problems(tag_dir) == []
        for name in os.listdir(tag_dir):
            if name.endswith(".pt"):
                ids = file_run_ids(os.path.join(tag_dir, name))
                assert ids and set(ids) == {state.run_id}, (name, ids)
