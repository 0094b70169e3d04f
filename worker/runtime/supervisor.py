"""Running shipmon's processes side by side as one command, and stopping them cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 30.0
# A child that exits this often within the window is broken, not unlucky: give up on it.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0


@dataclass
class Supervisor:
    """Child processes started together; one that dies is started again, unless it keeps dying."""

    env: dict[str, str]
    # Where the children's output goes; None: this process's terminal.
    log: Path | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> None:
        self.argv[name] = argv
        output = None if self.log is None else self.log.open("ab")
        # Each child leads a session of its own: a Ctrl-C in the terminal reaches only us, and
        # we stop the children in order.
        self.children[name] = subprocess.Popen(
            argv, env=self.env, start_new_session=True, stdout=output, stderr=output
        )
        if output is not None:
            output.close()

    def celery(self, name: str, *args: str) -> None:
        self.start(name, [sys.executable, "-m", "celery", "-A", "worker", *args])

    def wait_any(self) -> tuple[str, int]:
        """Block until a child exits; its name and exit code."""
        while True:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    return name, code
            time.sleep(0.2)

    def restart(self, name: str) -> bool:
        """Start an exited child again; False, starting nothing, when it keeps exiting.

        A worker that lost its broker or database may exit instead of waiting for it (Celery
        does, when it held unacknowledged tasks); started again, it reconnects by itself.
        """
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            return False
        self.restarts[name] = [*recent, now]
        self.start(name, self.argv[name])
        return True

    def stop(self) -> None:
        """SIGTERM every child (a warm shutdown for Celery), then SIGKILL what lingers."""
        for child in self.children.values():
            if child.poll() is None:
                # Only the leader: a Celery worker lets its pool finish the running tasks.
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait()


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)
