"""Every check that can fail a run, done before any process group, model or dataset index
exists: a bad value must cost a second, not a cluster allocation. Each error names the numbers.

Checked when the config is parsed (config.py / the data and MoE configs): unknown keys, value
ranges, `moe.num_experts % moe.ep_size`, data and tokenizer files exist and are not empty.
Checked here, against the launch (checks.py runs them in order): world size vs ep_size, batch
sizes vs the DeepSpeed JSON, tokenizer vocabulary vs the model, domain labels vs
`model.num_labels`, the estimated memory per rank vs the device or host RAM (memory.py), the
checkpoint folder (start.py; a folder that cannot be written: run_dir.claim).
Data (data.py, with moe_dist/data/index_check.py): every `.bin` has the size its `.idx` implies, every prefix
gives each requested split at least one document, no token id reaches the vocabulary. Start
points: `train.init_from` holds only finite tensors (finite.py); `--resume` finds whole
files and a stored config this run can continue (moe_dist/checkpoint/training/resume.py).
"""

from moe_dist.train.preflight.checks import Preflight, preflight, requested_samples

__all__ = ["Preflight", "preflight", "requested_samples"]
