"""Hostile bundle archives against the real ``bmsync bundle verify`` and ``extract``.

Every archive here is a tiny good bundle written by bmsync, taken apart and put back
together with one attack in it (DESIGN.md §5: "reading never trusts the archive").
For each one, both commands must:

- exit non-zero with exactly one line on stderr, ``bmsync: error: ...``, naming the
  member or digest at fault and the problem (no traceback, nothing on stdout);
- leave no ``DEST`` and no ``.DEST.partial-*`` behind, and leave the directory beside
  ``DEST`` (a SENTINEL the path attacks aim at) and the archive's own directory exactly
  as they were: same names, types, modes and content hashes;
- peak below 200 MB of resident memory, bombs and huge zstd windows included.

Peak RSS is measured per run: a fresh python process runs the command through
:func:`tests.cli.bmsync` and prints its own ``RUSAGE_CHILDREN`` ``ru_maxrss``, which is
the peak of its one child, bmsync. Two simpler ways are wrong here:
``RUSAGE_CHILDREN`` of pytest itself is the largest child of the whole session
(registries, skopeo), not this one; and a child spawned by pytest (or by a fork of it)
starts its count from its parent's peak (Linux records the old address space's
high-water mark at exec, and ``subprocess`` may vfork), so pytest's own memory would be
charged to bmsync. The fresh interpreter's ~20 MB stays below bmsync's own baseline.

Each sidecar ``.sha256`` is rewritten to match the hostile archive (anyone can recompute
a checksum), so that the check under test is the one that fires; one case keeps a
sidecar that does not match.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import os
import re
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bundles import (
    BLOCKDEV,
    CHARDEV,
    FIFO,
    HARDLINK,
    SYMLINK,
    GoodBundle,
    blob_name,
    build_bundle,
    compress,
    digest_of,
    manifest_bytes,
    member,
    tar,
    with_offsets,
    write_archive,
    zero_bomb_frame,
    zstd_frame,
)
from tests.cli import ROOT, Run

RSS_LIMIT = 200 * 10**6
TIMEOUT = 60
GiB = 1 << 30
PWNED = b"written by a hostile archive\n"
ARCHIVE = "bmpackages_1.0.tar.zst"


@dataclass(frozen=True)
class Site:
    """Where one test runs: the archive in ``inbox``; ``dest`` (absent) and ``sentinel``
    (a directory with files) side by side in ``out``."""

    inbox: Path
    out: Path
    sentinel: Path
    dest: Path

    @property
    def archive(self) -> Path:
        return self.inbox / ARCHIVE


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[GoodBundle, Site], Path]  # writes the hostile archive, returns it
    message: str  # regex the error line must match (after "bmsync: error: ")
    exit_code: int = 6  # IntegrityError


# -- building hostile archives ----------------------------------------------------------

def meta(g: GoodBundle) -> list[tuple[str, bytes]]:
    """bundle.json, oci-layout, index.json."""
    return list(g.members[:3])


def blobs(g: GoodBundle) -> list[tuple[str, bytes]]:
    """The blob members, in archive order."""
    return list(g.members[3:])


def first_blob(g: GoodBundle) -> tuple[str, bytes]:
    return g.members[3]


def digest(name: str) -> str:
    return "sha256:" + name.rsplit("/", 1)[1]


def archive(site: Site, members: list[Any], *, end: bool = True) -> Path:
    return write_archive(site.archive, compress(tar(members, end=end)))


def with_manifest(g: GoodBundle, manifest: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The good members with another bundle.json."""
    return [("bundle.json", manifest_bytes(manifest)), *g.members[1:]]


def before_blobs(extra: bytes) -> Callable[[GoodBundle, Site], Path]:
    """An archive with one more member between index.json and the first blob."""
    return lambda g, s: archive(s, [*meta(g), extra, *blobs(g)])


def instead_of_first_blob(**fields: Any) -> Callable[[GoodBundle, Site], Path]:
    """An archive whose first blob is replaced by a member with these header fields,
    under the same name (so a reader that only checks names would take it)."""

    def make(g: GoodBundle, s: Site) -> Path:
        name, data = first_blob(g)
        hostile = member(name, **{"data": data, **fields})
        return archive(s, [*meta(g), hostile, *blobs(g)[1:]])

    return make


def absolute_name(g: GoodBundle, s: Site) -> Path:
    return archive(s, [*meta(g), member(str(s.sentinel / "pwned"), PWNED), *blobs(g)])


def nul_in_name(g: GoodBundle, s: Site) -> Path:
    # A reader that stops at the NUL sees the first blob's name.
    name, data = first_blob(g)
    hidden = name.encode() + b"\0../../../sentinel/pwned"
    return archive(s, [*meta(g), member(hidden, data), *blobs(g)[1:]])


def setuid_bundle_json(g: GoodBundle, s: Site) -> Path:
    name, data = g.members[0]
    return archive(s, [member(name, data, mode=0o4755), *g.members[1:]])


def duplicate_blob(g: GoodBundle, s: Site) -> Path:
    return archive(s, [*meta(g), first_blob(g), *blobs(g)])


def second_bundle_json(g: GoodBundle, s: Site) -> Path:
    # Tools that let the last of two same-named members win would take this one.
    forged = copy.deepcopy(g.manifest)
    forged["version"] = "6.6.6"
    return archive(s, [*meta(g), ("bundle.json", manifest_bytes(forged)), *blobs(g)])


def larger_than_declared(g: GoodBundle, s: Site) -> Path:
    name, data = first_blob(g)
    return archive(s, [*meta(g), (name, data + b"\0" * 1000), *blobs(g)[1:]])


def oversized_bundle_json(g: GoodBundle, s: Site) -> Path:
    # The header claims 8 GiB of bundle.json; 1 GiB of zeros follows, in 32 KiB of zstd.
    header = member("bundle.json", size=8 * GiB)
    frames = zstd_frame(header) + zero_bomb_frame(GiB)
    return write_archive(s.archive, frames)


def huge_window_first_frame(g: GoodBundle, s: Site) -> Path:
    data = tar(g.members)
    return write_archive(s.archive, zstd_frame(data, window_log=31))


def huge_window_blob_frame(g: GoodBundle, s: Site) -> Path:
    # The last blob in a frame of its own, after the big layer (300 kB of zstd), so the
    # reader meets it mid-archive rather than while it reads bundle.json.
    head, rest = tar(g.members[:-1], end=False), tar(g.members[-1:])
    return write_archive(s.archive, zstd_frame(head) + zstd_frame(rest, window_log=31))


def bomb_after_end(g: GoodBundle, s: Site) -> Path:
    # Zeros after the end-of-archive blocks look like tar record padding: 4 GiB of them.
    return write_archive(s.archive, zstd_frame(tar(g.members)) + zero_bomb_frame(4 * GiB))


def xz_bomb_after_end(g: GoodBundle, s: Site) -> Path:
    # The same in one .tar.xz stream: 128 MiB of zeros (20 kB of xz) after the tar.
    xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
    parts = [xz.compress(tar(g.members))]
    zeros = bytes(1 << 20)
    parts += [xz.compress(zeros) for _ in range(128)]
    parts.append(xz.flush())
    return write_archive(s.inbox / "bmpackages_1.0.tar.xz", b"".join(parts))


def blob_bytes_mismatch(g: GoodBundle, s: Site) -> Path:
    name, data = first_blob(g)
    i = len(data) // 2
    flipped = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    return archive(s, [*meta(g), (name, flipped), *blobs(g)[1:]])


def truncated_mid_frame(g: GoodBundle, s: Site) -> Path:
    good = g.archive.read_bytes()
    return write_archive(s.archive, good[: len(good) // 2])


def truncated_between_members(g: GoodBundle, s: Site) -> Path:
    # A complete zstd stream whose tar stops after the second blob.
    return archive(s, [*meta(g), *blobs(g)[:2]], end=False)


def tampered_digest(g: GoodBundle, s: Site) -> Path:
    old = digest(first_blob(g)[0])
    new = digest_of(b"another layer")
    text = manifest_bytes(g.manifest).decode().replace(old, new)
    return archive(s, [("bundle.json", text.encode()), *g.members[1:]])


def tampered_size(g: GoodBundle, s: Site) -> Path:
    m = copy.deepcopy(g.manifest)
    m["blobs"][digest(first_blob(g)[0])]["size"] += 1
    with_offsets(m, [digest(n) for n, _ in blobs(g)])
    return archive(s, with_manifest(g, m))


def image_blob_list_edited(g: GoodBundle, s: Site) -> Path:
    m = copy.deepcopy(g.manifest)
    m["images"][0]["blobs"].remove(g.layers[0])
    return archive(s, with_manifest(g, m))


def layer_dropped_everywhere(g: GoodBundle, s: Site) -> Path:
    # A consistent bundle.json and archive without one layer the image manifest needs.
    layer = g.layers[0]
    m = copy.deepcopy(g.manifest)
    m["images"][0]["blobs"].remove(layer)
    m["images"][0]["size"] -= m["blobs"].pop(layer)["size"]
    kept = [(n, d) for n, d in blobs(g) if digest(n) != layer]
    with_offsets(m, [digest(n) for n, _ in kept])
    return archive(s, [("bundle.json", manifest_bytes(m)), *g.members[1:3], *kept])


def undeclared_blob_added(g: GoodBundle, s: Site) -> Path:
    extra = b"a blob bundle.json does not list"
    return archive(s, [*g.members, (blob_name(digest_of(extra)), extra)])


def foreign_file_added(g: GoodBundle, s: Site) -> Path:
    return archive(s, [*g.members, ("evil.sh", b"#!/bin/sh\nrm -rf ~\n")])


def first_blob_removed(g: GoodBundle, s: Site) -> Path:
    return archive(s, [*meta(g), *blobs(g)[1:]])


def last_blob_removed(g: GoodBundle, s: Site) -> Path:
    return archive(s, [*meta(g), *blobs(g)[:-1]])


def foreign_tar_xz(g: GoodBundle, s: Site) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        for name, data in (("images/", None), ("images/foo.tar", b"x" * 2000)):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return write_archive(s.inbox / "bmpackages_1.0.tar.xz", buf.getvalue())


def sidecar_mismatch(g: GoodBundle, s: Site) -> Path:
    path = write_archive(s.archive, g.archive.read_bytes())
    other = hashlib.sha256(b"something else").hexdigest()
    (s.inbox / f"{ARCHIVE}.sha256").write_text(f"{other}  {ARCHIVE}\n")
    return path


def deeply_nested_bundle_json(g: GoodBundle, s: Site) -> Path:
    return archive(s, [("bundle.json", b"[" * 200_000), *g.members[1:]])


def huge_bundle_json_list(g: GoodBundle, s: Site) -> Path:
    # 60 MB of JSON (under bmsync's 64 MiB bound) that parses into 30 million items.
    return archive(s, [("bundle.json", b"[" + b"0," * 30_000_000 + b"0]"), *g.members[1:]])


# Messages are regexes over the one error line, in which {first} and {second} stand for
# the names of the first two blob members, {first_digest} and {last_digest} for the
# digests of the first and last blobs, and {layer} for the digest of the image's first
# layer (the 300 kB one).
CASES = [
    Case("dotdot-name", before_blobs(member("../sentinel/pwned", PWNED)),
         r"member '\.\./sentinel/pwned' at offset \d+: '\.\.' component in name"),
    Case("dotdot-inside-blob-path",
         before_blobs(member("blobs/sha256/../../../sentinel/pwned", PWNED)),
         r"member 'blobs/sha256/\.\./\.\./\.\./sentinel/pwned' at offset \d+: '\.\.' component"),
    Case("absolute-name", absolute_name,
         r"member '/.*/sentinel/pwned' at offset \d+: absolute name"),
    Case("backslash-name", before_blobs(member("..\\sentinel\\pwned", PWNED)),
         r"member '\.\.\\\\sentinel\\\\pwned' at offset \d+: backslash in name"),
    Case("nul-in-name", nul_in_name,
         r"member '{first}\\x00\.\./\.\./\.\./sentinel/pwned' at offset \d+: NUL byte"),
    Case("symlink", instead_of_first_blob(typeflag=SYMLINK, data=b"",
                                          linkname="../../../sentinel/keep.txt"),
         r"member '{first}' at offset \d+: symbolic link .*not allowed"),
    Case("hardlink", instead_of_first_blob(typeflag=HARDLINK, data=b"",
                                           linkname="../sentinel/keep.txt"),
         r"member '{first}' at offset \d+: hard link .*not allowed"),
    Case("char-device", instead_of_first_blob(typeflag=CHARDEV, data=b"", device=(1, 3)),
         r"member '{first}' at offset \d+: character device .*not allowed"),
    Case("block-device", instead_of_first_blob(typeflag=BLOCKDEV, data=b"", device=(8, 0)),
         r"member '{first}' at offset \d+: block device .*not allowed"),
    Case("fifo", instead_of_first_blob(typeflag=FIFO, data=b""),
         r"member '{first}' at offset \d+: FIFO .*not allowed"),
    Case("setuid-blob", instead_of_first_blob(mode=0o4755),
         r"member '{first}' at offset \d+: setuid bit set"),
    Case("setuid-bundle-json", setuid_bundle_json,
         r"member 'bundle\.json' at offset 0: setuid bit set"),
    Case("duplicate-blob", duplicate_blob,
         r"member '{first}' at offset \d+: duplicate name"),
    Case("duplicate-bundle-json", second_bundle_json,
         r"member 'bundle\.json' at offset \d+: duplicate name"),
    Case("member-larger-than-declared", larger_than_declared,
         r"member '{first}' at offset \d+: size \d+ exceeds the \d+ bytes allowed"),
    Case("oversized-bundle-json", oversized_bundle_json,
         r"member 'bundle\.json' at offset 0: size 8589934592 exceeds the \d+ bytes allowed"),
    Case("huge-window-first-frame", huge_window_first_frame,
         r"frame at byte \d+ asks for a 2147483648-byte window"),
    Case("huge-window-blob-frame", huge_window_blob_frame,
         r"frame at byte \d+ asks for a 2147483648-byte window"),
    Case("bomb-after-end-of-archive", bomb_after_end,
         r"bmpackages_1\.0\.tar\.zst: decompresses to more than the \d+ bytes its bundle\.json"
         r" declares"),
    Case("xz-bomb-after-end-of-archive", xz_bomb_after_end,
         r"bmpackages_1\.0\.tar\.xz: decompresses to more than the \d+ bytes"),
    Case("blob-bytes-mismatch", blob_bytes_mismatch,
         r"blob {first_digest} holds content hashing to sha256:[0-9a-f]{{64}}"),
    Case("truncated-mid-frame", truncated_mid_frame,
         r"zstd stream is truncated: it ends inside a frame|truncated archive"),
    Case("truncated-between-members", truncated_between_members,
         r"truncated archive: (stream ends at byte \d+ without the end-of-archive blocks"
         r"|blob {last_digest} is missing)"),
    Case("bundle-json-digest-changed", tampered_digest,
         r"member '{first}' where bundle\.json has blob sha256:[0-9a-f]{{64}}"),
    Case("bundle-json-size-changed", tampered_size,
         r"blob {first_digest} is not where bundle\.json says"),
    Case("bundle-json-image-blob-list-edited", image_blob_list_edited,
         r"{layer}"),
    Case("layer-dropped-from-bundle-json-and-archive", layer_dropped_everywhere,
         r"{layer}"),
    Case("member-added-undeclared-blob", undeclared_blob_added,
         r"member 'blobs/sha256/[0-9a-f]{{64}}' is not declared in bundle\.json"),
    Case("member-added-foreign-file", foreign_file_added,
         r"unexpected member 'evil\.sh' at offset \d+"),
    Case("member-removed-first-blob", first_blob_removed,
         # The member found where the first blob belongs is named, with whichever of its
         # name or size is checked first.
         r"member '{second}' (where bundle\.json has blob {first_digest}|at offset \d+: size"
         r" \d+ exceeds the \d+ bytes allowed)"),
    Case("member-removed-last-blob", last_blob_removed,
         r"blob {last_digest} is missing"),
    Case("foreign-tar-xz", foreign_tar_xz,
         r"bmpackages_1\.0\.tar\.xz is not a bmsync bundle: its first member is 'images/?'",
         exit_code=2),
    Case("sidecar-sha256-mismatch", sidecar_mismatch,
         r"sha256 [0-9a-f]{{64}} does not match [0-9a-f]{{64}} in .*\.sha256"),
    Case("bundle-json-deeply-nested", deeply_nested_bundle_json, r"bundle\.json"),
    Case("bundle-json-huge-list", huge_bundle_json_list, r"bundle\.json"),
]



def expected_message(case: Case, g: GoodBundle) -> str:
    names = [n for n, _ in blobs(g)]
    return case.message.format(
        first=re.escape(names[0]),
        second=re.escape(names[1]),
        first_digest=re.escape(digest(names[0])),
        last_digest=re.escape(digest(names[-1])),
        layer=re.escape(g.layers[0]),
    )


# -- running and observing ----------------------------------------------------------------

# Runs in a fresh interpreter (cwd: the repository, so ``tests`` imports): the command,
# then the peak RSS of its one child, bmsync.
_MEASURE = """
import dataclasses, json, resource, sys
from tests.cli import bmsync
run = bmsync(*json.loads(sys.argv[1]), timeout=float(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"run": dataclasses.asdict(run), "peak": peak}))
"""


def run_measured(*args: str) -> tuple[Run, int]:
    """Run ``bmsync ARGS`` through :func:`tests.cli.bmsync`; returns the run and the peak
    RSS of the bmsync process in bytes (see the module docstring for how)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(args), str(TIMEOUT)],
        capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT + 30, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    return Run(**report["run"]), report["peak"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its type, mode and (files) sha256; links unfollowed."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            what = stat.filemode(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                what += " " + hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what += " -> " + os.readlink(path)
            seen[str(path.relative_to(root))] = what
    return seen


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> GoodBundle:
    return build_bundle(tmp_path_factory.mktemp("good-bundle"))


@pytest.fixture
def site(tmp: Path) -> Site:
    out = tmp / "out"
    sentinel = out / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "keep.txt").write_text("the sentinel's own file\n")
    (sentinel / "sub" / "data.bin").write_bytes(bytes(range(256)))
    os.chmod(sentinel / "sub" / "data.bin", 0o600)
    inbox = tmp / "in"
    inbox.mkdir()
    return Site(inbox=inbox, out=out, sentinel=sentinel, dest=out / "dest")


def command_args(command: str, archive: Path, site: Site) -> list[str]:
    if command == "verify":
        return ["bundle", "verify", str(archive)]
    return ["bundle", "extract", str(archive), "--to", str(site.dest)]


# -- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["verify", "extract"])
def test_good_archive_rebuilt_by_these_helpers_is_accepted(
    command: str, good: GoodBundle, site: Site
) -> None:
    """The control: taking the good archive apart and putting it back together without
    an attack passes, so each refusal below is the attack's doing."""
    path = archive(site, list(good.members))
    run, peak = run_measured(*command_args(command, path, site))
    assert run.code == 0, run.output
    assert peak < RSS_LIMIT
    if command == "extract":
        layout = site.dest / "blobs" / "sha256"
        assert sorted(p.name for p in layout.iterdir()) == sorted(
            digest(n).split(":")[1] for n, _ in blobs(good)
        )
        for name, data in blobs(good):
            assert (site.dest / name).read_bytes() == data


@pytest.mark.parametrize(
    ("case", "command"),
    [
        pytest.param(case, command, id=f"{case.id}-{command}")
        for case in CASES
        for command in ("verify", "extract")
    ],
)
def test_hostile_archive_is_refused_cleanly(
    case: Case, command: str, good: GoodBundle, site: Site, tmp: Path
) -> None:
    path = case.make(good, site)
    before = snapshot(tmp)

    run, peak = run_measured(*command_args(command, path, site))

    lines = run.stderr.splitlines()
    assert run.code != 0, f"accepted: {run.output}"
    assert "Traceback" not in run.output, run.output
    assert len(lines) == 1 and lines[0].startswith("bmsync: error: "), run.stderr
    assert run.stdout == ""
    assert re.search(expected_message(case, good), lines[0]), lines[0]
    assert run.code == case.exit_code, lines[0]
    assert not site.dest.exists()
    assert not [p.name for p in site.out.iterdir() if p.name.startswith(".dest.partial-")]
    assert snapshot(tmp) == before
    assert peak < RSS_LIMIT, f"peak RSS {peak / 1e6:.0f} MB"
