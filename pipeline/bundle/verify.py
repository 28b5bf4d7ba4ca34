"""``bmsync bundle verify``: one streaming pass over an archive, trusting nothing.

Checks, stopping at the first problem (IntegrityError naming it): the archive's sha256
(and each part's, when split) against the ``.sha256`` sidecar; every member's name and
place; every blob's size and digest against ``bundle.json``; ``index.json`` against
``bundle.json``; nothing added or missing; and for a delta, when its base is given,
that the base holds every blob the delta leaves out.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bundle.format import BaseContent, BundleManifest
from pipeline.bundle.reader import Source, open_bundle
from pipeline.errors import IntegrityError, UsageError

_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


@dataclass
class VerifyReport:
    archive: str
    manifest: BundleManifest
    sha256: str
    blobs: int
    bytes: int
    seconds: float
    checked_sidecar: bool
    checked_base: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "archive": self.archive,
            "ok": True,
            "version": m.version,
            "sha256": self.sha256,
            "images": len(m.images),
            "blobsChecked": self.blobs,
            "bytesChecked": self.bytes,
            "base": m.base.to_json() if m.base else None,
            "sidecarChecked": self.checked_sidecar,
            "baseChecked": self.checked_base,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


def read_sidecar(path: Path) -> dict[str, str]:
    """``name -> sha256 hex`` from a sha256sum-format file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise IntegrityError(f"cannot read checksum file {path}: {e.strerror}") from None
    return parse_sums(text, str(path))


def parse_sums(text: str, where: str) -> dict[str, str]:
    """``name -> sha256 hex`` from sha256sum-format text; ``where`` names it in errors."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SUM_LINE.match(line)
        if not match:
            raise IntegrityError(f"{where}:{n}: not a sha256sum line")
        sums[match[2]] = match[1]
    return sums


def verify_bundle(
    path: str | Path,
    *,
    base: BaseContent | None = None,
    require_sidecar: bool = True,
) -> VerifyReport:
    started = time.monotonic()
    reader = open_bundle(path, hash_raw=True)
    with reader:
        source = reader.source
        sums = expected_sums(source, require_sidecar)
        count = 0
        nbytes = 0
        try:
            for blob in reader.blobs():
                blob.reader.drain()
                count += 1
                nbytes += blob.entry.size
            reader.finish()
        except IntegrityError as e:
            # Damage found inside: when the sidecar says which part (or that the whole
            # archive) changed in transfer, that is the more useful thing to tell.
            if sums is not None:
                reader.drain_raw()
                check_sums(source, sums, reader.raw_sha256 or "", reader.part_sha256,
                            cause=str(e))
            raise
        digest = reader.raw_sha256 or ""
        parts_digests = reader.part_sha256
        manifest = reader.manifest
    checked_sidecar = False
    if sums is not None:
        check_sums(source, sums, digest, parts_digests)
        checked_sidecar = True
    notes: list[str] = []
    checked_base = False
    missing = manifest.missing_blobs()
    if manifest.base is not None:
        if base is None:
            notes.append(
                f"delta of {manifest.base.describe()}: the {len(missing)} blobs it leaves"
                " out were not checked (pass --base)"
            )
        else:
            if base.ref.digest != manifest.base.digest:
                raise IntegrityError(
                    f"{source.name} is a delta of {manifest.base.describe()}, not of the"
                    f" given base {base.ref.describe()}"
                )
            absent = [d for d in missing if d not in base.digests]
            if absent:
                raise IntegrityError(
                    f"{source.name}: blob {absent[0]} is neither in the archive nor in its"
                    f" base {base.ref.describe()}"
                )
            checked_base = True
    return VerifyReport(
        archive=source.name,
        manifest=manifest,
        sha256=digest,
        blobs=count,
        bytes=nbytes,
        seconds=time.monotonic() - started,
        checked_sidecar=checked_sidecar,
        checked_base=checked_base,
        notes=notes,
    )


def check_sums(source: Source, sums: dict[str, str], digest: str, parts: list[str],
               cause: str | None = None) -> None:
    """Compare the archive's (and its parts') sha256 with the sidecar; raise on a mismatch."""
    found = f"; {cause}" if cause else ""
    for part, got in zip(source.parts, parts, strict=False):
        want = sums.get(part.name)
        if want is None:
            raise IntegrityError(f"{source.sidecar}: no checksum for part {part.name}")
        if want != got:
            raise IntegrityError(
                f"{part}: sha256 {got} does not match {want} in {source.sidecar}{found}",
                hint="copy this part again",
            )
    name = Path(source.name).name
    want = sums.get(name)
    if want is None:
        raise IntegrityError(f"{source.sidecar}: no checksum for {name}")
    if want != digest:
        raise IntegrityError(
            f"{source.name}: sha256 {digest} does not match {want} in {source.sidecar}{found}",
            hint="the archive was changed or damaged in transfer",
        )


def expected_sums(source: Source, require: bool) -> dict[str, str] | None:
    sidecar = source.sidecar
    if sidecar is None or not sidecar.exists():
        if require:
            raise UsageError(
                f"no checksum file {sidecar} beside the archive",
                hint="copy the .sha256 file with the archive, or pass --no-checksum",
            )
        return None
    return read_sidecar(sidecar)
