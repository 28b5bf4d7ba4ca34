"""Archives split into parts for removable media (``--split-size``), written and read.

Parts are consecutive byte ranges of one archive: ``NAME.part-0001``, ``NAME.part-0002``
... Joined in order they are the archive, so every reader sees one stream. The
``NAME.sha256`` sidecar has one line per part plus one for the joined stream.

:class:`SplitWriter` is a file-like sink that rolls over to a new part every
``split_size`` bytes, hashing each part, under temporary names until :meth:`commit`.
:class:`PartsFile` reads a set of parts as one seekable file (and offers ``pread`` for
concurrent readers); a missing part is named before anything is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import IntegrityError, UsageError

_PART = re.compile(r"^(?P<stem>.+)\.part-(?P<n>\d{4,})$")
_SIZE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[kKmMgGtT]?)(?:i?[bB])?$")


def part_name(name: str, n: int) -> str:
    """``NAME.part-0001`` for n = 1."""
    return f"{name}.part-{n:04d}"


def parse_size(text: str) -> int:
    """``4G``, ``700M``, ``512k``, ``1.5G`` or a byte count; binary units (G = 2**30)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"invalid size {text!r}", hint="write a number with K, M, G or T, e.g. 4G")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match["unit"].lower()]
    size = int(float(match["n"]) * scale)
    if size < 1024 * 1024:
        raise UsageError(f"split size {text!r} is below 1 MiB")
    return size


class SplitWriter:
    """Writes ``out/NAME.part-NNNN`` files of ``split_size`` bytes (the last one shorter)."""

    def __init__(self, out: Path, name: str, split_size: int) -> None:
        self._out = out
        self._name = name
        self._split = split_size
        self._parts: list[tuple[Path, Path, str]] = []  # (tmp, final, sha256 hex)
        self._hasher = hashlib.sha256()
        self._left = 0
        self._f: BinaryIO | None = None
        self._current: tuple[Path, Path] = (out, out)
        self._open_next()

    def _open_next(self) -> None:
        n = len(self._parts) + 1
        final = self._out / part_name(self._name, n)
        tmp = self._out / f".{final.name}.partial"
        self._f = open(tmp, "wb")
        self._current = (tmp, final)
        self._hasher = hashlib.sha256()
        self._left = self._split

    def _close_current(self) -> None:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        tmp, final = self._current
        self._parts.append((tmp, final, self._hasher.hexdigest()))
        self._f = None

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._close_current()
                self._open_next()
            take = view[: self._left]
            assert self._f is not None
            self._f.write(take)
            self._hasher.update(take)
            self._left -= len(take)
            view = view[len(take):]
        return len(data)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def commit(self) -> list[Path]:
        """Close the last part and rename every part to its final name."""
        if self._f is not None:
            self._close_current()
        for tmp, final, _ in self._parts:
            os.replace(tmp, final)
        # A previous build with more parts must not leave stale ones behind.
        n = len(self._parts) + 1
        while (stale := self._out / part_name(self._name, n)).exists():
            stale.unlink()
            n += 1
        return [final for _, final, _ in self._parts]

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self._parts.append((*self._current, ""))
        for tmp, _, _ in self._parts:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def part_hashes(self) -> list[tuple[Path, str]]:
        return [(final, digest) for _, final, digest in self._parts]


def find_parts(path: Path) -> list[Path] | None:
    """The parts of a split archive named by ``path`` (the archive or any part), or None.

    Raises IntegrityError naming the first missing part when the numbering has a gap
    or the first part is absent.
    """
    match = _PART.match(path.name)
    stem = match["stem"] if match else path.name
    if not match and path.exists():
        return None
    first = path.parent / part_name(stem, 1)
    if not first.exists():
        if match:
            raise IntegrityError(f"{first}: first part of the split archive is missing")
        return None
    numbered: dict[int, Path] = {}
    for p in path.parent.iterdir():
        m = _PART.match(p.name)
        if m and m["stem"] == stem:
            numbered[int(m["n"])] = p
    # The checksum file lists every part: it tells when the last ones are missing.
    last = max(numbered)
    sidecar = path.parent / f"{stem}.sha256"
    if sidecar.is_file():
        for line in sidecar.read_text(errors="replace").splitlines():
            m = _PART.match(line.split(" ", 2)[-1].lstrip("*")) if " " in line else None
            if m and m["stem"] == stem:
                last = max(last, int(m["n"]))
    parts = []
    for n in range(1, last + 1):
        if n not in numbered:
            raise IntegrityError(
                f"{path.parent / part_name(stem, n)}: part {n} of {last} is missing",
                hint="copy every part of the archive",
            )
        parts.append(numbered[n])
    return parts


class PartsFile:
    """Several files read as one: ``read``/``seek``/``tell`` plus thread-safe ``pread``."""

    def __init__(self, parts: Sequence[Path]) -> None:
        self.parts = list(parts)
        self._fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in self.parts]
        self._starts: list[int] = []
        total = 0
        for fd in self._fds:
            self._starts.append(total)
            total += os.fstat(fd).st_size
        self.size = total
        self._pos = 0
        self._lock = threading.Lock()

    def pread(self, size: int, offset: int) -> bytes:
        out = bytearray()
        while size > 0 and offset < self.size:
            i = self._index(offset)
            within = offset - self._starts[i]
            chunk = os.pread(self._fds[i], size, within)
            if not chunk:
                break
            out += chunk
            size -= len(chunk)
            offset += len(chunk)
        return bytes(out)

    def _index(self, offset: int) -> int:
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if size is None or size < 0:
                size = self.size - self._pos
            data = self.pread(size, self._pos)
            self._pos += len(data)
            return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._lock:
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
            self._pos = max(0, base + offset)
            return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> PartsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
