"""A real containerd (Debian 1.6.x) with its own root, state and socket, and ``ctr``.

``ContainerdServer(directory, extra_config=TEXT)`` writes ``config.toml`` (``version =
2``, ``root``, ``state``, ``[grpc] address``, the native snapshotter for the CRI plugin,
then ``extra_config`` verbatim, e.g. a generated registry section), starts
``containerd --config FILE`` with its log in ``containerd.log``, and waits until
``ctr version`` answers over its socket. It runs as root (containerd needs it) and is
stopped by the PID it started. A containerd that cannot start raises
``ServerStartError`` with the log tail: tests fail, they never skip.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

from tests.harness.errors import ServerStartError, ToolError
from tests.harness.process import log_tail, terminate

CONTAINERD = "containerd"
CTR = "ctr"

_running: set[ContainerdServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.stop()


class ContainerdServer:
    """One containerd process; call order: ``start()``, any ``ctr()`` calls, ``stop()``.

    Usable as a context manager. Not thread-safe.
    """

    def __init__(self, directory: Path, *, extra_config: str = "",
                 start_timeout: float = 15.0) -> None:
        self.directory = directory
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.config_path = directory / "config.toml"
        self.log_path = directory / "containerd.log"
        # A unix socket path must stay under ~108 bytes: keep the name short.
        self.socket = directory / "c.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config_text(self) -> str:
        """The config file containerd is started with."""
        d = self.directory
        base = (
            "version = 2\n"
            f'root = "{d / "root"}"\n'
            f'state = "{d / "state"}"\n'
            "\n[grpc]\n"
            f'  address = "{self.socket}"\n'
            "\n[ttrpc]\n"
            f'  address = "{d / "t.sock"}"\n'
            '\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  snapshotter = "native"\n'
        )
        return base + "\n" + self.extra_config

    def start(self) -> ContainerdServer:
        if shutil.which(CONTAINERD) is None or shutil.which(CTR) is None:
            raise ServerStartError("containerd or ctr is not installed (Debian: containerd)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [CONTAINERD, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise ServerStartError(f"containerd exited with {code}:\n{self.log_tail()}")
            if self.socket.exists():
                done = subprocess.run([CTR, "-a", str(self.socket), "version"],
                                      capture_output=True, timeout=10, check=False)
                if done.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"containerd did not answer within {self.start_timeout:.0f}s:\n"
                    f"{self.log_tail()}")
            time.sleep(0.05)

    def ctr(self, *args: str, namespace: str = "k8s.io", check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCKET -n NAMESPACE ARGS``; ``ToolError`` (with the containerd log
        tail) when it fails and ``check`` is set."""
        command = [CTR, "-a", str(self.socket), "-n", namespace, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            shown = " ".join(_redact(command))
            raise ToolError(
                f"{shown} exited {done.returncode}: {done.stderr.strip()}\n"
                f"containerd log:\n{self.log_tail()}",
                returncode=done.returncode, stderr=done.stderr,
            )
        return done

    def plugin_status(self, kind: str, name: str) -> str | None:
        """The STATUS column of ``ctr plugins ls`` for plugin TYPE ``kind`` and ID ``name``."""
        for line in self.ctr("plugins", "ls").stdout.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[0] == kind and fields[1] == name:
                return fields[-1]
        return None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the PID started, SIGKILL after ``timeout`` seconds; always reaped."""
        terminate(self._process, timeout)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)

    def __enter__(self) -> ContainerdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _redact(command: list[str]) -> list[str]:
    """``--user U:P`` shown as ``--user U:***``."""
    out = []
    hide = False
    for arg in command:
        if hide:
            out.append(arg.split(":", 1)[0] + ":***")
            hide = False
            continue
        hide = arg in ("--user", "-u")
        out.append(arg)
    return out
