"""The slot pool: GPUs named through CUDA_VISIBLE_DEVICES, granted in arrival order, released on exit."""

from __future__ import annotations

import threading
import time

import pytest

from rloopd.slots import SlotError, SlotPool, parse_slots


def test_parse_slots():
    assert parse_slots("none", 3) == ("cpu", ["cpu0", "cpu1", "cpu2"])
    assert parse_slots("0,1,3", 1) == ("gpu", ["0", "1", "3"])
    for bad in ("0,0", "a,b", ""):
        with pytest.raises(SlotError, match="--gpus"):
            parse_slots(bad, 1)
    with pytest.raises(SlotError, match="--cpu-slots"):
        parse_slots("none", 0)


def test_gpus_are_named_and_released():
    pool = SlotPool("gpu", ["0", "1", "3"])
    with pool.hold("a", 2) as env:
        assert env == {"CUDA_VISIBLE_DEVICES": "0,1"} and pool.slot_of("a") == ["0", "1"]
        with pool.hold("b", 1) as env_b:
            assert env_b == {"CUDA_VISIBLE_DEVICES": "3"}
    assert pool.free == ["0", "1", "3"] and pool.holders == {}
    with pool.hold("c", 8) as env:  # more than the pool has: all of it
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1,3"


def test_arrival_order_and_cancel():
    pool = SlotPool("cpu", ["cpu0"])
    order, cancelled = [], threading.Event()
    first = pool.hold("first", 1)
    first.__enter__()

    def wait(name: str, cancel: threading.Event | None = None) -> None:
        with pool.hold(name, 1, cancel) as env:
            order.append((name, env is not None))

    threads = [threading.Thread(target=wait, args=("second",)),
               threading.Thread(target=wait, args=("cancelled", cancelled)),
               threading.Thread(target=wait, args=("third",))]
    for t in threads:
        t.start()
        time.sleep(0.3)  # arrive in this order
    cancelled.set()
    time.sleep(0.5)
    first.__exit__(None, None, None)
    for t in threads:
        t.join(10)
    assert order == [("cancelled", False), ("second", True), ("third", True)]
