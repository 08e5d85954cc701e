"""The training-checkpoint format: the one place that writes and reads what the trainer saves.

    <checkpoint_dir>/latest                  the last committed tag (layout.py)
    <checkpoint_dir>/<tag>/...               DeepSpeed's files, the experts per EP rank, RNG states,
                                             the completion marker (layout.py, tags.py)

Modules: `layout` (names and places), `tags` (completion marker, run ids, is a tag whole and one
run's), `writer` (save and load through the DeepSpeed engine, the commit protocol), `disk`
(free space before a save, ENOSPC and a read-only folder as their own errors), `retention` (keep_last, partial tags),
`reader` (TrainingCheckpoint: a tag opened without an engine, for the tools), `zero` (the
ZeRO-1/2 partition layout), `resume` (can this run continue that checkpoint), `reshard` (the
checkpoint for another EP / world size). Everything outside this package uses the names below;
tests/unit/test_import_graph.py enforces it, and that nothing here imports `moe_dist.train`.
"""

from moe_dist.checkpoint.training.disk import EXIT_NO_SPACE, DiskSpaceError
from moe_dist.checkpoint.training.disk import EXIT_NOT_WRITABLE, NotWritableError, check_writable_dir
from moe_dist.checkpoint.training.layout import ENGINE_PREFIX, is_expert_key, read_latest
from moe_dist.checkpoint.training.reader import TrainingCheckpoint
from moe_dist.checkpoint.training.reshard import reshard
from moe_dist.checkpoint.training.resume import check_checkpoint_dir, check_resume
from moe_dist.checkpoint.training.retention import remove_partial_tags, wait_for_deletions
from moe_dist.checkpoint.training.tags import RUN_ID_KEY, check_latest_tag, latest_run_id, tag_report
from moe_dist.checkpoint.training.writer import load_latest, save
from moe_dist.checkpoint.training.zero import check_supported, read_zero_state

__all__ = ["ENGINE_PREFIX", "EXIT_NO_SPACE", "RUN_ID_KEY", "DiskSpaceError", "TrainingCheckpoint",
           "check_checkpoint_dir", "check_latest_tag", "check_resume", "check_supported", "is_expert_key",
           "latest_run_id", "load_latest", "read_latest", "read_zero_state", "remove_partial_tags", "reshard", "save",
           "tag_report", "wait_for_deletions"]
__all__ += ["EXIT_NOT_WRITABLE", "NotWritableError", "check_writable_dir"]
