"""Run the real ``bmsync`` command as a user would: a separate process, exit code, output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


def bmsync(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> Run:
    """``python -m pipeline.cli ARGS`` with a clean proxy environment and no terminal.

    ``stdin`` is piped in (``--password-stdin``); without it stdin is empty.
    """
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full_env.pop("BMSYNC_PASSWORD", None)
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
        input=stdin if stdin is not None else "",
    )
    return Run(done.returncode, done.stdout, done.stderr)


def write_images_config(
    path: Path,
    images: Iterable[str | Mapping[str, Any]],
    *,
    registries: Mapping[str, Mapping[str, Any]] | None = None,
    release: str = "1.0.0",
    platforms: Iterable[str] | None = None,
) -> Path:
    """Write an images config (JSON is valid YAML, so no quoting surprises)."""
    doc: dict[str, Any] = {"version": 1, "release": release}
    if platforms is not None:
        doc["platforms"] = list(platforms)
    if registries:
        doc["registries"] = {k: dict(v) for k, v in registries.items()}
    doc["images"] = list(images)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def store_index(store: Path) -> dict[str, dict[str, Any]]:
    """The store's index.json entries by ref name, read from disk."""
    data = json.loads((store / "index.json").read_text())
    return {
        m["annotations"]["org.opencontainers.image.ref.name"]: m for m in data["manifests"]
    }


def store_blob(store: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return store / "blobs" / algorithm / hexdigest


def assert_blobs_sound(store: Path) -> int:
    """Every file under blobs/ hashes to its name (the bytes on disk); returns the count."""
    count = 0
    for path in (store / "blobs" / "sha256").iterdir():
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == path.name, f"{path} holds content hashing to {actual}"
        count += 1
    return count
