"""Loading a checkpoint runs no code and trusts no changed byte (issue 26, items 10 and 3).

- A tag whose files pickle a type that could run code (here an object whose `__reduce__` creates
  a marker file) is refused by `--resume` through the real `deepspeed` launcher, by `inspect` and
  by the conversions, each naming the file and the type, and the marker file never appears.
  DeepSpeed's own `torch.load` of a resume is under the same rule (`deepspeed_loads_weights_only`).
- 4 bytes flipped inside the tensor data of an expert or ZeRO file of `latest` (values still
  finite, size unchanged) are found by the sha256 digests of the completion marker: `--resume`
  exits 2 naming the file, `inspect` exits 3, a conversion 2. A tag committed before digests
  existed still loads, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from tests.harness.train import REPO, free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.files import UnsafeCheckpointError, deepspeed_loads_weights_only, load_pt, torch_load
from moe_dist.checkpoint.training.layout import experts_file, read_latest, zero_file
from moe_dist.checkpoint.training.tags import MARKER, data_files, read_marker, write_marker


class PlantsAFile:
    """Unpickled with weights_only=False, it opens (creates) `path`: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_config(tmp, ckpt, steps: int = 4) -> str:
    cfg = tiny_config(train=dict(steps=steps, checkpoint_interval=2, checkpoint_dir=str(ckpt)))
    return write_yaml(str(tmp / "run.yaml"), cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory of a tiny run through the launcher (tags step 2 and 4)."""
    tmp = tmp_path_factory.mktemp("trained")
    ckpt = tmp / "ckpt"
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", run_config(tmp, ckpt)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ckpt


def copy_of(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    return ckpt, ckpt / read_latest(str(ckpt))


def poison(path, marker: str, keep_marker_consistent: bool = True) -> None:
    """Add an object that plants `marker` on an unsafe load to the dict pickled in `path`; the
    tag's completion marker is rewritten to match (sizes, digests), as a tag crafted elsewhere
    would be, so only the weights-only load stands between the file and the code in it."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["note"] = PlantsAFile(marker)
    torch.save(state, path)
    tag_dir = os.path.dirname(path)
    old = read_marker(tag_dir)
    if keep_marker_consistent and old is not None:
        write_marker(tag_dir, old.get("run_id"), old["step"])


def tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_pickled_object_is_refused_naming_file_and_type(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "x.pt")
    torch.save({"w": torch.zeros(2), "note": PlantsAFile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load '{path}': it pickles (io|_io|builtins)\.open"):
        load_pt(path, "expert")
    with pytest.raises(UnsafeCheckpointError):
        torch_load(path, deepspeed=True, mmap=True)
    assert not os.path.exists(marker)


def test_deepspeeds_own_load_is_weights_only(tmp_path):
    """The resume path: DeepSpeed's TorchCheckpointEngine.load passes weights_only=False itself."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "zero.pt")
    torch.save({"optimizer_state_dict": {"x": PlantsAFile(marker)}}, path)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    with deepspeed_loads_weights_only(engine), pytest.raises(UnsafeCheckpointError, match="io.open|builtins.open"):
        engine.checkpoint_engine.load(path, map_location=torch.device("cpu"))
    assert not os.path.exists(marker)
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's method again after the block


@pytest.mark.slow
@pytest.mark.parametrize("which", ["experts", "zero_legacy_tag"])
def test_resume_through_the_launcher_refuses_code_in_a_tag(trained, tmp_path, which):
    """`experts`: an expert file of a committed tag (its marker rewritten to match); refused in
    preflight. `zero_legacy_tag`: rank 0's ZeRO file of a tag without a marker (written before
    markers existed), which preflight does not read: each rank reads the files of its load
    weights-only before DeepSpeed does, and all stop together (DeepSpeed's own read is
    weights-only too: test_deepspeeds_own_load_is_weights_only)."""
    ckpt, tag_dir = copy_of(trained, tmp_path)
    marker = str(tmp_path / "code_ran")
    if which == "experts":
        target = experts_file(str(tag_dir), 1)
        poison(target, marker)
    else:
        target = zero_file(str(tag_dir), 0, bf16=False)
        os.remove(tag_dir / MARKER)
        poison(target, marker)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", run_config(tmp_path, ckpt, steps=6), "--resume"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-5000:]
    assert f"refused to load {target!r}: it pickles" in out, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    assert not os.path.exists(marker), "the pickled code ran"


@pytest.mark.parametrize("command", ["inspect", "consolidate", "reshard", "export-hf"])
def test_inspect_and_conversions_refuse_code_in_a_tag(trained, tmp_path, command):
    ckpt, tag_dir = copy_of(trained, tmp_path)
    marker = str(tmp_path / "code_ran")
    target = experts_file(str(tag_dir), 0)
    poison(target, marker)
    extra = {"inspect": [], "consolidate": [str(tmp_path / "out")],
             "reshard": [str(tmp_path / "out"), "--ep-size", "1"], "export-hf": [str(tmp_path / "out")]}[command]
    proc = tool(command, str(ckpt), *extra)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"refused to load {target!r}: it pickles" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(marker), "the pickled code ran"
    assert not os.path.exists(tmp_path / "out")


# ---- flipped bytes (item 3) ----------------------------------------------------------------------

def flip_tensor_bytes(path) -> None:
    """XOR 0x01 into the 4 bytes of one fp32 value in the middle of the file's largest tensor: the
    lowest bit of each byte, so the value changes (its exponent by at most 2) and stays finite,
    and the file keeps its size and its zip structure."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len + (info.file_size // 2) // 4 * 4
        f.seek(start)
        old = f.read(4)
        f.seek(start)
        f.write(bytes(b ^ 0x01 for b in old))


def test_the_marker_records_a_sha256_of_every_file(trained):
    tag_dir = str(trained / read_latest(str(trained)))
    marker = read_marker(tag_dir)
    assert sorted(marker["digests"]) == data_files(tag_dir) == sorted(marker["files"])
    assert not [n for n in os.listdir(tag_dir) if n.startswith(".digests_")]  # the ranks' reports merged
    for name, digest in marker["digests"].items():
        with open(os.path.join(tag_dir, name), "rb") as f:
            assert digest == "sha256:" + hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_resume_through_the_launcher_refuses_flipped_bytes_naming_the_file(trained, tmp_path):
    ckpt, tag_dir = copy_of(trained, tmp_path)
    target = experts_file(str(tag_dir), 1)
    flip_tensor_bytes(target)
    experts = torch.load(target, weights_only=True)["experts"]
    assert all(bool(torch.isfinite(t).all()) for t in experts.values())  # the NaN check cannot see it
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", run_config(tmp_path, ckpt, steps=6), "--resume"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-5000:]
    assert f"{target}: content differs from the commit (sha256:" in out, out[-5000:]
    assert "step 5/" not in out and "Traceback" not in out, out[-5000:]


@pytest.mark.parametrize("which", ["experts", "zero"])
def test_inspect_and_a_conversion_refuse_flipped_bytes(trained, tmp_path, which):
    ckpt, tag_dir = copy_of(trained, tmp_path)
    target = experts_file(str(tag_dir), 0) if which == "experts" else zero_file(str(tag_dir), 1, bf16=False)
    flip_tensor_bytes(target)
    proc = tool("inspect", str(ckpt))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{target}: content differs from the commit" in proc.stderr, proc.stderr[-3000:]
    proc = tool("consolidate", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{target}: content differs from the commit" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")


def test_a_tag_committed_before_digests_loads_with_a_note(trained, tmp_path):
    ckpt, tag_dir = copy_of(trained, tmp_path)
    marker = read_marker(str(tag_dir))
    del marker["digests"]
    (tag_dir / MARKER).write_text(json.dumps(marker))
    proc = tool("inspect", str(ckpt))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "was committed without file digests" in proc.stderr
    proc = tool("consolidate", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
