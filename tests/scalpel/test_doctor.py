"""`scalpel doctor` reports what a bug report needs, and a crashing child becomes one readable line."""

from __future__ import annotations

import json
import signal
import sys

from scalpel import doctor
from scalpel.cli.main import main

AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "


def test_a_child_killed_by_sigsegv_is_one_line_with_cause_and_fix():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    result = doctor.run_probe(crash, AMX_BUILD)
    assert not result["ok"] and result["signal"] == signal.SIGSEGV
    assert "SIGSEGV" in result["message"] and "AMX" in result["message"] and "setup.sh" in result["message"]
    assert "\n" not in result["message"]


def test_other_signals_name_their_own_cause():
    assert "CPU features" in doctor.describe_signal(signal.SIGILL, "")
    assert "memory" in doctor.describe_signal(signal.SIGKILL, "")
    assert "AMX" not in doctor.describe_signal(signal.SIGSEGV, "CPU : AVX2 = 1 |")


def test_doctor_reports_build_threads_versions_and_a_generation(home, capsys, monkeypatch):
    monkeypatch.setenv("SCALPEL_THREADS", "1")  # restored afterwards: --threads sets it for the process
    assert main(["doctor", "--json", "--threads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "AVX2 = 1" in report["llama_cpp"]["system_info"]
    assert report["threads"]["used"] == 2
    assert report["torch"]["device"] in {"cpu", "cuda", "mps"}
    assert report["packages"]["llama-cpp-python"] == "0.3.36"
    assert report["generation"]["ok"] and report["generation"]["text"]
    assert report["problems"] == []
