"""What the trainer deletes in its checkpoint directory, and nothing else: partial tags a crashed
save left (moe_dist/checkpoint/training/tags.py says which those are) at the next start, and the oldest
complete tags beyond `train.keep_last` after `latest` has moved.

A tag is deleted by renaming it to a hidden `.deleting-<tag>-...` name first and removing that:
a crash in the middle of the removal then leaves a hidden folder (removed at the next start), not
a tag with its marker but half its files.
"""

from __future__ import annotations

import os
import shutil

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import COMPLETE, PARTIAL, list_tags
from moe_dist.common.atomic import temporary_sibling

DELETING = "deleting"


def delete_tag(checkpoint_dir: str, tag: str) -> None:
    path = os.path.join(checkpoint_dir, tag)
    aside = temporary_sibling(path, DELETING)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_partial_tags(checkpoint_dir: str) -> list[str]:
    """Remove the partial tags (and half-deleted leftovers) of `checkpoint_dir`; returns the tags."""
    if not os.path.isdir(checkpoint_dir):
        return []
    for name in os.listdir(checkpoint_dir):
        if name.startswith(".step_") and f".{DELETING}-" in name:
            shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
    removed = [s.tag for s in list_tags(checkpoint_dir) if s.status == PARTIAL]
    for tag in removed:
        delete_tag(checkpoint_dir, tag)
    return removed


def apply_keep_last(checkpoint_dir: str, keep_last: int | None) -> list[str]:
    """Delete the oldest complete tags so that at most `keep_last` remain; the tag `latest` names
    is always kept. Legacy tags (no marker) are never deleted. Returns the deleted tags."""
    if keep_last is None:
        return []
    latest = read_latest(checkpoint_dir)
    complete = [s.tag for s in list_tags(checkpoint_dir) if s.status == COMPLETE]
    keep = set(complete[-keep_last:]) | {latest}
    deleted = [t for t in complete if t not in keep]
    for tag in deleted:
        delete_tag(checkpoint_dir, tag)
    return deleted
