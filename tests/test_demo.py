"""`shipmon demo`, the quick start's first command, runs the whole system and ends cleanly."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import RunServers
from worker.sim.demo import push_summary, start_pushing
from worker.sim.sandbox import running_sandbox
from worker.sim.workload import Faults


@pytest.mark.e2e
def test_the_demo_shows_polls_pushes_transitions_and_verified_webhooks(
    servers: RunServers, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--duration", "25", "--orders", "10"],
        env=servers.env(SHIPMON_HOME=str(tmp_path / "home"), COLUMNS="160"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = re.findall(r"polls made: (\d+).*?verified by the receiver: (\d+)", result.stdout)
    assert summary, result.stdout[-3000:]
    polls, verified = map(int, summary[-1])
    assert polls > 0
    assert verified > 0
    assert "rejected: 0" in result.stdout
    assert "→" in result.stdout  # transitions were shown
    assert "What to try next" in result.stdout
    # The sandbox pushed to shipmon's own receiver, which took them; polls caught the rest.
    pushes = re.findall(
        r"changes by push: (\d+), by poll: \d+ .*?carrier pushes sent: (\d+)",
        result.stdout,
    )
    assert pushes, result.stdout[-3000:]
    by_push, sent = map(int, pushes[-1])
    assert sent > 0, result.stdout[-3000:]
    assert by_push > 0
    assert (tmp_path / "home" / "demo.log").exists()


def closed_port() -> int:
    with socket.socket() as probe:  # a loopback port just freed: connections are refused
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_demo_turns_pushing_on_and_reports_it() -> None:
    api_port = closed_port()  # no receiver yet: pushes would fail and be given up
    with running_sandbox(faults=Faults(), seed=2) as sandbox:
        assert start_pushing(sandbox.base_url, api_port) is None
        pushes = sandbox.stats()["pushes"]
        assert pushes["url"] == f"http://127.0.0.1:{api_port}/carrier/247/status"
        summary = push_summary(sandbox.base_url, Counter(push=3, poll=5))
    assert "changes by push: [bold cyan]3[/], by poll: [bold]5[/]" in summary
    assert "carrier pushes sent: 0, dropped: 0, failed: 0, given up: 0" in summary


def test_the_demo_goes_on_when_the_sandbox_cannot_push() -> None:
    port = closed_port()
    refusal = start_pushing(f"http://127.0.0.1:{port}", 8000)
    assert refusal is not None and "poll only" in refusal
    assert push_summary(f"http://127.0.0.1:{port}", Counter()).endswith("unknown[/]")
