"""Contract of the on-disk OCI layout store (pipeline.store); no servers, skopeo as reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import IntegrityError, StoreError, TransportError
from pipeline.store import REF_NAME_ANNOTATION, BlobSink, Store, atomic_write

MiB = 1 << 20
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunked_fetch(data: bytes, calls: list[int]) -> Callable[[int, BlobSink], None]:
    """A fetch that serves ``data`` from the offset asked, in 1 MiB chunks, like a Range GET."""

    def fetch(offset: int, sink: BlobSink) -> None:
        calls.append(offset)
        for start in range(offset, len(data), MiB):
            sink.write(data[start : start + MiB])

    return fetch


def never_fetch(offset: int, sink: BlobSink) -> None:
    raise AssertionError("fetch called for a blob that is present")


def partial_path(store: Store, digest: str) -> Path:
    return store.root / ".bmsync" / "partial" / digest.split(":", 1)[1]


# -- layout ---------------------------------------------------------------------------


def test_new_layout_has_oci_files(tmp_path: Path) -> None:
    root = tmp_path / "absent" / "store"
    Store(root)
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((root / "index.json").read_bytes()) == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }
    assert (root / "blobs" / "sha256").is_dir()
    # Temp files of the atomic writes live in .bmsync, never in the layout itself.
    assert sorted(os.listdir(root)) == [".bmsync", "blobs", "index.json", "oci-layout"]


def test_empty_directory_becomes_a_layout(tmp_path: Path) -> None:
    Store(tmp_path)
    assert (tmp_path / "oci-layout").is_file()


def test_reopening_keeps_blobs_and_images(tmp_path: Path) -> None:
    store = Store(tmp_path)
    manifest = b'{"schemaVersion":2}'
    digest = store.write_blob(manifest)
    store.add_image("gcr.io/x/y:1", {"mediaType": MANIFEST_TYPE, "digest": digest, "size": 19})

    again = Store(tmp_path)
    assert again.read_blob(digest) == manifest
    entry = again.find_image("gcr.io/x/y:1")
    assert entry is not None and entry["digest"] == digest


def test_non_layout_directory_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError) as caught:
        Store(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert "not an OCI image layout" in str(caught.value)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_unsupported_layout_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(StoreError) as caught:
        Store(tmp_path)
    assert "2.0.0" in str(caught.value)
    assert str(tmp_path / "oci-layout") in str(caught.value)


def test_a_file_as_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store(tmp_path / "f")


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../x",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha256:" + "a" * 64 + "/x",
        "a" * 64,
        "",
    ],
)
def test_invalid_digests_are_refused_before_touching_disk(tmp_path: Path, digest: str) -> None:
    store = Store(tmp_path / "s")
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    for call in (
        lambda: store.blob_path(digest),
        lambda: store.has_blob(digest),
        lambda: store.ensure_blob(digest, None, never_fetch),
        lambda: store.write_blob(b"x", digest),
    ):
        with pytest.raises(StoreError, match="invalid digest"):
            call()
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["s"]


# -- ensure_blob ----------------------------------------------------------------------


def test_ensure_blob_fetches_once_then_reports_present(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(3 * MiB + 123)
    digest = sha256(data)
    calls: list[int] = []

    assert store.ensure_blob(digest, len(data), chunked_fetch(data, calls)) is True
    assert calls == [0]
    assert store.blob_path(digest).read_bytes() == data
    assert store.has_blob(digest, len(data))
    assert not store.has_blob(digest, len(data) + 1)
    assert not partial_path(store, digest).exists()

    assert store.ensure_blob(digest, len(data), never_fetch) is False
    with store.open_blob(digest) as f:
        assert f.read() == data

    # A descriptor whose size disagrees with the stored blob is wrong, not "absent".
    with pytest.raises(IntegrityError) as caught:
        store.ensure_blob(digest, len(data) - 1, never_fetch)
    assert (caught.value.expected, caught.value.actual) == (str(len(data) - 1), str(len(data)))


def test_ensure_blob_without_size(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(1000)
    assert store.ensure_blob(sha256(data), None, chunked_fetch(data, []))
    assert store.read_blob(sha256(data)) == data


def test_sha512_blobs_live_under_their_algorithm(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(5000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    assert store.ensure_blob(digest, len(data), chunked_fetch(data, []))
    assert (tmp_path / "blobs" / "sha512" / digest[7:]).read_bytes() == data
    assert store.has_blob(digest, len(data))


def test_digest_mismatch_deletes_partial_and_raises(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(2 * MiB)
    digest = sha256(data)
    wrong = os.urandom(len(data))

    with pytest.raises(IntegrityError) as caught:
        store.ensure_blob(digest, len(data), chunked_fetch(wrong, []))
    assert caught.value.expected == digest
    assert caught.value.actual == sha256(wrong)
    assert digest in str(caught.value)
    assert not partial_path(store, digest).exists()
    assert not store.blob_path(digest).exists()
    assert not store.has_blob(digest)


def test_more_bytes_than_expected_fail_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(MiB)
    digest = sha256(data)
    writes: list[int] = []

    def fetch(offset: int, sink: BlobSink) -> None:
        for _ in range(5):
            writes.append(sink.offset)
            sink.write(data[: MiB // 2 + 1])

    with pytest.raises(IntegrityError, match="more than"):
        store.ensure_blob(digest, len(data), fetch)
    assert writes == [0, MiB // 2 + 1]  # the second write overflowed and stopped the fetch
    assert not partial_path(store, digest).exists()
    assert not store.has_blob(digest)


def test_short_blob_fails_with_sizes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(1000)
    with pytest.raises(IntegrityError) as caught:
        store.ensure_blob(sha256(data), len(data), chunked_fetch(data[:600], []))
    assert (caught.value.expected, caught.value.actual) == ("1000", "600")
    assert not partial_path(store, sha256(data)).exists()


def test_interrupted_fetch_resumes_from_partial(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(3 * MiB)
    digest = sha256(data)
    cut = MiB + MiB // 2

    def dropping(offset: int, sink: BlobSink) -> None:
        sink.write(data[:MiB])
        sink.write(data[MiB:cut])
        raise TransportError("connection reset")

    with pytest.raises(TransportError):
        store.ensure_blob(digest, len(data), dropping)
    assert partial_path(store, digest).stat().st_size == cut
    assert not store.has_blob(digest)

    calls: list[int] = []
    assert store.ensure_blob(digest, len(data), chunked_fetch(data, calls)) is True
    assert calls == [cut]
    assert store.blob_path(digest).read_bytes() == data
    assert not partial_path(store, digest).exists()


def test_restart_when_server_ignores_range(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(2 * MiB)
    digest = sha256(data)
    partial_path(store, digest).write_bytes(data[:700])

    offsets: list[int] = []

    def whole_blob(offset: int, sink: BlobSink) -> None:
        offsets.append(offset)
        sink.restart()
        assert sink.offset == 0
        for start in range(0, len(data), MiB):
            sink.write(data[start : start + MiB])

    assert store.ensure_blob(digest, len(data), whole_blob) is True
    assert offsets == [700]
    assert store.blob_path(digest).read_bytes() == data


def test_garbage_partial_of_full_size_is_refetched(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(4096)
    digest = sha256(data)
    partial_path(store, digest).write_bytes(os.urandom(4096))
    calls: list[int] = []
    assert store.ensure_blob(digest, len(data), chunked_fetch(data, calls)) is True
    assert calls == [0]
    assert store.read_blob(digest) == data


def test_eight_threads_fetch_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(2 * MiB)
    digest = sha256(data)
    calls: list[int] = []
    start = threading.Barrier(8)
    results: list[bool] = []
    errors: list[BaseException] = []

    def slow_fetch(offset: int, sink: BlobSink) -> None:
        calls.append(offset)
        for pos in range(offset, len(data), MiB // 4):
            time.sleep(0.01)
            sink.write(data[pos : pos + MiB // 4])

    def worker() -> None:
        start.wait()
        try:
            results.append(Store(tmp_path).ensure_blob(digest, len(data), slow_fetch))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert calls == [0]
    assert sorted(results) == [False] * 7 + [True]
    assert store.read_blob(digest) == data


_PROCESS_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.store import Store

    root, digest, source, count_file, go = sys.argv[1:]
    data = Path(source).read_bytes()

    def fetch(offset, sink):
        with open(count_file, "a") as f:
            f.write(f"{offset}\\n")
        for pos in range(offset, len(data), 256 * 1024):
            time.sleep(0.02)
            sink.write(data[pos : pos + 256 * 1024])

    while not Path(go).exists():
        time.sleep(0.005)
    # Every process also opens the (not yet existing) store at the same moment.
    print(Store(root).ensure_blob(digest, len(data), fetch))
    """
)


def test_four_processes_fetch_once(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    digest = sha256(data)
    source = tmp_path / "source"
    source.write_bytes(data)
    root, count_file, go = tmp_path / "store", tmp_path / "count", tmp_path / "go"

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WORKER, str(root), digest, str(source)]
            + [str(count_file), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.3)  # let the interpreters start so they all race on the go file
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["False", "False", "False", "True"]
    assert count_file.read_text().splitlines() == ["0"]
    store = Store(root)
    assert store.read_blob(digest) == data
    assert store.images() == []


# -- trust ----------------------------------------------------------------------------


def test_planted_wrong_file_is_not_trusted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(10_000)
    digest = sha256(data)
    store.blob_path(digest).write_bytes(b"x" * len(data))

    assert not store.has_blob(digest)
    assert not store.blob_path(digest).exists()  # deleted after the re-hash

    store.blob_path(digest).write_bytes(b"y" * len(data))
    calls: list[int] = []
    assert store.ensure_blob(digest, len(data), chunked_fetch(data, calls)) is True
    assert calls == [0]
    assert store.blob_path(digest).read_bytes() == data


def test_planted_correct_file_is_verified_once_and_kept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(10_000)
    digest = sha256(data)
    store.blob_path(digest).write_bytes(data)
    assert not (tmp_path / ".bmsync" / "verified" / digest[7:]).exists()

    assert store.ensure_blob(digest, len(data), never_fetch) is False
    assert (tmp_path / ".bmsync" / "verified" / digest[7:]).exists()
    assert store.has_blob(digest, len(data))


def test_verify_blob_catches_corruption_and_drops_the_blob(tmp_path: Path) -> None:
    store = Store(tmp_path)
    digest = store.write_blob(b"config bytes")
    store.verify_blob(digest)

    store.blob_path(digest).write_bytes(b"config bytez")  # bit rot, same size
    with pytest.raises(IntegrityError) as caught:
        store.verify_blob(digest)
    assert caught.value.expected == digest
    assert not store.has_blob(digest)
    with pytest.raises(StoreError, match="not in the store"):
        store.verify_blob(digest)


def test_read_blob_checks_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    digest = store.write_blob(b"manifest")
    store.blob_path(digest).write_bytes(b"manifesT")
    with pytest.raises(IntegrityError):
        store.read_blob(digest)
    with pytest.raises(StoreError, match="not in the store"):
        store.read_blob(digest)
    with pytest.raises(StoreError, match="not in the store"):
        store.open_blob(digest)


def test_write_blob_checks_the_given_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(IntegrityError):
        store.write_blob(b"abc", sha256(b"abd"))
    assert not store.has_blob(sha256(b"abd"))
    assert store.write_blob(b"abc", sha256(b"abc")) == sha256(b"abc")
    assert store.write_blob(b"abc") == sha256(b"abc")
    assert store.read_blob(sha256(b"abc")) == b"abc"


def test_atomic_write_replaces_or_leaves_untouched(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    atomic_write(target, b"one")
    atomic_write(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret"
    assert target.stat().st_mode & 0o777 == 0o600

    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"secret"
    assert os.listdir(tmp_path) == ["config.toml"]  # no temp file left behind


# -- index ----------------------------------------------------------------------------


def _manifest(store: Store, text: str) -> dict[str, object]:
    data = json.dumps({"schemaVersion": 2, "note": text}).encode()
    return {"mediaType": MANIFEST_TYPE, "digest": store.write_blob(data), "size": len(data)}


def test_add_image_refuses_missing_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    index_before = (tmp_path / "index.json").read_bytes()
    absent = sha256(b"never written")
    with pytest.raises(StoreError) as caught:
        store.add_image("gcr.io/x/y:1", {"mediaType": MANIFEST_TYPE, "digest": absent, "size": 13})
    assert absent in str(caught.value)
    assert (tmp_path / "index.json").read_bytes() == index_before

    present = _manifest(store, "a")
    with pytest.raises(StoreError):  # present, but not with that size
        store.add_image("gcr.io/x/y:1", {**present, "size": 1})
    assert store.images() == []


def test_add_images_writes_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    kept = _manifest(store, "kept")
    store.add_image("gcr.io/k/k:1", kept)
    index_before = (tmp_path / "index.json").read_bytes()
    good = _manifest(store, "good")
    absent = {"mediaType": MANIFEST_TYPE, "digest": sha256(b"never written"), "size": 13}
    with pytest.raises(StoreError):
        store.add_images([("gcr.io/a/a:1", good), ("gcr.io/b/b:1", absent)])
    assert (tmp_path / "index.json").read_bytes() == index_before

    store.add_images([("gcr.io/b/b:1", good), ("gcr.io/k/k:1", good)])
    assert {i["annotations"][REF_NAME_ANNOTATION]: i["digest"] for i in store.images()} == {
        "gcr.io/b/b:1": good["digest"], "gcr.io/k/k:1": good["digest"]}


def test_add_image_replaces_by_ref_name_and_sorts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first, second, other = (_manifest(store, t) for t in ("first", "second", "other"))
    store.add_image("gcr.io/x/y:1", first)
    store.add_image("gcr.io/a/b:2", {**other, "annotations": {"org.example": "kept"}})
    store.add_image(
        "gcr.io/x/y:1", {**second, "platform": {"os": "linux", "architecture": "amd64"}}
    )

    images = Store(tmp_path).images()
    assert [i["annotations"][REF_NAME_ANNOTATION] for i in images] == [
        "gcr.io/a/b:2",
        "gcr.io/x/y:1",
    ]
    assert images[0]["annotations"]["org.example"] == "kept"
    replaced = store.find_image("gcr.io/x/y:1")
    assert replaced is not None
    assert replaced["digest"] == second["digest"]
    assert replaced["platform"] == {"os": "linux", "architecture": "amd64"}
    assert store.find_image("gcr.io/x/y:2") is None


def _tiny_image() -> tuple[bytes, bytes, bytes]:
    """(gzip layer, config, manifest) of a valid one-layer OCI image."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        content = b"hello from bmsync\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes.getvalue())]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return layer, config, manifest


def test_skopeo_reads_the_layout(tmp_path: Path) -> None:
    store = Store(tmp_path / "layout")
    layer, config, manifest = _tiny_image()
    store.ensure_blob(sha256(layer), len(layer), chunked_fetch(layer, []))
    store.write_blob(config)
    digest = store.write_blob(manifest)
    store.add_image(
        "gcr.io/x/y:1", {"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(manifest)}
    )
    ref = f"oci:{store.root}:gcr.io/x/y:1"

    raw = subprocess.run(
        ["/usr/bin/skopeo", "inspect", "--raw", ref], capture_output=True, check=True
    )
    assert raw.stdout == manifest

    # A full inspect also reads the config blob through the layout.
    full = subprocess.run(["/usr/bin/skopeo", "inspect", ref], capture_output=True, check=True)
    report = json.loads(full.stdout)
    assert report["Digest"] == digest
    assert report["Layers"] == [sha256(layer)]
