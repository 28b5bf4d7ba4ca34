"""Pull images from registries into the shared store (DESIGN.md §3-4).

Call order: :func:`resolve_images` turns the config's image specs into concrete
references (tag filters are evaluated against the registry's tag list), then
:func:`pull_images` fetches each one:

1. one manifest request per image: a HEAD when the store already holds the image (a
   warm pull stops there if the digest is unchanged), a GET otherwise;
2. an index is filtered to the wanted platforms (rewritten to list only the kept
   children; an image pinned by digest is kept whole, since nodes pull that exact
   digest), and its child manifests are fetched by digest;
3. every blob the store lacks is streamed into the store by a shared thread pool; a
   blob needed by several images is fetched once, and a transfer cut mid-blob resumes
   from where it stopped;
4. manifests are written children first, then the image's entry in ``index.json``, so
   the store never lists an image whose content is incomplete.

One image failing does not stop the others; the report names each failure.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ImagesConfig
from pipeline.errors import (
    BmsyncError,
    ConnectionLost,
    IntegrityError,
    NotFound,
    StoreError,
    UsageError,
)
from pipeline.manifest import Descriptor, Manifest, filter_index
from pipeline.platform import Platform
from pipeline.progress import Progress, human_bytes
from pipeline.reference import Reference
from pipeline.registry.client import RegistryClient
from pipeline.registry.connect import ClientPool
from pipeline.store import PLATFORMS, UPSTREAM_DIGEST, BlobSink, Store, stored_upstream
from pipeline.tagfilter import select_tags

log = logging.getLogger("bmsync.pull")

BLOB_ATTEMPTS = 5


@dataclass(frozen=True)
class ImageResult:
    source: str
    status: str  # "pulled" | "present" | "failed"
    digest: str | None = None
    upstream_digest: str | None = None
    media_type: str | None = None
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    error: str | None = None
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "status": self.status,
            "digest": self.digest,
            "upstreamDigest": self.upstream_digest,
            "mediaType": self.media_type,
            "blobsFetched": self.blobs_fetched,
            "bytesFetched": self.bytes_fetched,
        }
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class PullReport:
    images: list[ImageResult] = field(default_factory=list)
    blobs_fetched: int = 0
    blobs_present: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[ImageResult]:
        return [i for i in self.images if i.status == "failed"]

    @property
    def mb_per_s(self) -> float:
        return self.bytes_fetched / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [i.to_json() for i in self.images],
            "summary": {
                "images": len(self.images),
                "pulled": sum(1 for i in self.images if i.status == "pulled"),
                "present": sum(1 for i in self.images if i.status == "present"),
                "failed": len(self.failed),
                "blobsFetched": self.blobs_fetched,
                "blobsPresent": self.blobs_present,
                "bytesFetched": self.bytes_fetched,
                "seconds": round(self.seconds, 3),
                "mbPerSecond": round(self.mb_per_s, 1),
            },
        }


@dataclass(frozen=True)
class ResolveFailure:
    spec: str
    error: BmsyncError


def resolve_images(
    config: ImagesConfig, clients: ClientPool
) -> tuple[list[Reference], list[ResolveFailure]]:
    """Concrete references for every image of ``config``, in config order, deduplicated.

    Plain references pass through; a spec with tag filters lists the repository's tags
    (one paginated request) and keeps the matches. A spec whose listing fails is
    returned as a failure rather than raised, so other images still pull.
    """
    refs: list[Reference] = []
    failures: list[ResolveFailure] = []
    seen: set[str] = set()
    for spec in config.images:
        if spec.filter is None:
            candidates = [spec.reference]
        else:
            ref = spec.reference
            try:
                tags = clients.client(ref.registry).list_tags(ref.repository, what=ref.name)
            except BmsyncError as e:
                failures.append(ResolveFailure(ref.name, e))
                continue
            chosen = select_tags(tags, spec.filter)
            if not chosen:
                # A release missing an image must not look complete.
                failures.append(ResolveFailure(ref.name, NotFound(
                    f"{ref.name}: no tag matches {spec.filter.describe()}"
                    f" (the repository has {len(tags)} tags)",
                    hint="check the filter in the config",
                )))
                continue
            candidates = [ref.with_tag(t) for t in chosen]
        for ref in candidates:
            key = str(ref)
            if key not in seen:
                seen.add(key)
                refs.append(ref)
    return refs, failures


class _Puller:
    """State of one pull run: the store, clients, pools and counters."""

    def __init__(
        self,
        store: Store,
        clients: ClientPool,
        platforms: Sequence[Platform],
        concurrency: int,
        progress: Progress,
        platform_hint: str,
        pins: Mapping[str, str],
    ) -> None:
        self.store = store
        self.pins = pins
        self.platform_hint = platform_hint
        # index.json as the run started, read once (an image's entry is only ever
        # replaced by its own pull).
        self.known = store.images_by_name()
        self.clients = clients
        self.platforms = tuple(platforms)
        self.progress = progress
        self.blob_pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="blob")
        self._lock = threading.Lock()
        self._blob_futures: dict[str, Future[int]] = {}
        self.blobs_fetched = 0
        self.blobs_present = 0
        self.bytes_fetched = 0

    # -- one image -----------------------------------------------------------------------

    def pull(self, ref: Reference) -> ImageResult:
        name = store_name(ref)
        client = self.clients.client(ref.registry)
        pinned = ref.digest is not None
        platforms = () if pinned else self.platforms
        wanted = ",".join(str(p) for p in platforms)

        pin = self.pins.get(str(ref))
        entry = self.known.get(name)
        upstream: str | None = None  # of the stored image, when it is whole and reusable
        if entry is not None:
            upstream = stored_upstream(entry, wanted)
            if upstream is not None and not self._complete(entry["digest"]):
                upstream = None
        if entry is not None and upstream is not None:
            current = ref.digest or pin or client.head_manifest(
                ref.repository, ref.identifier, what=str(ref)
            ).digest
            if current == upstream:
                return ImageResult(
                    str(ref), "present", entry["digest"], upstream, entry.get("mediaType")
                )

        top = client.get_manifest(ref.repository, pin or ref.identifier, what=str(ref))
        upstream_digest = top.digest
        if entry is not None and upstream == upstream_digest:
            # The HEAD did not say (no Docker-Content-Digest): the GET shows it unchanged.
            return ImageResult(
                str(ref), "present", entry["digest"], upstream, entry.get("mediaType")
            )
        if pinned and self.platforms and top.is_index:
            log.warning(
                "%s is pinned by digest: keeping every platform of its index", ref
            )
        if top.is_index and platforms:
            try:
                kept = filter_index(top, platforms)
            except UsageError as e:
                raise UsageError(f"{ref}: {e.message}", hint=self.platform_hint) from None
        else:
            kept = top

        manifests: list[Manifest] = []  # children before parents
        blobs: dict[str, Descriptor] = {}
        self._walk(client, ref, kept, manifests, blobs, depth=0)

        futures: list[tuple[Future[int], bool]] = []
        first: str | None = None
        if platforms and not kept.is_index:
            # The config first: a wrong-platform image must not cost its layers.
            config = kept.config()
            first = config.digest
            futures.append(self._submit_blob(client, ref, config))
            self._check_platform(ref, futures[0][0], config, platforms)
        futures += [self._submit_blob(client, ref, d) for d in blobs.values() if d.digest != first]
        # An image counts the blobs it was first to ask for, so per-image figures add up
        # to the run's total when images share layers.
        fetched = 0
        nbytes = 0
        for fut, owned in futures:
            got = fut.result()  # raises the blob's error for this image
            if got and owned:
                fetched += 1
                nbytes += got
        for m in manifests:
            self.store.write_blob(m.raw, m.digest)
        descriptor = {
            **kept.descriptor().to_json(),
            "annotations": {UPSTREAM_DIGEST: upstream_digest, PLATFORMS: wanted},
        }
        self.store.add_image(name, descriptor)
        return ImageResult(
            str(ref), "pulled", kept.digest, upstream_digest, kept.media_type, fetched, nbytes
        )

    def _walk(
        self,
        client: RegistryClient,
        ref: Reference,
        manifest: Manifest,
        manifests: list[Manifest],
        blobs: dict[str, Descriptor],
        depth: int,
    ) -> None:
        if manifest.is_index:
            if depth > 2:
                raise BmsyncError(f"{ref}: indexes nested deeper than 2 levels")
            for child in manifest.children():
                try:
                    stored = self.store.read_manifest(child.digest, child.media_type)
                except (StoreError, IntegrityError):
                    stored = client.get_manifest(ref.repository, child.digest, what=str(ref))
                self._walk(client, ref, stored, manifests, blobs, depth + 1)
        else:
            for d in manifest.blobs():
                blobs.setdefault(d.digest, d)
        manifests.append(manifest)

    def _check_platform(
        self, ref: Reference, fetching: Future[int], config: Descriptor,
        platforms: Sequence[Platform],
    ) -> None:
        """A single-platform image must be one of the wanted platforms (its config says)."""
        fetching.result()
        try:
            doc = json.loads(self.store.read_blob(config.digest))
            actual = Platform.from_json(doc)
        except (ValueError, AttributeError):
            return  # not an image config we can read (an artifact): nothing to filter on
        if not any(p.matches(actual) for p in platforms):
            wanted = ", ".join(str(p) for p in platforms)
            raise UsageError(
                f"{ref} is a single-platform {actual} image; {wanted} was asked for",
                hint=self.platform_hint,
            )

    def _complete(self, digest: str) -> bool:
        """Whether the store holds ``digest`` and everything it references (local reads only)."""
        try:
            m = self.store.read_manifest(digest)
        except BmsyncError:
            return False
        if m.is_index:
            return all(self._complete(c.digest) for c in m.children())
        return all(self.store.has_blob(d.digest, d.size) for d in m.blobs())

    # -- blobs ---------------------------------------------------------------------------

    def _moved(self, n: int) -> None:
        """Bytes that crossed the wire (a resumed blob counts only what was missing)."""
        with self._lock:
            self.bytes_fetched += n
        self.progress.advance(n)

    def _submit_blob(
        self, client: RegistryClient, ref: Reference, desc: Descriptor
    ) -> tuple[Future[int], bool]:
        """The future of the blob's fetch, and whether this call created it."""
        with self._lock:
            fut = self._blob_futures.get(desc.digest)
            owned = fut is None
            if fut is None:
                if self.store.has_blob(desc.digest, desc.size):
                    self.blobs_present += 1
                    fut = Future()
                    fut.set_result(0)
                else:
                    self.progress.add_total(desc.size)
                    fut = self.blob_pool.submit(self._fetch_blob, client, ref, desc)
                self._blob_futures[desc.digest] = fut
            return fut, owned

    def _fetch_blob(self, client: RegistryClient, ref: Reference, desc: Descriptor) -> int:
        """Fetch one blob into the store, resuming after a lost connection.

        Returns the bytes that crossed the wire (a resumed blob counts its missing part).
        """
        moved = 0

        def count(n: int) -> None:
            nonlocal moved
            moved += n
            self._moved(n)

        def fetch(offset: int, sink: BlobSink) -> None:
            # A body cut mid-way is resumed here, inside the store's download: the sink
            # keeps its offset and running hash, so a retry neither fetches nor re-reads
            # what arrived (re-entering ensure_blob would hash the whole partial file
            # again on every attempt). Refused connections and server errors were
            # already retried by the transport.
            attempt = 0
            while True:
                attempt += 1
                try:
                    client.fetch_blob(
                        ref.repository, desc.digest, _CountingSink(sink, count), size=desc.size
                    )
                    return
                except ConnectionLost as e:
                    if attempt >= BLOB_ATTEMPTS:
                        raise
                    delay = client.transport.policy.backoff(attempt)
                    log.debug("%s; resuming in %.1fs", e, delay)
                    time.sleep(delay)

        fetched = self.store.ensure_blob(desc.digest, desc.size, fetch)
        with self._lock:
            if fetched:
                self.blobs_fetched += 1
            else:
                self.blobs_present += 1
        return moved if fetched else 0


class _CountingSink:
    """Forwards to a store sink and reports bytes to the progress counter."""

    def __init__(self, sink: BlobSink, count: Callable[[int], None]) -> None:
        self._sink = sink
        self._count = count

    @property
    def offset(self) -> int:
        return self._sink.offset

    def write(self, data: bytes) -> None:
        self._sink.write(data)
        self._count(len(data))

    def restart(self) -> None:
        self._sink.restart()


def store_name(ref: Reference) -> str:
    """The ``org.opencontainers.image.ref.name`` of an image: tag form when it has a tag."""
    if ref.tag:
        return str(Reference(ref.registry, ref.repository, ref.tag, None))
    return str(ref)


def pull_images(
    refs: Sequence[Reference],
    store: Store,
    clients: ClientPool,
    *,
    platforms: Sequence[Platform] = (),
    concurrency: int = 8,
    progress: Progress | None = None,
    platform_hint: str = "change the platforms wanted",
    pins: Mapping[str, str] | None = None,
) -> PullReport:
    """Pull ``refs`` into ``store``; never raises for one image's failure (see the report).

    ``platform_hint`` ends the message of an image that has none of ``platforms`` (the
    CLI says where the platforms came from: ``--platform`` or the config). ``pins``
    maps ``str(ref)`` of a tagged reference to the upstream manifest digest resolved
    earlier (a lock file): that digest is fetched, not whatever the tag points at now,
    and an image already stored at it costs no request. Unlike a reference written
    with a digest, a pinned tag is still filtered to ``platforms``.
    """
    started = time.monotonic()
    progress = progress or Progress("pull", enabled=False)
    puller = _Puller(store, clients, platforms, concurrency, progress, platform_hint,
                     pins or {})
    report = PullReport()
    workers = max(1, min(len(refs), concurrency))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="image")
    interrupted = False
    try:
        futures = [(ref, pool.submit(puller.pull, ref)) for ref in refs]
        for ref, fut in futures:
            try:
                result = fut.result()
            except BmsyncError as e:
                # Named by the caller in its summary: one line per failure, naming the image.
                text = str(e) if str(e).startswith(str(ref)) else f"{ref}: {e}"
                result = ImageResult(str(ref), "failed", error=text, exit_code=e.exit_code)
            else:
                progress.item_done(_describe(result))
            report.images.append(result)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # On Ctrl-C, drop queued work at once: transfers in flight leave resumable
        # partials, and the CLI exits without waiting for them.
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        puller.blob_pool.shutdown(wait=not interrupted, cancel_futures=True)
        progress.close()
    report.blobs_fetched = puller.blobs_fetched
    report.blobs_present = puller.blobs_present
    report.bytes_fetched = puller.bytes_fetched
    report.seconds = time.monotonic() - started
    return report


def _describe(result: ImageResult) -> str:
    if result.status == "pulled":
        blobs = "1 blob" if result.blobs_fetched == 1 else f"{result.blobs_fetched} blobs"
        size = human_bytes(result.bytes_fetched)
        return f"pulled {result.source} {result.digest} ({blobs}, {size})"
    return f"present {result.source} {result.digest}"
