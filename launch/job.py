#!/usr/bin/env python
"""Run a moe_dist job under DeepSpeed's launcher with an exit status a scheduler can trust: takes
exactly the arguments of `deepspeed`, waits for every process of the job, and exits 75 when every
rank stopped on a signal with its checkpoint committed, whichever process got the signal.

    python launch/job.py --num_gpus 2 launch/pretrain.py --config configs/tiny_cpu.yaml

A SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this process is passed to the ranks. Why bare `deepspeed`
cannot do this, and the statuses: moe_dist/train/safety/job.py, docs/launch.md.
"""

from __future__ import annotations

import sys

from moe_dist.train.safety.job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
