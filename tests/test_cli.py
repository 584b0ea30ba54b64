"""The console script: help that explains every option, and clear exits."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support import ROOT

NODECACHE = ROOT / ".venv" / "bin" / "nodecache"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NODECACHE), *args], capture_output=True, text=True, timeout=60)


def test_help_lists_commands_and_agent_options() -> None:
    top = run("--help")
    assert top.returncode == 0 and "agent" in top.stdout and "status" in top.stdout
    agent = run("agent", "--help").stdout
    for option in ("--declarations", "--cache-dir", "--socket-dir", "--http-port",
                   "--metrics-port", "--log-format"):  # fmt: skip
        assert option in agent


def test_status_without_an_agent_says_so(tmp_path: Path) -> None:
    result = run("status", "--socket-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no agent answers on" in result.stderr


def test_missing_declarations_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = run(
        "agent", "--declarations", str(tmp_path / "nope"), "--metrics-port", "0",
        "--socket-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not exist" in result.stderr
