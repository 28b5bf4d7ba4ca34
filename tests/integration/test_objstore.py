"""`bmsync publish|fetch|catalog|prune` through a real SeaweedFS S3 and through file://.

Every behaviour that applies to both backends runs against both (the ``backend``
fixture). The tests read the storage with their own eyes, never with bmsync's
object-store code: the harness's boto3 client for S3 (signed with the server's keys),
the file system for file://. The CLI runs as a separate process, as an operator or a
timer runs it, and is killed with SIGKILL where the issue asks what an interrupted run
leaves behind.

Archives are written by bmsync's own bundle writer from stores the tests fill with
random layers: one archive of over 100 MB (so S3 takes the multipart path in parts of
PART_SIZE), and small ones for layout, races, corruption and pruning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from pipeline.bundle.delta import load_base
from pipeline.bundle.writer import plan_bundle, write_bundle
from pipeline.objstore import PART_SIZE, RANGE_SIZE
from pipeline.store import Store
from tests.cli import ROOT, Run, bmsync
from tests.harness import S3Server

MIB = 1024 * 1024
BIG_LAYER = 101 * MIB  # the archive lands just over 100 MiB, several parts
EPOCH = 1_700_000_000  # bundle "created" times: EPOCH + day * 86400, so order is known
DAY = 86_400
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Layers are random bytes that nothing here unpacks; the uncompressed media type says so.
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CATALOG = "catalog.json"
IMAGES = tuple(f"gcr.io/bmsync-test/{name}:1" for name in ("alpha", "beta", "gamma", "delta"))
BIG_IMAGE = "gcr.io/bmsync-test/big:1"
# How long a killed-run test may wait for the moment to kill.
KILL_WINDOW = 60.0


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- archives -------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """An archive bmsync's writer made, and what the tests compare against."""

    version: str
    archive: Path  # the archive (for a split one: the joined stream's name, not on disk)
    files: tuple[Path, ...]  # what is on disk: the archive, or its parts in order
    sha256: str  # of the (joined) archive
    size: int
    created: str
    sidecar: Path  # bmpackages_<v>.tar.zst.sha256
    manifest: Path  # bmpackages_<v>.bundle.json

    @property
    def name(self) -> str:
        return self.archive.name

    def keys(self) -> set[str]:
        """The object keys (relative to the prefix) a publish of this archive writes."""
        return {f"{self.version}/{p.name}" for p in (*self.files, self.sidecar, self.manifest)}


def add_image(store: Store, ref: str, layer_sizes: Sequence[int], *, shared: int = 0) -> None:
    """Put image ``ref`` in ``store``: random layers of ``layer_sizes`` bytes (seeded by the
    ref, so reruns give the same bytes), preceded by a layer of ``shared`` bytes that
    every image given the same size has in common."""
    rnd = random.Random(ref)
    layers = [store.write_blob(random.Random("shared").randbytes(shared))] if shared else []
    layers += [store.write_blob(rnd.randbytes(n)) for n in layer_sizes]
    config = store.write_blob(json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Labels": {"ref": ref}},
         "rootfs": {"type": "layers", "diff_ids": []}}, sort_keys=True).encode())

    def descriptor(media_type: str, digest: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": digest,
                "size": store.blob_path(digest).stat().st_size}

    manifest = store.write_blob(json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, d) for d in layers],
    }, sort_keys=True).encode())
    store.add_image(ref, descriptor(OCI_MANIFEST, manifest))


def build(store: Store, refs: Sequence[str], out: Path, version: str, *, day: int,
          base: Built | None = None, split_size: int | None = None, level: int = 3) -> Built:
    """Write ``bmpackages_<version>`` of ``refs`` into ``out/<version>/`` (a delta of
    ``base`` when given), created ``day`` days after EPOCH."""
    plan = plan_bundle(store, refs, version=version, created=EPOCH + day * DAY,
                       base=load_base(base.manifest) if base else None)
    result = write_bundle(store, plan, out / version, split_size=split_size, level=level,
                          threads=2)
    return Built(version, result.archive, tuple(result.parts), result.sha256, result.size,
                 result.manifest.created, result.sidecar_sha256, result.sidecar_manifest)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store with four small images sharing a base layer (so deltas leave it out)."""
    store = Store(tmp_path_factory.mktemp("images") / "store")
    for ref in IMAGES:
        add_image(store, ref, (300_000, 2_000), shared=200_000)
    return store


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """An archive of over 100 MB: one image with a 101 MiB random (incompressible) layer."""
    root = tmp_path_factory.mktemp("big")
    store = Store(root / "store")
    add_image(store, BIG_IMAGE, (BIG_LAYER,))
    built = build(store, [BIG_IMAGE], root / "out", "big", day=0, level=1)
    assert built.size >= 100 * 1000 * 1000
    return built


@pytest.fixture
def small(images: Store, tmp_path: Path) -> Callable[..., Built]:
    """``small(version, day=0, refs=IMAGES[:1], base=None, split_size=None, out=...)``:
    a new small archive in ``out/<version>/`` under this test's own directory."""
    def make(version: str, *, day: int = 0, refs: Sequence[str] = IMAGES[:1],
             base: Built | None = None, split_size: int | None = None,
             out: str = "archives") -> Built:
        return build(images, refs, tmp_path / out, version, day=day, base=base,
                     split_size=split_size)

    return make


# -- backends -------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectState:
    """What changes when an object is written again, even with the same bytes."""

    size: int
    stamp: str


class Backend(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def env(self) -> Mapping[str, str]: ...

    def objects(self) -> dict[str, ObjectState]:
        """Every object under the URL, by key relative to it."""

    def read(self, key: str) -> bytes | None: ...

    def sha256(self, key: str) -> str: ...

    def delete(self, key: str) -> None: ...

    def corrupt(self, key: str) -> None:
        """Flip one byte in the middle of the stored object, keeping its size."""

    def unfinished(self) -> list[str]:
        """Unfinished uploads under the URL: multipart uploads (S3), partial files (file)."""


@dataclass(frozen=True)
class S3Backend:
    server: S3Server
    bucket: str
    prefix: str
    kind: str = "s3"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def env(self) -> Mapping[str, str]:
        return self.server.env()

    @property
    def client(self) -> Any:
        return self.server.client()

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def objects(self) -> dict[str, ObjectState]:
        found: dict[str, ObjectState] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/")
        for page in pages:
            for o in page.get("Contents", []):
                # LastModified has a resolution of one second: a test that must see a
                # rewrite of identical bytes waits a second first.
                found[o["Key"][len(self.prefix) + 1:]] = ObjectState(
                    o["Size"], f"{o['ETag']} {o['LastModified'].isoformat()}")
        return found

    def read(self, key: str) -> bytes | None:
        client = self.client
        try:
            data: bytes = client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        return data

    def sha256(self, key: str) -> str:
        body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        h = hashlib.sha256()
        while chunk := body.read(8 * MIB):
            h.update(chunk)
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def corrupt(self, key: str) -> None:
        self.server.corrupt_object(self._full(key), bucket=self.bucket)

    def unfinished(self) -> list[str]:
        resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return [u["Key"] for u in resp.get("Uploads", [])]


@dataclass(frozen=True)
class FileBackend:
    root: Path
    kind: str = "file"

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    @property
    def env(self) -> Mapping[str, str]:
        return {}

    def objects(self) -> dict[str, ObjectState]:
        # Hidden files (bmsync's lock file, partial uploads) are not objects, as `ls`
        # does not show them; unfinished() looks at the partial ones.
        found: dict[str, ObjectState] = {}
        if not self.root.exists():
            return found
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                found[str(p.relative_to(self.root))] = ObjectState(
                    st.st_size, f"{st.st_ino}:{st.st_mtime_ns}")
        return found

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def sha256(self, key: str) -> str:
        return sha256_file(self.root / key)

    def delete(self, key: str) -> None:
        (self.root / key).unlink()

    def corrupt(self, key: str) -> None:
        with open(self.root / key, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    def unfinished(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(".*.partial"))


def make_backend(kind: str, server: S3Server, directory: Path) -> Backend:
    if kind == "s3":
        return S3Backend(server, server.bucket, f"t-{uuid.uuid4().hex[:12]}")
    return FileBackend(directory / "objects")


@pytest.fixture(params=["s3", "file"])
def backend(request: pytest.FixtureRequest, s3_server: S3Server, tmp_path: Path) -> Backend:
    """Empty object storage of this test's own: a fresh prefix in the shared bucket, or a
    directory that does not exist yet."""
    return make_backend(request.param, s3_server, tmp_path)


# -- running bmsync -------------------------------------------------------------------


def run(backend: Backend, *args: str) -> Run:
    return bmsync(*args, env=backend.env)


def publish(backend: Backend, built: Built, *extra: str) -> Run:
    return run(backend, "publish", str(built.files[0]), "--to", backend.url, *extra)


def fetch(backend: Backend, release: str, to: Path, *extra: str) -> Run:
    return run(backend, "fetch", "--from", backend.url, "--release", release,
               "--to", str(to), *extra)


def catalog_doc(backend: Backend) -> dict[str, Any] | None:
    """catalog.json as stored, read directly from the storage."""
    raw = backend.read(CATALOG)
    return None if raw is None else json.loads(raw)


def listed(backend: Backend) -> set[str]:
    doc = catalog_doc(backend)
    return set() if doc is None else set(doc["versions"])


@dataclass(frozen=True)
class Started:
    """A bmsync process running in the background, its output going to files."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def finish(self, timeout: float = 120) -> Run:
        code = self.process.wait(timeout)
        return Run(code, self.stdout.read_text(), self.stderr.read_text())


def start(backend: Backend, logs: Path, *args: str) -> Started:
    """``bmsync ARGS`` in the background, environment as :func:`tests.cli.bmsync` makes it."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(backend.env)
    logs.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env,
                                   stdout=o, stderr=e, stdin=subprocess.DEVNULL, cwd=ROOT)
    return Started(process, out, err)


def kill_when(started: Started, ready: Callable[[], bool], what: str) -> None:
    """SIGKILL the process as soon as ``ready()`` is true; fails the test when the
    process ends by itself first (nothing would have been interrupted)."""
    deadline = time.monotonic() + KILL_WINDOW
    process = started.process
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} ended (exit {process.returncode}) before it could be killed:"
                        f" {started.stderr.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{what}: the moment to kill it never came")
        time.sleep(0.002)
    process.kill()
    process.wait()
    # It may have finished between the last poll and the kill.
    assert process.returncode == -9, f"{what} exited by itself ({process.returncode})"


# -- round trip of a big archive ------------------------------------------------------


@dataclass(frozen=True)
class Published:
    backend: Backend
    run: Run


@pytest.fixture(scope="module", params=["s3", "file"])
def published_big(request: pytest.FixtureRequest, s3_server: S3Server,
                  tmp_path_factory: pytest.TempPathFactory, big: Built) -> Published:
    """The big archive published once per backend (uploading 100 MB costs a second or
    two); the tests using it only read the storage."""
    backend = make_backend(request.param, s3_server, tmp_path_factory.mktemp("published"))
    return Published(backend, publish(backend, big, "--json"))


def test_big_archive_round_trips_through_multipart(published_big: Published, big: Built,
                                                   tmp_path: Path) -> None:
    backend, published = published_big.backend, published_big.run
    assert published.code == 0, published.output
    report = published.json()
    assert report["version"] == "big"
    assert sorted(report["uploaded"]) == sorted(big.keys())
    assert report["bytesUploaded"] == big.size
    key = f"big/{big.name}"
    stored = backend.objects()
    assert stored[key].size == big.size
    if backend.kind == "s3":
        # An S3 ETag ending in -N is a multipart upload of N parts.
        parts = -(-big.size // PART_SIZE)
        assert stored[key].stamp.split()[0].strip('"').endswith(f"-{parts}"), stored[key]
    assert backend.sha256(key) == big.sha256

    shown = run(backend, "catalog", "--from", backend.url, "--json")
    assert shown.code == 0, shown.output
    entry = shown.json()["versions"]["big"]
    assert entry["digest"] == f"sha256:{big.sha256}"
    assert entry["size"] == big.size
    assert shown.json()["latest"] == "big"

    dest = tmp_path / "fetched"
    got = fetch(backend, "latest", dest, "--json")
    assert got.code == 0, got.output
    assert got.json()["digest"] == f"sha256:{big.sha256}"
    assert got.json()["bytesDownloaded"] == big.size
    assert sha256_file(dest / big.name) == big.sha256
    assert (dest / big.sidecar.name).read_bytes() == big.sidecar.read_bytes()
    assert (dest / big.manifest.name).read_bytes() == big.manifest.read_bytes()
    assert not list(dest.glob(".*")), "fetch left hidden partial files"

    verified = bmsync("bundle", "verify", str(dest / big.name))
    assert verified.code == 0, verified.output
    assert "OK, bundle big" in verified.stdout

    # Fetching the same version again moves nothing and leaves the file as it was.
    before = (dest / big.name).stat()
    again = fetch(backend, "latest", dest, "--json")
    assert again.code == 0, again.output
    assert again.json()["bytesDownloaded"] == 0
    after = (dest / big.name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def recorded_ranges(partial: Path) -> list[int]:
    """Starts of the ranges the record beside a partial download lists as written."""
    try:
        return list(json.loads(partial.with_name(partial.name + ".ranges").read_text())["done"])
    except (FileNotFoundError, ValueError, KeyError):
        return []  # absent, or caught between its write and its rename


def test_killed_fetch_resumes_without_downloading_again(published_big: Published, big: Built,
                                                        tmp_path: Path) -> None:
    backend = published_big.backend
    assert published_big.run.code == 0, published_big.run.output
    dest = tmp_path / "fetched"
    partial = dest / f".{big.name}.partial"

    def well_under_way() -> bool:
        return len(recorded_ranges(partial)) >= 1

    first = start(backend, tmp_path / "logs", "fetch", "--from", backend.url,
                  "--release", "big", "--to", str(dest), "--json")
    kill_when(first, well_under_way, "fetch")
    assert partial.is_file(), "the killed fetch left no partial file to resume from"
    done = recorded_ranges(partial)
    kept = sum(min(RANGE_SIZE, big.size - s) for s in done)
    assert 0 < kept < big.size
    assert not (dest / big.name).exists(), "an unverified archive has its final name"

    again = fetch(backend, "big", dest, "--json")
    assert again.code == 0, again.output
    assert again.json()["bytesDownloaded"] == big.size - kept
    assert sha256_file(dest / big.name) == big.sha256
    assert not partial.exists()
    assert not list(dest.glob(".*")), "fetch left hidden files"


def test_killed_publish_lists_nothing_and_a_rerun_completes(
        backend: Backend, big: Built, tmp_path: Path) -> None:
    def uploading() -> bool:
        # S3: the multipart upload was created; file://: the partial copy exists.
        return bool(backend.unfinished())

    first = start(backend, tmp_path / "logs", "publish", str(big.archive), "--to", backend.url)
    kill_when(first, uploading, "publish")
    assert "big" not in listed(backend), "a half-published version is listed"
    not_there = fetch(backend, "big", tmp_path / "early")
    assert not_there.code != 0

    again = publish(backend, big, "--json")
    assert again.code == 0, again.output
    assert listed(backend) == {"big"}
    assert backend.sha256(f"big/{big.name}") == big.sha256
    assert backend.unfinished() == [], "the interrupted upload was left behind"


# -- layout and catalog ---------------------------------------------------------------


def test_layout_and_catalog(backend: Backend, small: Callable[..., Built],
                            tmp_path: Path) -> None:
    full = small("1.0", day=1)
    # A delta of 1.0, split into parts: the layout holds the parts, not a joined file.
    delta = small("1.1", day=2, refs=IMAGES[:2], base=full, split_size=128 * 1024)
    assert len(delta.files) > 1
    for built in (full, delta):
        done = publish(backend, built)
        assert done.code == 0, done.output
        assert f"published {built.version}" in done.stdout

    stored = backend.objects()
    assert set(stored) == {CATALOG} | full.keys() | delta.keys()
    for built in (full, delta):
        for p in (*built.files, built.sidecar, built.manifest):
            assert backend.sha256(f"{built.version}/{p.name}") == sha256_file(p), p.name

    doc = catalog_doc(backend)
    assert doc is not None
    assert doc["latest"] == "1.1"
    assert set(doc["versions"]) == {"1.0", "1.1"}
    for built in (full, delta):
        entry = doc["versions"][built.version]
        assert entry["digest"] == f"sha256:{built.sha256}"
        assert entry["size"] == built.size
        assert entry["created"] == built.created
    assert doc["versions"]["1.0"]["base"] is None
    assert doc["versions"]["1.1"]["base"] == {
        "kind": "bundle", "version": "1.0",
        "digest": "sha256:" + sha256_file(full.manifest),
    }

    shown = run(backend, "catalog", "--from", backend.url)
    assert shown.code == 0, shown.output
    assert "2 versions, latest 1.1" in shown.stdout
    assert "delta of 1.0" in shown.stdout
    as_json = run(backend, "catalog", "--from", backend.url, "--json")
    assert as_json.json() == doc

    dest = tmp_path / "fetched"
    got = fetch(backend, "1.1", dest)
    assert got.code == 0, got.output
    assert "a delta: importing it needs bundle 1.0" in got.stdout
    for p in delta.files:
        assert sha256_file(dest / p.name) == sha256_file(p)
    verified = bmsync("bundle", "verify", str(dest / delta.name), "--base", str(full.archive))
    assert verified.code == 0, verified.output


# -- idempotence and immutability -----------------------------------------------------


def test_republishing_uploads_nothing_and_another_archive_is_refused(
        backend: Backend, small: Callable[..., Built]) -> None:
    first = small("2.0", day=1)
    done = publish(backend, first)
    assert done.code == 0, done.output
    before = backend.objects()
    catalog_before = backend.read(CATALOG)
    if backend.kind == "s3":
        time.sleep(1.1)  # so that a rewrite, even of the same bytes, changes LastModified

    again = publish(backend, first, "--json")
    assert again.code == 0, again.output
    assert again.json()["uploaded"] == []
    assert again.json()["bytesUploaded"] == 0
    assert again.json()["alreadyPublished"] is True
    assert backend.objects() == before
    plain = publish(backend, first)
    assert plain.code == 0 and "already published; nothing uploaded" in plain.stdout

    other = small("2.0", day=5, refs=IMAGES[:2], out="other")
    assert other.sha256 != first.sha256
    refused = publish(backend, other)
    assert refused.code != 0, refused.output
    assert "version 2.0" in refused.stderr
    assert "already published" in refused.stderr
    assert backend.read(CATALOG) == catalog_before
    assert backend.objects() == before


def test_concurrent_publishers_keep_every_entry(backend: Backend, small: Callable[..., Built],
                                                tmp_path: Path) -> None:
    builts = [small(f"3.{n}", day=n, refs=IMAGES[: 1 + n % 4]) for n in range(4)]
    running = [start(backend, tmp_path / "logs", "publish", str(b.archive), "--to", backend.url)
               for b in builts]
    results = [r.finish() for r in running]
    for result in results:
        assert result.code == 0, result.output
    doc = catalog_doc(backend)
    assert doc is not None
    assert set(doc["versions"]) == {b.version for b in builts}
    assert doc["latest"] == "3.3"
    for b in builts:
        assert doc["versions"][b.version]["digest"] == f"sha256:{b.sha256}"


# -- fetch failures -------------------------------------------------------------------


def test_corrupted_object_is_detected_at_fetch(backend: Backend, small: Callable[..., Built],
                                               tmp_path: Path) -> None:
    built = small("4.0")
    assert publish(backend, built).code == 0
    key = f"4.0/{built.name}"
    backend.corrupt(key)

    dest = tmp_path / "fetched"
    got = fetch(backend, "4.0", dest)
    assert got.code == 6, got.output
    assert f"{backend.url}/{key}" in got.stderr
    assert "publish it again" in got.stderr
    assert not (dest / built.name).exists()
    assert not (dest / f".{built.name}.partial").exists()


@pytest.mark.parametrize("missing", ["archive", "sidecar"])
def test_listed_version_whose_objects_have_not_arrived(
        backend: Backend, small: Callable[..., Built], tmp_path: Path, missing: str) -> None:
    built = small("5.0")
    assert publish(backend, built).code == 0
    name = built.name if missing == "archive" else built.sidecar.name
    backend.delete(f"5.0/{name}")

    dest = tmp_path / "fetched"
    got = fetch(backend, "5.0", dest)
    assert got.code == 8, got.output
    assert "has not arrived yet" in got.stderr
    assert f"5.0/{name}" in got.stderr
    assert not (dest / built.name).exists()


def test_missing_catalog_is_said_clearly(backend: Backend, tmp_path: Path) -> None:
    got = fetch(backend, "latest", tmp_path / "fetched")
    assert got.code != 0
    assert backend.url in got.stderr
    assert "no catalog.json" in got.stderr
    shown = run(backend, "catalog", "--from", backend.url)
    assert backend.url in shown.output
    assert "no published version" in shown.output


# -- S3 credentials and buckets -------------------------------------------------------


COMMANDS = {
    "catalog": ("catalog", "--from", "{url}"),
    "publish": ("publish", "{archive}", "--to", "{url}"),
    "fetch": ("fetch", "--from", "{url}", "--release", "latest", "--to", "{dest}"),
    "prune": ("prune", "--from", "{url}", "--keep", "1"),
}


def command(name: str, url: str, archive: Built, dest: Path) -> list[str]:
    return [a.format(url=url, archive=archive.archive, dest=dest) for a in COMMANDS[name]]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_wrong_credentials_exit_3_without_the_secret(
        s3_server: S3Server, small: Callable[..., Built], tmp_path: Path, name: str) -> None:
    backend = S3Backend(s3_server, s3_server.bucket, f"t-{uuid.uuid4().hex[:12]}")
    built = small("6.0")
    assert publish(backend, built).code == 0
    wrong = "Wr0ngSecret-" + uuid.uuid4().hex
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": wrong}
    got = bmsync("-vv", *command(name, backend.url, built, tmp_path / "fetched"), env=env)
    assert got.code == 3, got.output
    assert backend.url in got.stderr
    assert wrong not in got.output
    assert s3_server.secret_key not in got.output
    assert listed(backend) == {"6.0"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_missing_bucket_is_named(s3_server: S3Server, small: Callable[..., Built],
                                 tmp_path: Path, name: str) -> None:
    bucket = f"absent-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/releases"
    got = bmsync(*command(name, url, small("7.0"), tmp_path / "fetched"), env=s3_server.env())
    assert got.code != 0, got.output
    assert f"bucket {bucket} does not exist" in got.stderr


# -- prune ----------------------------------------------------------------------------


def test_prune_keeps_latest_and_the_bases_of_kept_deltas(
        backend: Backend, small: Callable[..., Built]) -> None:
    v1 = small("8.1", day=1, refs=IMAGES[:1])
    v2 = small("8.2", day=2, refs=IMAGES[:2], base=v1)
    v3 = small("8.3", day=3, refs=IMAGES[:3])
    v4 = small("8.4", day=4, refs=IMAGES[:4], base=v3)
    for built in (v1, v2, v3, v4):
        done = publish(backend, built)
        assert done.code == 0, done.output
    everything = backend.objects()

    # The three newest include the delta 8.2, which needs 8.1: nothing goes.
    kept = run(backend, "prune", "--from", backend.url, "--keep", "3")
    assert kept.code == 0, kept.output
    assert "removed 0 versions" in kept.stdout
    assert listed(backend) == {"8.1", "8.2", "8.3", "8.4"}
    assert backend.objects() == everything

    dry = run(backend, "prune", "--from", backend.url, "--keep", "1", "--dry-run")
    assert dry.code == 0, dry.output
    assert "would remove 2 versions: 8.2, 8.1" in dry.stdout
    assert backend.objects() == everything

    # Keeping one keeps the latest 8.4 and its base 8.3; 8.2 and 8.1 go, objects too.
    pruned = run(backend, "prune", "--from", backend.url, "--keep", "1")
    assert pruned.code == 0, pruned.output
    assert "removed 2 versions" in pruned.stdout
    doc = catalog_doc(backend)
    assert doc is not None
    assert set(doc["versions"]) == {"8.3", "8.4"}
    assert doc["latest"] == "8.4"
    remaining = backend.objects()
    assert set(remaining) == {CATALOG} | v3.keys() | v4.keys()
    for key in v3.keys() | v4.keys():
        assert remaining[key] == everything[key], f"{key} was rewritten"
    if isinstance(backend, FileBackend):
        # Nothing at all under the pruned versions, hidden files included.
        for gone in ("8.1", "8.2"):
            assert not [p for p in (backend.root / gone).rglob("*") if p.is_file()]



def test_a_bucket_named_bucket_is_not_mistaken_for_a_missing_one(
        s3_server: S3Server, small: Callable[..., Built], tmp_path: Path) -> None:
    """An absent object is told from an absent bucket by the S3 error code, not by
    words in the message (which holds the URL)."""
    url = f"s3://{s3_server.new_bucket('site-bucket')}/releases"
    env = s3_server.env()
    shown = bmsync("catalog", "--from", url, env=env)
    assert shown.code == 0, shown.output
    assert "no published version" in shown.stdout
    built = small("8.0")
    assert bmsync("publish", str(built.archive), "--to", url, env=env).code == 0
    got = bmsync("fetch", "--from", url, "--release", "8.0", "--to", str(tmp_path / "f"),
                 env=env)
    assert got.code == 0, got.output
    assert sha256_file(tmp_path / "f" / built.name) == built.sha256


@pytest.mark.parametrize("archive", ["/tmp/bmsync-forged/evil", "../evil.tar.zst",
                                     "bmpackages_6.0.tar.zst/../../evil"])
def test_forged_catalog_names_never_become_paths(tmp_path: Path, archive: str) -> None:
    """Names in catalog.json crossed the air gap: fetch refuses any that is not the
    version's archive (or its parts) before writing anything."""
    objects = tmp_path / "objects"
    (objects / "6.0").mkdir(parents=True)
    (objects / "6.0" / "evil.sha256").write_text("0" * 64 + "  evil\n")
    (objects / CATALOG).write_text(json.dumps({"schemaVersion": 1, "latest": "6.0", "versions": {
        "6.0": {"digest": "sha256:" + "0" * 64, "size": 1, "archive": archive,
                "files": [archive], "created": "2026-01-01T00:00:00Z", "base": None}}}))
    dest = tmp_path / "fetched"
    got = bmsync("fetch", "--from", f"file://{objects}", "--release", "6.0", "--to", str(dest))
    assert got.code == 6, got.output
    assert "names files" in got.stderr and "Traceback" not in got.stderr
    assert not dest.exists() or not any(dest.iterdir())
    assert not Path("/tmp/bmsync-forged").exists()
