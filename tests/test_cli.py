"""The console script: help that explains every option, and clear exits."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

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


def test_every_command_has_help() -> None:
    for command in ("agent", "reconciler", "status", "prefetch"):
        result = run(command, "--help")
        assert result.returncode == 0 and "usage: nodecache " + command in result.stdout, command


def test_a_bare_command_line_gives_the_settings_defaults(monkeypatch: Any) -> None:
    """A flag's default is its field's default: the two are one statement."""
    from nodecache.agent.cli import build_parser
    from nodecache.agent.settings import COMMANDS, from_arguments

    for name in ("NODECACHE_SOCKET_DIR", "NODE_NAME", "POD_NAMESPACE", "POD_NAME"):
        monkeypatch.delenv(name, raising=False)
    for command, settings in COMMANDS.items():
        parsed = from_arguments(settings, build_parser().parse_args([command]))
        assert parsed == settings(), command


def test_flags_reach_the_nested_serving_and_transport_settings(monkeypatch: Any) -> None:
    from nodecache.agent.cli import build_parser
    from nodecache.agent.settings import AgentSettings, from_arguments

    monkeypatch.setenv("NODE_NAME", "n7")
    args = build_parser().parse_args(
        ["agent", "--model-queue", "9", "--spread-at", "0", "--log-format", "json",
         "--header-timeout", "3", "--metrics-port", "0", "--max-output-bytes", "1Mi"]
    )  # fmt: skip
    settings = from_arguments(AgentSettings, args)
    serve = settings.node.serve
    assert (serve.model_queue, serve.spread_at, serve.log_format) == (9, 0, "json")
    assert serve.max_output_bytes == 1 << 20 and serve.model_concurrency == 4
    assert settings.node.limits.header_timeout == 3.0
    assert settings.node.metrics_port is None  # 0 turns it off
    assert settings.node_name == "n7"
