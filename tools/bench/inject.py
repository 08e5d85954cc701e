"""Failures made on purpose (`--fail-reference CASE[:STAGE]`), so that a run on CPU takes the paths
a GPU run takes when a reference cannot be built or dies while it runs: the case's row must say
why, every other row must survive, and a moe_dist failure must fail the run.

STAGE is `build` (the default: the case's builder raises before it builds anything) or `run`
(its step raises on its first call, inside the timing rounds). For gpu_check's pretraining, CASE
is `pretrain-MODE` (a `model.moe_recompute` mode), whose worker raises before it trains, so its
launcher run exits non-zero as a crash would.
"""

from __future__ import annotations

from collections.abc import Callable

STAGES = ("build", "run")


class InjectedFailure(RuntimeError):
    pass


def parse_failures(values: list[str], known: tuple[str, ...], flag: str = "--fail-reference") -> dict[str, str]:
    """{case: stage} from `CASE[:STAGE]` values; a clear error names a bad one."""
    out = {}
    for value in values:
        case, _, stage = value.partition(":")
        stage = stage or "build"
        if case not in known or stage not in STAGES:
            raise ValueError(f"{flag} {value!r}: expected CASE[:STAGE] with CASE one of {list(known)} "
                             f"and STAGE one of {list(STAGES)}")
        out[case] = stage
    return out


def message(case: str, stage: str) -> str:
    return f"--fail-reference {case}:{stage}: made to fail on purpose"


def check_build(failures: dict[str, str], case: str) -> None:
    """Raise where `case` is made to fail at build; call first thing in its builder."""
    if failures.get(case) == "build":
        raise InjectedFailure(message(case, "build"))


def wrap_step(failures: dict[str, str], case: str, step: Callable[[], None]) -> Callable[[], None]:
    """`step`, or one that raises where `case` is made to fail at run."""
    if failures.get(case) != "run":
        return step

    def failing() -> None:
        raise InjectedFailure(message(case, "run"))

    return failing
