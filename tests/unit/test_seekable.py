"""The zstd seekable format: what standard tools and our readers see in what we write,
and how damaged or hostile files are refused."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
import zstandard

from pipeline.bundle import seekable
from pipeline.bundle.seekable import (
    MAX_FRAME_SIZE,
    SEEKABLE_MAGIC,
    Frame,
    SeekableReader,
    SeekableWriter,
    read_seek_table,
    stream_decompressor,
)
from pipeline.errors import IntegrityError

FS = 64 * 1024  # small frames keep the tests fast while giving many frames


def sample(size: int, seed: int = 1) -> bytes:
    """Half random, half compressible bytes, so frames of both kinds appear."""
    rnd = random.Random(seed)
    half = size // 2
    text = b"".join(b"layer %d of image %d\n" % (i, i % 7) for i in range(size // 10 + 1))
    return rnd.randbytes(half) + text[: size - half]


def write_seekable(path: Path, data: bytes, *, frame_size: int = FS, threads: int = 2,
                   level: int = 3, chunk: int = 10_000) -> SeekableWriter:
    with open(path, "wb") as f:
        w = SeekableWriter(f, level=level, threads=threads, frame_size=frame_size)
        for i in range(0, len(data), chunk):
            w.write(data[i : i + chunk])
        w.close()
    return w


def seek_table(entries: list[tuple[int, int]], *, descriptor: int = 0) -> bytes:
    """A seek table written from the spec, independently of the module under test."""
    body = b"".join(struct.pack("<II", c, d) for c, d in entries)
    body += struct.pack("<IBI", len(entries), descriptor, 0x8F92EAB1)
    return struct.pack("<II", 0x184D2A5E, len(body)) + body


def rle_frame(total: int, *, content_size: int | None = None) -> bytes:
    """A hand-made zstd frame of ``total`` zero bytes in 128 KiB RLE blocks: 4 bytes of
    input per 128 KiB of output (RFC 8878 §3.1.1), the shape of a decompression bomb."""
    block = 128 * 1024
    window = 0x38  # Window_Descriptor: exponent 7 -> 2**17 = 128 KiB
    if content_size is None:
        header = struct.pack("<IBB", 0xFD2FB528, 0x00, window)
    else:  # Frame_Content_Size_Flag 3: an 8-byte content size follows the window
        header = struct.pack("<IBBQ", 0xFD2FB528, 0xC0, window, content_size)
    count = total // block
    blocks = [((i == count - 1) | (1 << 1) | (block << 3)).to_bytes(3, "little") + b"\0"
              for i in range(count)]
    return header + b"".join(blocks)


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 4 * FS, 10 * FS + 123], ids=["empty", "small",
                                                                       "exact", "many"])
def test_round_trip(tmp_path: Path, size: int) -> None:
    data = sample(size)
    path = tmp_path / "a.tar.zst"
    w = write_seekable(path, data)

    assert w.bytes_in == size
    assert w.bytes_out == path.stat().st_size
    assert [f.decompressed_size for f in w.frames] == [
        min(FS, size - i) for i in range(0, size, FS)
    ]
    with open(path, "rb") as f:
        assert read_seek_table(f) == w.frames
    with SeekableReader(path) as r:
        assert r.total_size == size
        assert r.read_at(0, size) == data
    with open(path, "rb") as f:
        assert stream_decompressor(f, max_output=size).read() == data


def test_zstd_cli_decompresses_to_identical_bytes(tmp_path: Path) -> None:
    data = sample(7 * FS + 5)
    path = tmp_path / "a.zst"
    write_seekable(path, data)

    out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
    assert out.stdout == data
    subprocess.run(["zstd", "-tq", str(path)], check=True)


def test_zstd_cli_reads_an_empty_stream(tmp_path: Path) -> None:
    path = tmp_path / "empty.zst"
    write_seekable(path, b"")

    out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
    assert out.stdout == b""


def test_tar_reads_a_tar_written_through_it(tmp_path: Path) -> None:
    members = {"bundle.json": b'{"schemaVersion": 1}\n', "oci-layout": b"{}",
               "blobs/sha256/" + "a" * 64: sample(3 * FS + 17, seed=2),
               "blobs/sha256/" + "b" * 64: sample(100, seed=3)}
    path = tmp_path / "bmpackages_1.0.tar.zst"
    with open(path, "wb") as f, SeekableWriter(f, frame_size=FS) as w:
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name, body in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))

    listing = subprocess.run(f"zstd -dc '{path}' | tar -t", shell=True, capture_output=True,
                             check=True, text=True)
    assert listing.stdout.split() == list(members)
    blob = "blobs/sha256/" + "a" * 64
    extracted = subprocess.run(f"zstd -dc '{path}' | tar -xO {blob}", shell=True,
                               capture_output=True, check=True)
    assert extracted.stdout == members[blob]


# -- determinism -------------------------------------------------------------------


def test_output_is_identical_whatever_the_threads_and_write_sizes(tmp_path: Path) -> None:
    data = sample(12 * FS + 999, seed=4)
    one = write_seekable(tmp_path / "one.zst", data, threads=1, chunk=FS)
    four = write_seekable(tmp_path / "four.zst", data, threads=4, chunk=7_777)
    whole = write_seekable(tmp_path / "whole.zst", data, threads=3, chunk=len(data))

    ref = (tmp_path / "one.zst").read_bytes()
    assert (tmp_path / "four.zst").read_bytes() == ref
    assert (tmp_path / "whole.zst").read_bytes() == ref
    assert one.frames == four.frames == whole.frames


def test_end_frame_starts_the_next_byte_on_a_frame_boundary(tmp_path: Path) -> None:
    meta, blob = b"m" * 1500, sample(2 * FS, seed=5)
    path = tmp_path / "a.zst"
    with open(path, "wb") as f:
        w = SeekableWriter(f, frame_size=FS)
        w.write(meta)
        w.end_frame()
        w.end_frame()  # nothing pending: no empty frame
        w.write(bytearray(blob))
        w.close()

    assert [fr.decompressed_offset for fr in w.frames] == [0, 1500, 1500 + FS]
    with SeekableReader(path) as r:
        assert r.read_at(1500, len(blob)) == blob


def test_flush_writes_ended_frames_and_keeps_the_open_one(tmp_path: Path) -> None:
    data = sample(2 * FS + 500, seed=12)
    out = io.BytesIO()
    w = SeekableWriter(out, frame_size=FS)
    w.write(data)
    w.flush()
    assert [f.decompressed_size for f in w.frames] == [FS, FS]
    assert len(out.getvalue()) == w.bytes_out == sum(f.compressed_size for f in w.frames)
    w.close()

    assert [f.decompressed_size for f in w.frames] == [FS, FS, 500]
    path = tmp_path / "a.zst"
    write_seekable(path, data)
    assert out.getvalue() == path.read_bytes()


# -- random access -----------------------------------------------------------------

SIZE = 6 * FS + 321


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = sample(SIZE, seed=6)
    path = tmp_path_factory.mktemp("seekable") / "a.zst"
    write_seekable(path, data)
    return path, data


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 1),
        (FS - 1, 1),  # last byte of a frame
        (FS, 1),  # first byte of the next
        (FS - 1, 2),  # straddles a boundary
        (FS, FS),  # exactly one frame
        (FS - 10, 3 * FS + 20),  # spans several frames
        (0, SIZE),
        (SIZE - 1, 1),
        (SIZE, 0),
        (2 * FS, 0),
    ],
)
def test_read_at(archive: tuple[Path, bytes], offset: int, size: int) -> None:
    path, data = archive
    with SeekableReader(path) as r:
        assert r.read_at(offset, size) == data[offset : offset + size]
        with r.open_range(offset, size) as rng:
            got = b"".join(iter(lambda: rng.read(5000), b""))
        assert got == data[offset : offset + size]
        # readinto fills what the first frame holds of the range
        first = min(size, FS - offset % FS)
        buf = bytearray(size)
        with r.open_range(offset, size) as rng:
            assert rng.readinto(buf) == first
        assert buf[:first] == data[offset : offset + first]


def test_range_past_the_end_is_refused(archive: tuple[Path, bytes]) -> None:
    path, _ = archive
    with SeekableReader(path) as r, pytest.raises(IntegrityError, match="beyond the end"):
        r.read_at(SIZE - 10, 11)


def test_concurrent_readers_get_correct_bytes(archive: tuple[Path, bytes]) -> None:
    path, data = archive
    errors: list[str] = []
    reader = SeekableReader(path, cache_frames=2)

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            off = rnd.randrange(SIZE)
            size = rnd.randrange(min(SIZE - off, 3 * FS) + 1)
            if seed % 2:
                got = reader.read_at(off, size)
            else:
                got = reader.open_range(off, size).read()
            if got != data[off : off + size]:
                errors.append(f"{off}+{size}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert errors == []


# -- malformed seek tables -----------------------------------------------------------


def tampered(path: Path, tmp_path: Path, edit: bytes | None = None, at: int = 0,
             cut: int = 0) -> Path:
    raw = bytearray(path.read_bytes())
    if edit is not None:
        raw[at : at + len(edit)] = edit
    if cut:
        del raw[len(raw) - cut :]
    out = tmp_path / "bad.zst"
    out.write_bytes(raw)
    return out


def test_file_without_footer_has_no_table(archive: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = archive
    plain = tmp_path / "plain.zst"
    plain.write_bytes(zstandard.ZstdCompressor().compress(b"x" * 1000))
    for candidate in (plain, tampered(path, tmp_path, cut=1)):
        with open(candidate, "rb") as f:
            assert read_seek_table(f) is None
        with pytest.raises(IntegrityError, match="no zstd seek table"):
            SeekableReader(candidate)


def _table_offsets(path: Path) -> tuple[int, int]:
    """(offset of the table's skippable frame, number of frames)."""
    raw = path.read_bytes()
    count = struct.unpack_from("<I", raw, len(raw) - 9)[0]
    return len(raw) - (8 + 8 * count + 9), count


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("count_absurd", "cannot fit"),
        ("count_off_by_one", "does not match|cannot fit|no skippable"),
        ("reserved_bit", "reserved bits"),
        ("skippable_magic", "no skippable frame"),
        ("frame_size_field", "does not match"),
        ("entry_too_big", "add up"),
        ("entry_zero", "compressed size of 0"),
        ("huge_frame", "declares"),
        ("truncated_data", "add up"),
    ],
)
def test_malformed_tables_are_refused(archive: tuple[Path, bytes], tmp_path: Path, case: str,
                                      message: str) -> None:
    path, _ = archive
    size = path.stat().st_size
    table, count = _table_offsets(path)
    first_entry = table + 8
    edits: dict[str, dict[str, object]] = {
        "count_absurd": {"edit": struct.pack("<I", 0xFFFFFFF0), "at": size - 9},
        "count_off_by_one": {"edit": struct.pack("<I", count + 1), "at": size - 9},
        "reserved_bit": {"edit": b"\x04", "at": size - 5},
        "skippable_magic": {"edit": struct.pack("<I", 0x184D2A5F), "at": table},
        "frame_size_field": {"edit": struct.pack("<I", 8 * count + 10), "at": table + 4},
        "entry_too_big": {"edit": struct.pack("<I", 10**6), "at": first_entry},
        "entry_zero": {"edit": struct.pack("<I", 0), "at": first_entry},
        "huge_frame": {"edit": struct.pack("<I", MAX_FRAME_SIZE + 1), "at": first_entry + 4},
    }
    if case == "truncated_data":
        # Drop a byte from the middle of the frames: the table no longer adds up.
        raw = path.read_bytes()
        bad = tmp_path / "bad.zst"
        bad.write_bytes(raw[:100] + raw[101:])
    else:
        bad = tampered(path, tmp_path, **edits[case])  # type: ignore[arg-type]
    with open(bad, "rb") as f, pytest.raises(IntegrityError, match=message):
        read_seek_table(f)
    with pytest.raises(IntegrityError, match=message):
        SeekableReader(bad)


def test_inconsistent_frames_given_by_the_caller_are_refused(
        archive: tuple[Path, bytes]) -> None:
    path, _ = archive
    with pytest.raises(IntegrityError, match="inconsistent"):
        SeekableReader(path, [Frame(0, 10, 0, 5), Frame(11, 10, 5, 5)])
    with pytest.raises(IntegrityError, match="the file has"):
        SeekableReader(path, [Frame(0, 10**9, 0, 5)])


def test_corrupt_frame_is_detected(archive: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = archive
    with open(path, "rb") as f:
        frames = read_seek_table(f)
    assert frames
    target = frames[-2]  # a compressible frame: its bytes are real zstd blocks
    raw = bytearray(path.read_bytes())
    raw[target.compressed_offset + target.compressed_size // 2] ^= 0xFF
    bad = tmp_path / "bad.zst"
    bad.write_bytes(raw)
    with SeekableReader(bad) as r:
        assert r.read_at(0, FS) == data[:FS]  # other frames still read
        with pytest.raises(IntegrityError):
            r.read_at(target.decompressed_offset, 10)
    with open(bad, "rb") as f, pytest.raises(IntegrityError):
        stream_decompressor(f, max_output=None).read()


# -- hostile frames ----------------------------------------------------------------


def big_window_frame(window_log: int) -> bytes:
    """A frame whose header asks for a 2**window_log window (content size unknown, so
    zstd keeps the window it was given)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        w.write(b"small payload" * 10)
    frame = out.getvalue()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log
    return frame


def test_frame_with_huge_window_is_refused(tmp_path: Path) -> None:
    frame = big_window_frame(27)
    path = tmp_path / "window.zst"
    path.write_bytes(frame + seek_table([(len(frame), 130)]))
    with SeekableReader(path) as r, pytest.raises(IntegrityError, match="window"):
        r.read_at(0, 10)

    with open(path, "rb") as f, pytest.raises(IntegrityError, match="[Ww]indow"):
        stream_decompressor(f, max_output=None, max_window_size=16 << 20).read()
    huge = big_window_frame(30)
    with pytest.raises(IntegrityError, match="[Ww]indow"):
        stream_decompressor(io.BytesIO(huge), max_output=None).read()


def test_seekable_frame_bigger_than_declared_is_refused(tmp_path: Path) -> None:
    bomb = rle_frame(1 << 30)  # 1 GiB of zeros, no content size in its header
    path = tmp_path / "bomb.zst"
    path.write_bytes(bomb + seek_table([(len(bomb), 1 << 20)]))
    with SeekableReader(path) as r, pytest.raises(IntegrityError):
        r.read_at(0, 10)

    liar = rle_frame(1 << 20, content_size=1 << 40)  # header claims 1 TiB
    path.write_bytes(liar + seek_table([(len(liar), 1 << 20)]))
    with SeekableReader(path) as r, pytest.raises(IntegrityError, match="seek table says"):
        r.read_at(0, 10)


def test_stream_bomb_is_stopped_with_little_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zst"
    bomb.write_bytes(rle_frame(1 << 30))
    script = textwrap.dedent(f"""
        from pipeline.bundle.seekable import stream_decompressor
        from pipeline.errors import IntegrityError
        out = 0
        with open({str(bomb)!r}, "rb") as f:
            s = stream_decompressor(f, max_output=8 << 20)
            try:
                while chunk := s.read(1 << 22):
                    out += len(chunk)
            except IntegrityError as e:
                print("refused", out, e)
        # VmHWM, not ru_maxrss: the latter keeps the peak of the process that forked us
        # (pytest, which may be large) across exec.
        with open("/proc/self/status") as status:
            print(next(l.split()[1] for l in status if l.startswith("VmHWM:")))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    lines = run.stdout.splitlines()
    assert lines[0].startswith("refused 8388608 ")
    assert "more than 8388608 bytes" in lines[0]
    assert int(lines[1]) < 150 * 1024  # KiB: a 1 GiB output was never held


# -- streaming -----------------------------------------------------------------------


def test_stream_reads_at_most_n_bytes_and_skips_skippable_frames() -> None:
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    a, b = sample(50_000, seed=7), sample(70_000, seed=8)
    skippable = struct.pack("<II", 0x184D2A50, 6) + b"ignore"
    stream = cctx.compress(a) + skippable + cctx.compress(b) + seek_table([(1, 1)])
    s = stream_decompressor(io.BytesIO(stream), max_output=len(a) + len(b))
    got = bytearray()
    while chunk := s.read(3000):
        assert len(chunk) <= 3000
        got += chunk
    assert bytes(got) == a + b


def test_stream_allows_exactly_max_output() -> None:
    data = sample(10_000)
    stream = zstandard.ZstdCompressor().compress(data)
    assert stream_decompressor(io.BytesIO(stream), max_output=len(data)).read() == data
    with pytest.raises(IntegrityError, match="more than 9999 bytes"):
        stream_decompressor(io.BytesIO(stream), max_output=len(data) - 1).read()


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"", "empty"),
        (zstandard.ZstdCompressor().compress(b"y" * 5000)[:-3], "truncated"),
        (struct.pack("<II", 0x184D2A5E, 100) + b"short", "truncated"),
        (b"not zstd at all", "no frame magic"),
        (zstandard.ZstdCompressor().compress(b"ok") + b"trailing junk", "no frame magic"),
    ],
    ids=["empty", "cut-frame", "cut-skippable", "garbage", "junk-after"],
)
def test_stream_refuses_damaged_input(stream: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        stream_decompressor(io.BytesIO(stream), max_output=None).read()


def test_stream_reads_a_seekable_archive_from_a_pipe(archive: tuple[Path, bytes]) -> None:
    path, data = archive
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        got = stream_decompressor(proc.stdout, max_output=SIZE).read()
    proc.wait()
    assert got == data


# -- writer failures -----------------------------------------------------------------


class FailingSink:
    def __init__(self, after: int) -> None:
        self.left = after

    def write(self, data: bytes) -> int:
        if self.left <= 0:
            raise OSError(28, "No space left on device")
        self.left -= 1
        return len(data)

    def flush(self) -> None:
        pass


def test_sink_error_is_raised_from_write_and_every_later_call() -> None:
    w = SeekableWriter(FailingSink(after=2), frame_size=FS, threads=2)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):
            w.write(sample(FS, seed=9))
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert len(w.frames) == 2


def test_worker_error_is_raised_from_close(monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenCompressor:
        def __init__(self, **_: object) -> None:
            pass

        def compress(self, data: bytes) -> bytes:
            raise zstandard.ZstdError("out of memory in the worker")

    monkeypatch.setattr(seekable.zstandard, "ZstdCompressor", BrokenCompressor)
    w = SeekableWriter(io.BytesIO(), frame_size=FS)
    w.write(b"abc")
    with pytest.raises(zstandard.ZstdError, match="out of memory in the worker"):
        w.close()


def test_aborted_writer_writes_no_seek_table() -> None:
    out = io.BytesIO()
    with pytest.raises(KeyError), SeekableWriter(out, frame_size=FS) as w:
        w.write(sample(3 * FS))
        raise KeyError("interrupted")
    assert not out.getvalue().endswith(struct.pack("<I", SEEKABLE_MAGIC))
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")


def test_writer_rejects_frames_readers_could_refuse() -> None:
    with pytest.raises(ValueError, match="frame_size"):
        SeekableWriter(io.BytesIO(), frame_size=64 << 20)
    with pytest.raises(ValueError, match="threads"):
        SeekableWriter(io.BytesIO(), threads=0)


def test_table_with_checksums_is_read(tmp_path: Path) -> None:
    """Files from other producers may carry per-frame checksums (Checksum_Flag): the
    table is still read, entries being 12 bytes."""
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    parts = [sample(1000, seed=10), sample(2000, seed=11)]
    frames = [cctx.compress(p) for p in parts]
    body = b"".join(struct.pack("<III", len(f), len(p), 0) for f, p in zip(frames, parts,
                                                                           strict=True))
    body += struct.pack("<IBI", 2, 0x80, 0x8F92EAB1)
    path = tmp_path / "sum.zst"
    path.write_bytes(b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(body)) + body)
    with SeekableReader(path) as r:
        assert r.total_size == 3000
        assert r.read_at(900, 200) == (parts[0] + parts[1])[900:1100]
