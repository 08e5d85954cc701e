"""The per-machine choice between the AVX-512 kernels and MKL's batch GEMM
(`moe_dist/kernels/cpu/kernel_choice.py`): the decision from the trial's timings, its cache (hits,
corrupt files, concurrent writers, an unwritable folder), the environment's override, the CPU
backend following the decision, and, where the kernels build, a real trial's measurements. Whether
the trial's verdict matches a direct timing of the backend's calls is read with
`python -m tools.bench.kernel_trial`: two timings on a shared machine disagree by chance, so a test
never asserts it."""

import functools
import json
import logging
import threading
import time

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.kernels.cpu import avx512_gemm, kernel_choice, mkl_grouped

needs_kernels = pytest.mark.skipif(avx512_gemm._library() is None or not avx512_gemm._self_check(),
                                   reason="no AVX-512 CPU, no C compiler or a failed self-check here")
KEY = kernel_choice.machine_key("avx512_gemm-test.so", 2)


def trial_of(hand_s: float, mkl_s: float, calls: list | None = None):
    """A trial whose every measurement gives these times."""
    def trial():
        if calls is not None:
            calls.append(1)
        return [(hand_s, mkl_s)] * kernel_choice.TRIALS
    return trial


def no_trial():
    raise AssertionError("the trial ran although the decision was cached")


@pytest.mark.parametrize("hand_s,mkl_s,use", [(0.5, 1.0, True), (1.0, 0.5, False), (0.99, 1.0, False)],
                         ids=["kernels_faster", "mkl_faster", "near_tie_keeps_mkl"])
def test_the_faster_path_is_chosen_and_cached(tmp_path, hand_s, mkl_s, use):
    record = kernel_choice.decide(tmp_path, KEY, trial_of(hand_s, mkl_s))
    assert record["use_avx512"] is use and not record["cached"]
    again = kernel_choice.decide(tmp_path, KEY, no_trial)  # a fresh read of the file, as another process
    assert again["use_avx512"] is use and again["cached"]
    assert [p.name for p in tmp_path.iterdir()] == [kernel_choice.cache_path(tmp_path, KEY).name]


def test_trials_that_disagree_keep_mkl_and_cache_nothing(tmp_path):
    """A burst of other work that sways one trial neither picks the kernels nor is kept: the next
    process measures again."""
    trials = iter([[(0.5, 1.0), (1.0, 0.5)], [(0.5, 1.0), (0.5, 1.0)]])
    record = kernel_choice.decide(tmp_path, KEY, lambda: next(trials))
    assert record["use_avx512"] is False and not record["settled"] and not record["cached"]
    assert list(tmp_path.iterdir()) == []
    record = kernel_choice.decide(tmp_path, KEY, lambda: next(trials))
    assert record["use_avx512"] is True and record["settled"]
    assert kernel_choice.decide(tmp_path, KEY, no_trial)["use_avx512"] is True


def test_the_cache_is_per_machine_key(tmp_path):
    kernel_choice.decide(tmp_path, KEY, trial_of(0.5, 1.0))
    other = {**KEY, "threads": 64}
    calls = []
    assert kernel_choice.decide(tmp_path, other, trial_of(1.0, 0.5, calls))["use_avx512"] is False
    assert calls == [1]
    assert kernel_choice.decide(tmp_path, KEY, no_trial)["use_avx512"] is True


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00binary", b"[1, 2]",
                                     b'{"key": {"cpu": "another"}, "use_avx512": true}',
                                     b"KEY_WITHOUT_DECISION"],
                         ids=["empty", "truncated", "binary", "not_a_record", "other_key", "no_decision"])
def test_a_corrupt_cache_is_replaced(tmp_path, content, caplog):
    path = kernel_choice.cache_path(tmp_path, KEY)
    if content == b"KEY_WITHOUT_DECISION":
        content = json.dumps({"key": KEY, "use_avx512": "yes"}).encode()
    path.write_bytes(content)
    calls = []
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        record = kernel_choice.decide(tmp_path, KEY, trial_of(0.5, 1.0, calls))
    assert calls == [1] and record["use_avx512"] is True
    assert "replacing the CPU kernel choice cache" in caplog.text
    assert kernel_choice.decide(tmp_path, KEY, no_trial)["use_avx512"] is True  # the file was rewritten
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_an_unwritable_cache_decides_for_the_process_only(tmp_path, caplog):
    kernel_choice.cache_path(tmp_path, KEY).mkdir()  # neither readable as a file nor replaceable
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        assert kernel_choice.decide(tmp_path, KEY, trial_of(1.0, 0.5))["use_avx512"] is False
    assert "holds for this process only" in caplog.text
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert kernel_choice.decide(blocked / "cache", KEY, trial_of(0.5, 1.0))["use_avx512"] is True


def test_concurrent_writers_agree_on_the_first_published_decision(tmp_path):
    """Ranks that time at once and disagree (noise) all end with the decision that was published
    first, and the file is whole."""
    n, results = 8, [None] * 8
    barrier = threading.Barrier(n)

    def rank(i):
        def trial():
            barrier.wait()  # every rank has read a missing cache before any publishes
            time.sleep(0.001 * (n - i))
            return [(0.5, 1.0) if i % 2 else (1.0, 0.5)] * kernel_choice.TRIALS
        results[i] = kernel_choice.decide(tmp_path, KEY, trial)["use_avx512"]

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = json.loads(kernel_choice.cache_path(tmp_path, KEY).read_text())
    assert results == [published["use_avx512"]] * n
    assert [p.name for p in tmp_path.iterdir()] == [kernel_choice.cache_path(tmp_path, KEY).name]


@pytest.mark.parametrize("value,want", [(None, None), ("", None), ("auto", None), ("AUTO", None),
                                        ("0", False), ("1", True), (" 1 ", True)])
def test_the_environment_values(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(kernel_choice.ENV, raising=False)
    else:
        monkeypatch.setenv(kernel_choice.ENV, value)
    assert kernel_choice.forced() is want


@pytest.mark.parametrize("value", ["yes", "2", "mkl"])
def test_an_unknown_environment_value_is_refused(monkeypatch, value):
    monkeypatch.setenv(kernel_choice.ENV, value)
    with pytest.raises(ConfigError, match="expected 0 .* 1 .* or auto"):
        kernel_choice.forced()


# ---- the CPU backend following the decision (needs the kernels) ---------------------------------


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """A cache folder of the test's own and no decision in memory; `set_trial(hand_s, mkl_s)`
    replaces the timing and returns the list of its calls."""
    monkeypatch.setenv("MOE_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(kernel_choice.ENV, raising=False)
    avx512_gemm._measured.cache_clear()

    def set_trial(hand_s, mkl_s):
        calls = []
        monkeypatch.setattr(kernel_choice, "time_both", lambda run, threads=None: trial_of(hand_s, mkl_s, calls)())
        return calls

    yield set_trial
    avx512_gemm._measured.cache_clear()


def _backend_paths() -> dict[str, int]:
    """Run one product through the CPU backend (`mkl_grouped.segment_mm`, segments below the
    own-GEMM size) and count the calls of each path."""
    ran = {"avx512": 0, "mkl": 0}

    def counted(real, key):
        def call(*a):
            ran[key] += 1
            return real(*a)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(avx512_gemm, "_run", counted(avx512_gemm._run, "avx512"))
        mp.setattr(mkl_grouped, "_call", counted(mkl_grouped._call, "mkl"))
        x, w = torch.randn(40, 64), torch.randn(2, 64, 128)
        y = mkl_grouped.segment_mm(x, w, [25, 15], transpose_w=False)
    torch.testing.assert_close(y, torch.cat([x[:25] @ w[0], x[25:] @ w[1]]), rtol=1e-5, atol=1e-4)
    return ran


@needs_kernels
@pytest.mark.parametrize("hand_s,mkl_s,path", [(0.5, 1.0, "avx512"), (1.0, 0.5, "mkl")])
def test_the_backend_runs_the_faster_path(monkeypatch, fresh_choice, hand_s, mkl_s, path, caplog):
    calls = fresh_choice(hand_s, mkl_s)
    with caplog.at_level(logging.INFO, logger=avx512_gemm.__name__):
        first, second = _backend_paths(), _backend_paths()
    assert first[path] == 1 and first == second, (first, second)
    assert calls == [1]  # measured once per process
    logged = [r for r in caplog.records if "CPU expert GEMMs" in r.getMessage()]
    assert len(logged) == 1 and ("AVX-512 kernels (" if path == "avx512" else "MKL's batch GEMM (") \
        in logged[0].getMessage()


@needs_kernels
def test_a_cached_decision_skips_the_trial_in_a_new_process(monkeypatch, fresh_choice):
    fresh_choice(1.0, 0.5)
    assert _backend_paths()["mkl"] == 1
    avx512_gemm._measured.cache_clear()  # what a new process has: only the file
    calls = fresh_choice(0.5, 1.0)  # a trial now would choose the kernels
    assert _backend_paths()["mkl"] == 1 and calls == []


@needs_kernels
@pytest.mark.parametrize("value,path", [("1", "avx512"), ("0", "mkl")])
def test_the_environment_overrides_the_measurement(monkeypatch, fresh_choice, value, path):
    calls = fresh_choice(*((1.0, 0.5) if path == "avx512" else (0.5, 1.0)))  # the trial says otherwise
    monkeypatch.setenv(kernel_choice.ENV, value)
    assert _backend_paths()[path] == 1 and calls == []


@needs_kernels
def test_a_real_trial_measures_both_paths_on_agreeing_outputs():
    """The trial's outputs agree between the paths (else it reports MKL infinitely faster), so
    every measurement is a finite time for each path. Whether its verdict matches the backend's
    own calls is a timing question, read with `python -m tools.bench.kernel_trial`, never asserted."""
    lib = avx512_gemm._library()
    runs = kernel_choice.time_both(functools.partial(avx512_gemm._launch, lib))
    assert len(runs) == kernel_choice.TRIALS
    assert all(len(run) == 2 and 0 < t < float("inf") for run in runs for t in run), runs


@needs_kernels
def test_the_trial_bench_prints_a_verdict_per_round(capsys):
    from tools.bench import kernel_trial
    assert kernel_trial.main(["--rounds", "1"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[-1].split()[-1] in {"agree", "DISAGREE", "tie"}, rows
