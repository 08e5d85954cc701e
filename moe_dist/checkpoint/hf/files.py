"""The files of a local Hugging Face model directory: config.json and the safetensors weights,
one `model.safetensors` or shards named by `model.safetensors.index.json`.

Reads are lazy: opening checks every header (and, for a sharded model, that each shard the index
names exists and holds the tensors the index puts there) but reads no tensor data; `tensor(name)`
then reads one tensor from its shard. So a conversion can check every name and shape against
config.json before the expensive part, and holds one source tensor at a time beyond what it
keeps. Nothing here downloads: a Hub id instead of a directory is an error.

Only safetensors are read: `pytorch_model.bin` files are pickles (arbitrary code on load), so a
directory with those alone is an error that says how to convert it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from moe_dist.checkpoint.files import CheckpointError, read_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def check_hf_dir(hf_dir: str) -> None:
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"Hugging Face model directory {hf_dir!r} does not exist (only local directories "
                              f"are read: nothing is downloaded)")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json of `hf_dir` as a dict."""
    check_hf_dir(hf_dir)
    path = os.path.join(hf_dir, CONFIG_FILE)
    config = read_json(path, "Hugging Face model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path!r} holds a {type(config).__name__}, expected a JSON object")
    return config


class HFWeights:
    """The safetensors tensors of a Hugging Face directory by name, read lazily; use as a
    context manager (the shards stay open, memory-mapped, until exit)."""

    def __init__(self, hf_dir: str) -> None:
        check_hf_dir(hf_dir)
        self.hf_dir = hf_dir
        self._handles: dict[str, Any] = {}  # shard file name -> safe_open handle
        self._open_handles = contextlib.ExitStack()  # closes them
        self._file_of: dict[str, str] = {}  # tensor name -> shard file name

    # ---- opening ------------------------------------------------------------------------------

    def __enter__(self) -> "HFWeights":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open_handles.close()
        self._handles.clear()

    def _open(self) -> None:
        index_path = os.path.join(self.hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            self._open_sharded(index_path)
        elif os.path.isfile(os.path.join(self.hf_dir, SINGLE_FILE)):
            handle = self._open_file(SINGLE_FILE)
            self._file_of = {name: SINGLE_FILE for name in handle.keys()}
        else:
            pickles = [f for f in _PICKLE_FILES if os.path.isfile(os.path.join(self.hf_dir, f))]
            hint = (f"; it has {pickles[0]} (a pickle, not read for safety): convert it once with transformers, "
                    f"`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`, which writes "
                    f"safetensors" if pickles else "")
            raise CheckpointError(f"{self.hf_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

    def _open_sharded(self, index_path: str) -> None:
        index = read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path!r} has no 'weight_map' (tensor name -> shard file)")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        missing = sorted(s for s in by_shard if not os.path.isfile(os.path.join(self.hf_dir, s)))
        if missing:
            raise CheckpointError(f"missing shard(s) {missing} of {self.hf_dir!r}: {index_path!r} names them for "
                                  f"{sum(len(by_shard[s]) for s in missing)} tensors (e.g. "
                                  f"{by_shard[missing[0]][0]!r})")
        for shard, names in sorted(by_shard.items()):
            present = set(self._open_file(shard).keys())
            absent = sorted(set(names) - present)
            if absent:
                raise CheckpointError(f"shard {os.path.join(self.hf_dir, shard)!r} lacks {len(absent)} tensor(s) "
                                      f"that {index_path!r} puts there, e.g. {absent[:3]}")
        self._file_of = dict(weight_map)

    def _open_file(self, name: str):
        from safetensors import safe_open

        path = os.path.join(self.hf_dir, name)
        try:
            handle = self._open_handles.enter_context(safe_open(path, framework="pt"))
        except Exception as e:  # SafetensorError for a bad header, OSError for a short file
            raise CheckpointError(f"cannot read safetensors file {path!r} ({type(e).__name__}: {e}); the file is "
                                  f"truncated or corrupted") from None
        self._handles[name] = handle
        return handle

    # ---- reading ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def path_of(self, name: str) -> str:
        """The file that holds tensor `name` (the file a message about it should name)."""
        return os.path.join(self.hf_dir, self._file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """torch's dtype name ("float32", "bfloat16", ...)."""
        return _DTYPES.get(self._handles[self._file_of[name]].get_slice(name).get_dtype(), "unknown")

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except Exception as e:  # a header that promises more bytes than the file has
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path_of(name)!r} "
                                  f"({type(e).__name__}: {e}); the file is truncated or corrupted") from None
