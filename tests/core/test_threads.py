"""llama.cpp runs on every usable physical core by default, and SCALPEL_THREADS/--threads override it."""

from __future__ import annotations

import pytest

from core import threads
from core.errors import ScalpelError


def test_physical_cores_count_hyperthreads_once(tmp_path):
    for cpu, core in enumerate([0, 0, 1, 1]):  # two cores with two hyperthreads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert threads.physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert threads.physical_cores({0, 1}, tmp_path) == 1  # affinity to one core's two threads
    assert threads.physical_cores({7}, tmp_path) == 1  # no sysfs entry: one core per CPU


def test_cgroup_quota_bounds_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_env_overrides_and_bad_values_name_the_variable():
    assert threads.default_threads({"SCALPEL_THREADS": "3"}) == 3
    assert threads.default_threads({}) == threads.usable_cores()
    with pytest.raises(ScalpelError, match="SCALPEL_THREADS"):
        threads.default_threads({"SCALPEL_THREADS": "many"})
