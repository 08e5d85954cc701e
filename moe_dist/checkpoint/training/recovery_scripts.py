"""DeepSpeed copies its recovery scripts (`zero_to_fp32.py`, `zero_to_torch.py`) into every
checkpoint folder it saves to. On moe_dist's checkpoints they fail (expert parameters are
partitioned per expert-parallel rank, not over the whole world: "consumed 98304 numels out of
196608 - something is wrong"), yet a DeepSpeed user tries them first. After each save they are
replaced by a script of the same name that says what to run instead and exits 2.
"""

from __future__ import annotations

import os

from moe_dist.common.atomic import write_text_atomic

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")

_SCRIPT = '''#!/usr/bin/env python
"""Written by moe_dist in place of DeepSpeed's {name}, which cannot merge this checkpoint: its
expert parameters are partitioned per expert-parallel rank (docs/checkpoints.md)."""
import sys

sys.stderr.write(
    "error: {name} (DeepSpeed's) cannot read moe_dist checkpoints; one file with every weight:\\n"
    "  python tools/convert_checkpoint.py consolidate {folder} OUT          (model.safetensors + moe_dist.json)\\n"
    "  python tools/convert_checkpoint.py consolidate {folder} OUT --master-weights   (the fp32 master weights)\\n"
    "  python tools/convert_checkpoint.py export-hf {folder} OUT            (a Hugging Face model)\\n"
    "run from the moe_dist repository; docs/checkpoints.md\\n")
sys.exit(2)
'''


def replace_recovery_scripts(checkpoint_dir: str) -> None:
    """Overwrite the DeepSpeed recovery scripts in `checkpoint_dir` (those present) with the message."""
    for name in RECOVERY_SCRIPTS:
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            write_text_atomic(path, _SCRIPT.format(name=name, folder=checkpoint_dir))
            os.chmod(path, 0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
