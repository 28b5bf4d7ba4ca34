"""Across the air gap: publish, fetch, catalog and prune bundles in object storage.

Layout under the store's URL (DESIGN.md §6)::

    catalog.json                         versions and "latest", updated last
    <version>/bmpackages_<v>.tar.zst     the archive (or its .part-NNNN files)
    <version>/bmpackages_<v>.tar.zst.sha256
    <version>/bmpackages_<v>.bundle.json

Publish uploads the data first, then the checksum sidecar and bundle.json, and only
then adds the version to ``catalog.json`` with a conditional write (replace only the
catalog it read; create only if absent), retried when another publisher won the race:
two publishers never lose each other's entry, and a half-published version is never
listed. Re-publishing the same archive uploads nothing; another archive under a
published version is refused.

Fetch trusts only the sidecar objects (transfer systems reorder objects and drop
metadata): every file is downloaded under a ``.partial`` name (resuming from the record
of ranges beside it, see ``pipeline.objstore``), hashed while it arrives, checked
against the ``.sha256`` sidecar and the catalog's digest, and renamed into place only
then. A catalog that names a version whose objects have not all arrived yet raises
:class:`NotYetArrived` (its own exit code) so a timer can simply try again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.bundle.format import (
    EXTENSIONS,
    BundleManifest,
    archive_name,
    parse_manifest,
    sidecar_manifest_name,
)
from pipeline.bundle.reader import open_bundle
from pipeline.bundle.split import find_parts, part_name
from pipeline.bundle.verify import parse_sums, read_sidecar
from pipeline.errors import (
    Conflict,
    IntegrityError,
    NotFound,
    NotYetArrived,
    StoreError,
    UsageError,
)
from pipeline.objstore import Downloaded, ObjectInfo, ObjectStore, discard_partial

log = logging.getLogger("bmsync.publish")

CATALOG = "catalog.json"
CATALOG_SCHEMA = 1
CATALOG_ATTEMPTS = 8


@dataclass
class Catalog:
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    latest: str | None = None
    etag: str | None = None  # of the object it was read from; None when absent

    def to_json(self) -> bytes:
        doc = {"schemaVersion": CATALOG_SCHEMA, "latest": self.latest,
               "versions": {v: self.versions[v] for v in sorted(self.versions)}}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_catalog(store: ObjectStore) -> Catalog:
    got = store.get_bytes(CATALOG)
    if got is None:
        return Catalog()
    raw, etag = got
    try:
        doc = json.loads(raw)
        versions = doc["versions"]
        if not isinstance(versions, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{store.url}/{CATALOG} is not a bmsync catalog") from None
    return Catalog(versions, doc.get("latest"), etag)


def update_catalog(store: ObjectStore, change: Callable[[Catalog], None]) -> Catalog:
    """Read, change and write the catalog conditionally, retrying on a lost race."""
    for attempt in range(CATALOG_ATTEMPTS):
        catalog = read_catalog(store)
        change(catalog)
        try:
            if catalog.etag is None:
                store.put_bytes(CATALOG, catalog.to_json(), if_none_match=True)
            else:
                store.put_bytes(CATALOG, catalog.to_json(), if_match=catalog.etag)
            return catalog
        except Conflict:
            time.sleep(0.05 * (attempt + 1))
    raise Conflict(f"{store.url}/{CATALOG}: other writers kept changing it",
                   hint="try again")


@dataclass(frozen=True)
class LocalBundle:
    version: str
    manifest: BundleManifest
    manifest_raw: bytes
    files: list[Path]  # the archive, or its parts in order
    sidecar: Path
    sums: dict[str, str]
    digest: str  # sha256 of the (joined) archive
    name: str  # the archive's name (the joined stream's, when split)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def local_bundle(path: Path) -> LocalBundle:
    """The archive at ``path`` (or any of its parts) with its sidecars, checked to exist."""
    parts = find_parts(path)
    with open_bundle(path) as reader:
        manifest, raw = reader.manifest, reader.manifest_raw
        name = Path(reader.source.name).name
        archive_dir = Path(reader.source.name).parent
    files = parts or [archive_dir / name]
    sidecar = archive_dir / f"{name}.sha256"
    if not sidecar.is_file():
        raise UsageError(f"no checksum file {sidecar} beside the archive",
                         hint="publish the directory `bmsync bundle build` wrote")
    sums = read_sidecar(sidecar)
    if name not in sums:
        raise IntegrityError(f"{sidecar}: no checksum for {name}")
    return LocalBundle(manifest.version, manifest, raw, files, sidecar, sums,
                       "sha256:" + sums[name], name)


@dataclass
class PublishReport:
    url: str
    version: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    already: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "version": self.version, "uploaded": self.uploaded,
                "skipped": self.skipped, "bytesUploaded": self.bytes,
                "alreadyPublished": self.already, "seconds": round(self.seconds, 3)}


def publish(path: Path, store: ObjectStore, *,
            on_bytes: Callable[[int], None] | None = None) -> PublishReport:
    started = time.monotonic()
    local = local_bundle(path)
    v = local.version
    report = PublishReport(store.url, v)
    catalog = read_catalog(store)
    listed = catalog.versions.get(v)
    if listed is not None and listed.get("digest") != local.digest:
        raise UsageError(
            f"{store.url}: version {v} is already published with another archive"
            f" ({listed.get('digest')}, not {local.digest})",
            hint="bundle under a new version; published versions never change",
        )
    uploads: list[tuple[str, Path]] = [(f"{v}/{p.name}", p) for p in local.files]
    for key, p in uploads:
        have = store.head(key)
        if have is not None and have.size == p.stat().st_size and listed is not None:
            report.skipped.append(key)  # listed with the same digest: already complete
            if on_bytes:
                on_bytes(have.size)
            continue
        done = store.upload_file(key, p, on_bytes=on_bytes)
        report.uploaded.append(key)
        report.bytes += done.sent
    small = [(f"{v}/{local.sidecar.name}", local.sidecar.read_bytes()),
             (f"{v}/{sidecar_manifest_name(v)}", local.manifest_raw)]
    for key, data in small:
        got = store.get_bytes(key)
        if got is not None and got[0] == data:
            report.skipped.append(key)
            continue
        store.put_bytes(key, data)
        report.uploaded.append(key)
    if listed is None:
        m = local.manifest
        entry = {
            "digest": local.digest,
            "size": local.size,
            "created": m.created,
            "base": m.base.to_json() if m.base else None,
            "archive": local.name,
            "files": [p.name for p in local.files],
            "published": datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

        def add(c: Catalog) -> None:
            existing = c.versions.get(v)
            if existing is not None and existing.get("digest") != local.digest:
                raise UsageError(f"{store.url}: version {v} was just published by another"
                                 " publisher with another archive")
            c.versions[v] = existing or entry
            c.latest = _newest(c)

        update_catalog(store, add)
    else:
        report.already = not report.uploaded
    report.seconds = time.monotonic() - started
    return report


def _newest(c: Catalog) -> str | None:
    if not c.versions:
        return None
    return max(c.versions, key=lambda v: (c.versions[v].get("created", ""), v))


@dataclass
class FetchReport:
    url: str
    version: str
    files: list[Path]
    archive: Path
    digest: str
    base: dict[str, Any] | None
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "version": self.version, "archive": str(self.archive),
                "files": [str(f) for f in self.files], "digest": self.digest,
                "base": self.base, "bytesDownloaded": self.bytes,
                "seconds": round(self.seconds, 3)}


def fetch(store: ObjectStore, release: str, to: Path, *,
          on_total: Callable[[int], None] | None = None,
          on_bytes: Callable[[int], None] | None = None) -> FetchReport:
    started = time.monotonic()
    catalog = read_catalog(store)
    if not catalog.versions:
        raise NotFound(f"{store.url}: no catalog.json, or it lists no version",
                       hint="check the URL; publish a bundle first")
    v = catalog.latest if release == "latest" else release
    if v is None or v not in catalog.versions:
        known = ", ".join(sorted(catalog.versions)) or "none"
        raise NotFound(f"{store.url}: version {release} is not in the catalog (it has {known})")
    entry = catalog.versions[v]
    name, files = _entry_files(store, v, entry)
    sidecar_key = f"{v}/{name}.sha256"
    got = store.get_bytes(sidecar_key)
    if got is None:
        raise NotYetArrived(f"{store.url}: version {v} is listed but {sidecar_key} has not"
                            " arrived yet", hint="try again later")
    sums = parse_sums(got[0].decode(errors="replace"), f"{store.url}/{sidecar_key}")
    if "sha256:" + sums.get(name, "") != entry.get("digest"):
        raise IntegrityError(f"{store.url}/{sidecar_key} does not match the catalog's digest"
                             f" {entry.get('digest')} for {name}")
    infos: list[ObjectInfo] = []
    for f in files:
        info = store.head(f"{v}/{f}")
        if info is None:
            raise NotYetArrived(f"{store.url}: {v}/{f} has not arrived yet",
                                hint="try again later")
        infos.append(info)
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {to}: {e.strerror}",
                         hint="choose another --to, or check its permissions") from None
    report = FetchReport(store.url, v, [], to / name, str(entry["digest"]), entry.get("base"))
    # The sidecar is written last, once every file checked out: if it is there with the
    # same content and every file has its size, this version was fetched already.
    local_sidecar = to / f"{name}.sha256"
    if (local_sidecar.is_file() and local_sidecar.read_bytes() == got[0]
            and all((to / f).is_file() and (to / f).stat().st_size == i.size
                    for f, i in zip(files, infos, strict=True))):
        report.files = [to / f for f in files]
        report.seconds = time.monotonic() - started
        return report
    if on_total:
        on_total(sum(i.size for i in infos))
    for f, info in zip(files, infos, strict=True):
        final = to / f
        want = sums.get(f) if len(files) > 1 else sums.get(name)
        if want is None:
            raise IntegrityError(f"{store.url}/{sidecar_key} has no checksum for {f}")
        if final.exists() and _sha256(final) == want:
            report.files.append(final)
            if on_bytes:
                on_bytes(info.size)
            continue
        partial = to / f".{f}.partial"
        got_file = _download(store, f"{v}/{f}", partial, info, on_bytes)
        report.bytes += got_file.fetched
        if got_file.sha256 != want and got_file.kept:
            # Resumed from a record that named bytes the disk does not hold (the machine
            # stopped before they were written back): start this file over, once.
            log.warning("%s/%s/%s: the resumed download does not verify; downloading it"
                        " again", store.url, v, f)
            discard_partial(partial)
            got_file = _download(store, f"{v}/{f}", partial, info, on_bytes)
            report.bytes += got_file.fetched
        if got_file.sha256 != want:
            discard_partial(partial)
            raise IntegrityError(
                f"{store.url}/{v}/{f}: sha256 {got_file.sha256} does not match {want} in the"
                " sidecar",
                hint="the object was damaged in storage or transfer; publish it again",
            )
        os.replace(partial, final)
        report.files.append(final)
    # Sidecars beside the archive, so `bmsync bundle verify` works on the result.
    _write(to / f"{name}.sha256", got[0])
    manifest = store.get_bytes(f"{v}/{sidecar_manifest_name(v)}")
    if manifest is not None:
        parse_manifest(manifest[0], source=f"{store.url}/{v}/{sidecar_manifest_name(v)}")
        _write(to / sidecar_manifest_name(v), manifest[0])
    report.seconds = time.monotonic() - started
    return report


def _entry_files(store: ObjectStore, version: str,
                 entry: dict[str, Any]) -> tuple[str, list[str]]:
    """The archive's name and its files, as the catalog lists them, checked: they
    become local paths, and the catalog crossed the air gap (never trusted)."""
    name = entry.get("archive")
    files = entry.get("files")
    names = {archive_name(version, c) for c in EXTENSIONS}
    if name not in names or not isinstance(files, list) or not files or not all(
            f == name or f in {part_name(str(name), n) for n in range(1, len(files) + 1)}
            for f in files):
        raise IntegrityError(f"{store.url}/{CATALOG}: the entry of {version} names files"
                             f" {files!r} of archive {name!r}, not bmpackages_{version} ones",
                             hint="the catalog is damaged or forged; publish the version again")
    return str(name), [str(f) for f in files]


def _download(store: ObjectStore, key: str, partial: Path, info: ObjectInfo,
              on_bytes: Callable[[int], None] | None) -> Downloaded:
    """``store.download`` of ``key`` into ``partial``, resuming what an earlier run left;
    an object replaced since ``info`` was read (Conflict) is downloaded afresh, once."""
    try:
        return store.download(key, partial, info=info, on_bytes=on_bytes)
    except Conflict:
        # download() removed the partial: the new object's bytes start from zero.
        now = store.head(key)
        if now is None:
            raise NotYetArrived(f"{store.url}/{key} is gone", hint="try again later") from None
        return store.download(key, partial, info=now, on_bytes=on_bytes)


def _write(path: Path, data: bytes) -> None:
    from pipeline.store import atomic_write

    atomic_write(path, data)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prune(store: ObjectStore, keep: int, *, dry_run: bool = False) -> list[str]:
    """Remove all but the newest ``keep`` versions, never the latest nor a base that a
    kept delta depends on (directly or through a chain). Returns the versions removed.

    The catalog entry goes first (a version not listed is not fetched), then its objects.
    """
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    catalog = read_catalog(store)
    order = sorted(catalog.versions,
                   key=lambda v: (catalog.versions[v].get("created", ""), v), reverse=True)
    kept = set(order[:keep])
    if catalog.latest:
        kept.add(catalog.latest)
    changed = True
    while changed:  # follow delta chains
        changed = False
        for v in list(kept):
            base = catalog.versions[v].get("base") or {}
            if base.get("kind") == "bundle":
                target = base.get("version")
                if target in catalog.versions and target not in kept:
                    kept.add(target)
                    changed = True
    doomed = [v for v in order if v not in kept]
    if dry_run or not doomed:
        return doomed

    def drop(c: Catalog) -> None:
        for v in doomed:
            c.versions.pop(v, None)
        c.latest = catalog.latest if catalog.latest in c.versions else _newest(c)

    update_catalog(store, drop)
    for v in doomed:
        for info in store.list_objects(f"{v}/"):
            store.delete(info.key)
    return doomed
