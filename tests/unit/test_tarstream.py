"""Contract of the bundle tar stream (pipeline.bundle.tarstream): GNU tar and python's
tarfile read what it writes, byte for byte reproducibly, at the offsets it predicts, and
the reader refuses every hostile archive with a message naming the member and the reason."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.bundle.tarstream import (
    BLOCK,
    CHUNK,
    END_OF_ARCHIVE,
    Member,
    TarReader,
    TarWriter,
    first_member_name,
    member_header,
    member_span,
    padding,
)
from pipeline.errors import IntegrityError

MTIME = 1_600_000_000  # 2020-09-13 12:26:40 UTC
BLOB = "blobs/sha256/" + "ab" * 32
GiB = 1 << 30

MEMBERS: list[tuple[str, bytes]] = [
    ("bundle.json", b'{"schemaVersion": 1}\n'),
    ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
    ("index.json", b""),
    (BLOB, bytes(range(256)) * 4),  # exactly two blocks: no padding
    ("blobs/sha256/" + "cd" * 32, b"x" * 513),  # one byte into a block: 511 of padding
]


def write_archive(members: list[tuple[str, bytes]], mtime: int = MTIME) -> bytes:
    out = io.BytesIO()
    writer = TarWriter(out, mtime=mtime)
    for name, data in members:
        writer.add_bytes(name, data)
    writer.close()
    return out.getvalue()


def read_all(
    archive: bytes, reader_factory: Callable[[io.BytesIO], TarReader] = TarReader
) -> list[tuple[Member, bytes]]:
    reader = reader_factory(io.BytesIO(archive))
    return [(member, reader.read()) for member in reader]


# --- the writer, checked by other readers ------------------------------------------------


def test_gnu_tar_lists_names_sizes_mode_owner_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "bundle.tar"
    path.write_bytes(write_archive(MEMBERS))
    listing = subprocess.run(
        ["tar", "--utc", "-tvf", str(path)], check=True, capture_output=True, text=True
    )
    assert listing.stderr == ""
    lines = listing.stdout.splitlines()
    assert len(lines) == len(MEMBERS)
    for line, (name, data) in zip(lines, MEMBERS, strict=True):
        assert line.split() == ["-rw-r--r--", "0/0", str(len(data)), "2020-09-13", "12:26", name]


def test_gnu_tar_extracts_the_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bundle.tar"
    path.write_bytes(write_archive(MEMBERS))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True, capture_output=True)
    for name, data in MEMBERS:
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_mtime == MTIME


def test_python_tarfile_reads_every_header_field() -> None:
    archive = write_archive(MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        infos = tar.getmembers()
        assert [(i.name, i.size) for i in infos] == [(n, len(d)) for n, d in MEMBERS]
        for info, (_, data) in zip(infos, MEMBERS, strict=True):
            assert info.isreg()
            assert (info.mtime, info.mode, info.uid, info.gid) == (MTIME, 0o644, 0, 0)
            assert (info.uname, info.gname, info.linkname) == ("", "", "")
            assert info.pax_headers == {}
            extracted = tar.extractfile(info)
            assert extracted is not None
            assert extracted.read() == data


def test_header_is_plain_ustar_with_a_valid_checksum() -> None:
    header = member_header(BLOB, 1234, mtime=MTIME)
    assert len(header) == BLOCK
    assert header[257:265] == b"ustar\x0000"
    assert header[156:157] == b"0"
    # tarfile verifies the checksum in frombuf and raises on a mismatch.
    info = tarfile.TarInfo.frombuf(header, "ascii", "strict")
    assert (info.name, info.size, info.mtime, info.mode) == (BLOB, 1234, MTIME, 0o644)
    assert (info.devmajor, info.devminor) == (0, 0)


def test_same_content_and_mtime_give_identical_bytes() -> None:
    first = write_archive(MEMBERS)
    assert write_archive(list(MEMBERS)) == first
    assert write_archive(MEMBERS, mtime=MTIME + 1) != first
    # Nothing of the writing host or user leaks in: the only non-zero bytes of a header
    # are the fields the arguments determine.
    assert b"root" not in first


def test_offsets_predicted_by_member_span_match_every_reader() -> None:
    archive = write_archive(MEMBERS)
    predicted = []
    offset = 0
    for _, data in MEMBERS:
        predicted.append(offset)
        offset += member_span(len(data))
    assert len(archive) == offset + len(END_OF_ARCHIVE)

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        assert [info.offset for info in tar.getmembers()] == predicted
    assert [m.offset for m, _ in read_all(archive)] == predicted


def test_writer_reports_the_offsets_it_writes_at() -> None:
    out = io.BytesIO()
    writer = TarWriter(out, mtime=MTIME)
    members = [writer.add_bytes(name, data) for name, data in MEMBERS]
    writer.close()
    assert writer.position == len(out.getvalue())
    for member, (name, data) in zip(members, MEMBERS, strict=True):
        assert (member.name, member.size) == (name, len(data))
        assert out.getvalue()[member.data_offset : member.data_offset + len(data)] == data


@pytest.mark.parametrize(
    ("size", "pad", "span"),
    [(0, 0, 512), (1, 511, 1024), (511, 1, 1024), (512, 0, 1024), (513, 511, 1536)],
)
def test_padding_and_span(size: int, pad: int, span: int) -> None:
    assert padding(size) == pad
    assert member_span(size) == span


@pytest.mark.parametrize("size", [8**11 - 1, 8**11, 9 * GiB, 300 * GiB])
def test_sizes_of_8_gib_and_more_round_trip_through_the_header(size: int) -> None:
    header = member_header(BLOB, size, mtime=MTIME)
    field = header[124:136]
    if size < 8**11:
        assert field == b"%011o\0" % size
    else:
        assert field[0] == 0x80  # GNU base-256
    assert tarfile.TarInfo.frombuf(header, "ascii", "strict").size == size
    # The reader only parses the header; the data is never read here.
    member = TarReader(io.BytesIO(header)).next()
    assert member == Member(name=BLOB, size=size, offset=0)


def test_stream_member_copies_exactly_the_declared_size() -> None:
    out = io.BytesIO()
    writer = TarWriter(out, mtime=MTIME)
    data = b"layer" * 1000
    writer.add_stream(BLOB, len(data), io.BytesIO(data), chunk_size=777)
    writer.close()
    assert out.getvalue() == write_archive([(BLOB, data)])


@pytest.mark.parametrize(("declared", "actual"), [(10, 9), (10, 11)])
def test_stream_member_whose_source_changed_size_is_refused(declared: int, actual: int) -> None:
    writer = TarWriter(io.BytesIO(), mtime=MTIME)
    with pytest.raises(IntegrityError, match=re.escape(repr(BLOB))):
        writer.add_stream(BLOB, declared, io.BytesIO(b"x" * actual))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x" * 101, "more than 100"),
        ("café", "not printable ASCII"),
        ("../x", "'..' component"),
        ("/etc/x", "absolute name"),
        ("a\\b", "backslash"),
        ("a//b", "empty path component"),
        ("", "empty name"),
    ],
)
def test_header_refuses_names_readers_would_refuse(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        member_header(name, 0, mtime=MTIME)


def test_header_refuses_special_modes_and_bad_numbers() -> None:
    with pytest.raises(ValueError, match="mode"):
        member_header("a", 0, mtime=MTIME, mode=0o4755)
    with pytest.raises(ValueError, match="size"):
        member_header("a", -1, mtime=MTIME)
    with pytest.raises(ValueError, match="mtime"):
        member_header("a", 0, mtime=-1)


def test_writer_refuses_duplicates_and_adding_after_close() -> None:
    out = io.BytesIO()
    writer = TarWriter(out, mtime=MTIME)
    writer.add_bytes("a", b"1")
    written = out.getvalue()
    with pytest.raises(ValueError, match="already in the archive"):
        writer.add_bytes("a", b"2")
    assert out.getvalue() == written  # refused before writing anything
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add_bytes("b", b"")


# --- the reader on good archives ---------------------------------------------------------


def test_reader_round_trips_names_sizes_and_data() -> None:
    archive = write_archive(MEMBERS)
    reader = TarReader(io.BytesIO(archive))
    got = [(m.name, reader.read()) for m in reader]
    assert got == MEMBERS
    assert reader.position == len(archive)
    assert reader.next() is None  # and stays at the end


def test_partial_reads_skip_and_auto_skip_keep_the_stream_aligned() -> None:
    archive = write_archive(MEMBERS)
    reader = TarReader(io.BytesIO(archive))
    first = reader.next()
    assert first is not None and first.name == "bundle.json"
    assert reader.read(5) == b'{"sch'
    assert reader.read(0) == b""
    second = reader.next()  # the rest of bundle.json is skipped
    assert second is not None and second.name == "oci-layout"
    assert reader.position == second.data_offset
    reader.skip()
    assert reader.position == second.end
    assert reader.read(10) == b""  # nothing left of a skipped member
    names = [m.name for m in reader]
    assert names == [name for name, _ in MEMBERS[2:]]


def test_copy_to_streams_in_large_chunks() -> None:
    data = bytes(range(256)) * (14 * 1024 + 3)  # 3.5 MiB + 768 bytes
    archive = write_archive([(BLOB, data)])

    class RecordingSource(io.BytesIO):
        def __init__(self, content: bytes) -> None:
            super().__init__(content)
            self.requests: list[int] = []

        def read(self, n: int | None = -1) -> bytes:
            self.requests.append(-1 if n is None else n)
            return super().read(n)

    src = RecordingSource(archive)
    reader = TarReader(src)
    assert reader.next() == Member(name=BLOB, size=len(data), offset=0)
    chunks: list[bytes] = []
    assert reader.copy_to(chunks.append) == len(data)
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, CHUNK, len(data) - 3 * CHUNK]
    data_reads = [n for n in src.requests if n not in (BLOCK, padding(len(data)))]
    assert min(data_reads) == len(data) - 3 * CHUNK and max(data_reads) == CHUNK
    assert reader.next() is None


def test_reader_copes_with_short_reads_from_pipes() -> None:
    class Trickle(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            return super().read(min(7, n if n is not None and n >= 0 else 7))

    archive = write_archive(MEMBERS)
    reader = TarReader(Trickle(archive))
    assert [(m.name, reader.read()) for m in reader] == MEMBERS


def test_reader_accepts_archives_from_gnu_tar_and_tarfile(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "blobs" / "sha256").mkdir(parents=True)
    (src / "index.json").write_bytes(b"{}")
    (src / BLOB).write_bytes(b"layer data")
    # GNU tar's "posix" format adds pax headers, which bundle readers refuse.
    for fmt in ("gnu", "ustar"):
        archive = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", f"--format={fmt}", "-cf", str(archive), "-C", str(src), "index.json", BLOB],
            check=True,
        )
        got = read_all(archive.read_bytes())
        assert [(m.name, data) for m, data in got] == [("index.json", b"{}"), (BLOB, b"layer data")]

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("index.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert [(m.name, d) for m, d in read_all(out.getvalue())] == [("index.json", b"{}")]


def test_allowed_and_max_size_pass_what_the_caller_accepts() -> None:
    archive = write_archive(MEMBERS)
    sizes = {name: len(data) for name, data in MEMBERS}
    got = read_all(
        archive,
        lambda src: TarReader(src, allowed=sizes.__contains__, max_size=sizes.get),
    )
    assert [m.name for m, _ in got] == list(sizes)


def test_first_member_name_describes_a_foreign_archive() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("images/foo.tar")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert first_member_name(io.BytesIO(out.getvalue())) == "images/foo.tar"
    # Leniency: a link or an unsafe name is still reported, not refused.
    assert first_member_name(io.BytesIO(symlink_archive())) == "link"
    assert first_member_name(io.BytesIO(write_archive(MEMBERS))) == "bundle.json"


@pytest.mark.parametrize(
    "data",
    [b"", b"\x28\xb5\x2f\xfd" + b"\0" * 600, b'{"not": "a tar"}', END_OF_ARCHIVE],
    ids=["empty", "zstd frame", "json", "empty archive"],
)
def test_first_member_name_of_something_else_is_none(data: bytes) -> None:
    assert first_member_name(io.BytesIO(data)) is None


# --- hostile archives --------------------------------------------------------------------


def tarfile_archive(*infos: tarfile.TarInfo, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """An archive of header-only members, as python's tarfile writes them."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info in infos:
            tar.addfile(info, io.BytesIO(b"\0" * info.size) if info.isreg() else None)
    return out.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    result = tarfile.TarInfo(name)
    result.type = kind
    for key, value in fields.items():
        setattr(result, key, value)
    return result


def symlink_archive() -> bytes:
    return tarfile_archive(info("link", tarfile.SYMTYPE, linkname="/etc/passwd"))


def hand_made(name: bytes, *, patch: dict[int, bytes] | None = None, fix_sum: bool = True) -> bytes:
    """A header of ours with raw bytes patched in (for what tarfile refuses to write)."""
    header = bytearray(member_header("placeholder", 0, mtime=MTIME))
    header[0:100] = name.ljust(100, b"\0")
    for offset, value in (patch or {}).items():
        header[offset : offset + len(value)] = value
    if fix_sum:
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + END_OF_ARCHIVE


def bad_checksum() -> bytes:
    archive = bytearray(write_archive([("index.json", b"{}")]))
    archive[0] = ord("I")  # flip the case of one name byte after the sum was written
    return bytes(archive)


def truncated_header() -> bytes:
    return write_archive([("index.json", b"{}")])[:300]


def truncated_data() -> bytes:
    return write_archive([(BLOB, b"x" * 1000)])[: BLOCK + 10]


def missing_end_blocks() -> bytes:
    return write_archive([("index.json", b"{}")])[: -len(END_OF_ARCHIVE)]


def lone_zero_block() -> bytes:
    return write_archive([("index.json", b"{}")])[:-BLOCK]


def nonzero_padding() -> bytes:
    archive = bytearray(write_archive([("index.json", b"{}")]))
    archive[BLOCK + 100] = ord("!")
    return bytes(archive)


def zero_block_then_member() -> bytes:
    return b"\0" * BLOCK + write_archive([("index.json", b"{}")])


HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("dotdot", lambda: tarfile_archive(info("../x")), r"member '\.\./x' .*'\.\.' component"),
    ("inner dotdot", lambda: tarfile_archive(info("a/../../x")), r"'a/\.\./\.\./x'.*'\.\.' comp"),
    ("absolute", lambda: tarfile_archive(info("/etc/x")), r"member '/etc/x' .*absolute name"),
    ("backslash", lambda: tarfile_archive(info("a\\b")), r"member 'a\\\\b' .*backslash"),
    ("NUL in name", lambda: tarfile_archive(info("a\0b")), r"member 'a\\x00b' .*NUL byte"),
    ("empty component", lambda: tarfile_archive(info("a//b")), r"'a//b' .*empty path component"),
    ("trailing slash", lambda: tarfile_archive(info("a/")), r"'a/' .*empty path component"),
    ("dot component", lambda: tarfile_archive(info("./a")), r"'\./a' .*'\.' component"),
    ("non-ASCII", lambda: tarfile_archive(info("café")), r"'caf\\xc3\\xa9' .*not printable"),
    ("control char", lambda: tarfile_archive(info("a\nb")), r"'a\\nb' .*not printable ASCII"),
    ("empty name", lambda: hand_made(b""), r"member '' .*empty name"),
    (
        "symlink",
        symlink_archive,
        r"member 'link' .*symbolic link \(typeflag '2'\) not allowed",
    ),
    (
        "hardlink",
        lambda: tarfile_archive(info("hl", tarfile.LNKTYPE, linkname="index.json")),
        r"member 'hl' .*hard link \(typeflag '1'\)",
    ),
    (
        "char device",
        lambda: tarfile_archive(info("null", tarfile.CHRTYPE, devmajor=1, devminor=3)),
        r"member 'null' .*character device \(typeflag '3'\)",
    ),
    (
        "block device",
        lambda: tarfile_archive(info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)),
        r"member 'sda' .*block device \(typeflag '4'\)",
    ),
    ("FIFO", lambda: tarfile_archive(info("fifo", tarfile.FIFOTYPE)), r"'fifo' .*FIFO"),
    (
        "directory",
        lambda: tarfile_archive(info("blobs", tarfile.DIRTYPE, mode=0o755)),
        r"member 'blobs/' .*directory \(typeflag '5'\)",
    ),
    (
        "pax header",
        lambda: tarfile_archive(
            info("index.json", pax_headers={"comment": "hi"}), fmt=tarfile.PAX_FORMAT
        ),
        r"PaxHeader.*pax extended header \(typeflag 'x'\)",
    ),
    (
        "pax global header",
        lambda: hand_made(b"pax_global_header", patch={156: b"g"}),
        r"member 'pax_global_header' .*pax global header \(typeflag 'g'\)",
    ),
    (
        "GNU long name",
        lambda: tarfile_archive(info("a" * 150), fmt=tarfile.GNU_FORMAT),
        r"member '\./\./@LongLink' .*GNU long name header \(typeflag 'L'\)",
    ),
    (
        "GNU long link",
        lambda: tarfile_archive(
            info("l", tarfile.SYMTYPE, linkname="t" * 150), fmt=tarfile.GNU_FORMAT
        ),
        r"member '\./\./@LongLink' .*GNU long link name header \(typeflag 'K'\)",
    ),
    ("setuid", lambda: tarfile_archive(info("su", mode=0o4755)), r"'su' .*setuid bit set"),
    ("setgid", lambda: tarfile_archive(info("sg", mode=0o2755)), r"'sg' .*setgid bit set"),
    ("sticky", lambda: tarfile_archive(info("st", mode=0o1644)), r"'st' .*sticky bit set"),
    (
        "file type bits in mode",
        lambda: hand_made(b"m", patch={100: b"0100644\0"}),
        r"member 'm' .*mode 0o100644 has bits beyond",
    ),
    (
        "duplicate",
        lambda: tarfile_archive(info("index.json"), info("index.json")),
        r"member 'index\.json' at offset 512: duplicate name",
    ),
    ("bad checksum", bad_checksum, r"member 'Index\.json' at offset 0: header checksum mismatch"),
    (
        "not ustar",
        lambda: hand_made(b"v7", patch={257: b"\0" * 8}),
        r"member 'v7' .*not a ustar header",
    ),
    (
        "malformed size",
        lambda: hand_made(b"sz", patch={124: b"12x45678901\0"}),
        r"member 'sz' .*malformed size field",
    ),
    (
        "negative base-256 size",
        lambda: hand_made(b"neg", patch={124: b"\xff" * 12}),
        r"member 'neg' .*malformed size field",
    ),
    (
        "truncated in header",
        truncated_header,
        r"truncated archive: .*inside the header at offset 0 \(300 of 512 bytes\)",
    ),
    (
        "truncated in data",
        truncated_data,
        rf"truncated archive: .*inside the data of member '{BLOB}' .*\(10 of 1000 bytes\)",
    ),
    (
        "missing end blocks",
        missing_end_blocks,
        r"truncated archive: stream ends at byte 1024 without the end-of-archive blocks",
    ),
    ("lone zero block", lone_zero_block, r"truncated archive: .*single zero block at offset 1024"),
    (
        "nonzero padding",
        nonzero_padding,
        r"member 'index\.json' at offset 0: non-zero bytes in the padding",
    ),
    ("zero block then data", zero_block_then_member, r"zero block at offset 0 is followed by data"),
    ("empty stream", lambda: b"", r"truncated archive: stream ends at byte 0"),
]


@pytest.mark.parametrize(
    ("make", "message"), [(m, msg) for _, m, msg in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_archive_is_refused_naming_member_and_reason(
    make: Callable[[], bytes], message: str
) -> None:
    archive = make()
    with pytest.raises(IntegrityError, match=message) as caught:
        read_all(archive)
    assert caught.value.exit_code == 6


def test_member_not_allowed_by_the_caller_is_unexpected() -> None:
    archive = tarfile_archive(info("index.json"), info("images/foo.tar"))
    with pytest.raises(IntegrityError, match=r"unexpected member 'images/foo\.tar' at offset 512"):
        read_all(archive, lambda src: TarReader(src, allowed=lambda n: n == "index.json"))


def test_member_bigger_than_its_declared_size_is_refused() -> None:
    archive = write_archive([("bundle.json", b"{}"), (BLOB, b"x" * 2000)])
    declared = {"bundle.json": 2, BLOB: 1999}
    with pytest.raises(IntegrityError, match=rf"member '{BLOB}' .*size 2000 exceeds the 1999") as e:
        read_all(archive, lambda src: TarReader(src, max_size=declared.get))
    assert (e.value.expected, e.value.actual) == ("1999", "2000")

    reader = TarReader(io.BytesIO(archive))
    with pytest.raises(IntegrityError, match=r"member 'bundle\.json' .*size 2 exceeds the 1 "):
        reader.next(max_size=1)
