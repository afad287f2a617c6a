"""How llama-cpp-python is built, in one place: the CPU's own features, and never AMX unless asked.

llama-cpp-python compiles llama.cpp with `-march=native` by default. On Xeons with AMX in a VM
that turns on ggml's AMX kernels, and the first quantized matmul dies with a general protection
fault (llama.cpp issue 20824). So the build turns `GGML_NATIVE` off and names each x86 feature
that /proc/cpuinfo reports, one by one, leaving the three AMX options off unless
SCALPEL_LLAMA_AMX=1.

This file runs as a plain script before anything is installed (`scripts/setup.sh` calls it), so
it imports only the standard library. `scalpel doctor` and the tests import it to compare the
installed build with what it asked for.

    python core/llama_build.py cmake-args   # the CMAKE_ARGS for this machine
    python core/llama_build.py key          # a cache key for the wheel built with them
    python core/llama_build.py check        # exit 1 with a reason if the installed build differs
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# ggml's CMake option -> the /proc/cpuinfo flags it needs, all of them. The option's name without
# "GGML_" is also the name llama_print_system_info() prints when the feature is compiled in
# (SSE4.2 is the one it never prints).
X86_FEATURES: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    # ggml's AVX512 option compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
X86_AMX: dict[str, tuple[str, ...]] = {
    "GGML_AMX_TILE": ("amx_tile",),
    "GGML_AMX_INT8": ("amx_int8",),
    "GGML_AMX_BF16": ("amx_bf16",),
}
NOT_REPORTED = {"GGML_SSE42", "GGML_AMX_TILE", "GGML_AMX_BF16"}


@dataclass(frozen=True)
class BuildPlan:
    """What the build asks CMake for, and what llama_print_system_info() must then say."""

    backend: str  # "cpu", "cuda" or "metal"
    cmake_args: tuple[str, ...]
    amx: bool
    expected_features: tuple[str, ...] = field(default=())  # names as system info prints them


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where there is none (macOS, Windows)."""
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.exists() else ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def choose_backend(env: dict[str, str], system: str, machine: str) -> str:
    """SCALPEL_LLAMA_BACKEND if set; otherwise Metal on Apple silicon, CUDA where a GPU answers."""
    asked = env.get("SCALPEL_LLAMA_BACKEND", "auto").strip().lower() or "auto"
    if asked not in {"auto", "cpu", "cuda", "metal"}:
        raise SystemExit(f"SCALPEL_LLAMA_BACKEND={asked!r}: expected auto, cpu, cuda or metal")
    if asked != "auto":
        return asked
    if system == "Darwin" and machine == "arm64":
        return "metal"
    if system == "Linux" and _has_nvidia_gpu():
        return "cuda"
    return "cpu"


def plan(
    env: dict[str, str] | None = None,
    cpuinfo: str | None = None,
    system: str | None = None,
    machine: str | None = None,
) -> BuildPlan:
    """The build for this machine (every argument defaults to the real one; tests pass their own)."""
    env = dict(os.environ) if env is None else env
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    backend = choose_backend(env, system, machine)
    amx = _truthy(env.get("SCALPEL_LLAMA_AMX"))
    args: list[str] = []
    expected: list[str] = []
    if machine in {"x86_64", "amd64"}:
        flags = cpu_flags(cpuinfo)
        # Every option is written ON or OFF: with GGML_NATIVE=OFF ggml turns SSE4.2, AVX, AVX2,
        # BMI2, FMA and F16C on by default, which would crash a CPU that lacks them.
        args.append("-DGGML_NATIVE=OFF")
        options = dict(X86_FEATURES)
        if amx:
            options.update(X86_AMX)
        for option, needs in options.items():
            on = all(flag in flags for flag in needs)
            args.append(f"-D{option}={'ON' if on else 'OFF'}")
            if on and option not in NOT_REPORTED:
                expected.append(option.removeprefix("GGML_"))
        if not amx:
            args.extend(f"-D{option}=OFF" for option in X86_AMX)
    if backend == "cuda":
        args.append("-DGGML_CUDA=on")
    elif backend == "metal":
        args.append("-DGGML_METAL=on")
    extra = env.get("SCALPEL_CMAKE_ARGS", "").split()
    return BuildPlan(backend, tuple(args + extra), amx, tuple(expected))


def cache_key(build: BuildPlan) -> str:
    """A name for the wheel built with these flags, for this Python and platform."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.system()}-{platform.machine()}"
    digest = hashlib.sha256(" ".join(build.cmake_args).encode()).hexdigest()[:16]
    return f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{tag}-{build.backend}-{digest}"


def system_features(system_info: str) -> set[str]:
    """The names that llama_print_system_info() reports as `NAME = 1`."""
    found = set()
    for part in system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            found.add(name)
    return found


def problems(build: BuildPlan, system_info: str, gpu_offload: bool) -> list[str]:
    """What is wrong with an installed build, compared with the plan (empty when it matches)."""
    found = system_features(system_info)
    wrong = []
    if "AMX_INT8" in found and not build.amx:
        wrong.append(
            "llama.cpp was built with AMX (AMX_INT8 = 1), which crashes on the first matmul on "
            "many AMX machines; rebuild with ./scripts/setup.sh, or set SCALPEL_LLAMA_AMX=1 to keep it"
        )
    missing = [name for name in build.expected_features if name not in found]
    if missing:
        wrong.append(f"llama.cpp lacks CPU features this build asked for: {', '.join(missing)}")
    if build.backend in {"cuda", "metal"} and not gpu_offload:
        wrong.append(f"llama.cpp was asked for {build.backend} but cannot offload to a GPU")
    return wrong


def installed_problems(build: BuildPlan | None = None) -> list[str]:
    """problems() for the llama-cpp-python importable here."""
    try:
        import llama_cpp  # imported here: the script's other commands run before it is installed
    except ImportError as e:
        return [f"llama-cpp-python cannot be imported ({e})"]
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return problems(build or plan(), info, bool(llama_cpp.llama_supports_gpu_offload()))


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "cmake-args"
    build = plan()
    if command == "cmake-args":
        print(" ".join(build.cmake_args))
    elif command == "key":
        print(cache_key(build))
    elif command == "check":
        wrong = installed_problems(build)
        for line in wrong:
            print(f"llama.cpp build: {line}", file=sys.stderr)
        return 1 if wrong else 0
    else:
        print(f"unknown command {command!r}: expected cmake-args, key or check", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
