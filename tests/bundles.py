"""Tiny bundle archives for tests: a good one written by bmsync's own writer, and the
pieces to take it apart and put hostile variants back together.

``build_bundle(dir)`` makes a store holding one small OCI image (a config, two gzip
layers, a manifest) and writes ``bmpackages_1.0.tar.zst`` from it with
:func:`pipeline.bundle.writer.write_bundle`. Its members come back as (name, data)
pairs, so a test can edit them and reassemble an archive with :func:`member`
(any name, type, mode or size, checksummed like a real header), :func:`tar`,
:func:`zstd_frame` / :func:`seekable_zstd` and :func:`write_archive` (which also writes a
fresh ``.sha256`` sidecar, so that the check a test aims at is the one that fails).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import struct
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from pipeline.bundle.tarstream import END_OF_ARCHIVE, member_header, member_span, padding
from pipeline.bundle.writer import plan_bundle, write_bundle
from pipeline.store import Store

REF = "gcr.io/x/y:1"
VERSION = "1.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class GoodBundle:
    """A bundle as bmsync wrote it, with what a test needs to tamper with it."""

    archive: Path
    manifest: dict[str, Any]  # bundle.json, parsed
    members: tuple[tuple[str, bytes], ...]  # the tar members in archive order
    layers: tuple[str, ...]  # digests of the image's two layers
    config: str
    image: str  # digest of the image manifest


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def tiny_store(root: Path) -> tuple[Store, tuple[str, ...], str, str]:
    """A store holding the image :data:`REF`: (store, layer digests, config, manifest)."""
    store = Store(root)
    rnd = random.Random(REF)
    # Random bytes do not compress: the layers keep their size inside the archive, and
    # the big one puts its successors beyond the first read-ahead of a zstd decoder.
    layers = tuple(
        store.write_blob(gzip.compress(rnd.randbytes(size), mtime=0)) for size in (300_000, 700)
    )
    config_data = json.dumps(
        {"architecture": "amd64", "os": "linux",
         "rootfs": {"type": "layers", "diff_ids": []}}, sort_keys=True
    ).encode()
    config = store.write_blob(config_data)

    def descriptor(media_type: str, digest: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": digest,
                "size": store.blob_path(digest).stat().st_size}

    manifest_data = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, d) for d in layers],
    }, sort_keys=True).encode()
    image = store.write_blob(manifest_data)
    store.add_image(REF, descriptor(OCI_MANIFEST, image))
    return store, layers, config, image


def build_bundle(workdir: Path) -> GoodBundle:
    """Write the good archive into ``workdir/good`` (store in ``workdir/store``)."""
    store, layers, config, image = tiny_store(workdir / "store")
    plan = plan_bundle(store, [REF], version=VERSION, created=0)
    result = write_bundle(store, plan, workdir / "good", threads=1)
    members = read_members(result.archive)
    manifest = json.loads(dict(members)["bundle.json"])
    return GoodBundle(result.archive, manifest, tuple(members), layers, config, image)


def read_members(archive: Path) -> list[tuple[str, bytes]]:
    """(name, data) of every member of a good ``.tar.zst``, read with python's tarfile."""
    raw = archive.read_bytes()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as r:
        tar_bytes = r.read()
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as t:
        for info in t:
            f = t.extractfile(info)
            assert f is not None
            out.append((info.name, f.read()))
    return out


# -- tar ------------------------------------------------------------------------------

# Tar typeflags (POSIX ustar).
REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
FIFO = b"6"


def member(
    name: str | bytes,
    data: bytes = b"",
    *,
    typeflag: bytes = REGULAR,
    mode: int = 0o644,
    linkname: str = "",
    size: int | None = None,
    device: tuple[int, int] = (0, 0),
) -> bytes:
    """One member (header, data, padding) with any name, type, mode, link or device.

    Starts from bmsync's own header for a placeholder name and overwrites the fields, so
    everything else is what a real bundle holds. A name longer than 100 bytes is split
    into the ustar prefix and name fields at a ``/``. ``size`` puts another size in the
    header than ``len(data)`` (the data written is still ``data``).
    """
    raw = name.encode() if isinstance(name, str) else name
    header = bytearray(member_header("placeholder", len(data) if size is None else size, mtime=0))
    prefix = b""
    if len(raw) > 100:
        cut = raw.index(b"/", len(raw) - 101)
        prefix, raw = raw[:cut], raw[cut + 1:]
    header[0:100] = raw.ljust(100, b"\0")
    header[345:500] = prefix.ljust(155, b"\0")
    header[100:108] = b"%07o\0" % mode
    header[156:157] = typeflag
    header[157:257] = linkname.encode().ljust(100, b"\0")
    header[329:337] = b"%07o\0" % device[0]
    header[337:345] = b"%07o\0" % device[1]
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * padding(len(data))


def tar(members: Iterable[tuple[str, bytes] | bytes], *, end: bool = True) -> bytes:
    """A tar stream of members given as (name, data) pairs (plain files, as bmsync writes
    them) or as ready-made bytes from :func:`member`; ``end`` adds the end blocks."""
    parts = [m if isinstance(m, bytes) else member(*m) for m in members]
    return b"".join(parts) + (END_OF_ARCHIVE if end else b"")


def with_offsets(manifest: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``manifest`` with the offsets of the blobs in ``order`` (digests, archive order)
    recomputed from their sizes, as a writer would: a consistent bundle.json."""
    offset = 0
    for digest in order:
        manifest["blobs"][digest]["offset"] = offset
        offset += member_span(manifest["blobs"][digest]["size"])
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode()


# -- zstd -----------------------------------------------------------------------------

def zstd_frame(data: bytes, *, window_log: int | None = None) -> bytes:
    """One zstd frame holding ``data``, with a content checksum.

    With ``window_log``, the frame is written without its content size (so its header
    has a Window_Descriptor) and that descriptor is set to ask for ``2**window_log``
    bytes of window: the data still decodes, but only for a decoder that allows it.
    """
    if window_log is None:
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    frame = bytearray(
        zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(data)
    )
    descriptor = frame[4]
    # RFC 8878 3.1.1.1.1: no Single_Segment flag and no dictionary id, so the
    # Window_Descriptor is the byte right after the Frame_Header_Descriptor.
    assert descriptor & 0x20 == 0 and descriptor & 0x03 == 0, descriptor
    frame[5] = (window_log - 10) << 3
    return bytes(frame)


def zero_bomb_frame(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes (a multiple of 128 KiB) made of RLE blocks:
    4 bytes per 128 KiB, so gigabytes fit in kilobytes."""
    block = 128 * 1024
    assert size % block == 0 and size > 0
    count = size // block
    # Magic; descriptor 0 (no checksum, no content size); window 2**17 (exponent 7).
    head = struct.pack("<IBB", 0xFD2FB528, 0, 7 << 3)
    rle = ((block << 3) | (1 << 1)).to_bytes(3, "little") + b"\0"
    last = ((block << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\0"
    return head + rle * (count - 1) + last


def seekable_zstd(frames: Sequence[tuple[bytes, int]]) -> bytes:
    """Frames given as (compressed frame, decompressed size), followed by the seek table
    of the zstd seekable format (no per-frame checksums)."""
    entries = b"".join(struct.pack("<II", len(f), n) for f, n in frames)
    footer = struct.pack("<IBI", len(frames), 0, 0x8F92EAB1)
    table = struct.pack("<II", 0x184D2A5E, len(entries) + len(footer)) + entries + footer
    return b"".join(f for f, _ in frames) + table


def compress(tar_bytes: bytes) -> bytes:
    """A seekable ``.tar.zst`` of one frame (enough for tiny archives)."""
    return seekable_zstd([(zstd_frame(tar_bytes), len(tar_bytes))])


def write_archive(path: Path, data: bytes, *, sidecar: bool = True) -> Path:
    """Write archive bytes and (by default) a matching ``.sha256`` sidecar beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if sidecar:
        digest = hashlib.sha256(data).hexdigest()
        (path.parent / f"{path.name}.sha256").write_text(f"{digest}  {path.name}\n")
    return path
