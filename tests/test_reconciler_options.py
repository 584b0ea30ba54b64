"""``nodecache reconciler``'s options are stated once: what ``--help`` says, what a bare
command line gives and what the reconciler runs with are one dataclass's defaults, and
``--help`` gets them without loading the kubernetes client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from support import ROOT

from nodecache.agent.cli import build_parser
from nodecache.agent.settings import ReconcilerOptions, ReconcilerSettings, from_arguments

POD_ENV = ("POD_NAMESPACE", "POD_NAME")


def cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    """``nodecache`` in a child process, help unwrapped, without the pod's variables."""
    env = {k: v for k, v in os.environ.items() if k not in POD_ENV} | {"COLUMNS": "1000"}
    python = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    return subprocess.run(
        [*python, "-m", "nodecache.agent.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def parse(monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> ReconcilerOptions:
    """The options ``nodecache reconciler ARGS`` hands the reconciler."""
    for name in POD_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = from_arguments(ReconcilerSettings, build_parser().parse_args(["reconciler", *args]))
    return settings.reconciler


def test_the_reconciler_runs_with_the_options_the_command_line_builds() -> None:
    from nodecache.agent.kube import reconciler

    assert reconciler.ReconcilerOptions is ReconcilerOptions


def test_a_bare_command_line_gives_the_reconcilers_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse(monkeypatch) == ReconcilerOptions()


def test_help_shows_the_defaults_the_reconciler_runs_with() -> None:
    """Every "(default: X)" in ``--help`` is the value of the field its flag sets (prose
    such as "hostname and a random suffix" aside)."""
    done = cli("reconciler", "--help")
    assert done.returncode == 0, done.stderr
    settings = ReconcilerSettings()
    owners = (settings, settings.reconciler, settings.reconciler.limits)
    shown: dict[str, str] = {}
    for entry in re.split(r"\n\s+(?=--)", done.stdout):  # one per flag, its help wrapped
        if m := re.match(r"--([a-z-]+) .*\(default: (?:\$\w+, else )?([^) ]+)\)", entry, re.S):
            shown[m[1].replace("-", "_")] = m[2]
    for name, text in shown.items():
        owner: Any = next(o for o in owners if hasattr(o, name))
        assert text == str(getattr(owner, name)), name
    checked = {"lease_name", "lease_namespace", "metrics_port", "header_timeout", "log_level"}
    assert checked <= shown.keys()


@pytest.mark.parametrize("args", [("--help",), ("reconciler", "--help")])
def test_help_loads_no_kubernetes_client(args: tuple[str, ...]) -> None:
    done = cli(*args, importtime=True)
    assert done.returncode == 0
    modules = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "nodecache.agent.settings" in modules  # the trace is there
    assert [m for m in modules if m.split(".")[0] == "kubernetes"] == []


def test_flags_and_the_pods_variables_reach_the_reconciler(monkeypatch: pytest.MonkeyPatch) -> None:
    options = parse(
        monkeypatch,
        "--lease-name", "lead", "--metrics-port", "0", "--metrics-host", "127.0.0.1",
        "--header-timeout", "3", "--body-timeout", "4", "--keepalive-timeout", "5",
        POD_NAMESPACE="ns1", POD_NAME="pod-a",
    )  # fmt: skip
    assert (options.lease_name, options.lease_namespace, options.identity) == (
        "lead",
        "ns1",
        "pod-a",
    )
    assert options.metrics_port is None  # 0 turns it off
    assert options.metrics_host == "127.0.0.1"
    limits = options.limits
    assert (limits.header_timeout, limits.body_timeout, limits.keepalive_timeout) == (3, 4, 5)
    # What has no flag keeps the one default.
    assert options.resync_interval == ReconcilerOptions().resync_interval


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--header-timeout", "0", "must be more than 0"),
        ("--body-timeout", "soon", "is not a number of seconds"),
        ("--metrics-port", "70000", "port must be 0-65535"),
    ],
)
def test_a_bad_value_is_a_usage_error_that_says_why(flag: str, value: str, says: str) -> None:
    done = cli("reconciler", flag, value)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
