"""``bmsync bundle extract``: an archive into a standard OCI layout, safely.

The layout also gets the bundle's ``bundle.json`` (OCI readers ignore it; ``push images
--source=DIR`` plans from it). A full bundle extracts into a fresh directory: everything
is written under a temporary sibling name (``.NAME.partial-XXXX``) and renamed into
place only when every blob has been verified, so an interrupted or refused extraction
leaves nothing at ``DIR``.

A delta extracts only onto a layout that already holds its base (``onto``): every blob
the delta leaves out must be present there first (named if not); new blobs are written
atomically (temp file, fsync, rename) and ``index.json`` is merged last (under the
store's index lock when the layout is a bmsync store, which a pull may be writing).

Members go through the strict reader (:mod:`pipeline.bundle.reader`): no path outside
the destination can be written, whatever the archive holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bundle.format import BUNDLE_JSON, OCI_LAYOUT, REF_NAME
from pipeline.bundle.reader import BundleReader, open_bundle
from pipeline.bundle.verify import check_sums, expected_sums
from pipeline.errors import IntegrityError, StoreError, UsageError
from pipeline.store import OCI_LAYOUT_BYTES, Store, atomic_write, fsync_dir, merge_index

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ExtractResult:
    target: Path
    version: str
    images: int
    blobs_written: int
    bytes_written: int


def extract_bundle(path: str | Path, *, to: Path | None = None,
                   onto: Path | None = None) -> ExtractResult:
    """Extract into a new directory ``to``, or merge into the existing layout ``onto``."""
    if (to is None) == (onto is None):
        raise UsageError("give either --to (a new directory) or --onto (an existing layout)")
    with open_bundle(path, hash_raw=True) as reader:
        # The sidecar is checked when it is there (verify requires it; extract is often
        # run on an archive verified just before).
        sums = expected_sums(reader.source, require=False)
        if to is not None:
            if reader.manifest.is_delta:
                assert reader.manifest.base is not None
                raise UsageError(
                    f"{reader.source.name} is a delta of {reader.manifest.base.describe()}:"
                    " extract it --onto a layout that holds its base"
                )
            return _extract_fresh(reader, to, sums)
        assert onto is not None
        return _extract_onto(reader, onto, sums)


def _extract_fresh(reader: BundleReader, to: Path, sums: dict[str, str] | None) -> ExtractResult:
    if to.exists():
        raise UsageError(f"{to} already exists", hint="name a new directory, or use --onto")
    parent = to.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.partial-", dir=parent))
    try:
        blobs_dir = tmp / "blobs" / "sha256"
        blobs_dir.mkdir(parents=True)
        written, nbytes = _write_blobs(reader, blobs_dir, sums)
        (tmp / OCI_LAYOUT).write_bytes(OCI_LAYOUT_BYTES)
        # bundle.json beside the layout lets `push images --source=DIR` plan from it.
        atomic_write(tmp / BUNDLE_JSON, reader.manifest_raw)
        atomic_write(tmp / "index.json", reader.index_json)
        fsync_dir(blobs_dir)
        os.rename(tmp, to)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExtractResult(to, reader.manifest.version, len(reader.manifest.images), written,
                         nbytes)


def _extract_onto(reader: BundleReader, onto: Path, sums: dict[str, str] | None) -> ExtractResult:
    layout = onto / OCI_LAYOUT
    if not layout.is_file():
        raise UsageError(f"{onto} is not an OCI layout (no oci-layout file)")
    blobs_dir = onto / "blobs" / "sha256"
    missing = [
        d for d in reader.manifest.missing_blobs()
        if not (blobs_dir / d.split(":", 1)[1]).is_file()
    ]
    if missing:
        base = reader.manifest.base
        raise StoreError(
            f"{onto} lacks blob {missing[0]} (and {len(missing) - 1} more) that the delta"
            f" leaves to its base {base.describe() if base else ''}",
            hint="extract the base bundle there first",
        )
    blobs_dir.mkdir(parents=True, exist_ok=True)
    written, nbytes = _write_blobs(reader, blobs_dir, sums)
    incoming = json.loads(reader.index_json)
    if (onto / ".bmsync").is_dir():
        # A bmsync store (pulls may be writing its index at this very moment): merge
        # under its index lock, as its own writers do.
        Store(onto).add_images(
            (m["annotations"][REF_NAME], m) for m in incoming.get("manifests", []))
    else:
        _merge_index(onto / "index.json", incoming)
    atomic_write(onto / BUNDLE_JSON, reader.manifest_raw)
    return ExtractResult(onto, reader.manifest.version, len(reader.manifest.images), written,
                         nbytes)


def _write_blobs(reader: BundleReader, blobs_dir: Path,
                 sums: dict[str, str] | None) -> tuple[int, int]:
    """Write every blob of the archive (verified) into ``blobs_dir``; skip present ones.

    Then the archive's checksum is compared with ``sums`` (the sidecar), when given.
    """
    written = 0
    nbytes = 0
    for blob in reader.blobs():
        final = blobs_dir / blob.digest.split(":", 1)[1]
        if final.is_file() and final.stat().st_size == blob.entry.size:
            blob.reader.drain()  # verified by the reader, not rewritten
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=".blob-", dir=blobs_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := blob.reader.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        written += 1
        nbytes += blob.entry.size
    reader.finish()
    if sums is not None:
        check_sums(reader.source, sums, reader.raw_sha256 or "", reader.part_sha256)
    return written, nbytes


def _merge_index(path: Path, incoming: dict[str, Any]) -> None:
    """Merge into the index.json of a plain OCI layout (no bmsync store, so no lock)."""
    try:
        current = json.loads(path.read_bytes()) if path.exists() else {}
    except ValueError:
        raise IntegrityError(f"{path} is not valid JSON") from None
    merged = merge_index(current, incoming.get("manifests", []))
    atomic_write(path, (json.dumps(merged, sort_keys=True, indent=1) + "\n").encode())
