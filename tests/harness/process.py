"""What every harness server does with the process it started: stop it, read its log."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM ``process``, SIGKILL it after ``timeout`` seconds; always reaped."""
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of the log at ``path`` ("" when there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
