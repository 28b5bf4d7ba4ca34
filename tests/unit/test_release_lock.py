"""The release lock file (``<workDir>/<version>/lock.json``) and ``is_pulled``.

The witness for the lock format is the document the ``pipeline.release`` docstring
shows, written here by hand; the witness for ``is_pulled`` is a store whose
``index.json`` entries carry the annotations ``bmsync pull`` writes (literal names).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import IntegrityError, StoreError
from pipeline.release import Lock, PinnedImage, is_pulled, read_lock, write_lock
from pipeline.store import Store

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D512 = "sha512:" + "a" * 128
MEDIA_TYPE = "application/vnd.bmsync.lock.v1+json"


def doc(**changes: Any) -> dict[str, Any]:
    """The docstring's example lock, with ``changes`` applied (None value: key removed)."""
    base: dict[str, Any] = {
        "schemaVersion": 1, "mediaType": MEDIA_TYPE, "version": "1.30.0", "kind": "release",
        "resolved": 1764032400, "platforms": ["linux/amd64"], "base": None,
        "images": [{"source": "gcr.io/repo/name:tag", "digest": D1}],
    }
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


LOCKS = [
    Lock("1.30.0", "release", 1764032400, ("linux/amd64",),
         (PinnedImage("gcr.io/repo/name:tag", D1),)),
    Lock("2026.11.24.3", "nightly", 0, ("linux/amd64", "linux/arm64/v8"),
         (PinnedImage("gcr.io/a/etcd:v3.4.13", D1),
          PinnedImage("gcr.io/a/pause@" + D2, D2),
          PinnedImage("localhost:5000/b/c:1", D512)),
         {"kind": "bundle", "file": "base.bundle.json", "digest": D2, "version": "2026.11.20.1"}),
    Lock("v1", "nightly", 1, (), (),
         {"kind": "inventory", "file": "base.inventory.json", "digest": D1}),
]


@pytest.mark.parametrize("lock", LOCKS, ids=lambda lock: lock.version)
def test_lock_round_trip(tmp_path: Path, lock: Lock) -> None:
    path = tmp_path / lock.version / "lock.json"
    write_lock(path, lock)  # creates the version folder
    assert read_lock(path) == lock
    # Written again from what was read: the same bytes (a re-run leaves the file alone).
    assert read_lock(path).to_json() == path.read_bytes()


@pytest.mark.parametrize("lock", LOCKS, ids=lambda lock: lock.version)
def test_lock_json_is_the_documented_format(lock: Lock) -> None:
    raw = lock.to_json()
    assert raw.endswith(b"\n")
    assert json.loads(raw) == {
        "schemaVersion": 1,
        "mediaType": MEDIA_TYPE,
        "version": lock.version,
        "kind": lock.kind,
        "resolved": lock.resolved,
        "platforms": list(lock.platforms),
        "base": lock.base,
        "images": [{"source": i.source, "digest": i.digest} for i in lock.images],
    }


def test_hand_written_lock_reads(tmp_path: Path) -> None:
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(doc()), encoding="utf-8")
    lock = read_lock(path)
    assert lock == LOCKS[0]
    assert lock.pins() == frozenset({("gcr.io/repo/name:tag", D1)})
    assert lock.images[0].reference.repository == "repo/name"


def test_lock_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert LOCKS[0].epoch == 1764032400
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert LOCKS[0].epoch == 1700000000


# What a damaged or foreign file holds (bytes), and a fragment of the reason given.
DAMAGED: list[tuple[str, bytes, str]] = [
    ("empty", b"", ""),
    ("truncated", json.dumps(doc()).encode()[:-7], ""),
    ("not-json", b"version = 1\n", ""),
    ("not-utf8", b"\xff\xfe{}", ""),
    ("json-list", b"[]", ""),
    ("json-string", b'"lock"', ""),
    ("other-media-type", json.dumps(doc(mediaType="application/json")).encode(),
     "not a bmsync lock file"),
    ("schema-2", json.dumps(doc(schemaVersion=2)).encode(), "not a bmsync lock file"),
    ("no-schema", json.dumps(doc(schemaVersion=None)).encode(), "not a bmsync lock file"),
    ("no-images", json.dumps(doc(images=None)).encode(), "images"),
    ("images-not-list", json.dumps(doc(images=7)).encode(), ""),
    ("image-no-digest", json.dumps(doc(images=[{"source": "gcr.io/a/b:1"}])).encode(),
     "digest"),
    ("bad-digest", json.dumps(doc(images=[{"source": "gcr.io/a/b:1",
                                           "digest": "sha256:abc"}])).encode(),
     "invalid digest 'sha256:abc'"),
    ("upper-digest", json.dumps(doc(images=[{"source": "gcr.io/a/b:1",
                                             "digest": "sha256:" + "A" * 64}])).encode(),
     "invalid digest"),
    ("bad-source", json.dumps(doc(images=[{"source": "gcr.io/A B:1", "digest": D1}])).encode(),
     "invalid image reference"),
    ("no-version", json.dumps(doc(version=None)).encode(), "version"),
    ("no-kind", json.dumps(doc(kind=None)).encode(), "kind"),
    ("resolved-text", json.dumps(doc(resolved="yesterday")).encode(), ""),
    ("no-platforms", json.dumps(doc(platforms=None)).encode(), "platforms"),
    ("base-list", json.dumps(doc(base=["bundle"])).encode(), "invalid base"),
    ("base-no-digest", json.dumps(doc(base={"kind": "bundle", "file": "b.json"})).encode(),
     "invalid base"),
]


@pytest.mark.parametrize(("raw", "fragment"), [(r, f) for _, r, f in DAMAGED],
                         ids=[name for name, _, _ in DAMAGED])
def test_read_lock_rejects_damaged_files(tmp_path: Path, raw: bytes, fragment: str) -> None:
    path = tmp_path / "2026.11.24.1" / "lock.json"
    path.parent.mkdir()
    path.write_bytes(raw)
    with pytest.raises(IntegrityError) as info:
        read_lock(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid lock file (")
    assert fragment in message
    assert info.value.hint == "delete it to resolve the release again"
    assert info.value.exit_code == 6


def test_read_lock_rejects_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "lock.json"
    # A valid document padded past the 16 MiB bound with trailing whitespace.
    path.write_bytes(json.dumps(doc()).encode() + b" " * (16 * 1024 * 1024))
    with pytest.raises(IntegrityError) as info:
        read_lock(path)
    assert str(info.value).startswith(f"{path}: not a valid lock file (too large")


@pytest.mark.parametrize("changes", [
    {"platforms": "linux/amd64"},   # read as ('l', 'i', 'n', ...)
    {"version": False},              # read as version "False"
    {"resolved": 1.9},               # read as 1
    {"kind": "weekly"},              # neither "release" nor "nightly"
], ids=["platforms-string", "version-bool", "resolved-float", "kind-unknown"])
def test_read_lock_rejects_wrong_types(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(doc(**changes)), encoding="utf-8")
    with pytest.raises(IntegrityError):
        read_lock(path)


def test_read_lock_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "1.30.0" / "lock.json"
    with pytest.raises(StoreError) as info:
        read_lock(path)
    assert str(info.value) == f"{path}: no lock file (resolve the release first)"


def test_read_lock_on_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        read_lock(tmp_path)
    assert str(info.value).startswith(f"cannot read {tmp_path}")


# -- is_pulled ----------------------------------------------------------------------------

UPSTREAM = "dev.bmsync.upstream-digest"
PLATFORMS = "dev.bmsync.platforms"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def stored_manifest(store: Store, tag: str) -> tuple[str, int]:
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "tag": tag}).encode()
    digest = store.write_blob(raw)
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    return digest, len(raw)


def add(store: Store, name: str, digest: str, size: int,
        annotations: dict[str, str] | None) -> None:
    descriptor: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest, "size": size}
    if annotations is not None:
        descriptor["annotations"] = annotations
    store.add_image(name, descriptor)


AMD64 = ("linux/amd64",)
BOTH = ("linux/amd64", "linux/arm64")

# (annotations on the stored entry: "self" stands for the stored manifest's digest,
#  source asked for, digest pinned ("self" likewise), platforms asked for, expected)
IS_PULLED: list[tuple[str, dict[str, str] | None, str, str, tuple[str, ...], bool]] = [
    ("pulled-filtered", {UPSTREAM: D1, PLATFORMS: "linux/amd64"}, "gcr.io/a/b:1", D1, AMD64,
     True),
    ("two-platforms", {UPSTREAM: D1, PLATFORMS: "linux/amd64,linux/arm64"}, "gcr.io/a/b:1", D1,
     BOTH, True),
    ("platform-order-matters", {UPSTREAM: D1, PLATFORMS: "linux/arm64,linux/amd64"},
     "gcr.io/a/b:1", D1, BOTH, False),
    ("tag-moved", {UPSTREAM: D1, PLATFORMS: "linux/amd64"}, "gcr.io/a/b:1", D2, AMD64, False),
    ("other-platforms", {UPSTREAM: D1, PLATFORMS: "linux/arm64"}, "gcr.io/a/b:1", D1, AMD64,
     False),
    ("kept-every-platform", {UPSTREAM: D1, PLATFORMS: ""}, "gcr.io/a/b:1", D1, AMD64, False),
    ("every-platform-wanted", {UPSTREAM: D1, PLATFORMS: ""}, "gcr.io/a/b:1", D1, (), True),
    ("filtered-but-all-wanted", {UPSTREAM: D1, PLATFORMS: "linux/amd64"}, "gcr.io/a/b:1", D1,
     (), False),
    ("not-in-store", {UPSTREAM: D1, PLATFORMS: "linux/amd64"}, "gcr.io/a/other:1", D1, AMD64,
     False),
    ("no-annotations-own-digest", None, "gcr.io/a/b:1", "self", (), True),
    ("no-annotations-other-digest", None, "gcr.io/a/b:1", D1, (), False),
    ("no-annotations-filter-wanted", None, "gcr.io/a/b:1", "self", AMD64, False),
    ("pinned-by-digest", {UPSTREAM: D2}, "gcr.io/a/b@" + D2, D2, AMD64, True),
    ("pinned-by-digest-filtered", {UPSTREAM: D2, PLATFORMS: "linux/amd64"},
     "gcr.io/a/b@" + D2, D2, AMD64, False),
]


@pytest.mark.parametrize(("annotations", "source", "pinned", "platforms", "expected"),
                         [row[1:] for row in IS_PULLED], ids=[row[0] for row in IS_PULLED])
def test_is_pulled(tmp_path: Path, annotations: dict[str, str] | None, source: str, pinned: str,
                   platforms: tuple[str, ...], expected: bool) -> None:
    store = Store(tmp_path / "store")
    digest, size = stored_manifest(store, "b")
    name = "gcr.io/a/b@" + D2 if "@" in source else "gcr.io/a/b:1"
    add(store, name, digest, size, annotations)
    # A neighbour that must not be mistaken for the image asked about.
    other_digest, other_size = stored_manifest(store, "c")
    add(store, "gcr.io/a/c:1", other_digest, other_size, {UPSTREAM: D1, PLATFORMS: ""})
    image = PinnedImage(source, digest if pinned == "self" else pinned)
    assert is_pulled(store, image, platforms) is expected


def test_is_pulled_reads_a_store_opened_elsewhere(tmp_path: Path) -> None:
    """Another Store object (another worker process) sees the image once it is indexed."""
    first = Store(tmp_path / "store")
    digest, size = stored_manifest(first, "b")
    image = PinnedImage("gcr.io/a/b:1", D1)
    assert not is_pulled(Store(tmp_path / "store"), image, AMD64)
    add(first, "gcr.io/a/b:1", digest, size, {UPSTREAM: D1, PLATFORMS: "linux/amd64"})
    assert is_pulled(Store(tmp_path / "store"), image, AMD64)
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "gcr.io/a/b:1"
