"""What the sha256 digests of a checkpoint tag cost (BENCHMARKS.md, "Checkpoint digests").

Runs through the real `deepspeed` launcher (2 CPU ranks, the tests' tiny config scaled up to a
tag of a few hundred MB, a save after every step), alternating with digests and without (the
ranks' `hashlib.file_digest` replaced by a constant: the save as it was before digests); the trainer logs
each save's time. Then, on the last tag while its files are in the page cache (as they are at the
commit, just fsynced): hashing all of its files in one process, and the check `--resume` and
`inspect` run (`tag_report`: sizes, digests, run ids), each the median of --repeats.

    python -m tools.bench.checkpoint_digest --out /tmp/digest_bench [--d-model 256 --experts 8 --rounds 2]

With --without-digests it is the launched program (launch/pretrain.py with hashing off).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import yaml

from moe_dist.checkpoint.training import read_latest, tag_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_config(out: str, d_model: int, experts: int) -> dict:
    return {
        "model": dict(vocab_size=257, d_model=d_model, n_layers=4, n_heads=8, d_ff=4 * d_model, max_seq_len=32,
                      moe_every=1, moe_offset=0),
        "moe": dict(num_experts=experts, ep_size=2, top_k=2, d_ff=2 * d_model, capacity_factor=1.25),
        "data": dict(kind="synthetic", tokenizer={"kind": "byte"}, synthetic={"num_domains": 4}),
        "train": dict(deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"), steps=4, seq_len=32,
                      micro_batch=1, grad_accum=1, lr=1e-3, warmup_steps=1, log_interval=1, eval_interval=0,
                      eval_iters=1, checkpoint_interval=1, checkpoint_dir=os.path.join(out, "ckpt")),
        "cpu": dict(threads=1),
    }


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pretrain_without_digests() -> None:
    import runpy

    class NoDigest:
        def hexdigest(self) -> str:
            return "0"

    hashlib.file_digest = lambda f, algorithm: NoDigest()  # the digest module's one hashing call
    # The launcher passes --local_rank=N first, then the program's own arguments.
    sys.argv = [os.path.join(REPO, "launch/pretrain.py"), *(a for a in sys.argv[1:] if a != "--without-digests")]
    runpy.run_path(sys.argv[0], run_name="__main__")


def saves(config: str, digests: bool) -> list[float]:
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    # As a module: run as a file, this folder would be sys.path[0] and its megatron.py would shadow
    # Megatron-Core.
    program = ["launch/pretrain.py"] if digests else ["--module", "tools.bench.checkpoint_digest", "--without-digests"]
    proc = subprocess.run([exe, "--num_gpus", "2", "--master_port", "29517", *program, "--config", config],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return [float(s) for s in re.findall(r"saved checkpoint \S+ in ([\d.]+)s", proc.stdout)]


def main() -> int:
    if "--without-digests" in sys.argv:
        pretrain_without_digests()
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch folder (replaced)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="launches with and without digests, alternating")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    config = os.path.join(args.out, "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(run_config(args.out, args.d_model, args.experts), f)
    ckpt = os.path.join(args.out, "ckpt")
    with_digests, without = [], []
    for _ in range(args.rounds):
        for on, found in ((False, without), (True, with_digests)):
            shutil.rmtree(ckpt, ignore_errors=True)
            found += saves(config, on)
    tag_dir = os.path.join(ckpt, read_latest(ckpt))
    paths = sorted(os.path.join(tag_dir, n) for n in os.listdir(tag_dir) if n.endswith(".pt"))
    size = sum(os.path.getsize(p) for p in paths)

    def hash_all():
        for path in paths:
            with open(path, "rb") as f:
                hashlib.file_digest(f, "sha256")

    hashing = median_s(hash_all, args.repeats)

    def check():
        for path in paths:  # a new mtime: the digest module's per-process memo misses
            os.utime(path)
        assert tag_report(ckpt, None)["problems"] == []

    checking = median_s(check, args.repeats)
    print(json.dumps({"tag_MB": round(size / 2**20, 1), "files": len(paths),
                      "save_s_with_digests": sorted(with_digests), "save_s_without": sorted(without),
                      "median_with": statistics.median(with_digests), "median_without": statistics.median(without),
                      "digests_s": round(hashing, 3),
                      "digest_MB_per_s": round(size / 2**20 / hashing), "resume_check_s": round(checking, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
