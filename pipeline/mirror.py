"""Push a bundle into a namespaced mirror, moving only what it lacks (DESIGN.md §7).

Call order for one mirror (:func:`push_bundle`):

1. every image's mirror path is computed, and two sources landing on one path are an
   error before any request;
2. one ``HEAD`` per image on its tag: an image already at its digest costs nothing
   more; a tag at another digest is retagged (old -> new), or refused with
   ``no_overwrite``;
3. for a delta, every blob it leaves to its base must already be in the mirror (``HEAD``
   in the repository of an image that needs it, else in that of any image of the
   bundle, mounted from there later), else nothing is pushed and the missing base
   version is named;
4. blobs, grouped by digest: skipped when present (``HEAD``), mounted from a repository
   of the same registry that has it, otherwise uploaded once and mounted elsewhere;
   each upload streams from the source and is committed (``PUT ?digest=``) only after
   the bytes read locally match the digest;
5. per image whose blobs all made it: child manifests by digest, then the image's own
   manifest by tag. A tag never points at a partial image.

Blob bytes come from a :class:`BlobSource`: random access into a seekable archive or
an OCI layout (no temporary disk), or one ordered pass over a stream where each needed
blob is spooled to a temporary file only while its uploads run.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from pipeline.bundle.format import BundleManifest, ImageEntry
from pipeline.bundle.reader import BundleReader, VerifyingReader
from pipeline.errors import (
    BmsyncError,
    IntegrityError,
    NotFound,
    RegistryError,
    ServerError,
    StoreError,
    TooManyRequests,
    TransportError,
)
from pipeline.manifest import IMAGE_TYPES, INDEX_TYPES
from pipeline.progress import Progress
from pipeline.reference import (
    Mirror,
    Reference,
    check_mirror_collisions,
    mirror_target,
    parse_reference,
)
from pipeline.registry.client import RegistryClient, ResendNeeded

log = logging.getLogger("bmsync.push")

CHUNK = 1024 * 1024
UPLOAD_ATTEMPTS = 4
SMALL_BLOB = 64 * 1024  # uploaded in one request (the commit carries the body)


# -- where blob bytes come from -------------------------------------------------------------


class BlobSource(Protocol):
    """Opens a blob as a verifying reader; thread-safe."""

    def open(self, digest: str) -> VerifyingReader: ...


class ArchiveSource:
    """Random access into a seekable archive (through its seek table)."""

    def __init__(self, reader: BundleReader) -> None:
        self._reader = reader

    def open(self, digest: str) -> VerifyingReader:
        return self._reader.open_blob(digest)


class LayoutSource:
    """An extracted OCI layout (``bmsync bundle extract``): ``blobs/sha256/<hex>``."""

    def __init__(self, root: Path, manifest: BundleManifest) -> None:
        self._root = root
        self._manifest = manifest

    def open(self, digest: str) -> VerifyingReader:
        path = self._root / "blobs" / "sha256" / digest.split(":", 1)[1]
        entry = self._manifest.blobs[digest]
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the reader's owner
        except OSError as e:
            raise StoreError(f"{path}: cannot read blob {digest}: {e.strerror}") from None
        return VerifyingReader(cast(IO[bytes], f), digest, entry.size, str(self._root))


class SpoolSource:
    """Blobs spooled from an ordered stream, each kept only while its uploads run."""

    def __init__(self) -> None:
        self._files: dict[str, Path] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.dir = Path(tempfile.mkdtemp(prefix="bmsync-push-"))

    def add(self, digest: str, size: int, reader: VerifyingReader) -> None:
        path = self.dir / digest.split(":", 1)[1]
        with open(path, "wb") as out:
            while chunk := reader.read(CHUNK):
                out.write(chunk)
        with self._lock:
            self._files[digest] = path
            self._sizes[digest] = size

    def open(self, digest: str) -> VerifyingReader:
        with self._lock:
            path, size = self._files[digest], self._sizes[digest]
        return VerifyingReader(cast(IO[bytes], open(path, "rb")), digest, size, "spool")

    def drop(self, digest: str) -> None:
        with self._lock:
            path = self._files.pop(digest, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        for digest in list(self._files):
            self.drop(digest)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


# -- reports ----------------------------------------------------------------------------------


@dataclass
class ImagePush:
    source: str
    target: str  # mirror reference, HOST[:PORT]/NS/REPO:TAG
    digest: str
    upstream_digest: str
    status: str = "planned"  # planned | present | pushed | retagged | failed
    old_digest: str | None = None
    error: str | None = None
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "target": self.target,
            "digest": self.digest,
            "upstreamDigest": self.upstream_digest,
            "status": self.status,
        }
        if self.old_digest:
            out["oldDigest"] = self.old_digest
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class PushReport:
    mirror: str
    images: list[ImagePush] = field(default_factory=list)
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_skipped: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def failed(self) -> list[ImagePush]:
        return [i for i in self.images if i.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        count = {s: sum(1 for i in self.images if i.status == s)
                 for s in ("present", "pushed", "retagged", "failed", "planned")}
        return {
            "mirror": self.mirror,
            "dryRun": self.dry_run,
            "images": [i.to_json() for i in self.images],
            "summary": {
                **count,
                "blobsUploaded": self.blobs_uploaded,
                "blobsMounted": self.blobs_mounted,
                "blobsSkipped": self.blobs_skipped,
                "bytesUploaded": self.bytes_uploaded,
                "seconds": round(self.seconds, 3),
            },
        }


# -- the push -------------------------------------------------------------------------------


@dataclass
class _Image:
    entry: ImageEntry
    ref: Reference  # on the mirror
    report: ImagePush
    blobs: list[str]  # layers and configs (not manifests)
    manifests: list[str]  # children first, the image's own last


class _Pusher:
    def __init__(self, manifest: BundleManifest, mirror: Mirror, client: RegistryClient,
                 source: BlobSource | None, *, concurrency: int, no_overwrite: bool,
                 progress: Progress) -> None:
        self.manifest = manifest
        self.mirror = mirror
        self.client = client
        self.source = source
        self.concurrency = concurrency
        self.no_overwrite = no_overwrite
        self.progress = progress
        self.report = PushReport(str(mirror))
        self._lock = threading.Lock()
        self.manifest_bytes: dict[str, bytes] = {}
        # For a delta: where each blob it leaves to its base was found in the mirror
        # (check_base asked; push_digest does not ask that repository again).
        self.base_location: dict[str, str] = {}
        # Streamed archives: members whose bytes failed their check.
        self.broken: dict[str, BmsyncError] = {}

    # Plan ------------------------------------------------------------------------------

    def plan(self) -> list[_Image]:
        refs = [parse_reference(i.source) for i in self.manifest.images]
        check_mirror_collisions(refs, self.mirror)
        images = []
        for entry in self.manifest.images:
            target = mirror_target(entry.source, entry.digest, self.mirror)
            report = ImagePush(entry.source, str(target), entry.digest, entry.upstream_digest)
            self.report.images.append(report)
            blobs, manifests = _split_blobs(self.manifest, entry)
            images.append(_Image(entry, target, report, blobs, manifests))
        return images

    def check_tags(self, images: list[_Image]) -> list[_Image]:
        """One HEAD per image; returns the images that need pushing."""
        def head(img: _Image) -> None:
            try:
                current = self.client.manifest_digest(img.ref.repository, img.ref.identifier)
            except NotFound:
                return
            if current == img.entry.digest:
                img.report.status = "present"
            elif img.ref.tag:
                if self.no_overwrite:
                    img.report.status = "failed"
                    img.report.exit_code = 2
                    img.report.error = (
                        f"{img.report.target} points at {current}, not {img.entry.digest};"
                        " --no-overwrite refuses to move it"
                    )
                else:
                    img.report.old_digest = current

        with ThreadPoolExecutor(max(1, min(self.concurrency, len(images)))) as pool:
            list(pool.map(head, images))
        return [i for i in images if i.report.status == "planned"]

    def check_base(self, todo: list[_Image], images: list[_Image]) -> None:
        """A delta's left-out blobs must be in the mirror already (nothing is pushed if not).

        Each is looked for in the repositories that need it, then in those of every
        image of the bundle (an image new to the mirror, in a repository of its own,
        finds the base's layers where the images already there hold them; they are
        mounted from there)."""
        base = self.manifest.base
        if base is None:
            return
        left_out = set(self.manifest.missing_blobs())
        needs: dict[str, list[str]] = {}
        for img in todo:
            for d in img.blobs + img.manifests:
                if d in left_out:
                    needs.setdefault(d, []).append(img.ref.repository)
        repos = sorted({i.ref.repository for i in images})

        def find(digest: str) -> str | None:
            wanted = needs[digest]
            for repo in wanted + [r for r in repos if r not in wanted]:
                if self.has(repo, digest):
                    with self._lock:
                        self.base_location[digest] = repo
                    return None
            return digest

        with ThreadPoolExecutor(max(1, min(self.concurrency, len(needs) or 1))) as pool:
            absent = [d for d in pool.map(find, sorted(needs)) if d]
        if absent:
            raise NotFound(
                f"mirror {self.mirror} lacks blob {absent[0]} (and {len(absent) - 1} more)"
                f" that this delta leaves to its base {base.describe()}; nothing was pushed",
                hint=f"push bundle {base.version} first" if base.version else
                "push the bundle the inventory was taken from first",
            )

    def has(self, repo: str, digest: str) -> bool:
        return self.client.holds(repo, digest, self.manifest.blobs[digest].media_type,
                                 push=True)

    # Blobs -----------------------------------------------------------------------------

    def blob_tasks(self, todo: list[_Image]) -> dict[str, list[str]]:
        """digest -> repositories that need it (layers and configs only)."""
        by_digest: dict[str, list[str]] = {}
        for img in todo:
            for d in img.blobs:
                repos = by_digest.setdefault(d, [])
                if img.ref.repository not in repos:
                    repos.append(img.ref.repository)
        return by_digest

    def push_digest(self, digest: str, repos: list[str]) -> None:
        """Make ``digest`` present in every repo of ``repos``: skip, mount or upload."""
        have: str | None = self.base_location.get(digest)
        missing: list[str] = []
        for repo in repos:
            if repo == have or self.client.blob_exists(repo, digest):
                have = have or repo
                self._count(skipped=1)
            else:
                missing.append(repo)
        for repo in missing:
            if have is not None and self.client.mount_blob(repo, digest, have):
                self._count(mounted=1)
                continue
            if not self.manifest.blobs[digest].in_archive:
                raise NotFound(
                    f"blob {digest}, left to the base, is in {have or 'no repository'} of"
                    f" the mirror and could not be mounted into {repo}",
                    hint="push the base bundle first",
                )
            self.upload(repo, digest)
            have = have or repo

    def upload(self, repo: str, digest: str) -> None:
        assert self.source is not None
        size = self.manifest.blobs[digest].size
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            reader = self.source.open(digest)
            try:
                body: Iterator[bytes] | bytes
                if size <= SMALL_BLOB:
                    # Read whole: the reader checks the digest as the last byte arrives.
                    body = b"".join(_chunks(reader, self.progress))
                else:
                    body = _chunks(reader, self.progress)
                self.client.upload_blob(repo, digest, size, body, verify=reader.drain)
            except (TransportError, ResendNeeded, TooManyRequests, ServerError) as e:
                # Uploads are not idempotent, so the transport does not retry them: a
                # failed one restarts here with a new upload session.
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                delay = self.client.transport.policy.backoff(attempt)
                if isinstance(e, RegistryError) and e.retry_after is not None:
                    delay = e.retry_after
                log.debug("upload of %s to %s failed (%s); new session in %.1fs",
                          digest, repo, e, delay)
                time.sleep(delay)
                continue
            finally:
                reader.close()
            self._count(uploaded=1, nbytes=size)
            return

    def _count(self, *, skipped: int = 0, mounted: int = 0, uploaded: int = 0,
               nbytes: int = 0) -> None:
        with self._lock:
            self.report.blobs_skipped += skipped
            self.report.blobs_mounted += mounted
            self.report.blobs_uploaded += uploaded
            self.report.bytes_uploaded += nbytes

    # Manifests -------------------------------------------------------------------------

    def manifest_raw(self, digest: str, repo: str) -> bytes:
        """A manifest's bytes: from the bundle, or (a delta leaving it to its base, for
        example an image re-tagged unchanged) from the mirror, where the base put it."""
        if digest in self.broken:
            raise self.broken[digest]
        raw = self.manifest_bytes.get(digest)
        if raw is None:
            if not self.manifest.blobs[digest].in_archive:
                raw = self.client.get_manifest(self.base_location.get(digest, repo), digest).raw
            else:
                assert self.source is not None
                with self.source.open(digest) as r:
                    raw = _read_all(r)
            self.manifest_bytes[digest] = raw
        return raw

    def push_manifests(self, img: _Image) -> None:
        repo = img.ref.repository
        for digest in img.manifests[:-1]:  # children by digest first
            entry = self.manifest.blobs[digest]
            if self.client.holds(repo, digest, entry.media_type, push=True):
                continue  # already there (a shared child, or an earlier partial push)
            self.client.put_manifest(repo, digest, self.manifest_raw(digest, repo),
                                     entry.media_type, expected_digest=digest)
        own = img.manifests[-1]
        self.client.put_manifest(repo, img.ref.identifier, self.manifest_raw(own, repo),
                                 img.entry.media_type, expected_digest=own)
        img.report.status = "retagged" if img.report.old_digest else "pushed"


def _read_all(reader: VerifyingReader) -> bytes:
    """Every byte of a (verifying) reader: reads may come back short."""
    return b"".join(iter(lambda: reader.read(CHUNK), b""))


def _chunks(reader: VerifyingReader, progress: Progress) -> Iterator[bytes]:
    while chunk := reader.read(CHUNK):
        progress.advance(len(chunk))
        yield chunk


def _split_blobs(manifest: BundleManifest, entry: ImageEntry) -> tuple[list[str], list[str]]:
    """An image's layers/configs, and its manifests ordered children first."""
    blobs, images, indexes = [], [], []
    for d in entry.blobs:
        media = manifest.blobs[d].media_type
        if d == entry.digest:
            continue
        if media in INDEX_TYPES:
            indexes.append(d)
        elif media in IMAGE_TYPES:
            images.append(d)
        else:
            blobs.append(d)
    return blobs, images + indexes + [entry.digest]


def push_bundle(
    manifest: BundleManifest,
    targets: Sequence[tuple[Mirror, RegistryClient]],
    *,
    reader: BundleReader | None = None,
    layout: Path | None = None,
    concurrency: int = 8,
    dry_run: bool = False,
    no_overwrite: bool = False,
    progress: Progress | None = None,
) -> list[PushReport]:
    """Push the bundle of ``manifest`` into every mirror of ``targets``.

    Blobs come from ``layout`` (an extracted layout) or from ``reader`` (the archive:
    random access when seekable, else one ordered pass). Per-image failures are in the
    reports; a failure that concerns a whole mirror (collisions, a delta's missing
    base, the mirror unreachable) raises before anything is pushed.
    """
    progress = progress or Progress("push", enabled=False)
    started = time.monotonic()
    spool: SpoolSource | None = None
    if layout is not None:
        source: BlobSource = LayoutSource(layout, manifest)
    elif reader is None:
        raise ValueError("push_bundle needs a reader or a layout")
    elif reader.seekable:
        source = ArchiveSource(reader)
    else:
        spool = SpoolSource()
        source = spool
    pushers = [
        _Pusher(manifest, mirror, client, source, concurrency=concurrency,
                no_overwrite=no_overwrite, progress=progress)
        for mirror, client in targets
    ]
    try:
        plans: list[_Plan] = []
        for p in pushers:
            images = p.plan()
            todo = p.check_tags(images)
            p.check_base(todo, images)
            plans.append(_Plan(p, todo, p.blob_tasks(todo)))
        if dry_run or not any(plan.todo for plan in plans):
            for plan in plans:
                plan.pusher.report.dry_run = dry_run
                plan.pusher.report.seconds = time.monotonic() - started
            return [p.report for p in pushers]
        for plan in plans:
            progress.add_total(sum(manifest.blobs[d].size for d in plan.tasks))
        if spool is not None:
            assert reader is not None
            _push_streamed(reader, spool, plans, concurrency)
        else:
            for plan in plans:
                _push_random(plan, concurrency)
    finally:
        if spool is not None:
            spool.close()
        progress.close()
    for p in pushers:
        p.report.seconds = time.monotonic() - started
    return [p.report for p in pushers]


def _run_image_blobs(p: _Pusher, todo: list[_Image],
                     futures: dict[str, Future[None]]) -> None:
    """Once every blob of an image is done, push its manifests (or record its failure)."""
    for img in todo:
        error: BaseException | None = None
        for d in img.blobs:
            try:
                futures[d].result()
            except BmsyncError as e:
                error = e
                break
        if error is None:
            try:
                p.push_manifests(img)
                continue
            except BmsyncError as e:
                error = e
        assert isinstance(error, BmsyncError)
        img.report.status = "failed"
        img.report.error = f"{img.report.target}: {error}"
        img.report.exit_code = error.exit_code


@dataclass(frozen=True)
class _Plan:
    """What one mirror needs: its pusher, the images to push, digest -> repositories."""

    pusher: _Pusher
    todo: list[_Image]
    tasks: dict[str, list[str]]


def _push_random(plan: _Plan, concurrency: int) -> None:
    p = plan.pusher
    with ThreadPoolExecutor(concurrency, thread_name_prefix="push") as pool:
        # Largest first: the long uploads start early and the pool stays busy.
        order = sorted(plan.tasks, key=lambda d: -p.manifest.blobs[d].size)
        futures = {d: pool.submit(p.push_digest, d, plan.tasks[d]) for d in order}
        _run_image_blobs(p, plan.todo, futures)


def _push_streamed(reader: BundleReader, spool: SpoolSource, plans: list[_Plan],
                   concurrency: int) -> None:
    """One ordered pass over the archive: spool what is needed, push, drop."""
    needed: dict[str, list[tuple[_Pusher, list[str]]]] = {}
    manifests_needed: set[str] = set()
    for plan in plans:
        for d, repos in plan.tasks.items():
            needed.setdefault(d, []).append((plan.pusher, repos))
        for img in plan.todo:
            manifests_needed.update(img.manifests)
    futures: dict[_Pusher, dict[str, Future[None]]] = {plan.pusher: {} for plan in plans}
    arrived: set[str] = set()  # members read whole from the stream
    in_flight = threading.BoundedSemaphore(max(1, concurrency))

    def run(digest: str) -> None:
        try:
            for p, repos in needed[digest]:
                p.push_digest(digest, repos)
        finally:
            spool.drop(digest)
            in_flight.release()

    broken: dict[str, BmsyncError] = {}  # digests whose bytes in the archive are bad
    with ThreadPoolExecutor(concurrency, thread_name_prefix="push") as pool:
        try:
            for blob in reader.blobs():
                try:
                    if blob.digest in manifests_needed:
                        data = _read_all(blob.reader)
                        for plan in plans:
                            plan.pusher.manifest_bytes[blob.digest] = data
                    elif blob.digest in needed:
                        in_flight.acquire()
                        try:
                            spool.add(blob.digest, blob.entry.size, blob.reader)
                        except BaseException:
                            in_flight.release()
                            raise
                        fut = pool.submit(run, blob.digest)
                        for p, _ in needed[blob.digest]:
                            futures[p][blob.digest] = fut
                    arrived.add(blob.digest)
                except IntegrityError as e:
                    # This member is bad but was read to its end: the stream goes on, and
                    # only the images that need it fail.
                    broken[blob.digest] = e
            reader.finish()
        except BmsyncError as e:
            # The stream itself broke (truncated, tampered layout): what the archive
            # carries but did not arrive fails with this error; images whose members all
            # came before the break still get their tags.
            for d in set(needed) | manifests_needed:
                if reader.manifest.blobs[d].in_archive and d not in arrived:
                    broken.setdefault(d, e)
        for plan in plans:
            plan.pusher.broken = broken
            for d, error in broken.items():
                failed: Future[None] = Future()
                failed.set_exception(error)
                futures[plan.pusher][d] = failed
        for plan in plans:
            # Blobs a delta leaves to its base are in the mirror (checked before): mount
            # them where an image needs them.
            for d, repos in plan.tasks.items():
                if d not in futures[plan.pusher]:
                    futures[plan.pusher][d] = pool.submit(plan.pusher.push_digest, d, repos)
            _run_image_blobs(plan.pusher, plan.todo, futures[plan.pusher])

