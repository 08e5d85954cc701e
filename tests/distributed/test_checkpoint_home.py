"""A save and a resume stay inside the training-checkpoint format's package (docs/design.md): every
moe_dist file rank 0 enters while the trainer's checkpoint calls and the resume's preflight checks
run is in checkpoint/training/, checkpoint/files.py, the shared infrastructure (common/,
parallel/) or the model's own state-dict hook. A format helper left in train/ (or a tool module)
shows up here by name."""

from __future__ import annotations

import json
import os
import sys

from tests.harness.train import run_deepspeed_ranks, tiny_config

import moe_dist

LIBRARY = os.path.abspath(list(moe_dist.__path__)[0]) + os.sep
# Beside the format: shared infrastructure, and the model's own load_state_dict pre-hook, which
# migrates the parameter names the model owns (moe/legacy_names.py) wherever a state dict is loaded.
HOME = ("checkpoint/training/", "checkpoint/files.py", "common/", "parallel/", "model/transformer.py",
        "moe/legacy_names.py")


def _traced(kind: str, seen: dict[str, set[str]], fn):
    def run(*args, **kwargs):
        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(LIBRARY):
                seen[kind].add(frame.f_code.co_filename[len(LIBRARY):].replace(os.sep, "/"))
        sys.setprofile(profile)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(None)
    return run


def _worker(rank: int, world: int, tmp: str) -> None:
    from moe_dist.train import trainer
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import checks

    seen: dict[str, set[str]] = {"save": set(), "resume": set()}
    if rank == 0:
        fmt = trainer.checkpoint
        for name in ("save", "load_latest"):
            setattr(fmt, name, _traced("save" if name == "save" else "resume", seen, getattr(fmt, name)))
        for name in ("check_checkpoint_dir", "check_latest_tag", "check_resume"):
            setattr(checks, name, _traced("resume", seen, getattr(checks, name)))
    cfg = parse_run_config(tiny_config(train=dict(steps=2, checkpoint_dir=os.path.join(tmp, "ckpt"))))
    trainer.pretrain(cfg, stop_at_step=1)
    trainer.pretrain(cfg, resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "seen.json"), "w") as f:
            json.dump({kind: sorted(files) for kind, files in seen.items()}, f)


def test_save_and_resume_stay_in_the_format_package(tmp_path):
    run_deepspeed_ranks(_worker, 2, str(tmp_path))
    seen = json.loads((tmp_path / "seen.json").read_text())
    for kind in ("save", "resume"):
        assert "checkpoint/training/writer.py" in seen[kind], seen  # the tracing saw the calls
        outside = [f for f in seen[kind] if not f.startswith(HOME)]
        assert not outside, f"a {kind} entered {outside} outside {HOME}; all it entered: {seen[kind]}"
