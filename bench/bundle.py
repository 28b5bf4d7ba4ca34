"""The ``bundle`` benchmark: ``bmsync bundle build|verify|inspect`` against tar + zstd.

Registered in ``bench.run.BENCHMARKS``; run it with ``python -m bench.run --only bundle``.
It uses the pull benchmark's store (``WORK/store``), pulling into it first, untimed, when
the pull benchmark did not run. In one run it measures:

- ``bmsync bundle build`` (zstd, the whole command: its warm pull, the archive, the fsync
  before the rename, the sidecars) against
  ``tar -I 'zstd -T0 -3' -cf OUT.tar.zst -C STORE blobs index.json oci-layout && sync OUT.tar.zst``
  over the same blobs: both fsync their archive. They alternate ``lab.repeat`` times,
  each from an empty output directory after ``sync``; the medians are compared.
- ``bmsync bundle build --compression xz`` once. xz runs at about 3 MB/s here (layers are
  already compressed), so a release of more than :data:`XZ_FULL_MAX_BYTES` of tar (the
  scale-1 set would take about 140 s) is measured on a subset of the images instead: the
  smallest images, together at most :data:`XZ_SUBSET_BYTES` of blobs; its MB/s is the
  figure to read, and the full set's time is projected from it.
- peak RSS of ``build`` and of ``verify`` (the whole archive, streamed), from ``wait4``.
- ``bmsync bundle inspect``: whole-process seconds, and how many bytes of the archive it
  read, three ways: counted by a wrapper that runs the same CLI with ``open`` patched to
  count the archive's reads; bounded by the zstd seek table (the compressed size of the
  frames that hold ``bundle.json``); and checked by inspecting a copy truncated right
  after those frames, which must still succeed.

The targets (build >= 1.0x tar + zstd, RSS < 150 MB, inspect < 0.3 s and at most the
first MiB read) are meant for a bundle of 1 GB or more: ``--scale 2`` (about 1.0 GB of
tar, 0.93 GiB; ``--scale 2.2`` for a full GiB). At scale 1 it takes about 40 s.
"""

from __future__ import annotations

import json
import lzma
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Lab, Row
    from tests.harness.images import SeededImage

RELEASE = "bench"  # the release name Lab.config writes
ZSTD_ARCHIVE = f"bmpackages_{RELEASE}.tar.zst"
XZ_ARCHIVE = f"bmpackages_{RELEASE}.tar.xz"
SIDECAR = f"bmpackages_{RELEASE}.bundle.json"

XZ_MBPS_HERE = 2.5
"""xz (preset 1) throughput on already-compressed layers measured on this machine, a
little rounded down; only used to decide whether the full set fits in the time budget."""
XZ_BUDGET_SECONDS = 90.0
XZ_FULL_MAX_BYTES = int(XZ_MBPS_HERE * 1e6 * XZ_BUDGET_SECONDS)
XZ_SUBSET_BYTES = 60_000_000

INSPECT_RUNS = 5
INSPECT_READ_TARGET = 1024 * 1024
RSS_TARGET = 150_000_000

_SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")  # Number_Of_Frames, Seek_Table_Descriptor, magic
_CHECKSUM_FLAG = 0x80
_BLOCK = 512

# argv: RESULT CMD...: runs CMD (stdio inherited) and writes "SECONDS MAXRSS_KIB EXITCODE"
# to RESULT. Timing starts at the fork, so the starter's own start-up is not counted.
_WAIT4 = r"""
import os, sys, time

started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - started
with open(sys.argv[1], "w") as f:
    f.write(f"{elapsed} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""

# Runs `bmsync bundle inspect ARCHIVE` in this interpreter with open() patched, and
# prints how many bytes were read from ARCHIVE's file descriptors (FileIO reads and any
# os.read/os.pread on them) to stderr. /proc/PID/io is no use here: its rchar counts
# every .py and .pyc the process imports, which dwarfs what inspect reads.
_COUNT_READS = r"""
import builtins, io, os, sys

target = os.path.realpath(sys.argv[1])
total = 0
fds = set()


class Counting(io.FileIO):
    def __init__(self, name):
        super().__init__(name, "rb")
        fds.add(self.fileno())

    def _count(self, n):
        global total
        total += n or 0
        return n

    def readinto(self, buffer):
        return self._count(super().readinto(buffer))

    def read(self, size=-1):
        data = super().read(size)
        self._count(len(data or b""))
        return data

    def readall(self):
        data = super().readall()
        self._count(len(data))
        return data

    def close(self):
        if not self.closed:
            fds.discard(self.fileno())
        super().close()


real_open, real_read, real_pread = io.open, os.read, os.pread


def counting_open(file, mode="r", *args, **kwargs):
    # Any binary read of the archive is counted, whatever buffering was asked for.
    if (isinstance(file, (str, os.PathLike)) and set(mode) <= set("rb") and "b" in mode
            and os.path.realpath(file) == target):
        return io.BufferedReader(Counting(file))
    return real_open(file, mode, *args, **kwargs)


def counting_read(fd, n):
    data = real_read(fd, n)
    if fd in fds:
        global total
        total += len(data)
    return data


def counting_pread(fd, n, offset):
    data = real_pread(fd, n, offset)
    if fd in fds:
        global total
        total += len(data)
    return data


builtins.open = io.open = counting_open
os.read, os.pread = counting_read, counting_pread

from pipeline.cli import main

code = main(["bundle", "inspect", sys.argv[1]])
sys.stdout.flush()
print(f"bench-bytes-read {total}", file=sys.stderr)
sys.exit(code)
"""


@dataclass(frozen=True)
class Measured:
    """One finished process: wall seconds, peak resident set of it and its children."""

    seconds: float
    peak_rss: int  # bytes
    returncode: int
    stdout: str
    stderr: str


def measure(cmd: list[str], *, check: bool = True) -> Measured:
    """Run ``cmd`` to completion and return its wall time and peak RSS.

    The command is started by :data:`_WAIT4`, a small interpreter that times it and takes
    its peak RSS from ``wait4``. Linux records the memory of the process that calls
    ``exec`` in the new program's peak, so a child forked straight from this benchmark
    (hundreds of MB after seeding) would report at least that much whatever it used;
    forked from the small starter, the floor is the starter's few MB. With ``check``, a
    non-zero exit ends the benchmark with the command's stderr.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".wait4") as result:
        subprocess.run([sys.executable, "-I", "-c", _WAIT4, result.name, *cmd],
                       stdout=out, stderr=err, check=True)
        seconds, rss_kib, code = result.read().split()
        out.seek(0)
        err.seek(0)
        done = Measured(float(seconds), int(rss_kib) * 1024, int(code),
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and done.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:4])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def seek_table(path: Path) -> list[tuple[int, int]]:
    """``(compressed, decompressed)`` sizes of every frame, read from the zstd seekable
    format's footer and table (contrib/seekable_format, version 0.1.0). Parsed here rather
    than with ``pipeline.bundle.seekable`` so the benchmark checks the format, not the code
    under test."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - _FOOTER.size)
        count, descriptor, magic = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic != _SEEKABLE_MAGIC:
            sys.exit(f"bench: {path} has no zstd seek table")
        entry = 12 if descriptor & _CHECKSUM_FLAG else 8
        f.seek(size - _FOOTER.size - count * entry)
        raw = f.read(count * entry)
    return [struct.unpack_from("<II", raw, i * entry) for i in range(count)]


def head_bound(frames: list[tuple[int, int]], tar_bytes: int) -> int:
    """Compressed bytes of the leading frames that hold the first ``tar_bytes`` of tar."""
    compressed = decompressed = 0
    for csize, dsize in frames:
        if decompressed >= tar_bytes:
            break
        compressed += csize
        decompressed += dsize
    return compressed


def decompressed_size(cmd: list[str]) -> int:
    """Bytes ``cmd`` writes to stdout (a decompressor), counted without keeping them."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    if proc.wait() != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode})")
    return total


def xz_tar_size(path: Path) -> int:
    with lzma.open(path) as f:
        total = 0
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def _fresh(path: Path) -> None:
    """Empty output directory, with the previous run's dirty pages written back first so
    they are not charged to the next timing."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _runs(times: list[float]) -> str:
    return "runs " + " ".join(f"{t:.2f}" for t in times)


def bench_bundle(lab: Lab) -> list[Row]:
    """Build (zstd vs tar + zstd, then xz), verify and inspect; see the module docstring.

    Rows, in order: bmsync build (zstd), tar + zstd, bmsync build (xz), verify, inspect.
    Their ``facts`` feed :func:`summary`.
    """
    from bench.run import BMSYNC, Row, _run

    work = lab.work
    config = lab.config(work / "images.yaml")
    store = work / "store"
    # Untimed: fills the store when the pull benchmark did not run, else a warm no-op.
    _run([BMSYNC, "-q", "pull", "--config", str(config), "--store", str(store)])

    out_bmsync = work / "bundle-bmsync"
    out_tar = work / "bundle-tar"
    tar_archive = out_tar / "store.tar.zst"
    tar_cmd = (
        f"tar -I 'zstd -T0 -3' -cf {shlex.quote(str(tar_archive))}"
        f" -C {shlex.quote(str(store))} blobs index.json oci-layout"
        f" && sync {shlex.quote(str(tar_archive))}"
    )
    # --json: its "seconds" is the archive writing alone (plan, stream, fsync, rename,
    # sidecars), without start-up and the warm pull that checks the release's tags.
    build_cmd = [BMSYNC, "-q", "bundle", "build", "--config", str(config),
                 "--store", str(store), "--out", str(out_bmsync), "--json"]

    build: list[Measured] = []
    peer: list[Measured] = []
    requests = 0
    for _ in range(lab.repeat):
        _fresh(out_bmsync)
        mark = lab.registry.mark()
        build.append(measure(build_cmd))
        requests = len(lab.registry.since(mark))
        _fresh(out_tar)
        peer.append(measure(["sh", "-c", tar_cmd]))

    archive = out_bmsync / ZSTD_ARCHIVE
    frames = seek_table(archive)
    tar_bytes = sum(d for _, d in frames)
    archive_bytes = archive.stat().st_size
    peer_tar_bytes = decompressed_size(["zstd", "-dcq", str(tar_archive)])
    peer_archive_bytes = tar_archive.stat().st_size
    sidecar = (out_bmsync / SIDECAR).read_bytes()

    build_s = statistics.median(m.seconds for m in build)
    write_times = [json.loads(m.stdout)["seconds"] for m in build]
    write_s = statistics.median(write_times)
    peer_s = statistics.median(m.seconds for m in peer)
    build_rss = max(m.peak_rss for m in build)
    rows = [
        Row("bmsync bundle build (zstd)", build_s, tar_bytes, requests,
            f"{_runs([m.seconds for m in build])}; writing alone {_runs(write_times)};"
            f" {_mb(archive_bytes)} archive; RSS {_mb(build_rss)}",
            facts={"archive": archive_bytes, "rss": build_rss, "write": write_s}),
        Row("tar -I 'zstd -T0 -3' + sync", peer_s, peer_tar_bytes, None,
            f"{_runs([m.seconds for m in peer])}; {_mb(peer_archive_bytes)} archive;"
            f" RSS {_mb(max(m.peak_rss for m in peer))}"),
    ]
    rows.append(_bench_xz(lab, sidecar, tar_bytes))

    verify = [measure([BMSYNC, "-q", "bundle", "verify", str(archive)])
              for _ in range(lab.repeat)]
    verify_rss = max(m.peak_rss for m in verify)
    rows.append(Row("bmsync bundle verify (zstd)", statistics.median(m.seconds for m in verify),
                    tar_bytes, None,
                    f"{_runs([m.seconds for m in verify])}; RSS {_mb(verify_rss)}",
                    facts={"rss": verify_rss}))
    rows.append(_bench_inspect(work, archive, frames, len(sidecar)))
    return rows


def _bench_xz(lab: Lab, sidecar: bytes, tar_bytes: int) -> Row:
    """The xz build, once: the whole release when it fits the time budget, else a subset."""
    from bench.run import BMSYNC, Row

    images = lab.images
    subset = tar_bytes > XZ_FULL_MAX_BYTES
    if subset:
        images = _smallest_images(lab, json.loads(sidecar))
    config = lab.config(lab.work / "images-xz.yaml", images)
    out = lab.work / "bundle-xz"
    _fresh(out)
    done = measure([BMSYNC, "-q", "bundle", "build", "--config", str(config),
                    "--store", str(lab.work / "store"), "--out", str(out),
                    "--compression", "xz"])
    archive = out / XZ_ARCHIVE
    xz_tar = xz_tar_size(archive)
    rate = xz_tar / done.seconds
    name = "bmsync bundle build (xz)"
    note = f"once; {_mb(archive.stat().st_size)} archive; RSS {_mb(done.peak_rss)}"
    facts: dict[str, float] = {"subset": float(subset), "images": len(images)}
    if subset:
        name = "bmsync bundle build (xz, subset)"
        projected = tar_bytes / rate
        note += (f"; {len(images)} of {_images(len(lab.images))}; the full set would take"
                 f" ~{projected:.0f} s at this rate")
        facts["projected"] = projected
    return Row(name, done.seconds, xz_tar, None, note, facts=facts)


def _smallest_images(lab: Lab, manifest: dict[str, Any]) -> list[SeededImage]:
    """The smallest images whose blobs together stay under :data:`XZ_SUBSET_BYTES`
    (counting shared blobs once), from the release's ``bundle.json``; at least one."""
    blob_sizes: dict[str, int] = {d: int(b["size"]) for d, b in manifest["blobs"].items()}
    needs: dict[str, set[str]] = {i["source"]: set(i["blobs"]) for i in manifest["images"]}

    def blobs_of(img: SeededImage) -> set[str]:
        return needs[f"gcr.io/{img.reference}"]

    chosen: list[SeededImage] = []
    held: set[str] = set()
    for img in sorted(lab.images, key=lambda i: sum(blob_sizes[d] for d in blobs_of(i))):
        more = held | blobs_of(img)
        if chosen and sum(blob_sizes[d] for d in more) > XZ_SUBSET_BYTES:
            break
        chosen.append(img)
        held = more
    return chosen


def _bench_inspect(work: Path, archive: Path, frames: list[tuple[int, int]],
                   manifest_size: int) -> Row:
    """Inspect's time, the archive bytes it reads, the seek-table bound and the truncated
    copy check."""
    from bench.run import BMSYNC, Row

    cmd = [BMSYNC, "bundle", "inspect", str(archive)]
    runs = [measure(cmd).seconds for _ in range(INSPECT_RUNS)]

    counted = measure([sys.executable, "-c", _COUNT_READS, str(archive)])
    marks = [ln for ln in counted.stderr.splitlines() if ln.startswith("bench-bytes-read ")]
    read = int(marks[-1].split()[1]) if marks else -1

    # bundle.json is the first member: its header block and its data padded to a block.
    head = _BLOCK + -(-manifest_size // _BLOCK) * _BLOCK
    bound = head_bound(frames, head)
    truncated = work / "inspect-truncated" / archive.name
    truncated.parent.mkdir(parents=True, exist_ok=True)
    with open(archive, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(bound))
    check = measure([BMSYNC, "bundle", "inspect", str(truncated)], check=False)
    truncated_ok = check.returncode == 0 and f"bundle      {RELEASE} " in check.stdout
    note = (f"{_runs(runs)}; read {read} B of the archive; bundle.json's frames:"
            f" {bound} B; truncated copy: {'OK' if truncated_ok else 'FAILED'}")
    if not truncated_ok:
        note += f" ({check.stderr.strip()[-200:]})"
    return Row("bmsync bundle inspect (zstd)", statistics.median(runs), 0, None, note,
               facts={"read": read, "bound": bound, "truncated_ok": float(truncated_ok),
                      "archive": archive.stat().st_size})


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def summary(rows: list[Row]) -> list[str]:
    """The ratio and target lines printed under the bundle table."""
    build, peer, xz, verify, inspect = rows
    size = build.facts["archive"]
    bundle = f"{size / 1e6:.0f} MB ({size / 2**30:.2f} GiB) bundle"
    write = build.facts["write"]
    ratio = peer.seconds / write
    lines = [
        f"bundle: {build.nbytes / 1e6:.1f} MB of tar -> {bundle}",
        f"bundle build, writing the archive (fsynced): bmsync is {ratio:.2f}x tar + zstd -T0 -3"
        f" + sync ({peer.seconds:.2f} s vs {write:.2f} s; target >= 1.0x:"
        f" {_verdict(ratio >= 1.0)})",
        f"bundle build, whole command (start-up and the warm pull of {build.requests}"
        f" requests included): {peer.seconds / build.seconds:.2f}x ({build.seconds:.2f} s)",
    ]
    if xz.facts["subset"]:
        lines.append(
            f"xz: {xz.mbps:.1f} MB/s on a subset of {_images(int(xz.facts['images']))}"
            f" ({xz.nbytes / 1e6:.0f} MB of tar in"
            f" {xz.seconds:.1f} s); the full release would take ~{xz.facts['projected']:.0f} s,"
            f" {xz.facts['projected'] / build.seconds:.0f}x the zstd build"
        )
    else:
        lines.append(f"xz: {xz.seconds:.1f} s for the full release ({xz.mbps:.1f} MB/s),"
                     f" {xz.seconds / build.seconds:.0f}x the zstd build")
    build_rss, verify_rss = build.facts["rss"], verify.facts["rss"]
    lines.append(
        f"peak RSS on a {bundle}: build {build_rss / 1e6:.0f} MB, verify"
        f" {verify_rss / 1e6:.0f} MB (target < {RSS_TARGET / 1e6:.0f} MB:"
        f" {_verdict(max(build_rss, verify_rss) < RSS_TARGET)})"
    )
    read, bound = int(inspect.facts["read"]), int(inspect.facts["bound"])
    truncated = "inspects OK" if inspect.facts["truncated_ok"] else "FAILS to inspect"
    # 0 means the wrapper saw no read at all: inspect read the file some other way.
    counted = (f"read {read} bytes of it (target <= 1 MiB:"
               f" {_verdict(read <= INSPECT_READ_TARGET)})" if read > 0
               else "bytes read not counted (no read went through open())")
    lines.append(
        f"inspect on a {bundle}: {inspect.seconds:.2f} s (target < 0.3 s:"
        f" {_verdict(inspect.seconds < 0.3)}); {counted}; bundle.json's frames end at"
        f" byte {bound}, and a copy cut there {truncated}"
    )
    return lines
