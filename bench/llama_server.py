"""llama.cpp's own `llama-server`, built once from the llama.cpp sources that the llama-cpp-python sdist vendors.

No registry ships the binary, so the serving benchmark builds it with the same CMake flags as our llama.cpp
(core/llama_build.py) and caches it outside the repo, in ~/.cache/scalpel/llama-server/<build key>/.

    .venv/bin/python bench/llama_server.py     # prints the binary's path, building it the first time
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
CACHE = Path(os.environ.get("SCALPEL_CACHE", Path.home() / ".cache" / "scalpel"))


def _plan(command: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "core" / "llama_build.py"), command], capture_output=True, text=True, check=True
    ).stdout.strip()


def sources() -> Path:
    """The vendored llama.cpp tree, unpacked from the sdist (downloaded with pip the first time)."""
    unpacked = CACHE / "src" / f"llama_cpp_python-{VERSION}"
    if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        archive = CACHE / "src" / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={VERSION}", "-d", str(archive.parent)],
                check=True,
            )  # fmt: skip
        with tarfile.open(archive) as tar:
            tar.extractall(archive.parent, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def llama_server() -> Path:
    binary = CACHE / "llama-server" / _plan("key") / "llama-server"
    if binary.exists():
        return binary
    flags = shlex.split(_plan("cmake-args"))
    with tempfile.TemporaryDirectory() as build:
        subprocess.run(
            ["cmake", "-S", str(sources()), "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF",
             *flags],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 1)], check=True
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        built = Path(build) / "bin" / "llama-server"
        partial = binary.with_suffix(".partial")
        partial.write_bytes(built.read_bytes())
        partial.chmod(0o755)
        partial.replace(binary)  # never a half-copied binary under the final name
    return binary


if __name__ == "__main__":
    print(llama_server())
