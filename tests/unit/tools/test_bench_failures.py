"""How the benchmarks report a case that fails: `time_cases` drops a case whose step raises and
times the others, `first_line` says why in one line (a bare `assert` names where it fired), and
`--fail-reference` values are parsed or refused by name (tools/bench/timing.py, inject.py)."""

from __future__ import annotations

import pytest

from tools.bench import inject
from tools.bench.timing import first_line, time_cases


def test_a_case_that_raises_is_dropped_and_the_others_are_timed():
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        raise ValueError("boom\nsecond line")

    failed: dict[str, str] = {}
    ms, cpu_ms = time_cases({"ok": ok, "bad": bad}, warmup=1, repeats=3, failed=failed)
    assert failed == {"bad": "ValueError: boom"}
    assert set(ms) == set(cpu_ms) == {"ok"} and ms["ok"] >= 0
    assert calls == {"ok": 4, "bad": 1}  # not retried after its failure
    with pytest.raises(ValueError, match="boom"):  # without `failed`, as before: the caller sees it
        time_cases({"ok": ok, "bad": bad}, warmup=0, repeats=1)


def test_first_line_of_a_bare_assertion_names_where_it_fired():
    # pytest rewrites this file's asserts to carry a message, so the bare one is raised by hand.
    try:
        raise AssertionError
    except AssertionError as e:
        why = first_line(e)
    assert why.startswith("AssertionError at ") and "test_bench_failures.py" in why, why
    assert why.endswith("raise AssertionError"), why
    assert first_line(RuntimeError("x\ny")) == "RuntimeError: x"


def test_fail_reference_values():
    known = ("moe_dist", "deepspeed")
    assert inject.parse_failures(["deepspeed", "moe_dist:run"], known) == {"deepspeed": "build", "moe_dist": "run"}
    with pytest.raises(ValueError, match=r"--fail-reference 'floor': expected CASE\[:STAGE\] with CASE one of "
                                         r"\['moe_dist', 'deepspeed'\]"):
        inject.parse_failures(["floor"], known)
    with pytest.raises(ValueError, match="STAGE one of"):
        inject.parse_failures(["deepspeed:soon"], known)
    with pytest.raises(inject.InjectedFailure, match="deepspeed:build: made to fail on purpose"):
        inject.check_build({"deepspeed": "build"}, "deepspeed")
    inject.check_build({"deepspeed": "run"}, "deepspeed")  # fails later, in its step
    with pytest.raises(inject.InjectedFailure, match="deepspeed:run"):
        inject.wrap_step({"deepspeed": "run"}, "deepspeed", lambda: None)()


def test_a_crashed_pretraining_mode_says_its_final_exception():
    from tools.bench.gpu_check_pretrain import _why

    log = "\n".join([
        "[launch.py] starting", "[rank0]: Traceback (most recent call last):", '[rank0]:   File "x.py", line 1',
        "[rank0]: RuntimeError: first", "[rank0]: ", "[rank0]: During handling of the above exception, another "
        "exception occurred:", "[rank0]: Traceback (most recent call last):", '[rank0]:   File "x.py", line 3',
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "[launch.py] exits with return code = 1"])
    assert _why(log, 1) == "exit 1: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    # Killed by the kernel's OOM killer: no traceback, the launcher's line says how it ended.
    assert _why("[launch.py] Killing subprocess 7\n[launch.py] exits with return code = -9\n", -9) == (
        "exit -9: [launch.py] exits with return code = -9")
