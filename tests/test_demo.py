"""`shipmon demo`, the quick start's first command, runs the whole system and ends cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RunServers

pytestmark = pytest.mark.e2e


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
