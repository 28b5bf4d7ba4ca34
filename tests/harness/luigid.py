"""A real ``luigid`` (Luigi's central scheduler) on loopback, stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.harness.errors import ServerStartError
from tests.harness.net import LOOPBACK, free_port
from tests.harness.process import log_tail

START_TIMEOUT = 30.0


def _luigid() -> str:
    beside = Path(sys.executable).parent / "luigid"
    return str(beside) if beside.exists() else "luigid"


class LuigidServer:
    """``luigid --address 127.0.0.1 --port P``; its log and state live in ``directory``.

    Started when it answers its API (workers must not start before: with the scheduler
    down a worker retries 3 times, 30 s apart).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def start(self) -> LuigidServer:
        logdir = self.directory / "log"
        logdir.mkdir(parents=True, exist_ok=True)  # luigid exits at start without it
        self.stdout = open(self.directory / "luigid.out", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [_luigid(), "--address", LOOPBACK, "--port", str(self.port),
             "--logdir", str(logdir), "--state-path", str(self.directory / "state.pickle")],
            stdout=self.stdout, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"luigid exited with {self.process.returncode}:"
                                       f" {self.log_tail()}")
            try:
                if requests.get(f"{self.url}api/task_list?data={{}}", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"luigid did not answer on {self.url}: {self.log_tail()}")

    def task_list(self, status: str) -> dict[str, object]:
        """The scheduler's tasks in ``status`` (DONE, FAILED, PENDING, RUNNING)."""
        data = json.dumps({"status": status, "upstream_status": ""})
        resp = requests.get(f"{self.url}api/task_list", params={"data": data}, timeout=5)
        resp.raise_for_status()
        response: dict[str, object] = resp.json()["response"]
        return response

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.directory / "luigid.out", lines)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.stdout.close()
