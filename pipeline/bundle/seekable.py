"""The zstd "seekable format" used by ``bmpackages_<VERSION>.tar.zst`` (DESIGN.md §5).

A seekable file is a sequence of independent zstd frames, each holding at most
``frame_size`` bytes of the decompressed stream, followed by the seek table in a
skippable frame (zstd ``contrib/seekable_format/zstd_seekable_compression_format.md``,
version 0.1.0)::

    frame 0 | frame 1 | ... | frame N-1 | seek table

    seek table = Skippable_Magic_Number  u32 LE  0x184D2A5E
                 Frame_Size              u32 LE  bytes that follow (entries + footer)
                 N entries of            u32 LE  Compressed_Size
                                         u32 LE  Decompressed_Size
                                        [u32 LE  Checksum]   only with Checksum_Flag
                 Number_Of_Frames        u32 LE
                 Seek_Table_Descriptor   u8      bit 7 Checksum_Flag, bits 6-2 reserved (0)
                 Seekable_Magic_Number   u32 LE  0x8F92EAB1

Standard tools read it as an ordinary zstd stream (``zstd -d`` skips skippable frames);
:class:`SeekableReader` uses the table to decompress only the frames a byte range
overlaps, and :func:`stream_decompressor` reads any zstd stream from a pipe.

Nothing read is trusted: the table is checked against the file size, every frame's
header against the table (content size, window size), every frame's output against its
declared size, and the window of every decoder is bounded, so a crafted archive can
neither exhaust memory nor return more bytes than it promised.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol, cast

import zstandard

from pipeline.errors import IntegrityError

if TYPE_CHECKING:
    from typing_extensions import Buffer

FRAME_SIZE = 4 * 1024 * 1024
"""Default decompressed bytes per frame."""

SEEKABLE_MAGIC = 0x8F92EAB1
SKIPPABLE_MAGIC = 0x184D2A5E
"""The skippable-frame magic the seekable format uses for its seek table."""

MAX_WINDOW_SIZE = 16 * 1024 * 1024
"""Largest zstd window a seekable frame may ask for (our frames need at most 8 MiB)."""

MAX_FRAME_SIZE = 64 * 1024 * 1024
"""Largest decompressed size a seek table entry may declare."""

STREAM_MAX_WINDOW_SIZE = 128 * 1024 * 1024
"""Default window bound of :func:`stream_decompressor`: the limit ``zstd -d`` itself
applies without ``--memory``, so any stream the CLI decompresses by default is read."""

_ZSTD_MAGIC = 0xFD2FB528
_FOOTER = struct.Struct("<IBI")
_SKIP_HEADER = struct.Struct("<II")
_ENTRY = struct.Struct("<II")
_CHECKSUM_FLAG = 0x80
_RESERVED_BITS = 0x7C
_MIN_FRAME_BYTES = 8  # smallest frame of any kind: an empty skippable frame
_MAX_FRAMES = 0x8000000  # the limit of zstd's own seekable library (ZSTD_SEEKABLE_MAXFRAMES)
_READ_ALL_CHUNK = 1024 * 1024
_MIN_LEVEL = -(1 << 17)  # zstd's ZSTD_minCLevel(): fast levels go down to -ZSTD_TARGETLENGTH_MAX

BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: where its compressed bytes are in the file and what it decompresses to."""

    compressed_offset: int
    compressed_size: int
    decompressed_offset: int
    decompressed_size: int


class ByteSink(Protocol):
    """Where :class:`SeekableWriter` writes: a binary file or anything with the same calls."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


def _seek_table(frames: list[Frame]) -> bytes:
    if len(frames) > _MAX_FRAMES:
        raise ValueError(f"{len(frames)} frames: more than a seek table may list")
    entries = b"".join(_ENTRY.pack(f.compressed_size, f.decompressed_size) for f in frames)
    footer = _FOOTER.pack(len(frames), 0, SEEKABLE_MAGIC)
    return _SKIP_HEADER.pack(SKIPPABLE_MAGIC, len(entries) + len(footer)) + entries + footer


_Pending = tuple["Future[bytes]", int, bytearray | None]


class SeekableWriter:
    """Compresses what is written into independent zstd frames, then appends a seek table.

    Every ``frame_size`` bytes written become one frame (the last one may be shorter, as
    may a frame closed early by :meth:`end_frame`). Frames are compressed at ``level`` on
    ``threads`` worker threads (python-zstandard releases the GIL) and written to ``out``
    in order by one more thread, so the caller's thread only copies bytes; each frame
    carries its content size and content checksum in its header.

    Output is deterministic: the same bytes, the same :meth:`end_frame` positions and the
    same ``level`` and ``frame_size`` give identical output whatever the thread count, the
    timing or how the input was cut into :meth:`write` calls.

    Memory is bounded: at most ``threads + 1`` ended frames wait to be compressed or
    written; :meth:`write` blocks while that many do.

    Call order: :meth:`write` and :meth:`end_frame` any number of times, then
    :meth:`close` (writes the last frame and the seek table; ``out`` itself is flushed,
    never closed). Used as a context manager, an exception inside the block calls
    :meth:`abort` instead. An error from a worker or from ``out`` is raised from the next
    :meth:`write`, :meth:`end_frame`, :meth:`flush` or :meth:`close`; the writer is then
    unusable and every later call raises the same error.

    Not thread-safe: one thread writes. :attr:`frames` and :attr:`bytes_out` are
    complete once :meth:`flush` or :meth:`close` has returned. Always end with
    :meth:`close` or :meth:`abort`: the threads live until then.
    """

    def __init__(
        self,
        out: ByteSink,
        *,
        level: int = 3,
        threads: int = 2,
        frame_size: int = FRAME_SIZE,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        # A frame larger than the readers' window bound could be refused by them
        # (zstd may use the whole content size as the window of a single-segment frame).
        if not 0 < frame_size <= MAX_WINDOW_SIZE:
            raise ValueError(f"frame_size must be between 1 and {MAX_WINDOW_SIZE}")
        if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level {level} is out of range")
        self._out = out
        self._level = level
        self._frame_size = frame_size
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd-frame")
        self._local = threading.local()
        # Ended frames, oldest first: (compressed bytes to come, decompressed size, the
        # buffer to recycle once written); None tells the output thread to stop.
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=threads + 1)
        self._spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buf = bytearray(frame_size)
        self._fill = 0
        self._error: BaseException | None = None
        self._aborting = False
        self._closed = False
        self.frames: list[Frame] = []
        """Frames written to ``out``, in order."""
        self.bytes_in = 0
        """Decompressed bytes accepted by :meth:`write`."""
        self.bytes_out = 0
        """Bytes written to ``out`` (frames, and after :meth:`close` the seek table)."""
        self._output = threading.Thread(
            target=self._output_loop, name="zstd-frame-output", daemon=True
        )
        self._output.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        """Position in the decompressed stream (what a tar writer counts)."""
        return self.bytes_in

    def write(self, data: BytesLike) -> int:
        """Take all of ``data``; returns its length. May block while frames are in flight."""
        self._check_open()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        pos = 0
        size = self._frame_size
        if self._fill:
            pos = min(size - self._fill, n)
            self._buf[self._fill : self._fill + pos] = view[:pos]
            self._fill += pos
            if self._fill == size:
                self._submit_buffer()
        while n - pos >= size:
            # Whole frames straight from the caller's buffer: no copy when it is
            # immutable; a mutable one may be reused by the caller once we return.
            piece = view[pos : pos + size]
            self._submit(piece if isinstance(data, bytes) else bytes(piece), size, None)
            pos += size
        if pos < n:
            rest = n - pos
            self._buf[self._fill : self._fill + rest] = view[pos:]
            self._fill += rest
        self.bytes_in += n
        return n

    def write_from(self, src: IO[bytes], n: int) -> int:
        """Read ``n`` bytes from ``src`` straight into the frame buffers (``readinto``):
        no intermediate copy and no allocation per chunk. Returns the bytes read, fewer
        than ``n`` only when ``src`` ended early."""
        self._check_open()
        readinto = getattr(src, "readinto", None)
        left = n
        while left:
            if readinto is None:
                chunk = src.read(min(left, self._frame_size))
                if not chunk:
                    break
                self.write(chunk)
                left -= len(chunk)
                continue
            space = self._frame_size - self._fill
            view = memoryview(self._buf)[self._fill : self._fill + min(space, left)]
            got = readinto(view)
            if not got:
                break
            self._fill += got
            self.bytes_in += got
            left -= got
            if self._fill == self._frame_size:
                self._submit_buffer()
        return n - left

    def end_frame(self) -> None:
        """End the current frame now, so the next byte written starts a new frame.

        No-op when the current frame is empty (no empty frames are written).
        """
        self._check_open()
        if self._fill:
            self._submit_buffer()

    def flush(self) -> None:
        """Write every frame already ended to ``out`` (waiting for its compression), then
        flush ``out``. The frame being filled stays open: ending it would change the
        output; call :meth:`end_frame` first for that."""
        self._check_open()
        self._queue.join()
        self._check_open()
        self._guard(self._out.flush)

    def close(self) -> None:
        """Write the last frame and the seek table, flush ``out`` and stop the threads.

        Idempotent once it has succeeded.
        """
        if self._closed:
            return
        self._check_open()
        if self._fill:
            self._submit_buffer()
        self._queue.put(None)
        self._output.join()
        self._check_open()
        table = _seek_table(self.frames)
        self._guard(lambda: self._out.write(table))
        self.bytes_out += len(table)
        self._guard(self._out.flush)
        self._closed = True
        self._executor.shutdown(wait=True)

    def abort(self) -> None:
        """Stop the threads and drop what is not written yet; no seek table is written.

        What ``out`` already holds is an incomplete file: the caller discards it.
        """
        if self._closed:
            return
        self._closed = True
        self._stop()

    def __enter__(self) -> SeekableWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        error = self._error
        if error is not None:
            self._stop()
            raise error
        if self._closed:
            raise ValueError("write to a closed SeekableWriter")

    def _guard(self, call: Callable[[], object]) -> None:
        """Run ``call`` (on ``out``); a failure makes the writer unusable."""
        try:
            call()
        except BaseException as e:
            self._error = e
            self._stop()
            raise

    def _stop(self) -> None:
        """Stop both kinds of thread without waiting for pending frames."""
        self._aborting = True
        if self._output.is_alive():
            # The output thread keeps taking items while aborting, so this never blocks
            # for long, and it ends at the None.
            self._queue.put(None)
            self._output.join()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _submit_buffer(self) -> None:
        buf, fill = self._buf, self._fill
        try:
            self._buf = self._spare.get_nowait()
        except queue.Empty:
            self._buf = bytearray(self._frame_size)
        self._fill = 0
        self._submit(memoryview(buf)[:fill], fill, buf)

    def _submit(self, data: BytesLike, size: int, owner: bytearray | None) -> None:
        self._check_open()
        future = self._executor.submit(self._compress, data)
        self._queue.put((future, size, owner))

    def _compress(self, data: BytesLike) -> bytes:
        # ZstdCompressor objects are not thread-safe: one per worker thread. A frame is
        # always compressed by one single-threaded context, so its bytes depend only on
        # its content and the level, never on which worker ran it.
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True
            )
            self._local.cctx = cctx
        return cctx.compress(data)

    def _output_loop(self) -> None:
        """The output thread: writes frames to ``out`` in the order they were ended.

        After an error (kept for the caller's thread to raise) or once aborting, it
        still takes every item, so a caller blocked on the full queue always wakes.
        """
        written_in = 0
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is not None or self._aborting:
                    continue
                future, size, owner = item
                try:
                    compressed = future.result()
                    self._out.write(compressed)
                except BaseException as e:  # handed to the caller's thread, raised there
                    self._error = e
                    continue
                self.frames.append(Frame(self.bytes_out, len(compressed), written_in, size))
                self.bytes_out += len(compressed)
                written_in += size
                if owner is not None and self._spare.qsize() < 2:
                    self._spare.put(owner)
            finally:
                self._queue.task_done()


def _describe(f: object) -> str:
    name = getattr(f, "name", None)
    return str(name) if isinstance(name, str | bytes | os.PathLike) else "seekable file"


def read_seek_table(f: BinaryIO, *, name: str | None = None) -> list[Frame] | None:
    """The frames listed by the seek table at the end of ``f``, or None when ``f`` does
    not end with a seekable footer (a plain zstd stream, say).

    ``f`` must be seekable; its position is moved. Messages name ``name`` (default: the
    file's own name). A footer with a table that does not
    fit the file (truncated, frame count beyond what the file can hold, sizes that do not
    add up to where the table starts, reserved bits set, a frame of zero bytes or
    declaring more than :data:`MAX_FRAME_SIZE`) raises :class:`IntegrityError`.
    Per-frame checksums, when the table has them, are read past and not checked: every
    frame we write carries zstd's own content checksum, checked on decompression.
    """
    what = name or _describe(f)
    size = f.seek(0, os.SEEK_END)
    if size < _FOOTER.size:
        return None
    f.seek(size - _FOOTER.size)
    count, descriptor, magic = _FOOTER.unpack(_read_exact(f, _FOOTER.size, what))
    if magic != SEEKABLE_MAGIC:
        return None

    def bad(reason: str) -> IntegrityError:
        return IntegrityError(f"{what}: malformed zstd seek table: {reason}")

    if descriptor & _RESERVED_BITS:
        raise bad(f"reserved bits set in descriptor 0x{descriptor:02x}")
    entry_size = 12 if descriptor & _CHECKSUM_FLAG else 8
    table_size = _SKIP_HEADER.size + count * entry_size + _FOOTER.size
    if count > _MAX_FRAMES or table_size + count * _MIN_FRAME_BYTES > size:
        raise bad(f"{count} frames cannot fit in a file of {size} bytes")
    data_end = size - table_size
    f.seek(data_end)
    raw = _read_exact(f, table_size - _FOOTER.size, what)
    magic, frame_size = _SKIP_HEADER.unpack_from(raw)
    if magic != SKIPPABLE_MAGIC:
        raise bad(f"no skippable frame where the table of {count} frames should start")
    if frame_size != table_size - _SKIP_HEADER.size:
        raise bad(f"skippable frame size {frame_size} does not match {count} entries")

    frames: list[Frame] = []
    compressed = decompressed = 0
    for i in range(count):
        csize, dsize = _ENTRY.unpack_from(raw, _SKIP_HEADER.size + i * entry_size)
        if csize == 0:
            raise bad(f"frame {i} has a compressed size of 0")
        if dsize > MAX_FRAME_SIZE:
            raise bad(f"frame {i} declares {dsize} bytes (at most {MAX_FRAME_SIZE})")
        frames.append(Frame(compressed, csize, decompressed, dsize))
        compressed += csize
        decompressed += dsize
        if compressed > data_end:
            break
    if compressed != data_end:
        raise bad(f"frames add up to {compressed} bytes but the table starts at {data_end}")
    return frames


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IntegrityError(f"{what}: short read ({len(data)} of {n} bytes)")
    return data


class SeekableReader:
    """Random access to the decompressed stream of a seekable file.

    ``frames`` is the file's seek table when the caller already has it; by default it
    is read from the file (:class:`IntegrityError` when the file has none: read it with
    :func:`stream_decompressor` instead).

    Thread-safe: any number of threads may call :meth:`read_at` and read ranges from
    :meth:`open_range` at once (compressed bytes are read with ``os.pread``, so no file
    position is shared; each thread has its own decompression context). Only the frames
    overlapping a range are read and decompressed; the frames last used only in part are
    kept (``cache_frames`` of them), since neighbouring small members share a frame.

    Every frame is checked before it is decompressed: its header's content size must be
    the table's, its window at most ``max_window_size``; its output must be exactly the
    declared size. Anything else raises :class:`IntegrityError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        frames: list[Frame] | None = None,
        *,
        max_window_size: int = MAX_WINDOW_SIZE,
        cache_frames: int = 4,
    ) -> None:
        self._path = os.fspath(path)
        self._max_window = max_window_size
        self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            file_size = os.fstat(self._fd).st_size
            if frames is None:
                # Read through our descriptor, so the table and the frames come from the
                # same file even if the path is replaced meanwhile.
                with open(self._fd, "rb", closefd=False) as f:
                    frames = read_seek_table(f, name=self._path)
                if frames is None:
                    raise IntegrityError(
                        f"{self._path} has no zstd seek table",
                        hint="read it as a stream",
                    )
            _check_frames(frames, file_size, self._path)
        except BaseException:
            os.close(self._fd)
            raise
        # Frames that decompress to nothing (skippable ones) never serve a byte.
        self._frames = [f for f in frames if f.decompressed_size]
        self._starts = [f.decompressed_offset for f in self._frames]
        last = frames[-1] if frames else None
        self._total = last.decompressed_offset + last.decompressed_size if last else 0
        self._local = threading.local()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_limit = cache_frames
        self._lock = threading.Lock()
        self._closed = False

    @property
    def total_size(self) -> int:
        """Bytes of the whole decompressed stream."""
        return self._total

    @property
    def frames(self) -> list[Frame]:
        """The frames that hold data, in order."""
        return list(self._frames)

    def read_at(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of the decompressed stream from ``offset``.

        A range past the end raises :class:`IntegrityError` (an offset from bundle.json
        that the archive does not hold is a damaged archive). The whole range is held in
        memory, twice while it is joined: stream large ranges with :meth:`open_range`.
        """
        self._check_range(offset, size)
        parts = [chunk for chunk, _ in self._chunks(offset, size)]
        if len(parts) == 1:
            only = parts[0]
            return only if isinstance(only, bytes) else bytes(only)
        return b"".join(parts)

    def open_range(self, offset: int, size: int) -> io.RawIOBase:
        """A reader streaming ``size`` bytes from ``offset``, one frame in memory at a
        time. Checked like :meth:`read_at`; each reader is for one thread."""
        self._check_range(offset, size)
        return _RangeReader(self._chunks(offset, size))

    def close(self) -> None:
        """Close the file. Reads in progress in other threads may then fail."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            with self._lock:
                self._cache.clear()

    def __enter__(self) -> SeekableReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0:
            raise ValueError(f"negative range ({offset}, {size})")
        if self._closed:
            raise ValueError("read from a closed SeekableReader")
        if offset + size > self._total:
            raise IntegrityError(
                f"{self._path}: range {offset}+{size} lies beyond the end of the"
                f" decompressed stream ({self._total} bytes)"
            )

    def _chunks(self, offset: int, size: int) -> Iterator[tuple[memoryview | bytes, int]]:
        """(bytes, frame index) for each frame overlapping the range, in order."""
        end = offset + size
        index = _frame_index(self._starts, offset)
        while offset < end:
            frame = self._frames[index]
            start = offset - frame.decompressed_offset
            stop = min(end - frame.decompressed_offset, frame.decompressed_size)
            whole = start == 0 and stop == frame.decompressed_size
            data = self._frame_bytes(index, cache=not whole)
            yield (data if whole else memoryview(data)[start:stop]), index
            offset += stop - start
            index += 1

    def _frame_bytes(self, index: int, *, cache: bool) -> bytes:
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
        data = self._decompress(self._frames[index])
        if cache and self._cache_limit > 0:
            with self._lock:
                self._cache[index] = data
                while len(self._cache) > self._cache_limit:
                    self._cache.popitem(last=False)
        return data

    def _decompress(self, frame: Frame) -> bytes:
        where = f"{self._path}: frame at byte {frame.compressed_offset}"
        raw = os.pread(self._fd, frame.compressed_size, frame.compressed_offset)
        if len(raw) != frame.compressed_size:
            raise IntegrityError(f"{where} is truncated")
        try:
            params = zstandard.get_frame_parameters(raw)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{where} is not a zstd frame: {e}") from e
        # Checked here, before any allocation: decompress() sizes its output from the
        # header's content size, so a header claiming 1 TB must never reach it.
        if params.window_size > self._max_window:
            raise IntegrityError(
                f"{where} asks for a {params.window_size}-byte window"
                f" (at most {self._max_window})"
            )
        declared = frame.decompressed_size
        if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, declared):
            raise IntegrityError(
                f"{where} holds {params.content_size} bytes, the seek table says {declared}",
                expected=str(declared),
                actual=str(params.content_size),
            )
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor(max_window_size=self._max_window)
            self._local.dctx = dctx
        try:
            # Without a content size in the header, the output buffer is max_output_size
            # bytes and more output is an error: the table's size bounds it either way.
            data = dctx.decompress(raw, max_output_size=declared, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{where} does not decompress: {e}") from e
        if len(data) != declared:
            raise IntegrityError(
                f"{where} decompressed to {len(data)} bytes, the seek table says {declared}",
                expected=str(declared),
                actual=str(len(data)),
            )
        return data


def _frame_index(starts: list[int], offset: int) -> int:
    """Index of the frame holding ``offset`` (the last frame whose start is <= it)."""
    lo, hi = 0, len(starts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid
    return lo


def _check_frames(frames: list[Frame], file_size: int, what: str) -> None:
    compressed = decompressed = 0
    for i, f in enumerate(frames):
        if (
            f.compressed_offset != compressed
            or f.decompressed_offset != decompressed
            or f.compressed_size <= 0
            or not 0 <= f.decompressed_size <= MAX_FRAME_SIZE
        ):
            raise IntegrityError(f"{what}: frame {i} of the seek table is inconsistent")
        compressed += f.compressed_size
        decompressed += f.decompressed_size
    if compressed > file_size:
        raise IntegrityError(
            f"{what}: the seek table lists {compressed} bytes of frames,"
            f" the file has {file_size}"
        )


class _RangeReader(io.RawIOBase):
    """Streams the chunks of a range; holds one frame's bytes at a time."""

    def __init__(self, chunks: Iterator[tuple[memoryview | bytes, int]]) -> None:
        super().__init__()
        self._chunks: Iterator[tuple[memoryview | bytes, int]] | None = chunks
        self._current = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while self._pos >= len(self._current):
            if self._chunks is None:
                return False
            nxt = next(self._chunks, None)
            if nxt is None:
                self._chunks = None
                self._current = memoryview(b"")
                return False
            self._current = memoryview(nxt[0])
            self._pos = 0
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed range reader")
        if size is None or size < 0:
            parts = []
            while self._fill():
                parts.append(self._current[self._pos :])
                self._pos = len(self._current)
            return b"".join(parts)
        if size == 0 or not self._fill():
            return b""
        piece = self._current[self._pos : self._pos + size]
        self._pos += len(piece)
        return bytes(piece)

    def readinto(self, buffer: Buffer) -> int:
        if self.closed:
            raise ValueError("read from a closed range reader")
        target = memoryview(buffer).cast("B")
        if not len(target) or not self._fill():
            return 0
        piece = self._current[self._pos : self._pos + len(target)]
        target[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)

    def close(self) -> None:
        self._chunks = None
        self._current = memoryview(b"")
        super().close()


# -- streaming (pipes) ---------------------------------------------------------------

_S_MAGIC, _S_SKIP_SIZE, _S_DESCRIPTOR, _S_FRAME_HEADER, _S_BLOCK_HEADER = range(5)
_DICT_ID_BYTES = (0, 1, 2, 4)
_BLOCK_RLE, _BLOCK_RESERVED = 1, 3


class _FrameTracker:
    """Passes ``src``'s bytes through while following the frame structure (RFC 8878
    §3.1: frame header, block headers, checksum; skippable frames), without
    decompressing.

    It tells whether the input ended exactly at the end of a frame (python-zstandard's
    stream reader just stops at the end of its input, so a truncated stream would
    otherwise pass for a complete one), and refuses a frame whose header asks for a
    window above ``max_window`` with a message that says so, before the decoder sees it.
    """

    def __init__(self, src: IO[bytes], max_window: int) -> None:
        self._src = src
        self._max_window = max_window
        self.offset = 0  # compressed bytes passed through
        self.frames = 0  # frames begun
        self._state = _S_MAGIC
        self._want = 4  # bytes of the header being collected
        self._header = bytearray()
        self._skip = 0
        self._checksum = False
        self._single_segment = False
        self._fcs_bytes = 0

    @property
    def at_frame_end(self) -> bool:
        return self._state == _S_MAGIC and not self._header and not self._skip

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data:
            self._scan(data)
        return data

    def _scan(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            take = data[i : i + self._want - len(self._header)]
            self._header += take
            i += len(take)
            if len(self._header) == self._want:
                header = bytes(self._header)
                self._header.clear()
                self._parse(header, self.offset + i - len(header))
        self.offset += n

    def _expect(self, state: int, want: int, skip: int = 0) -> None:
        """Skip ``skip`` bytes, then collect a ``want``-byte header for ``state``."""
        self._state, self._want, self._skip = state, want, skip

    def _parse(self, header: bytes, at: int) -> None:
        state = self._state
        value = int.from_bytes(header, "little")
        if state == _S_MAGIC:
            self.frames += 1
            if value == _ZSTD_MAGIC:
                self._expect(_S_DESCRIPTOR, 1)
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self._expect(_S_SKIP_SIZE, 4)
            else:
                raise IntegrityError(f"zstd stream: no frame magic at byte {at} (0x{value:08x})")
        elif state == _S_SKIP_SIZE:
            self._expect(_S_MAGIC, 4, skip=value)
        elif state == _S_DESCRIPTOR:
            self._checksum = bool(value & 0x04)
            self._single_segment = bool(value & 0x20)
            self._fcs_bytes = (1 if self._single_segment else 0, 2, 4, 8)[value >> 6]
            rest = (0 if self._single_segment else 1) + _DICT_ID_BYTES[value & 3]
            self._expect(_S_FRAME_HEADER, rest + self._fcs_bytes)
        elif state == _S_FRAME_HEADER:
            self._check_window(header, at)
            self._expect(_S_BLOCK_HEADER, 3)
        else:
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == _BLOCK_RESERVED:
                raise IntegrityError(f"zstd stream: reserved block type at byte {at}")
            body = 1 if kind == _BLOCK_RLE else size
            if last:
                self._expect(_S_MAGIC, 4, skip=body + (4 if self._checksum else 0))
            else:
                self._expect(_S_BLOCK_HEADER, 3, skip=body)

    def _check_window(self, header: bytes, at: int) -> None:
        # RFC 8878 §3.1.1.1.2: a single-segment frame's window is its content size;
        # otherwise the Window_Descriptor gives 2**(10+exponent) plus eighths of that.
        if self._single_segment:
            window = int.from_bytes(header[len(header) - self._fcs_bytes :], "little")
            if self._fcs_bytes == 2:
                window += 256
        else:
            exponent, mantissa = header[0] >> 3, header[0] & 7
            base = 1 << (10 + exponent)
            window = base + (base >> 3) * mantissa
        if window > self._max_window:
            raise IntegrityError(
                f"zstd stream: the frame at byte {at} asks for a {window}-byte window"
                f" (at most {self._max_window})"
            )


class _StreamDecompressor(io.RawIOBase):
    def __init__(self, src: IO[bytes], max_output: int | None, max_window_size: int) -> None:
        super().__init__()
        self._tracker = _FrameTracker(src, max_window_size)
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._reader = dctx.stream_reader(
            cast(IO[bytes], self._tracker), read_across_frames=True, closefd=False
        )
        self._max_output = max_output
        self._produced = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _limit(self, size: int) -> int:
        # Never ask for more than one byte past the bound: a bomb is caught after at
        # most max_output + 1 bytes have been produced, whatever size the caller asked.
        if self._max_output is None:
            return size
        return min(size, self._max_output - self._produced + 1)

    def _account(self, count: int) -> None:
        if count == 0:
            self._finish()
            return
        self._produced += count
        if self._max_output is not None and self._produced > self._max_output:
            raise IntegrityError(
                f"zstd stream decompresses to more than {self._max_output} bytes",
                hint="the archive is damaged or not what bundle.json declares",
            )

    def _finish(self) -> None:
        if self._done:
            return
        tracker = self._tracker
        if not tracker.frames:
            raise IntegrityError("zstd stream is empty")
        if not tracker.at_frame_end:
            raise IntegrityError(
                f"zstd stream is truncated: it ends inside a frame after {tracker.offset} bytes"
            )
        self._done = True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed decompressor")
        if size is None or size < 0:
            parts = []
            while chunk := self.read(_READ_ALL_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if size == 0:
            return b""
        try:
            data = self._reader.read(self._limit(size))
        except zstandard.ZstdError as e:
            raise IntegrityError(f"zstd stream does not decompress: {e}") from e
        self._account(len(data))
        return data

    def readinto(self, buffer: Buffer) -> int:
        if self.closed:
            raise ValueError("read from a closed decompressor")
        target = memoryview(buffer).cast("B")
        if not len(target):
            return 0
        try:
            count = self._reader.readinto(target[: self._limit(len(target))])
        except zstandard.ZstdError as e:
            raise IntegrityError(f"zstd stream does not decompress: {e}") from e
        self._account(count)
        return count

    def close(self) -> None:
        self._reader.close()
        super().close()


def stream_decompressor(
    src: IO[bytes],
    *,
    max_output: int | None,
    max_window_size: int = STREAM_MAX_WINDOW_SIZE,
) -> BinaryIO:
    """A reader of the decompressed bytes of the zstd stream ``src`` (a pipe is fine:
    ``src`` is read forward only, never sought).

    Reads any sequence of zstd frames, skipping skippable frames (so a seekable file's
    seek table is passed over). ``read(n)`` returns at most ``n`` bytes; ``b""`` only at
    the end of a complete stream. Raises :class:`IntegrityError` when the stream:
    decompresses to more than ``max_output`` bytes (raised once ``max_output + 1`` have
    come out, so memory stays bounded), needs a window above ``max_window_size``, is
    empty, ends inside a frame, or holds anything that is not a zstd frame.
    Closing it does not close ``src``.
    """
    return cast(BinaryIO, _StreamDecompressor(src, max_output, max_window_size))
