"""Whether the CPU backend's small expert GEMMs run on our AVX-512 kernels (`avx512_gemm`) or on
MKL's batch GEMM: timed once per machine, cached, and forced by `MOE_DIST_AVX512_GEMM`.

Why a measurement and not a rule: the kernels were tuned on AMD EPYC (Zen 4), where MKL runs a
generic code path and they beat it; on an Intel Xeon with AVX-512, MKL's own code path beats them
(issue 21; BENCHMARKS.md, "Kernel tuning constants"). A rule by vendor or instruction set would be
checked on one vendor only and would go stale with each CPU and MKL release; timing both on the
machine itself is right on either.

The trial (`time_both`): the three products the kernels have (x @ W, g @ W.T, x.T @ g) at the
benchmark layer's widths (d_model 512, d_ff 1024), segments of 64 and 192 rows (the benchmark's
E=256 and E=64 sizes), `EXPERTS_PER_THREAD` experts per thread so that every thread has whole
experts in either path, as in the layer, and weights that are cold at every call, as the layer's
E weight matrices are (sets used in turn, together twice the last-level cache). The paths run in
interleaved rounds, alternating which goes first, and each product counts its median round: on a
machine shared with other work the fastest round instead was a lottery (a quiet moment that fell
on one path's call decided the trial). The rounds make `TRIALS` independent measurements; the
kernels are chosen only when every one finds their total below `MARGIN` times MKL's. A near tie
therefore keeps MKL (the reference path), so noise cannot make the layer slower than MKL alone,
and a burst of other work that sways one measurement is not cached (disagreement: MKL for this
process, a new measurement in the next). The two paths' results must agree, or the trial decides
nothing (MKL is kept).

The cache: one small JSON file in the kernels' cache folder (`avx512_gemm.cache_dir()`) per
machine key: CPU model name and flags, torch version (hence its MKL), the kernels' library (its
source and compiler flags) and the thread count. It is written under a temporary name and
published with a hard link, which refuses an existing name: when ranks of one machine run the
trial at once, the first to publish wins and every other adopts the published decision, so ranks
agree and the decision is stable for as long as the file lives. A file that cannot be parsed or
does not hold this key is replaced; a folder that cannot be written keeps the decision in the
process only. Delete the file to measure again.

`MOE_DIST_AVX512_GEMM`: unset, empty or `auto`, the measured choice; `1`, the kernels wherever
they build and pass their check against `torch.mm` (no trial); `0`, MKL's batch GEMM, and the
kernels are not even built. Any other value is a ConfigError.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from moe_dist.common.atomic import temporary_sibling
from moe_dist.common.config import ConfigError

log = logging.getLogger(__name__)

ENV = "MOE_DIST_AVX512_GEMM"
KIND_NN, KIND_NT, KIND_OUTER = 0, 1, 2  # avx512_gemm's kinds (it imports this module, not the reverse)
D, F = 512, 1024
ROWS = (64, 192)
EXPERTS_PER_THREAD = 2  # even: alternating row counts then split evenly between threads
ROUNDS = 3  # timed per measurement, after one warm round
TRIALS = 2  # measurements per trial; a decision is cached only when they all agree
MARGIN = 0.97
MAX_POOL_BYTES = 512 * 2**20  # the trial's weight sets, at most
FORMAT = 1  # part of the key: raise it when the trial changes, so old decisions are measured again

# avx512_gemm's runner: (kind, counts, starts, in_width, out_width, x, w, grad, w_stride, out),
# None for w or grad when the kind does not read it.
HandRunner = Callable[..., None]


def forced() -> bool | None:
    """True / False when `MOE_DIST_AVX512_GEMM` forces the kernels on / off, None for `auto`."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected 0 (MKL's batch GEMM), 1 (moe_dist's "
                      f"AVX-512 kernels) or auto (the faster of the two on this machine, measured once)")


def _cpu_identity() -> tuple[str, str]:
    """(model name, sha of the flags) from /proc/cpuinfo, which the kernels need anyway (Linux)."""
    model = flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and not model:
                model = value.strip()
            elif name == "flags" and not flags:
                flags = value.strip()
    return model, hashlib.sha256(flags.encode()).hexdigest()[:16]


def machine_key(library: str, threads: int) -> dict:
    model, flags = _cpu_identity()
    return {"format": FORMAT, "cpu": model, "flags": flags, "torch": torch.__version__,
            "library": library, "threads": threads}


def cache_path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"avx512_choice-{digest}.json"


def _read(path: Path, key: dict) -> dict | None:
    """The cached record for `key`, or None when the file is missing; raises ValueError when it
    is there but unusable (unreadable, not JSON, another key, no decision)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable: {e}") from e
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("use_avx512"), bool):
        raise ValueError("not a decision for this machine")
    return record


def _publish(path: Path, record: dict) -> dict:
    """Write `record` at `path` (a temporary name, then a link or rename) and return the record
    that is there afterwards: ours, or a valid one another rank published first. A corrupt file
    there is replaced."""
    tmp = temporary_sibling(str(path))
    try:
        Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True))
        try:
            os.link(tmp, path)  # fails if the name exists: another rank's record, or a corrupt file
            return record
        except FileExistsError:
            try:
                theirs = _read(path, record["key"])
            except ValueError:
                theirs = None
            if theirs is not None:
                return theirs
            os.replace(tmp, path)
            return record
        except OSError:  # a filesystem without hard links: a rename still publishes whole files
            os.replace(tmp, path)
            return record
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def decide(folder: Path, key: dict, trial: Callable[[], list[tuple[float, float]]]) -> dict:
    """The record {key, use_avx512, avx512_s, mkl_s, trial_s, settled, cached} for `key`: the
    cached one, else `trial()` run now: (seconds of the kernels, of MKL) for each of its
    independent measurements. Only a settled decision (every measurement agrees) is cached; an
    unsettled one is MKL for this process, and the next process measures again."""
    path = cache_path(folder, key)
    try:
        record = _read(path, key)
    except ValueError as e:
        log.warning("moe_dist: replacing the CPU kernel choice cache %s (%s)", path, e)
        record = None
    if record is not None:
        return {**record, "settled": True, "cached": True}
    start = time.perf_counter()
    runs = trial()
    verdicts = {hand_s < MARGIN * mkl_s for hand_s, mkl_s in runs}
    record = {"key": key, "use_avx512": verdicts == {True}, "avx512_s": min(h for h, _ in runs),
              "mkl_s": min(m for _, m in runs), "trial_s": time.perf_counter() - start}
    if len(verdicts) > 1:
        log.info("moe_dist: the CPU kernel trials disagree %s (a busy machine?); MKL's batch GEMM for "
                 "this process, measured again in the next", runs)
        return {**record, "settled": False, "cached": False}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory")
        record = _publish(path, record)
    except OSError as e:
        log.warning("moe_dist: could not cache the CPU kernel choice in %s (%s); it holds for this "
                    "process only", path, e)
    return {**record, "settled": True, "cached": False}


@functools.cache
def _sgemm_batch():
    """MKL's `cblas_sgemm_batch` in libtorch_cpu, or None. Bound here as `mkl_grouped` binds it:
    `mkl_grouped` imports `avx512_gemm`, whose enablement this module decides, so importing it
    here would close an import cycle."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    fn.restype = None
    return fn


def _mkl_runner(trans_a: bool, trans_b: bool, m, n, k, a: list[int], lda: int, b: list[int], ldb: int,
                c: list[int], ldc: int) -> Callable[[], None]:
    """One batch call (one group per GEMM, row-major), its argument arrays built once."""
    groups = len(a)

    def col(values, dtype=torch.int32):
        return torch.tensor(values if isinstance(values, list) else [values] * groups, dtype=dtype)

    arrays = [col(112 if trans_a else 111), col(112 if trans_b else 111), col(m), col(n), col(k),
              col(1.0, torch.float32), col(a, torch.int64), col(lda), col(b, torch.int64), col(ldb),
              col(0.0, torch.float32), col(c, torch.int64), col(ldc)]
    arrays.append(col(1))
    ptrs = [t.data_ptr() for t in arrays]
    fn = _sgemm_batch()

    def call(keep_alive=arrays):  # ctypes sees raw addresses only: the arrays live with the closure
        fn(101, *ptrs[:13], groups, ptrs[13])

    return call


def _last_level_cache_bytes() -> int:
    """The largest cache of CPU 0 per sysfs (Linux, as the kernels), else 32 MiB."""
    largest = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * unit)
    return largest or 32 * 2**20


def _weight_sets(experts: int) -> int:
    """How many sets of `experts` [D, F] matrices make twice the last-level cache (at most
    `MAX_POOL_BYTES` in all, at least one set)."""
    per_set = experts * D * F * 4
    wanted = -(-2 * _last_level_cache_bytes() // per_set)
    return max(1, min(wanted, MAX_POOL_BYTES // per_set))


def _paths_agree(hand, mkl, experts: int, first_rows: int, y: Tensor, dx: Tensor) -> bool:
    """Both paths on one weight set, compared on the first expert: every expert runs the same code
    in either path, so it shows a wrong binding as well as all of them would, for less."""
    g = torch.Generator().manual_seed(1)
    w = torch.empty(experts, D, F).uniform_(-0.05, 0.05, generator=g)
    results = []
    for path in (hand, mkl):
        dw = torch.empty(experts, D, F)
        for call in path(w, dw):
            call()
        results.append((y[:first_rows].clone(), dx[:first_rows].clone(), dw[0]))
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(*results))


def time_both(run_hand: HandRunner, threads: int | None = None) -> list[tuple[float, float]]:
    """`TRIALS` measurements of (the kernels, MKL's batch GEMM) in seconds for the three products
    on the trial's segments, each the sum over products of the median of its `ROUNDS` interleaved
    rounds (one setup and warm round for all). MKL missing: the kernels win by default (the CPU
    backend then has no MKL path to fall back to)."""
    if _sgemm_batch() is None:
        return [(0.0, float("inf"))] * TRIALS
    experts = EXPERTS_PER_THREAD * (threads or torch.get_num_threads())
    rows = [ROWS[j % len(ROWS)] for j in range(experts)]
    counts = torch.tensor(rows, dtype=torch.int64)
    starts = counts.cumsum(0) - counts
    n, g = sum(rows), torch.Generator().manual_seed(0)
    x, dy = torch.randn(n, D, generator=g), torch.randn(n, F, generator=g)
    # Weight sets used in turn, together twice the last-level cache: each call meets its weights
    # cold, as the layer does with E of them. The outer product writes into a set as the layer's
    # weight gradients are written: to memory nothing has read lately.
    pool = torch.empty(_weight_sets(experts), experts, D, F).uniform_(-0.05, 0.05, generator=g)
    y, dx = torch.empty(n, F), torch.empty(n, D)
    s, at = x.element_size(), [int(v) for v in starts]

    def rows_of(t: Tensor) -> list[int]:
        return [t.data_ptr() + r * t.shape[1] * s for r in at]

    def mats(t: Tensor) -> list[int]:
        return [t.data_ptr() + j * D * F * s for j in range(experts)]

    def hand(w: Tensor, dw: Tensor) -> list[Callable[[], None]]:
        return [lambda: run_hand(KIND_NN, counts, starts, D, F, x, w, None, D * F, y),
                lambda: run_hand(KIND_NT, counts, starts, F, D, dy, w, None, D * F, dx),
                lambda: run_hand(KIND_OUTER, counts, starts, D, F, x, None, dy, D * F, dw)]

    def mkl(w: Tensor, dw: Tensor) -> list[Callable[[], None]]:
        return [_mkl_runner(False, False, rows, F, D, rows_of(x), D, mats(w), F, rows_of(y), F),
                _mkl_runner(False, True, rows, D, F, rows_of(dy), F, mats(w), F, rows_of(dx), D),
                _mkl_runner(True, False, D, F, rows, rows_of(x), D, rows_of(dy), F, mats(dw), F)]

    sets = len(pool)
    paths = {"avx512": [hand(pool[k], pool[(k + 1) % sets]) for k in range(sets)],
             "mkl": [mkl(pool[k], pool[(k + 1) % sets]) for k in range(sets)]}
    times: dict[str, list[list[float]]] = {p: [[] for _ in range(3)] for p in paths}
    turn = 0
    for r in range(TRIALS * ROUNDS + 1):
        # A path runs its three products in a row, as the layer would: running each product through
        # both paths back to back instead hands the second the first's warm caches, which favours
        # MKL (its packing of each weight is the memory-bound part).
        for p in (("avx512", "mkl") if r % 2 else ("mkl", "avx512")):
            for i in range(3):
                call, turn = paths[p][turn % sets][i], turn + 1
                t0 = time.perf_counter()
                call()
                if r:
                    times[p][i].append(time.perf_counter() - t0)
    if not _paths_agree(hand, mkl, experts, rows[0], y, dx):
        # A timing of wrong results decides nothing: keep MKL, the path the layer has without us.
        log.warning("moe_dist: the CPU kernel trial's two paths disagree; choosing MKL's batch GEMM")
        return [(float("inf"), 0.0)] * TRIALS

    def total(path: str, t: int) -> float:
        return sum(statistics.median(ts[t * ROUNDS:(t + 1) * ROUNDS]) for ts in times[path])

    return [(total("avx512", t), total("mkl", t)) for t in range(TRIALS)]
