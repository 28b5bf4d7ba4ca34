"""Strict, deterministic tar streams for bundle archives (DESIGN.md §5).

Writing: every member is one 512-byte POSIX ustar header followed by its data, padded
with zeros to a multiple of 512 bytes, and the stream ends with two zero blocks. Headers
carry no host information (uid/gid 0, empty uname/gname, the caller's fixed mtime, mode
0644), so the same content and the same ``SOURCE_DATE_EPOCH`` give identical bytes, and
because no member ever needs an extension header (pax, GNU long name), the position of
every member is ``sum(member_span(size) for the members before it)``: a bundle writer can
record blob offsets in ``bundle.json`` before writing a single blob.

Reading: :class:`TarReader` walks a stream in order through ``read(n)`` alone (pipes,
decompressors) and trusts nothing in it. Every header's checksum is verified, only plain
regular files with canonical relative ASCII names are accepted, names are never repeated,
sizes may be bounded per member, and a stream that stops anywhere before the two zero
blocks that end an archive is reported as truncated. Every refusal is an
:class:`~pipeline.errors.IntegrityError` naming the member, its offset and the reason.

The ``tarfile`` module is deliberately not used: it accepts (and on extraction, acts on)
links, devices and extension headers, it reads byte ranges with its own buffering we
cannot bound, and it tolerates truncation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.errors import IntegrityError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
CHUNK = 1 << 20
"""Size of the reads :meth:`TarReader.copy_to` and :meth:`TarReader.skip` issue, and of
the reads :meth:`TarWriter.add_stream` issues on its source."""

_ZERO_BLOCK = b"\0" * BLOCK
_NAME_FIELD = 100

# Field offsets of a POSIX.1-1988 ustar header (POSIX pax(1), "ustar Interchange Format").
_NAME = slice(0, 100)
_MODE = slice(100, 108)
_SIZE = slice(124, 136)
_CHKSUM = slice(148, 156)
_TYPEFLAG = 156
_MAGIC_VERSION = slice(257, 265)
_PREFIX = slice(345, 500)

_USTAR_MAGIC = b"ustar\x0000"
# GNU tar's default ("gnu"/"oldgnu") format: same layout up to the prefix field, which
# GNU uses for atime/ctime/sparse data instead, so the prefix is ignored under this magic.
_GNU_MAGIC = b"ustar  \x00"

# An octal field of w bytes holds w-1 digits and a terminating NUL.
_OCTAL_SIZE_LIMIT = 8**11
# GNU base-256 encoding of a 12-byte field: a 0x80 marker byte, then 11 big-endian bytes.
_BASE256_SIZE_LIMIT = 256**11

_REGULAR_TYPES = (b"0", b"\0")
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name header",
    b"K": "GNU long link name header",
    b"S": "GNU sparse file",
    b"V": "GNU volume label",
    b"M": "GNU multi-volume continuation",
    b"D": "GNU directory dump",
}

_OCTAL_DIGITS = re.compile(rb"[0-7]+")
# Bytes with the high bit set, deleted with bytes.translate to count them without a loop.
_HIGH_BYTES = bytes(range(128, 256))


@dataclass(frozen=True)
class Member:
    """One regular file of a tar stream: ``offset`` is where its header starts."""

    name: str
    size: int
    offset: int

    @property
    def data_offset(self) -> int:
        """Where the member's data starts in the stream."""
        return self.offset + BLOCK

    @property
    def end(self) -> int:
        """Where the next header starts (after the data and its padding)."""
        return self.offset + member_span(self.size)


def padding(size: int) -> int:
    """Zero bytes that follow ``size`` data bytes to reach the next 512-byte boundary."""
    if size < 0:
        raise ValueError(f"negative member size {size}")
    return -size % BLOCK


def member_span(size: int) -> int:
    """Bytes one member of ``size`` data bytes occupies: header, data and padding."""
    return BLOCK + size + padding(size)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member name, or None when it is acceptable.

    Acceptable names are printable ASCII, relative, use ``/`` between non-empty
    components, and contain no ``.`` or ``..`` component and no backslash. Requiring the
    canonical spelling makes a name-set check catch every duplicate (``a`` vs ``./a``).
    """
    if not name:
        return "empty name"
    if not (name.isascii() and name.isprintable()):
        return "name is not printable ASCII"
    if name.startswith("/"):
        return "absolute name"
    if "\\" in name:
        return "backslash in name"
    for component in name.split("/"):
        if component == "":
            return "empty path component"
        if component == "..":
            return "'..' component in name"
        if component == ".":
            return "'.' component in name"
    return None


def member_header(name: str, size: int, *, mtime: int, mode: int = 0o644) -> bytes:
    """The 512-byte ustar header of a regular file.

    uid/gid 0, empty uname/gname, device numbers 0, no link name, no prefix. Sizes below
    8 GiB are written in octal; larger ones in the GNU base-256 encoding, which GNU tar,
    python's tarfile and :class:`TarReader` read. Raises ValueError for a name that
    :func:`name_problem` refuses or that is longer than 100 bytes, a negative size, an
    mtime outside 0..8**11-1, or a mode with bits beyond the permission bits (setuid,
    setgid and sticky files are refused by readers).
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"member name {name!r}: {problem}")
    raw_name = name.encode("ascii")
    if len(raw_name) > _NAME_FIELD:
        raise ValueError(f"member name {name!r} is {len(raw_name)} bytes, more than 100")
    if size < 0 or size >= _BASE256_SIZE_LIMIT:
        raise ValueError(f"member {name!r}: size {size} cannot be encoded")
    if not 0 <= mtime < _OCTAL_SIZE_LIMIT:
        raise ValueError(f"member {name!r}: mtime {mtime} outside 0..{_OCTAL_SIZE_LIMIT - 1}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"member {name!r}: mode {mode:#o} is not plain permission bits")

    if size < _OCTAL_SIZE_LIMIT:
        size_field = b"%011o\0" % size
    else:
        size_field = b"\x80" + size.to_bytes(11, "big")
    header = bytearray(
        raw_name.ljust(_NAME_FIELD, b"\0")
        + b"%07o\0" % mode
        + b"0000000\0"  # uid
        + b"0000000\0"  # gid
        + size_field
        + b"%011o\0" % mtime
        + b" " * 8  # checksum: counted as spaces while summing (POSIX)
        + b"0"  # typeflag: regular file
        + b"\0" * 100  # linkname
        + _USTAR_MAGIC
        + b"\0" * 32  # uname
        + b"\0" * 32  # gname
        + b"0000000\0"  # devmajor
        + b"0000000\0"  # devminor
        + b"\0" * 155  # prefix
        + b"\0" * 12  # pad to 512
    )
    # Six octal digits, NUL, space: the form GNU tar and tarfile write.
    header[_CHKSUM] = b"%06o\0 " % sum(header)
    return bytes(header)


def _parse_number(field: bytes) -> int | None:
    """A numeric header field's value, or None when the field is malformed.

    Octal digits, optionally surrounded by spaces and ended by NUL or space; or GNU
    base-256 with a 0x80 marker byte. Negative base-256 values (0xff marker) are refused.
    """
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL_DIGITS.fullmatch(digits):
        return None
    return int(digits, 8)


def _checksum_matches(header: bytes) -> bool:
    stored = _parse_number(header[_CHKSUM])
    if stored is None:
        return False
    unsigned = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    if stored == unsigned:
        return True
    # Some historic tars summed signed chars; POSIX readers accept either sum.
    high = len(header) - len(header.translate(None, _HIGH_BYTES))
    high -= len(header[_CHKSUM]) - len(header[_CHKSUM].translate(None, _HIGH_BYTES))
    return stored == unsigned - 256 * high


def _field_text(field: bytes) -> tuple[bytes, bool]:
    """A NUL-terminated string field's bytes, and whether anything but NULs follows the
    first NUL (a name that hides a second string after its terminator). In that case the
    whole field up to its trailing NULs is returned, so that messages show what hid."""
    cut = field.find(b"\0")
    if cut < 0:
        return field, False
    if field.count(0, cut) != len(field) - cut:
        return field.rstrip(b"\0"), True
    return field[:cut], False


def _raw_name(header: bytes) -> tuple[bytes, bool]:
    """The full name of a header (prefix/name under the POSIX magic) and whether a NUL
    appears inside the name or prefix field before its end."""
    name, hidden = _field_text(header[_NAME])
    if header[_MAGIC_VERSION] == _USTAR_MAGIC:
        prefix, hidden_in_prefix = _field_text(header[_PREFIX])
        hidden = hidden or hidden_in_prefix
        if prefix:
            name = prefix + b"/" + name
    return name, hidden


def _show(raw: bytes) -> str:
    """A name quoted for a message, with control and non-ASCII bytes escaped."""
    return repr(raw)[1:]


def first_member_name(src: BinaryIO) -> str | None:
    """The name in the first header of ``src``, read leniently to describe a foreign
    archive ("found 'images/foo.tar' first").

    Reads at most 512 bytes. Nothing in the header is refused: link, extension header or
    unsafe name alike, the name field (joined with the ustar prefix) is returned, with
    non-ASCII bytes escaped. Returns None when the stream does not start with a tar header
    (shorter than 512 bytes, a zero block, or a bad checksum).
    """
    block = _read_fully(src, BLOCK)
    if len(block) < BLOCK or block == _ZERO_BLOCK or not _checksum_matches(block):
        return None
    raw, _ = _raw_name(block)
    return raw.decode("ascii", "backslashreplace")


def _read_fully(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of ``src``, fewer only at end of stream (reads may come short
    from pipes and decompressors)."""
    data = src.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class TarReader:
    """Reads a tar stream strictly, in order, from a file-like that only needs ``read(n)``.

    Call order: :meth:`next` to reach a member, then any of :meth:`read`,
    :meth:`copy_to` or :meth:`skip` for its data; :meth:`next` again skips whatever data
    is left. :meth:`next` returns None once the two zero blocks that end an archive are
    read; bytes after them (tar's record padding) are never read. Any failure raises
    :class:`~pipeline.errors.IntegrityError`; the stream is then somewhere inside the
    bad member, so the reader must not be used further.

    Accepted members are regular files (typeflag ``0`` or NUL) under the POSIX ustar or
    GNU magic, with a verified header checksum, a name :func:`name_problem` accepts and
    ``allowed`` (when given) approves, never seen before in this stream, with no setuid,
    setgid or sticky bit, and no bigger than the smallest of ``max_size(name)`` (when
    given) and the ``max_size`` passed to :meth:`next`. Padding after data must be zeros.

    ``position`` counts the bytes consumed from ``src`` since the reader was created, so
    callers can check member offsets against the ones ``bundle.json`` declares.

    Not thread-safe: one reader belongs to one thread.
    """

    def __init__(
        self,
        src: BinaryIO,
        *,
        allowed: Callable[[str], bool] | None = None,
        max_size: Callable[[str], int | None] | None = None,
    ) -> None:
        self._src = src
        self._allowed = allowed
        self._max_size = max_size
        self._seen: set[str] = set()
        self._member: Member | None = None
        self._remaining = 0
        self._padding = 0
        self._position = 0
        self._ended = False

    @property
    def position(self) -> int:
        """Bytes consumed from the source so far."""
        return self._position

    @property
    def member(self) -> Member | None:
        """The member :meth:`next` returned last (None before it and at the end)."""
        return self._member

    def __iter__(self) -> Iterator[Member]:
        """Every member in order (each one's unread data is skipped on advancing)."""
        while (member := self.next()) is not None:
            yield member

    def next(self, *, max_size: int | None = None) -> Member | None:
        """Skip what remains of the current member, then parse and validate the next header.

        Returns the member, positioned at the start of its data, or None at the end of the
        archive (and on every later call). ``max_size`` bounds this member's size, on top
        of the constructor's ``max_size`` callable.
        """
        if self._ended:
            return None
        if self._member is not None:
            self.skip()
            self._member = None
        offset = self._position
        block = self._read(BLOCK)
        if not block:
            raise IntegrityError(
                f"truncated archive: stream ends at byte {offset} "
                "without the end-of-archive blocks"
            )
        if len(block) < BLOCK:
            raise IntegrityError(
                f"truncated archive: stream ends inside the header at offset {offset} "
                f"({len(block)} of {BLOCK} bytes)"
            )
        if block == _ZERO_BLOCK:
            self._read_end_of_archive(offset)
            return None
        member = self._parse_header(block, offset, max_size)
        self._member = member
        self._remaining = member.size
        self._padding = padding(member.size)
        return member

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the current member's data (all that is left when ``n`` is
        negative); b"" once it is all read, or when there is no current member."""
        if self._remaining == 0:
            self._consume_padding()
            return b""
        want = self._remaining if n < 0 else min(n, self._remaining)
        data = self._read(want)
        self._remaining -= len(data)
        if len(data) < want:
            self._truncated_in_data()
        if self._remaining == 0:
            self._consume_padding()
        return data

    def copy_to(self, write: Callable[[bytes], object], *, chunk_size: int = CHUNK) -> int:
        """Stream the rest of the current member's data to ``write`` in chunks of
        ``chunk_size`` bytes (the last one shorter); returns the number of bytes written.

        Exceptions from ``write`` propagate and leave the member partly consumed.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        total = 0
        while self._remaining:
            data = self.read(chunk_size)
            write(data)
            total += len(data)
        self._consume_padding()
        return total

    def skip(self) -> None:
        """Discard the rest of the current member's data and its padding.

        Reads through the data rather than seeking, so truncation is still detected.
        """
        while self._remaining:
            self.read(CHUNK)
        self._consume_padding()

    def _read(self, n: int) -> bytes:
        data = _read_fully(self._src, n)
        self._position += len(data)
        return data

    def _read_end_of_archive(self, offset: int) -> None:
        second = self._read(BLOCK)
        if len(second) < BLOCK:
            raise IntegrityError(
                f"truncated archive: stream ends after a single zero block at offset "
                f"{offset}; an archive ends with two"
            )
        if second != _ZERO_BLOCK:
            raise IntegrityError(
                f"zero block at offset {offset} is followed by data at offset "
                f"{offset + BLOCK}: not a valid end of archive"
            )
        self._ended = True
        self._member = None

    def _truncated_in_data(self) -> None:
        member = self._member
        assert member is not None
        got = member.size - self._remaining
        raise IntegrityError(
            f"truncated archive: stream ends inside the data of member {member.name!r} "
            f"at offset {member.offset} ({got} of {member.size} bytes)",
            expected=str(member.size),
            actual=str(got),
        )

    def _consume_padding(self) -> None:
        if not self._padding:
            return
        member = self._member
        assert member is not None
        want = self._padding
        pad = self._read(want)
        self._padding = 0
        if len(pad) < want:
            raise IntegrityError(
                f"truncated archive: stream ends inside the padding of member "
                f"{member.name!r} at offset {member.offset}"
            )
        if pad.count(0) != len(pad):
            raise IntegrityError(
                f"member {member.name!r} at offset {member.offset}: "
                "non-zero bytes in the padding after its data"
            )

    def _parse_header(self, block: bytes, offset: int, max_size: int | None) -> Member:
        raw, hidden_nul = _raw_name(block)
        shown = _show(raw)

        def refuse(reason: str) -> IntegrityError:
            return IntegrityError(f"member {shown} at offset {offset}: {reason}")

        if not _checksum_matches(block):
            raise refuse("header checksum mismatch (corrupt or not a tar header)")
        magic = block[_MAGIC_VERSION]
        if magic not in (_USTAR_MAGIC, _GNU_MAGIC):
            raise refuse(f"not a ustar header (magic {magic!r})")
        typeflag = block[_TYPEFLAG : _TYPEFLAG + 1]
        if typeflag not in _REGULAR_TYPES:
            kind = _TYPE_NAMES.get(typeflag, "unknown member type")
            raise refuse(
                f"{kind} (typeflag {typeflag.decode('latin-1')!r}) not allowed: "
                "only regular files"
            )
        if hidden_nul:
            raise refuse("NUL byte inside the name")
        problem = name_problem(raw.decode("latin-1"))
        if problem is not None:
            raise refuse(problem)
        name = raw.decode("ascii")

        mode = _parse_number(block[_MODE])
        if mode is None:
            raise refuse("malformed mode field")
        for bit, what in ((0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky")):
            if mode & bit:
                raise refuse(f"{what} bit set in mode {mode:#o}")
        if mode & ~0o777:
            raise refuse(f"mode {mode:#o} has bits beyond the permission bits")
        size = _parse_number(block[_SIZE])
        if size is None:
            raise refuse("malformed size field")

        if self._allowed is not None and not self._allowed(name):
            raise IntegrityError(f"unexpected member {name!r} at offset {offset}")
        if name in self._seen:
            raise refuse("duplicate name (appears earlier in the archive)")
        self._seen.add(name)
        limits = [max_size]
        if self._max_size is not None:
            limits.append(self._max_size(name))
        bounds = [limit for limit in limits if limit is not None]
        if bounds and size > min(bounds):
            limit = min(bounds)
            raise IntegrityError(
                f"member {name!r} at offset {offset}: size {size} exceeds the "
                f"{limit} bytes allowed",
                expected=str(limit),
                actual=str(size),
            )
        return Member(name=name, size=size, offset=offset)


class TarWriter:
    """Writes a reproducible tar stream of regular files to ``dst`` (``write`` only).

    Call :meth:`add_bytes` / :meth:`add_stream` once per member, in the order the archive
    should hold them, then :meth:`close` (writes the end-of-archive blocks; ``dst`` itself
    is left open). Every header uses the fixed ``mtime`` and mode 0644; member ``i``
    starts at ``sum(member_span(size) for earlier members)``. Names are checked as by
    :func:`member_header` and must not repeat (ValueError, before anything is written).
    A failure while copying a member leaves a partial archive that the caller discards.

    Not thread-safe.
    """

    def __init__(self, dst: BinaryIO, *, mtime: int) -> None:
        self._dst = dst
        self._mtime = mtime
        self._names: set[str] = set()
        self._position = 0
        self._closed = False

    @property
    def position(self) -> int:
        """Bytes written so far: the offset the next member's header will have."""
        return self._position

    def add_bytes(self, name: str, data: bytes) -> Member:
        """Write one member holding ``data``."""
        member = self._start(name, len(data))
        self._write(data)
        self._write(b"\0" * padding(len(data)))
        return member

    def add_stream(
        self, name: str, size: int, src: BinaryIO, *, chunk_size: int = CHUNK
    ) -> Member:
        """Write one member of exactly ``size`` bytes copied from ``src`` in chunks.

        Raises IntegrityError when ``src`` holds fewer or more than ``size`` bytes (the
        content changed after its size was recorded).
        """
        member = self._start(name, size)
        write_from = getattr(self._dst, "write_from", None)
        if write_from is not None:
            # The destination reads into its own buffers (a zstd frame writer).
            got = write_from(src, size)
            self._position += got
            left = size - got
        else:
            left = size
        while left:
            data = src.read(min(chunk_size, left))
            if not data:
                raise IntegrityError(
                    f"member {name!r}: source ended after {size - left} of {size} bytes",
                    expected=str(size),
                    actual=str(size - left),
                )
            self._write(data)
            left -= len(data)
        if src.read(1):
            raise IntegrityError(
                f"member {name!r}: source holds more than the {size} bytes declared",
                expected=str(size),
            )
        self._write(b"\0" * padding(size))
        return member

    def close(self) -> None:
        """Write the two zero blocks that end the archive. Idempotent."""
        if not self._closed:
            self._write(END_OF_ARCHIVE)
            self._closed = True

    def _start(self, name: str, size: int) -> Member:
        if self._closed:
            raise ValueError(f"cannot add {name!r}: the archive is closed")
        if name in self._names:
            raise ValueError(f"member {name!r} is already in the archive")
        header = member_header(name, size, mtime=self._mtime)
        self._names.add(name)
        member = Member(name=name, size=size, offset=self._position)
        self._write(header)
        return member

    def _write(self, data: bytes) -> None:
        if data:
            self._dst.write(data)
            self._position += len(data)
