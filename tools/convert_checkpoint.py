#!/usr/bin/env python
"""Convert moe_dist checkpoints: inspect, consolidate, reshard, export-hf, import-hf, upcycle (see --help).

    python tools/convert_checkpoint.py inspect runs/tiny_cpu/checkpoints
    python tools/convert_checkpoint.py consolidate runs/tiny_cpu/checkpoints out/consolidated --dtype bf16
    python tools/convert_checkpoint.py reshard runs/tiny_cpu/checkpoints out/ep4 --ep-size 4 --world-size 4
    python tools/convert_checkpoint.py export-hf runs/tiny_cpu/checkpoints out/hf
    python tools/convert_checkpoint.py upcycle out/dense_consolidated out/moe --num-experts 8 --top-k 2
    python tools/convert_checkpoint.py import-hf /models/OLMoE-1B-7B out/olmoe   # + out/olmoe/run_config.yaml

The logic lives in moe_dist.checkpoint (importable, tested); this file is the entry point.
"""

from __future__ import annotations

import sys

from moe_dist.common.quiet import quiet_library_notices

quiet_library_notices()  # before DeepSpeed's import: `inspect --json` prints JSON alone

from moe_dist.checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
