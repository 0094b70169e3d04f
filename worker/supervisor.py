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


@dataclass
class Supervisor:
    """Child processes started together; if one dies, the others are stopped too."""

    env: dict[str, str]
    # Where the children's output goes; None: this process's terminal.
    log: Path | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> None:
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
