"""llama.cpp is built for the CPU it runs on, never with AMX unless asked, and the check sees the difference."""

from __future__ import annotations

import os

import llama_cpp

from core import llama_build

SAPPHIRE_RAPIDS = (
    "flags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2 avx_vnni avx512f avx512cd avx512vl avx512dq "
    "avx512bw avx512vbmi avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
)
HASWELL = "flags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2\n"
OLD_ATOM = "flags\t\t: fpu sse4_2\n"


def _options(build: llama_build.BuildPlan) -> dict[str, str]:
    return dict(arg.removeprefix("-D").split("=", 1) for arg in build.cmake_args)


def test_amx_cpu_gets_every_feature_but_amx():
    build = llama_build.plan(env={}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    options = _options(build)
    assert options["GGML_NATIVE"] == "OFF"  # -march=native would turn AMX on
    assert options["GGML_AVX512"] == options["GGML_AVX512_BF16"] == options["GGML_AVX_VNNI"] == "ON"
    assert options["GGML_AMX_INT8"] == options["GGML_AMX_TILE"] == options["GGML_AMX_BF16"] == "OFF"
    assert "AMX_INT8" not in build.expected_features and "AVX512_VNNI" in build.expected_features


def test_amx_only_when_the_user_opts_in():
    build = llama_build.plan(env={"SCALPEL_LLAMA_AMX": "1"}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    assert _options(build)["GGML_AMX_INT8"] == "ON" and build.amx


def test_features_the_cpu_lacks_are_written_off():
    """With GGML_NATIVE=OFF ggml turns AVX2 and friends on by default: each must be named OFF where missing."""
    haswell = _options(llama_build.plan(env={}, cpuinfo=HASWELL, system="Linux", machine="x86_64"))
    assert haswell["GGML_AVX2"] == "ON" and haswell["GGML_AVX512"] == "OFF"
    atom = _options(llama_build.plan(env={}, cpuinfo=OLD_ATOM, system="Linux", machine="x86_64"))
    assert atom["GGML_AVX"] == atom["GGML_AVX2"] == atom["GGML_FMA"] == atom["GGML_F16C"] == "OFF"
    assert atom["GGML_SSE42"] == "ON"


def test_backends_keep_metal_and_cuda():
    mac = llama_build.plan(env={}, cpuinfo="", system="Darwin", machine="arm64")
    assert mac.backend == "metal" and "-DGGML_METAL=on" in mac.cmake_args
    assert not any("NATIVE" in a for a in mac.cmake_args)
    cuda = llama_build.plan(env={"SCALPEL_LLAMA_BACKEND": "cuda"}, cpuinfo=HASWELL, system="Linux", machine="x86_64")
    assert "-DGGML_CUDA=on" in cuda.cmake_args and _options(cuda)["GGML_AMX_INT8"] == "OFF"


def test_the_wheel_cache_key_follows_the_flags():
    plain = llama_build.plan(env={}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    amx = llama_build.plan(env={"SCALPEL_LLAMA_AMX": "1"}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    assert llama_build.cache_key(plain) != llama_build.cache_key(amx)
    assert llama_build.cache_key(plain) == llama_build.cache_key(
        llama_build.plan(env={}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    )


def test_check_names_an_amx_build_and_missing_features():
    build = llama_build.plan(env={}, cpuinfo=SAPPHIRE_RAPIDS, system="Linux", machine="x86_64")
    crashing = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    wrong = llama_build.problems(build, crashing, gpu_offload=False)
    assert any("AMX_INT8 = 1" in w for w in wrong)
    assert any("AVX512_VNNI" in w for w in wrong)  # asked for, not in the build
    good = "CPU : " + " | ".join(f"{name} = 1" for name in build.expected_features) + " | "
    assert llama_build.problems(build, good, gpu_offload=False) == []


def test_installed_llama_cpp_has_no_amx_unless_opted_in():
    """The build that the tests run on: no AMX (it crashes AMX VMs), unless SCALPEL_LLAMA_AMX=1."""
    info = llama_cpp.llama_print_system_info().decode()
    if os.environ.get("SCALPEL_LLAMA_AMX") != "1":
        assert "AMX_INT8" not in llama_build.system_features(info), info
    assert llama_build.installed_problems() == []
