"""Is a training checkpoint tag complete, and did one run write all of it?

The trainer commits a tag by writing `<tag>/moe_dist_complete.json` (the completion marker: run
id, step, every data file with its size and sha256 digest, digest.py) after every rank's files
are on disk and fsynced, and only then moves `latest`. So:

- complete: the marker exists;
- partial: no marker and the tag is newer than `latest` (or there is no `latest`): a save that
  crashed or ran out of space. The next start removes it; `inspect` flags it;
- legacy: no marker but not newer than `latest`: written before markers existed (or by
  an older `reshard`); trusted as before.

Every file of a tag records the run id of the run that wrote it: `rank_state_*` and
`moe_experts_*` as `run_id`, DeepSpeed's files inside the DeepSpeed config they store
(`RUN_ID_KEY`, which the trainer adds to the config it hands DeepSpeed), the model-states file
also in the client state. Two runs writing one directory leave a tag whose files disagree;
`tag_problems` names them. Files are opened memory-mapped, so checking a tag reads kilobytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from moe_dist.checkpoint.files import torch_load
from moe_dist.checkpoint.training.digest import DIGESTS_KEY, digest_problems, tag_digests
from moe_dist.checkpoint.training.layout import CLIENT_KEY, read_latest
from moe_dist.common.atomic import write_text_atomic
from moe_dist.common.config import ConfigError

MARKER = "moe_dist_complete.json"
RUN_ID_KEY = "moe_dist_run_id"  # in the DeepSpeed config dict DeepSpeed stores in its files
COMPLETE, PARTIAL, LEGACY = "complete", "partial", "legacy"
_TAG = re.compile(r"^step_(\d{8})$")


@dataclass
class TagState:
    tag: str
    step: int
    status: str  # COMPLETE, PARTIAL or LEGACY
    run_id: str | None  # from the marker


def tag_step(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def data_files(tag_dir: str) -> list[str]:
    """The files a save wrote into `tag_dir` (not the marker, not hidden temporaries)."""
    return sorted(name for name in os.listdir(tag_dir)
                  if name != MARKER and not name.startswith(".") and os.path.isfile(os.path.join(tag_dir, name)))


def read_marker(tag_dir: str) -> dict[str, Any] | None:
    path = os.path.join(tag_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_marker(tag_dir: str, run_id: str | None, step: int, known: dict[str, str] | None = None) -> None:
    """Record the tag as complete: call only once every data file is written and fsynced.
    `known`: digests the writing ranks computed (digest.py); the other files are hashed here."""
    names = data_files(tag_dir)
    files = {name: os.path.getsize(os.path.join(tag_dir, name)) for name in names}
    known = known or {}
    digests = tag_digests(tag_dir, [n for n in names if n not in known])
    digests.update({n: known[n] for n in names if n in known})
    write_text_atomic(os.path.join(tag_dir, MARKER),
                      json.dumps({"run_id": run_id, "step": step, "files": files, DIGESTS_KEY: digests},
                                 indent=1, sort_keys=True))


def tag_state(checkpoint_dir: str, tag: str, latest: str | None = None) -> TagState:
    latest = read_latest(checkpoint_dir) if latest is None else latest
    tag_dir = os.path.join(checkpoint_dir, tag)
    step = tag_step(tag)
    marker = read_marker(tag_dir) if os.path.isdir(tag_dir) else None
    if marker is not None:
        return TagState(tag, step if step is not None else -1, COMPLETE, marker.get("run_id"))
    latest_step = tag_step(latest) if latest else None
    newer = latest_step is None or step is None or step > latest_step
    return TagState(tag, step if step is not None else -1, PARTIAL if newer and tag != latest else LEGACY, None)


def list_tags(checkpoint_dir: str) -> list[TagState]:
    """Every `step_<N>` directory in `checkpoint_dir`, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    latest = read_latest(checkpoint_dir)
    tags = [name for name in os.listdir(checkpoint_dir)
            if tag_step(name) is not None and os.path.isdir(os.path.join(checkpoint_dir, name))]
    return sorted((tag_state(checkpoint_dir, t, latest) for t in tags), key=lambda s: s.step)


def file_run_ids(path: str) -> list[str | None]:
    """The run ids a checkpoint file records (one or two places), [] where it records none."""
    try:
        obj = torch_load(path, deepspeed=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap needs one
        obj = torch_load(path, deepspeed=True)
    if not isinstance(obj, dict):
        return []
    found = []
    if "run_id" in obj:
        found.append(obj["run_id"])
    if isinstance(obj.get(CLIENT_KEY), dict) and "run_id" in obj[CLIENT_KEY]:
        found.append(obj[CLIENT_KEY]["run_id"])
    if isinstance(obj.get("ds_config"), dict) and RUN_ID_KEY in obj["ds_config"]:
        found.append(obj["ds_config"][RUN_ID_KEY])
    return found


def run_id_problems(tag_dir: str, run_id: str | None) -> list[str]:
    """'<file>: run id X' for every file of the tag that records a run id other than `run_id`."""
    problems = []
    for name in data_files(tag_dir):
        if not name.endswith(".pt"):
            continue
        try:
            ids = file_run_ids(os.path.join(tag_dir, name))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file is itself the finding
            problems.append(f"{os.path.join(tag_dir, name)}: unreadable ({type(e).__name__}: {e})")
            continue
        if any(found != run_id for found in ids):
            problems.append(f"{os.path.join(tag_dir, name)}: run id {sorted(set(map(str, ids)))}")
    return problems


def tag_problems(tag_dir: str) -> list[str]:
    """What makes a committed tag untrustworthy: files missing, resized, changed (digest) or added
    since the marker was written, and files written by another run. [] for a sound tag or a legacy one."""
    marker = read_marker(tag_dir)
    if marker is None:
        return []
    problems = []
    recorded: dict[str, int] = marker.get("files", {})
    present = set(data_files(tag_dir))
    for name, size in sorted(recorded.items()):
        path = os.path.join(tag_dir, name)
        if name not in present:
            problems.append(f"{path}: missing (listed in {MARKER})")
        elif os.path.getsize(path) != size:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, {MARKER} recorded {size}")
    problems += [f"{os.path.join(tag_dir, name)}: not listed in {MARKER}" for name in sorted(present - set(recorded))]
    problems += digest_problems(tag_dir, marker, MARKER)
    problems += [p + f", expected {marker.get('run_id')!r} ({MARKER})"
                 for p in run_id_problems(tag_dir, marker.get("run_id"))]
    return problems


def latest_run_id(checkpoint_dir: str) -> str | None:
    """The run id in the marker of the tag `latest` names: a resumed run keeps its id."""
    latest = read_latest(checkpoint_dir)
    marker = read_marker(os.path.join(checkpoint_dir, latest)) if latest else None
    return marker.get("run_id") if marker else None


def check_latest_tag(checkpoint_dir: str) -> None:
    """The tag --resume loads was committed by one run and has not changed since."""
    latest = read_latest(checkpoint_dir)
    if latest is None or not os.path.isdir(os.path.join(checkpoint_dir, latest)):
        return  # check_checkpoint_dir / the load name this
    problems = tag_problems(os.path.join(checkpoint_dir, latest))
    if problems:
        raise ConfigError(f"--resume: checkpoint {os.path.join(checkpoint_dir, latest)!r} ('latest') is not one "
                          f"run's complete checkpoint: " + "; ".join(problems))


def tag_report(path: str, tag: str | None) -> dict[str, Any] | None:
    """Completeness of the training tag `path` (and `tag`) resolves to, and of its siblings; None
    for a path that holds no training tag (a consolidated checkpoint, say)."""
    base = os.path.basename(os.path.normpath(path))
    if tag is None and tag_step(base) is not None and os.path.isdir(path):
        checkpoint_dir, tag = os.path.dirname(os.path.abspath(path)), base
    else:
        checkpoint_dir, tag = path, tag or (read_latest(path) if os.path.isdir(path) else None)
    if tag is None or not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        return None
    state = tag_state(checkpoint_dir, tag)
    problems = tag_problems(os.path.join(checkpoint_dir, tag)) if state.status == COMPLETE else []
    if state.status == PARTIAL:
        problems.insert(0, (f"tag {tag!r} is incomplete: no completion marker and newer than 'latest' "
                            f"({read_latest(checkpoint_dir)!r}); a save that did not finish, which the next "
                            f"start of the run removes"))
    return {"tag": tag, "status": state.status, "run_id": state.run_id, "problems": problems,
            "tags": {s.tag: s.status for s in list_tags(checkpoint_dir)}}
