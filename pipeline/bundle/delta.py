"""Bases of delta bundles: an earlier bundle, or an inventory of what a mirror holds.

``--base`` takes an archive (or split archive), its ``bmpackages_<V>.bundle.json``
sidecar, or an inventory file. An inventory is what a disconnected site reports about
its mirror (``bmsync inventory`` writes it)::

    {"schemaVersion": 1, "mediaType": "application/vnd.bmsync.inventory.v1+json",
     "registry": "HOST:PORT/NAMESPACE", "created": "...", "digests": ["sha256:...", ...]}

A delta built on it carries only the blobs whose digests it does not list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.bundle.format import MEDIA_TYPE, BaseContent, BaseRef, parse_manifest
from pipeline.bundle.reader import open_bundle
from pipeline.errors import IntegrityError, UsageError
from pipeline.manifest import compute_digest, is_digest

INVENTORY_MEDIA_TYPE = "application/vnd.bmsync.inventory.v1+json"
MAX_BASE_FILE = 256 * 1024 * 1024


def load_base(path: str | os.PathLike[str]) -> BaseContent:
    """What a delta may leave out, from ``path`` (see the module docstring).

    Raises UsageError for a file that is none of the accepted kinds.
    """
    p = Path(path)
    if p.suffix == ".json":
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read base {p}: {e.strerror}") from None
        if len(raw) > MAX_BASE_FILE:
            raise UsageError(f"base {p} is too large to be a bundle.json or an inventory")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise UsageError(f"base {p} is not JSON") from None
        media = doc.get("mediaType") if isinstance(doc, dict) else None
        if media == MEDIA_TYPE:
            return _from_manifest(raw, str(p))
        if media == INVENTORY_MEDIA_TYPE:
            return BaseContent(
                BaseRef("inventory", compute_digest(raw)),
                frozenset(_inventory_digests(doc, str(p))),
            )
        raise UsageError(
            f"base {p} is neither a bundle.json nor an inventory (mediaType {media!r})"
        )
    with open_bundle(p) as reader:
        return _from_manifest(reader.manifest_raw, str(p))


def _from_manifest(raw: bytes, source: str) -> BaseContent:
    manifest = parse_manifest(raw, source=source)
    digest = compute_digest(raw)
    # Everything the base's images need is at a site that imported the base (a delta
    # base's own missing blobs came from its base in turn).
    return BaseContent(BaseRef("bundle", digest, manifest.version), frozenset(manifest.blobs))


def _inventory_digests(doc: dict[str, object], source: str) -> Iterable[str]:
    digests = doc.get("digests")
    if not isinstance(digests, list):
        raise IntegrityError(f"{source}: inventory has no digests list")
    for d in digests:
        if not isinstance(d, str) or not d.startswith("sha256:") or not is_digest(d):
            raise IntegrityError(f"{source}: inventory lists an invalid digest {d!r}")
    return digests  # type: ignore[return-value]

