"""How many CPU threads llama.cpp runs with: every physical core this process may use, unless told.

llama-cpp-python's own default is `cpu_count() // 2`, which assumes two hyperthreads per core and
gives one thread on a 2-core VM. We count the physical cores (sysfs core ids) among the CPUs this
process may run on (`os.sched_getaffinity`), bounded by a cgroup CPU quota when there is one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from core.errors import ScalpelError

ENV = "SCALPEL_THREADS"
SYS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sys_cpu: Path = SYS_CPU) -> int:
    """Distinct (package, core) pairs among `cpus`; where sysfs says nothing, one core per CPU."""
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            core = (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            core = ("cpu", str(cpu))
        cores.add(core)
    return max(len(cores), 1)


def cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup v2 quota allows (rounded up), or None when there is no quota."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(math.ceil(int(quota) / int(period)), 1)


def usable_cores() -> int:
    """Physical cores this process may use."""
    cores = physical_cores(usable_cpus())
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def default_threads(env: dict[str, str] | None = None) -> int:
    """SCALPEL_THREADS when set, else usable_cores()."""
    value = (os.environ if env is None else env).get(ENV, "").strip()
    if not value:
        return usable_cores()
    if not value.isdigit() or int(value) < 1:
        raise ScalpelError(f"{ENV}={value!r}: expected a whole number of threads, 1 or more", param=ENV)
    return int(value)


def resolve(threads: int | None) -> int:
    """An explicit --threads value, or the default."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise ScalpelError(f"threads must be 1 or more, not {threads}", param="threads")
    return threads
