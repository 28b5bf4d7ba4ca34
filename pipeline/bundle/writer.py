"""Write ``bmpackages_<VERSION>`` archives from the store (DESIGN.md §5).

Call order: :func:`plan_bundle` reads the images' manifests from the store and decides
every member, its order and its offset (a delta leaves out what its base holds); then
:func:`write_bundle` streams the tar through the compressor straight into the output
file, with no temporary copy of the whole archive:

1. ``bundle.json``, ``oci-layout``, ``index.json`` (then the zstd frame is ended, so
   blobs start on a frame boundary);
2. blobs: layers and configs, then image manifests, then indexes (children first);
3. the end-of-archive blocks, then (zstd) the seek table.

The archive is written under a temporary name in the output directory, fsynced and
renamed; then ``bmpackages_<VERSION>.bundle.json`` and, last,
``bmpackages_<VERSION>.tar.zst.sha256`` (its presence says the archive is complete).
Output is reproducible: the same store content, options and ``SOURCE_DATE_EPOCH`` give
identical bytes (members sorted, fixed mtimes and owners, deterministic compression).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.bundle.format import (
    BUNDLE_JSON,
    CONTAINERD_NAME,
    INDEX_JSON,
    OCI_LAYOUT,
    REF_NAME,
    BaseContent,
    BlobEntry,
    BundleManifest,
    ImageEntry,
    archive_name,
    blob_member,
    sidecar_manifest_name,
)
from pipeline.bundle.seekable import SeekableWriter
from pipeline.bundle.split import SplitWriter
from pipeline.bundle.tarstream import END_OF_ARCHIVE, TarWriter, member_span
from pipeline.errors import IntegrityError, StoreError, UsageError
from pipeline.manifest import OCI_INDEX
from pipeline.progress import Progress
from pipeline.reference import parse_reference
from pipeline.store import OCI_LAYOUT_BYTES, UPSTREAM_DIGEST, Store, atomic_write

CHUNK = 8 * 1024 * 1024
XZ_PRESET = 1  # layers are already compressed: higher presets cost minutes and gain nothing

# Member classes, in archive order.
_LAYER, _IMAGE, _INDEX = 0, 1, 2


@dataclass(frozen=True)
class BundlePlan:
    manifest: BundleManifest
    index_json: bytes
    oci_layout: bytes

    @property
    def tar_size(self) -> int:
        """Bytes of the uncompressed tar stream."""
        meta = sum(
            member_span(len(b))
            for b in (self.manifest.to_json(), self.oci_layout, self.index_json)
        )
        blobs = sum(member_span(b.size) for _, b in self.manifest.archive_blobs())
        return meta + blobs + len(END_OF_ARCHIVE)


@dataclass
class BuildResult:
    archive: Path  # the archive (for a split build: the name of the joined stream)
    parts: list[Path]
    sidecar_sha256: Path
    sidecar_manifest: Path
    sha256: str  # of the archive bytes (the joined stream when split)
    size: int  # bytes on disk
    tar_size: int
    manifest: BundleManifest
    seconds: float

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "archive": str(self.archive),
            "parts": [str(p) for p in self.parts],
            "sha256": self.sha256,
            "size": self.size,
            "version": m.version,
            "base": m.base.to_json() if m.base else None,
            "images": len(m.images),
            "blobs": len(m.blobs),
            "blobsInArchive": len(m.archive_blobs()),
            "seconds": round(self.seconds, 3),
        }


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` as an integer, or None when unset; UsageError when malformed."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH must be a whole number of seconds, not {value!r}")
    return int(value)


def plan_bundle(
    store: Store,
    names: Sequence[str],
    *,
    version: str,
    platforms: Sequence[str] = (),
    base: BaseContent | None = None,
    created: int | None = None,
) -> BundlePlan:
    """Decide every member of the bundle of images ``names`` (store ref names).

    Every image must be complete in the store (pull first). With ``base``, blobs the
    base holds are declared with ``inArchive: false`` and left out of the archive.
    ``created`` is a Unix time (default: ``SOURCE_DATE_EPOCH``, else now).
    """
    if not names:
        raise UsageError("no images to bundle")
    when = created if created is not None else source_date_epoch()
    stamp = datetime.fromtimestamp(when if when is not None else time.time(), UTC)
    blob_class: dict[str, tuple[int, int, str, int]] = {}  # digest -> (class, depth, type, size)
    images: list[ImageEntry] = []
    index_entries: list[dict[str, Any]] = []
    known = store.images_by_name()
    for name in sorted(set(names)):
        entry = known.get(name)
        if entry is None:
            raise StoreError(f"{name} is not in the store {store.root}", hint="pull it first")
        needed: dict[str, int] = {}
        _walk(store, name, entry["digest"], entry["mediaType"], 0, blob_class, needed)
        ref = parse_reference(name)
        upstream = (entry.get("annotations") or {}).get(UPSTREAM_DIGEST, entry["digest"])
        images.append(
            ImageEntry(
                source=name,
                repository=ref.repository,
                tag=ref.tag,
                digest=entry["digest"],
                upstream_digest=upstream,
                media_type=entry["mediaType"],
                size=sum(needed.values()),
                blobs=tuple(sorted(needed)),
            )
        )
        index_entries.append(
            {
                "mediaType": entry["mediaType"],
                "digest": entry["digest"],
                "size": entry["size"],
                "annotations": {REF_NAME: name, CONTAINERD_NAME: name},
            }
        )

    have = base.digests if base else frozenset()
    order = sorted(
        (d for d in blob_class if d not in have),
        key=lambda d: (blob_class[d][0], -blob_class[d][1], d),
    )
    blobs: dict[str, BlobEntry] = {}
    offset = 0
    for digest in order:
        _cls, _depth, media_type, size = blob_class[digest]
        blobs[digest] = BlobEntry(size, media_type, True, offset)
        offset += member_span(size)
    for digest in sorted(have & blob_class.keys()):
        _cls, _depth, media_type, size = blob_class[digest]
        blobs[digest] = BlobEntry(size, media_type, False, None)

    manifest = BundleManifest(
        version=version,
        created=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        base=base.ref if base else None,
        platforms=tuple(platforms),
        images=tuple(images),
        blobs=blobs,
    )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    return BundlePlan(
        manifest=manifest,
        index_json=(json.dumps(index, sort_keys=True, indent=1) + "\n").encode(),
        oci_layout=OCI_LAYOUT_BYTES,
    )


def _walk(
    store: Store,
    name: str,
    digest: str,
    media_type: str,
    depth: int,
    blob_class: dict[str, tuple[int, int, str, int]],
    needed: dict[str, int],
) -> None:
    try:
        m = store.read_manifest(digest, media_type)
    except StoreError as e:
        raise StoreError(
            f"{name}: manifest {digest} is missing from the store", hint="pull it again"
        ) from e
    raw = m.raw
    cls = _INDEX if m.is_index else _IMAGE
    _note(blob_class, needed, digest, (cls, depth, m.media_type, len(raw)))
    if m.is_index:
        if depth > 2:
            raise StoreError(f"{name}: indexes nested deeper than 2 levels")
        for child in m.children():
            _walk(store, name, child.digest, child.media_type, depth + 1, blob_class, needed)
        return
    for d in m.blobs():
        if not store.has_blob(d.digest, d.size):
            raise StoreError(f"{name}: blob {d.digest} is missing from the store",
                             hint="pull the image again")
        _note(blob_class, needed, d.digest, (_LAYER, 0, d.media_type, d.size))


def _note(blob_class: dict[str, tuple[int, int, str, int]], needed: dict[str, int],
          digest: str, info: tuple[int, int, str, int]) -> None:
    known = blob_class.get(digest)
    if known is None or (info[0], info[1]) > (known[0], known[1]):
        blob_class[digest] = info
    needed[digest] = info[3]


class _HashingFile:
    """Counts and hashes what passes to ``out`` (the archive bytes on disk)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


class _XZWriter:
    def __init__(self, out: Any) -> None:
        self._out = out
        self._c = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                      preset=XZ_PRESET)

    def write(self, data: bytes | memoryview) -> None:
        self._out.write(self._c.compress(data))

    def end_frame(self) -> None:
        pass

    def close(self) -> None:
        self._out.write(self._c.flush())


class _PlainWriter:
    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, data: bytes | memoryview) -> None:
        self._out.write(data)

    def end_frame(self) -> None:
        pass

    def close(self) -> None:
        pass


def build_bundle(
    store: Store,
    names: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    version: str,
    platforms: Sequence[str] = (),
    base: BaseContent | None = None,
    epoch: int | None = None,
    compression: str = "zstd",
    split_size: int | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """:func:`plan_bundle` then :func:`write_bundle`, with ``progress`` counting the tar's
    bytes (closed at the end, success or not). ``epoch`` is both the bundle's
    ``created`` time and every member's mtime (default: ``SOURCE_DATE_EPOCH``)."""
    plan = plan_bundle(store, names, version=version, platforms=platforms, base=base,
                       created=epoch)
    progress = progress or Progress("write", enabled=False)
    progress.add_total(plan.tar_size)
    try:
        return write_bundle(store, plan, out_dir, compression=compression,
                            split_size=split_size, mtime=epoch, on_bytes=progress.advance)
    finally:
        progress.close()


def write_bundle(
    store: Store,
    plan: BundlePlan,
    out_dir: str | os.PathLike[str],
    *,
    compression: str = "zstd",
    split_size: int | None = None,
    level: int = 3,
    threads: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    mtime: int | None = None,
) -> BuildResult:
    """Write the archive of ``plan`` and its sidecars into ``out_dir``; see the module doc.

    ``mtime`` stamps every tar member (default: ``SOURCE_DATE_EPOCH``, else 0).

    An existing archive of the same name is replaced only once the new one is complete;
    on any failure the temporary files are removed and nothing else changes.
    ``on_bytes`` is called with each count of tar bytes written (progress).
    """
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = plan.manifest
    name = archive_name(manifest.version, compression)
    final = out / name
    if mtime is None:
        mtime = source_date_epoch() or 0
    threads = threads or min(4, os.cpu_count() or 2)

    if split_size:
        sink: Any = SplitWriter(out, name, split_size)
    else:
        sink = _SingleFile(out, name)
    hashed = _HashingFile(sink)
    comp: Any = None
    try:
        if compression == "zstd":
            comp = SeekableWriter(hashed, level=level, threads=threads)
        elif compression == "xz":
            comp = _XZWriter(hashed)
        elif compression == "none":
            comp = _PlainWriter(hashed)
        else:
            raise UsageError(f"unknown compression {compression!r}: use zstd, xz or none")
        _write_tar(store, plan, comp, mtime, on_bytes)
        comp.close()
        hashed.flush()
        parts = sink.commit()
    except BaseException:
        if isinstance(comp, SeekableWriter):
            comp.abort()  # stops its threads
        sink.abort()
        raise
    digest = hashed.hasher.hexdigest()

    manifest_path = out / sidecar_manifest_name(manifest.version)
    atomic_write(manifest_path, manifest.to_json())
    sums = [f"{h}  {p.name}\n" for p, h in sink.part_hashes()] if split_size else []
    sums.append(f"{digest}  {name}\n")
    sha_path = out / f"{name}.sha256"
    atomic_write(sha_path, "".join(sums).encode())
    return BuildResult(
        archive=final,
        parts=parts,
        sidecar_sha256=sha_path,
        sidecar_manifest=manifest_path,
        sha256=digest,
        size=hashed.size,
        tar_size=plan.tar_size,
        manifest=manifest,
        seconds=time.monotonic() - started,
    )


def _write_tar(store: Store, plan: BundlePlan, comp: Any, mtime: int,
               on_bytes: Callable[[int], None] | None) -> None:
    tar = TarWriter(_Progressing(comp, on_bytes), mtime=mtime)  # type: ignore[arg-type]
    tar.add_bytes(BUNDLE_JSON, plan.manifest.to_json())
    tar.add_bytes(OCI_LAYOUT, plan.oci_layout)
    tar.add_bytes(INDEX_JSON, plan.index_json)
    comp.end_frame()
    blobs_start = tar.position
    for digest, entry in plan.manifest.archive_blobs():
        try:
            f = store.open_blob(digest)
        except (StoreError, OSError) as e:
            raise StoreError(f"cannot read blob {digest} from the store: {e}") from e
        with f:
            try:
                member = tar.add_stream(blob_member(digest), entry.size, f, chunk_size=CHUNK)
            except IntegrityError as e:
                raise StoreError(
                    f"blob {digest} in the store no longer has its planned size: {e}",
                    hint="run `bmsync pull` again",
                ) from None
        # The plan's offsets are what readers seek to: they must be where the bytes went.
        assert member.offset - blobs_start == entry.offset, (digest, member.offset)
    tar.close()


class _Progressing:
    """Passes writes on to the compressor and reports their size."""

    def __init__(self, comp: Any, on_bytes: Callable[[int], None] | None) -> None:
        self._comp = comp
        self._on_bytes = on_bytes
        if hasattr(comp, "write_from"):
            self.write_from = self._write_from

    def write(self, data: bytes | memoryview) -> int:
        self._comp.write(data)
        if self._on_bytes:
            self._on_bytes(len(data))
        return len(data)

    def _write_from(self, src: BinaryIO, n: int) -> int:
        got: int = self._comp.write_from(src, n)
        if self._on_bytes:
            self._on_bytes(got)
        return got


class _SingleFile:
    """The archive under a temporary name until :meth:`commit` renames it into place."""

    def __init__(self, out: Path, name: str) -> None:
        self.final = out / name
        self.tmp = out / f".{name}.partial"
        self._f = open(self.tmp, "wb")

    def write(self, data: bytes | memoryview) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def commit(self) -> list[Path]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        return [self.final]

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def part_hashes(self) -> Iterable[tuple[Path, str]]:
        return ()

