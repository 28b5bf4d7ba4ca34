"""A release run on the connected side: lock file, pinned pulls, the archive.

A run first resolves every image of the config to the digest its tag points at now
and pins them in a lock file, ``<workDir>/<version>/lock.json``::

    {"schemaVersion": 1, "mediaType": "application/vnd.bmsync.lock.v1+json",
     "version": "1.30.0", "kind": "release", "resolved": 1764032400,
     "platforms": ["linux/amd64"], "base": null,
     "images": [{"source": "gcr.io/repo/name:tag", "digest": "sha256:..."}]}

Everything after reads the lock, never the tags: each image is pulled at its pinned
digest, the archive is built from exactly those images, and its timestamps come from
``resolved`` (unless ``SOURCE_DATE_EPOCH`` is set), so a re-run rebuilds the same bytes.
``base`` names the file in the version folder that a delta is built against
(``{"kind": "bundle"|"inventory", "file": NAME, "digest": "sha256:..."}``).

The Luigi tasks call these functions; so could any other scheduler.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bundle.format import archive_name
from pipeline.bundle.writer import BuildResult, build_bundle, source_date_epoch
from pipeline.config import ImagesConfig
from pipeline.errors import (
    BmsyncError,
    IntegrityError,
    ItemsFailed,
    NotFound,
    StoreError,
    UsageError,
)
from pipeline.jobconfig import PipelineConfig
from pipeline.manifest import is_digest
from pipeline.objstore import ObjectStore, open_store
from pipeline.platform import parse_platform
from pipeline.progress import Progress
from pipeline.publish import PublishReport, publish, read_catalog
from pipeline.pull import ImageResult, pull_images, resolve_images, store_name
from pipeline.reference import Reference, parse_reference
from pipeline.registry.connect import ClientPool
from pipeline.store import Store, atomic_write, stored_upstream

log = logging.getLogger("bmsync.release")

LOCK_MEDIA_TYPE = "application/vnd.bmsync.lock.v1+json"
LOCK_NAME = "lock.json"
MAX_LOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PinnedImage:
    source: str  # the reference as stored: tag form when it has a tag
    digest: str  # the upstream manifest digest the tag pointed at when resolved

    @property
    def reference(self) -> Reference:
        return parse_reference(self.source)


@dataclass(frozen=True)
class Lock:
    version: str
    kind: str  # "release" | "nightly"
    resolved: int  # Unix seconds
    platforms: tuple[str, ...]
    images: tuple[PinnedImage, ...]
    base: dict[str, str] | None = None

    @property
    def epoch(self) -> int:
        """The archive's timestamps: ``SOURCE_DATE_EPOCH`` when set, else ``resolved``."""
        env = source_date_epoch()
        return self.resolved if env is None else env

    def pins(self) -> frozenset[tuple[str, str]]:
        return frozenset((i.source, i.digest) for i in self.images)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schemaVersion": 1,
            "mediaType": LOCK_MEDIA_TYPE,
            "version": self.version,
            "kind": self.kind,
            "resolved": self.resolved,
            "platforms": list(self.platforms),
            "base": self.base,
            "images": [{"source": i.source, "digest": i.digest} for i in self.images],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def lock_path(cfg: PipelineConfig, version: str) -> Path:
    return cfg.version_dir(version) / LOCK_NAME


def write_lock(path: Path, lock: Lock) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lock.to_json())


def read_lock(path: Path) -> Lock:
    """Parse the lock file at ``path``; IntegrityError when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOCK + 1)
    except FileNotFoundError:
        raise StoreError(f"{path}: no lock file", hint="resolve the release first") from None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    try:
        if len(raw) > MAX_LOCK:
            raise ValueError("too large")
        doc = json.loads(raw)
        if doc.get("mediaType") != LOCK_MEDIA_TYPE or doc.get("schemaVersion") != 1:
            raise ValueError("not a bmsync lock file")
        version, kind, resolved = doc["version"], doc["kind"], doc["resolved"]
        platforms = doc["platforms"]
        if not isinstance(version, str) or not isinstance(kind, str):
            raise ValueError("version and kind must be strings")
        if kind not in ("release", "nightly"):
            raise ValueError(f"unknown kind {kind!r}")
        if isinstance(resolved, bool) or not isinstance(resolved, int):
            raise ValueError("resolved must be a whole number of seconds")
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise ValueError("platforms must be a list of strings")
        if not isinstance(doc["images"], list):
            raise ValueError("images must be a list")
        images = tuple(PinnedImage(i["source"], i["digest"]) for i in doc["images"])
        for i in images:
            if not isinstance(i.source, str) or not isinstance(i.digest, str):
                raise ValueError("image source and digest must be strings")
            parse_reference(i.source)
            if not is_digest(i.digest):
                raise ValueError(f"invalid digest {i.digest!r}")
        base = doc.get("base")
        if base is not None and not (isinstance(base, dict)
                                     and {"kind", "file", "digest"} <= base.keys()):
            raise ValueError("invalid base")
        return Lock(version, kind, resolved, tuple(platforms), images, base)
    except (ValueError, KeyError, TypeError, AttributeError, BmsyncError) as e:
        raise IntegrityError(f"{path}: not a valid lock file ({e})",
                             hint="delete it to resolve the release again") from None


def resolve_pins(config: ImagesConfig, clients: ClientPool, *,
                 concurrency: int = 8) -> tuple[PinnedImage, ...]:
    """Every image of ``config`` with the digest its tag points at now, sorted by source.

    Tag filters list tags (one request per repository); each tag costs one ``HEAD``
    (a ``GET`` when the registry sends no digest). Any image that cannot be resolved
    fails the whole resolution, naming every such image: a lock missing an image would
    make a release that looks complete and is not.
    """
    refs, failures = resolve_images(config, clients)
    def named(what: str, e: BmsyncError) -> str:
        # Messages only: each error's hint would repeat on one line; the first's is kept.
        return e.message if e.message.startswith(what) else f"{what}: {e.message}"

    problems = [named(f.spec, f.error) for f in failures]
    first: BmsyncError | None = failures[0].error if failures else None

    def pin(ref: Reference) -> PinnedImage | BmsyncError:
        if ref.digest is not None:
            return PinnedImage(str(ref), ref.digest)
        client = clients.client(ref.registry)
        try:
            digest = client.manifest_digest(ref.repository, ref.identifier, what=str(ref))
        except BmsyncError as e:
            return e
        return PinnedImage(store_name(ref), digest)

    pinned: list[PinnedImage] = []
    with ThreadPoolExecutor(max(1, min(concurrency, len(refs) or 1))) as pool:
        for ref, got in zip(refs, pool.map(pin, refs), strict=True):
            if isinstance(got, BmsyncError):
                problems.append(named(str(ref), got))
                first = first or got
            else:
                pinned.append(got)
    if problems:
        assert first is not None
        raise ItemsFailed("; ".join(problems), first.exit_code, hint=first.hint)
    return tuple(sorted(pinned, key=lambda p: p.source))


def resolve_release(cfg: PipelineConfig, version: str, *, kind: str = "release",
                    base: dict[str, str] | None = None,
                    pins: Sequence[PinnedImage] | None = None) -> Lock:
    """Resolve the config's images (unless ``pins`` are given) and write the lock file.

    An existing lock file is never replaced: the release stays pinned to what was
    resolved first (delete the file to resolve again).
    """
    path = lock_path(cfg, version)
    if path.exists():
        return read_lock(path)
    if pins is None:
        pins = resolve_pins(cfg.images, client_pool(cfg))
    lock = Lock(version, kind, int(time.time()),
                tuple(str(p) for p in cfg.images.platforms), tuple(pins), base)
    write_lock(path, lock)
    log.info("resolved %d images for %s into %s", len(lock.images), version, path)
    return lock


def client_pool(cfg: PipelineConfig, concurrency: int = 8) -> ClientPool:
    return ClientPool(dict(cfg.images.registries), pool_size=max(16, concurrency * 2))


def is_pulled(store: Store, image: PinnedImage, platforms: Sequence[str], *,
              known: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Whether the store holds ``image`` at its pinned digest, filtered to ``platforms``.

    Reads ``index.json`` only (``known``: its entries, read once by the caller): an
    image is added there after all its blobs are stored.
    """
    entry = (store.images_by_name() if known is None else known).get(image.source)
    if entry is None:
        return False
    pinned_by_digest = parse_reference(image.source).digest is not None
    wanted = "" if pinned_by_digest else ",".join(platforms)
    return stored_upstream(entry, wanted) == image.digest


def pull_pinned(cfg: PipelineConfig, image: PinnedImage, platforms: Sequence[str], *,
                concurrency: int = 8) -> ImageResult:
    """Pull one locked image into the store; raises its error when it fails."""
    ref = image.reference
    report = pull_images(
        [ref], Store(cfg.store), client_pool(cfg, concurrency),
        platforms=tuple(parse_platform(p) for p in platforms), concurrency=concurrency,
        platform_hint=f"change platforms: in {cfg.path}",
        pins={str(ref): image.digest},
    )
    [result] = report.images
    if result.status == "failed":
        raise ItemsFailed(result.error or str(ref), result.exit_code)
    log.info("%s %s %s", result.status, image.source, image.digest)
    return result


def bundle_paths(cfg: PipelineConfig, version: str) -> tuple[Path, Path]:
    """The archive of ``version`` and its ``.sha256`` sidecar (written last)."""
    archive = cfg.version_dir(version) / archive_name(version, "zstd")
    return archive, archive.with_name(archive.name + ".sha256")


def build_release(cfg: PipelineConfig, lock: Lock, *,
                  progress: Progress | None = None) -> BuildResult:
    """Write the archive of ``lock`` into its version folder (every image pulled first).

    With a base in the lock, a delta leaving out what the base holds; the base file
    must still have the digest recorded when the lock was made.
    """
    from pipeline.bundle.delta import load_base

    store = Store(cfg.store)
    known = store.images_by_name()
    missing = [i.source for i in lock.images
               if not is_pulled(store, i, lock.platforms, known=known)]
    if missing:
        raise StoreError(f"{missing[0]} is not in the store {cfg.store} at its locked digest",
                         hint="pull it first")
    base = None
    if lock.base is not None:
        base_path = cfg.version_dir(lock.version) / lock.base["file"]
        base = load_base(base_path)  # reads and hashes it once; UsageError when missing
        if base.ref.digest != lock.base["digest"]:
            raise IntegrityError(f"{base_path} does not have the digest {lock.base['digest']}"
                                 " the lock file recorded",
                                 hint="delete the version folder and run again")
    if not lock.images:
        raise NotFound(f"the lock of {lock.version} lists no image")
    result = build_bundle(store, [i.source for i in lock.images], cfg.version_dir(lock.version),
                          version=lock.version, platforms=lock.platforms, base=base,
                          epoch=lock.epoch, progress=progress)
    log.info("wrote %s (%d bytes, sha256 %s)", result.archive, result.size, result.sha256)
    return result


def check_version(version: str) -> str:
    """``version`` when it can name a bundle (file and object-store folder)."""
    from pipeline.config import valid_release

    if not valid_release(version):
        raise UsageError(f"{version!r} cannot name a bundle",
                         hint="use letters, digits, '.', '_' and '-', starting with a letter"
                              " or digit")
    return version


def objects(cfg: PipelineConfig) -> ObjectStore:
    return open_store(cfg.object_store, endpoint_url=cfg.endpoint_url)


def is_published(cfg: PipelineConfig, version: str) -> bool:
    """Whether the object store's catalog lists ``version`` (its data went up first)."""
    return version in read_catalog(objects(cfg)).versions


def publish_release(cfg: PipelineConfig, version: str, *,
                    progress: Progress | None = None) -> PublishReport:
    """Publish the archive of ``version`` built in its folder (catalog entry last)."""
    archive, _ = bundle_paths(cfg, version)
    progress = progress or Progress("publish", enabled=False)
    try:
        report = publish(archive, objects(cfg), on_bytes=progress.advance)
    finally:
        progress.close()
    log.info("published %s to %s: %d objects, %d bytes uploaded", version, cfg.object_store,
             len(report.uploaded), report.bytes)
    return report
