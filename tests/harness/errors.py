"""Errors of the test harness.

The harness is the independent witness of bmsync's behaviour, so it does not import
``pipeline`` (not even ``pipeline.errors``); it raises these instead::

    HarnessError
    ├── ServerStartError   a server did not come up (message holds its log tail)
    ├── PushError          the harness's own push was refused by a registry
    └── ToolError          an external tool (skopeo) failed (message holds its stderr)
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


class ServerStartError(HarnessError):
    """A server exited or did not answer in time; the message carries its log tail."""


class PushError(HarnessError):
    """A registry refused a request of the harness's pusher.

    ``status`` is the HTTP status (None for a transport failure) and ``body`` the start
    of the response body, which holds the distribution error codes.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ToolError(HarnessError):
    """An external command failed; ``returncode`` and ``stderr`` say how."""

    def __init__(self, message: str, *, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr
