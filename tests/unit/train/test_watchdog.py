"""The watchdog's hang report costs O(W) store reads (moe_dist/train/safety/watchdog.py): W ranks'
watchdogs fire at once against a counting fake store (W = 4 and W = 64, threads in one process);
one rank reads the heartbeats, every rank prints the same verdict. Before, every rank read every
key twice (check and get, two readings): 4 W^2 reads."""

from __future__ import annotations

import datetime
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe_dist.train.safety import watchdog
from moe_dist.train.safety.watchdog import KEY, hang_report, read_heartbeats


class CountingStore:
    """A TCPStore stand-in that counts every key an operation touches. Live ranks' heartbeats tick
    on every read (their publishers run); `silent` ranks' do not."""

    def __init__(self, world: int, silent: set[int], step: int = 5, missing: set[int] = frozenset()) -> None:
        self.data: dict[str, bytes] = {KEY.format(rank=r): f"{step}:1".encode() for r in range(world) if r not in missing}
        self.silent = {KEY.format(rank=r) for r in silent}
        self.reads = 0
        self.lock = threading.Condition()

    def _read(self, key: str) -> bytes:
        self.reads += 1
        value = self.data[key]
        if key.startswith("moe_dist/heartbeat/") and key not in self.silent:
            step, beats = value.decode().split(":")
            self.data[key] = f"{step}:{int(beats) + 1}".encode()
        return value

    def check(self, keys):
        with self.lock:
            self.reads += len(keys)
            return all(k in self.data for k in keys)

    def get(self, key):
        with self.lock:
            return self._read(key)

    def multi_get(self, keys):
        with self.lock:
            return [self._read(k) for k in keys]

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value
            self.lock.notify_all()

    def add(self, key, amount):
        with self.lock:
            self.reads += 1
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value

    def wait(self, keys, timeout: datetime.timedelta):
        with self.lock:
            self.reads += 1
            if not self.lock.wait_for(lambda: all(k in self.data for k in keys), timeout.total_seconds()):
                raise RuntimeError(f"wait timeout after {timeout}")


def fire_everywhere(store, world: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=world) as pool:
        return list(pool.map(lambda _: hang_report(store, world, poll_s=0.01), range(world)))


@pytest.mark.parametrize("world", [4, 64])
def test_the_hang_report_reads_the_store_o_of_w_times(world):
    store = CountingStore(world, silent={2})
    reports = fire_everywhere(store, world)
    assert reports == ["rank(s) 2 (heartbeat silent: stopped, dead or wedged)"] * world
    # Keys touched: the reporter's 2 readings x (a check of W keys + W gets); each rank's claim;
    # the others' wait and get of the report.
    assert store.reads == 2 * (world + world) + world + 2 * (world - 1)
    assert store.reads < 8 * world < 4 * world * world


def test_a_rank_that_never_published_costs_one_check_per_key():
    world = 8
    store = CountingStore(world, silent=set(), missing={5})
    before = read_heartbeats(store, world)
    assert sorted(before) == [r for r in range(world) if r != 5]
    assert store.reads == world + world + (world - 1)  # the joint check, one check per key, the gets
    assert "rank(s) 5" in fire_everywhere(CountingStore(world, silent=set(), missing={5}), world)[0]


def test_a_store_without_multi_get_is_read_key_by_key():
    class Plain(CountingStore):
        multi_get = property()  # hasattr() is False

    store = Plain(4, silent=set(), step=3)
    assert read_heartbeats(store, 4) == {r: (3, 1) for r in range(4)}


def test_a_store_that_does_not_answer_names_rank_0_within_the_bound(monkeypatch):
    monkeypatch.setattr(watchdog, "READ_BOUND_S", 0.2)

    class Dead:
        def __getattr__(self, name):
            return lambda *a, **k: time.sleep(60)

    t0 = time.monotonic()
    assert "rank 0 (it hosts the key-value store" in hang_report(Dead(), 4, poll_s=0.01)
    assert time.monotonic() - t0 < 5


def test_a_reporter_that_never_publishes_leaves_the_others_a_bounded_wait(monkeypatch):
    monkeypatch.setattr(watchdog, "READ_BOUND_S", 0.1)
    store = CountingStore(4, silent=set())
    store.add(watchdog.CLAIM_KEY, 1)  # a reporter took the claim and then stopped
    t0 = time.monotonic()
    report = hang_report(store, 4, poll_s=0.01)
    assert report.startswith("unknown (the rank reading the heartbeats did not publish its report within")
    assert time.monotonic() - t0 < 5
