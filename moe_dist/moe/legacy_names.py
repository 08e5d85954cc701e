"""Persistent names from before the naming rule of moe_dist/moe/__init__.py (a state-dict key is
named by the shape of the whole, consolidated tensor), and their migration, so that checkpoints
written before the rename still load, resume and convert. Nothing writes the old names.

This is the one map. It is applied wherever tensor names are read from a checkpoint file: the
model's own `load_state_dict` (a pre-hook of `MoETransformer`, so DeepSpeed's engine loads
migrate too, the trainer's `--resume` among them), the training-checkpoint reader
(`checkpoint.training`: model states, parameter shapes of the ZeRO groups, buffer names, expert
files) and the consolidated reader (`checkpoint.consolidated`).

A key is renamed by its last component only: each old name below belonged to exactly one module
class, so the module path in front of it stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")

LEGACY_NAMES = {
    "w_in_eDF": "w_in_EDI",  # GroupedExperts: [E, D, I] consolidated, I = 2F with SwiGLU
    "w_out_eFD": "w_out_EFD",  # GroupedExperts
    "w_in_DF": "w_in_DI",  # DenseFFN (dense layers and shared experts): [D, I]
    "probes_EHD": "probes_EJD",  # AttentiveRouter: J is the gate width, H the attention heads
    "basis_DR": "basis_DZ",  # PopulationInhibition, subspace mode: Z is router.rank, R rotary frequencies
}


def current_name(key: str) -> str:
    """`key` (a dotted state-dict key with any prefix) under today's name."""
    head, dot, leaf = key.rpartition(".")
    new = LEGACY_NAMES.get(leaf)
    return key if new is None else head + dot + new


def _both_names(old: str, new: str, where: str) -> ValueError:
    return ValueError(f"{where} holds both {old!r} (the name before the rename) and {new!r}; expected "
                     f"one of them: a checkpoint is written with one set of names")


def migrate_keys(state: Mapping[str, V], where: str) -> dict[str, V]:
    """`state` with every legacy key renamed, in its order (the order of a ZeRO group's
    parameters is its flat layout). `where` names the file in errors."""
    out: dict[str, V] = {}
    for key, value in state.items():
        new = current_name(key)
        if new != key and new in state:
            raise _both_names(key, new, where)
        out[new] = value
    return out


def migrate_names(names: Iterable[str]) -> list[str]:
    return [current_name(n) for n in names]


def migrate_state_dict_in_place(state: dict, prefix: str, where: str) -> None:
    """Rename the legacy keys under `prefix` in `state` itself (what a load_state_dict pre-hook
    must do: torch reads the dict it was given)."""
    for key in [k for k in state if k.startswith(prefix)]:
        new = current_name(key)
        if new == key:
            continue
        if new in state:
            raise _both_names(key, new, where)
        state[new] = state.pop(key)
