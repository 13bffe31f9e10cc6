"""GPU discovery and exclusive allocation."""

from __future__ import annotations

import pytest

from modelctl.errors import GpuAllocationError
from modelctl.host.gpus import allocate_gpus, discover_gpus


def test_override_lists_the_gpus(monkeypatch):
    monkeypatch.setenv("MODELCTL_GPUS", "0,1,3")
    assert discover_gpus() == [0, 1, 3]


def test_empty_override_means_no_gpus(monkeypatch):
    monkeypatch.setenv("MODELCTL_GPUS", "")
    assert discover_gpus() == []


def test_bad_override_is_explained(monkeypatch):
    monkeypatch.setenv("MODELCTL_GPUS", "zero")
    with pytest.raises(GpuAllocationError, match="MODELCTL_GPUS"):
        discover_gpus()


def test_counts_take_the_lowest_free_ids_exclusively():
    got = allocate_gpus({"a": (2, False), "b": (1, False)}, [0, 1, 2, 3], {})
    assert got == {"a": [0, 1], "b": [2]}


def test_explicit_ids_are_served_before_counts():
    got = allocate_gpus({"a": (2, False), "b": ((0, 1), False)}, [0, 1, 2, 3], {})
    assert got == {"b": [0, 1], "a": [2, 3]}


def test_gpus_held_by_running_servers_are_skipped():
    assert allocate_gpus({"a": (1, False)}, [0, 1], {0: "old"}) == {"a": [1]}


def test_too_few_gpus_is_an_error_naming_the_server():
    with pytest.raises(GpuAllocationError, match="server 'b' needs 2 GPU"):
        allocate_gpus({"a": (1, False), "b": (2, False)}, [0, 1], {})


def test_taken_explicit_id_names_the_holder():
    with pytest.raises(GpuAllocationError, match="GPU 1 by 'old'"):
        allocate_gpus({"a": ((1,), False)}, [0, 1], {1: "old"})


def test_missing_id_is_an_error():
    with pytest.raises(GpuAllocationError, match="GPU 7 does not exist"):
        allocate_gpus({"a": ((7,), False)}, [0, 1], {})


def test_shared_servers_may_use_taken_gpus():
    assert allocate_gpus({"a": ((0,), True)}, [0], {0: "old"}) == {"a": [0]}


def test_no_gpus_on_the_machine_is_fine_for_cpu_servers():
    assert allocate_gpus({"a": (0, False)}, [], {}) == {"a": []}
