"""skopeo (Debian 1.9.3) as the independent reader of what bmsync writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tests.harness.errors import ToolError

SKOPEO = "skopeo"


def run_skopeo(*args: str, timeout: float = 120.0) -> bytes:
    """Run ``skopeo ARGS`` and return its stdout; ``ToolError`` with stderr on failure."""
    command = [SKOPEO, *args]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ToolError(
            f"{' '.join(_redact(command))} timed out after {timeout:.0f}s",
            returncode=None,
            stderr=(exc.stderr or b"").decode(errors="replace"),
        ) from exc
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")
        raise ToolError(
            f"{' '.join(_redact(command))} exited {done.returncode}: {stderr.strip()}",
            returncode=done.returncode,
            stderr=stderr,
        )
    return done.stdout


def _transport_args(
    creds: tuple[str, str] | None, cert_dir: Path | None, tls_verify: bool
) -> list[str]:
    args = []
    if creds is not None:
        args.append(f"--creds={creds[0]}:{creds[1]}")
    if cert_dir is not None:
        args.append(f"--cert-dir={cert_dir}")
    args.append(f"--tls-verify={'true' if tls_verify else 'false'}")
    return args


def inspect_raw(
    reference: str,
    *,
    creds: tuple[str, str] | None = None,
    cert_dir: Path | None = None,
    tls_verify: bool = False,
) -> bytes:
    """The raw manifest bytes at ``reference`` (``docker://HOST/repo:tag``, ``oci:DIR:REF``).

    ``tls_verify=False`` also lets skopeo use plain http for a ``docker://`` registry.
    """
    args = ["inspect", "--raw"]
    if reference.startswith("docker://"):
        args += _transport_args(creds, cert_dir, tls_verify)
    return run_skopeo(*args, reference)


def inspect(
    reference: str,
    *,
    creds: tuple[str, str] | None = None,
    cert_dir: Path | None = None,
    tls_verify: bool = False,
) -> dict[str, Any]:
    """``skopeo inspect`` JSON (config-level: Digest, Architecture, Layers...)."""
    args = ["inspect"]
    if reference.startswith("docker://"):
        args += _transport_args(creds, cert_dir, tls_verify)
    parsed: dict[str, Any] = json.loads(run_skopeo(*args, reference))
    return parsed


def manifest_digest(raw: bytes) -> str:
    """sha256 digest of raw manifest bytes, as registries compute it."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _redact(command: list[str]) -> list[str]:
    # The password must not end up in a test report.
    return [
        "--creds=***" if arg.startswith("--creds=") else arg for arg in command
    ]
