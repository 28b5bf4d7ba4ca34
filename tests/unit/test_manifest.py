"""Manifest parsing, digests and platform filtering."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from pipeline.errors import IntegrityError, ProtocolError, UsageError
from pipeline.manifest import (
    ACCEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    compute_digest,
    filter_index,
    parse_manifest,
)
from pipeline.platform import Platform, parse_platform

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def dgst(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def image_doc(media_type: str | None = OCI_MANIFEST, layers: int = 2) -> dict[str, Any]:
    docker = media_type == DOCKER_MANIFEST
    doc: dict[str, Any] = {"schemaVersion": 2}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc["config"] = {
        "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
        "digest": dgst("config"),
        "size": 1234,
    }
    doc["layers"] = [
        {
            "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
            "digest": dgst(f"l{i}"),
            "size": 100 + i,
        }
        for i in range(layers)
    ]
    return doc


def child(platform: str | None, media_type: str = OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "mediaType": media_type,
        "digest": dgst(f"child-{platform}"),
        "size": 500,
    }
    if platform is not None:
        parts = platform.split("/")
        entry["platform"] = {"architecture": parts[1], "os": parts[0]}
        if len(parts) == 3:
            entry["platform"]["variant"] = parts[2]
    entry.update(extra)
    return entry


def attestation(for_platform: str) -> dict[str, Any]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": dgst(f"att-{for_platform}"),
        "size": 840,
        "annotations": {
            "vnd.docker.reference.digest": dgst(f"child-{for_platform}"),
            "vnd.docker.reference.type": "attestation-manifest",
        },
        "platform": {"architecture": "unknown", "os": "unknown"},
    }


def index_doc(
    entries: list[dict[str, Any]], media_type: str | None = OCI_INDEX, **top: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc["schemaVersion"] = 2
    doc["manifests"] = entries
    doc.update(top)
    return doc


def raw(doc: object, indent: int | None = None) -> bytes:
    return json.dumps(doc, indent=indent).encode()


# --- parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "content_type", "expected_type"),
    [
        (image_doc(OCI_MANIFEST), None, OCI_MANIFEST),
        (image_doc(DOCKER_MANIFEST), None, DOCKER_MANIFEST),
        (index_doc([child("linux/amd64")], OCI_INDEX), None, OCI_INDEX),
        (index_doc([child("linux/amd64", DOCKER_MANIFEST)], DOCKER_LIST), None, DOCKER_LIST),
        # No mediaType field: the Content-Type header decides (parameters ignored).
        (image_doc(None), DOCKER_MANIFEST, DOCKER_MANIFEST),
        (index_doc([child("linux/amd64")], None), f"{DOCKER_LIST}; charset=utf-8", DOCKER_LIST),
        # Neither: inferred from the fields.
        (image_doc(None), None, OCI_MANIFEST),
        (index_doc([child("linux/amd64")], None), "application/json", OCI_INDEX),
        # Field and header of the same kind: the field wins.
        (image_doc(OCI_MANIFEST), DOCKER_MANIFEST, OCI_MANIFEST),
    ],
)
def test_parse_media_types(
    doc: dict[str, Any], content_type: str | None, expected_type: str
) -> None:
    data = raw(doc, indent=3)
    manifest = parse_manifest(data, content_type)
    assert manifest.media_type == expected_type
    assert manifest.is_index == (expected_type in INDEX_TYPES)
    assert manifest.raw == data
    assert manifest.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert manifest.descriptor() == Descriptor(expected_type, manifest.digest, len(data))


def test_accept_lists_all_four_types() -> None:
    assert {t.strip() for t in ACCEPT.split(",")} == {
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_LIST,
    }


def test_digest_is_of_the_received_bytes() -> None:
    doc = image_doc()
    compact = parse_manifest(json.dumps(doc, separators=(",", ":")).encode())
    pretty = parse_manifest(raw(doc, indent=2))
    assert compact.digest != pretty.digest
    assert pretty.layers() == compact.layers()


def test_image_accessors() -> None:
    manifest = parse_manifest(raw(image_doc(layers=3)))
    config = manifest.config()
    assert (config.media_type, config.digest, config.size) == (OCI_CONFIG, dgst("config"), 1234)
    assert [layer.digest for layer in manifest.layers()] == [dgst("l0"), dgst("l1"), dgst("l2")]
    assert manifest.blobs() == [config, *manifest.layers()]
    assert manifest.children() == []


def test_index_children_and_no_config() -> None:
    entries = [
        child("linux/arm64/v8", annotations={"org.opencontainers.image.ref.name": "x"}),
        child("linux/amd64", urls=["https://example.com/blob"]),
        attestation("linux/amd64"),
    ]
    entries[2].pop("platform")
    index = parse_manifest(raw(index_doc(entries)))
    kids = index.children()
    assert [k.platform for k in kids] == [
        Platform("linux", "arm64", "v8"),
        Platform("linux", "amd64"),
        None,
    ]
    assert kids[0].annotations == {"org.opencontainers.image.ref.name": "x"}
    assert kids[1].urls == ("https://example.com/blob",)
    assert kids[2].annotations["vnd.docker.reference.type"] == "attestation-manifest"
    with pytest.raises(ProtocolError, match=f"{index.digest} is an index"):
        index.config()
    with pytest.raises(ProtocolError):
        index.layers()


def test_sha512_descriptor_digest_accepted() -> None:
    doc = image_doc()
    doc["layers"][0]["digest"] = "sha512:" + hashlib.sha512(b"x").hexdigest()
    assert parse_manifest(raw(doc)).layers()[0].digest.startswith("sha512:")


def _image_with(path: str, value: Any) -> dict[str, Any]:
    doc = image_doc()
    where, key = path.split(".")
    target = doc["config"] if where == "config" else doc["layers"][int(where)]
    target[key] = value
    return doc


SCHEMA1 = {
    "schemaVersion": 1,
    "name": "library/old",
    "tag": "1.0",
    "architecture": "amd64",
    "fsLayers": [{"blobSum": dgst("a")}],
    "history": [],
    "signatures": [],
}


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (raw(SCHEMA1), None, "schema 1"),
        (raw(SCHEMA1), "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
        (raw({**image_doc(), "schemaVersion": 3}), None, "schemaVersion 3"),
        (
            raw({k: v for k, v in image_doc().items() if k != "schemaVersion"}),
            None,
            "schemaVersion None",
        ),
        (raw(image_doc(OCI_MANIFEST)), OCI_INDEX, "served as"),
        (raw(index_doc([child("linux/amd64")], DOCKER_LIST)), DOCKER_MANIFEST, "served as"),
        (
            raw(image_doc("application/vnd.oci.artifact.manifest.v1+json")),
            None,
            "unsupported media type",
        ),
        (raw(image_doc(None)), "application/vnd.example.thing+json", "unsupported content type"),
        (raw({"schemaVersion": 2}), None, "neither"),
        (raw({**image_doc(), "manifests": []}), None, "both index and image"),
        (
            raw({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
            None,
            "needs a 'config'",
        ),
        (
            raw(index_doc([child("linux/amd64")], OCI_INDEX) | {"manifests": {}}),
            None,
            "no 'manifests' list",
        ),
        (
            raw({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": ["sha256:abc"]}),
            None,
            "manifests[0] is not an object",
        ),
        (raw(_image_with("config.digest", "sha256:" + "A" * 64)), None, "malformed digest"),
        (raw(_image_with("0.digest", "sha256:" + "a" * 63)), None, "malformed digest"),
        (raw(_image_with("0.digest", "sha256:" + "a" * 64 + "\n")), None, "malformed digest"),
        (raw(_image_with("1.digest", "sha512:" + "a" * 64)), None, "malformed digest"),
        (raw(_image_with("1.digest", "md5:" + "a" * 32)), None, "malformed digest"),
        (raw(_image_with("1.digest", 42)), None, "malformed digest"),
        (raw(_image_with("0.size", -1)), None, "invalid size -1"),
        (raw(_image_with("0.size", "12")), None, "invalid size '12'"),
        (raw(_image_with("0.size", True)), None, "invalid size True"),
        (raw(_image_with("0.mediaType", None)), None, "no mediaType"),
        (raw(_image_with("0.annotations", {"a": 1})), None, "annotations"),
        (
            raw(index_doc([child("linux/amd64") | {"platform": "linux/amd64"}])),
            None,
            "invalid platform",
        ),
        (
            b'{"schemaVersion": 2, "schemaVersion": 2, "config": {}, "layers": []}',
            None,
            "duplicate key",
        ),
    ],
)
def test_parse_rejects(data: bytes, content_type: str | None, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_manifest(data, content_type)
    assert message in str(info.value)
    assert compute_digest(data) in str(info.value)


def test_schema1_message_says_what_to_do() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_manifest(raw(SCHEMA1))
    assert "not supported" in str(info.value) and "schema 2" in str(info.value)


def test_oversized_manifest_rejected() -> None:
    doc = image_doc()
    doc["annotations"] = {"pad": "x" * MAX_MANIFEST_SIZE}
    with pytest.raises(ProtocolError, match="limit"):
        parse_manifest(raw(doc))


# --- digests --------------------------------------------------------------------


def test_expected_digest_matches() -> None:
    data = raw(image_doc())
    manifest = parse_manifest(data, expected_digest=compute_digest(data))
    assert manifest.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_expected_digest_mismatch_names_both() -> None:
    data = raw(image_doc())
    wrong = dgst("something else")
    with pytest.raises(IntegrityError) as info:
        parse_manifest(data, expected_digest=wrong)
    assert info.value.expected == wrong
    assert info.value.actual == compute_digest(data)
    assert wrong in str(info.value) and compute_digest(data) in str(info.value)
    assert info.value.exit_code == 6


def test_expected_sha512_digest() -> None:
    data = raw(image_doc())
    sha512 = "sha512:" + hashlib.sha512(data).hexdigest()
    assert parse_manifest(data, expected_digest=sha512).digest == sha512
    with pytest.raises(IntegrityError) as info:
        parse_manifest(data + b" ", expected_digest=sha512)
    assert info.value.actual is not None and info.value.actual.startswith("sha512:")


def test_compute_digest() -> None:
    assert compute_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert compute_digest(b"", "sha512").startswith("sha512:cf83e135")


# --- descriptors ----------------------------------------------------------------


def test_descriptor_json_and_immutability() -> None:
    notes = {"k": "v"}
    desc = Descriptor(
        OCI_MANIFEST, dgst("d"), 7, platform=parse_platform("linux/arm/v7"), annotations=notes
    )
    notes["k"] = "changed"
    assert desc.to_json() == {
        "mediaType": OCI_MANIFEST,
        "digest": dgst("d"),
        "size": 7,
        "annotations": {"k": "v"},
        "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
    }
    assert Descriptor(OCI_LAYER, dgst("d"), 7).to_json() == {
        "mediaType": OCI_LAYER,
        "digest": dgst("d"),
        "size": 7,
    }
    with pytest.raises(TypeError):
        desc.annotations["k"] = "x"  # type: ignore[index]
    # Hashable, so blob sets dedupe; annotations still count for equality.
    twin = Descriptor(OCI_MANIFEST, dgst("d"), 7, platform=desc.platform, annotations={"k": "v"})
    bare = Descriptor(OCI_MANIFEST, dgst("d"), 7, platform=desc.platform)
    assert len({desc, twin, bare}) == 2


# --- platform filtering ---------------------------------------------------------


def multiarch(media_type: str = OCI_INDEX) -> bytes:
    child_type = OCI_MANIFEST if media_type == OCI_INDEX else DOCKER_MANIFEST
    doc = index_doc(
        [
            child("linux/amd64", child_type),
            child("linux/arm64", child_type),
            attestation("linux/amd64"),
            attestation("linux/arm64"),
        ],
        media_type,
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    doc["manifests"][0]["annotations"] = {"keep": "me"}
    doc["manifests"][0]["artifactType"] = "application/x-unknown-field"
    return raw(doc, indent=2)


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_filter_amd64_only(media_type: str) -> None:
    original = parse_manifest(multiarch(media_type))
    filtered = filter_index(original, [parse_platform("linux/amd64")])

    assert filtered.media_type == media_type
    assert filtered.digest != original.digest
    assert filtered.digest == "sha256:" + hashlib.sha256(filtered.raw).hexdigest()
    kids = filtered.children()
    assert [str(k.platform) for k in kids] == ["linux/amd64"]
    assert kids[0].digest == dgst("child-linux/amd64")

    new_doc = json.loads(filtered.raw)
    old_doc = json.loads(original.raw)
    # Only `manifests` shrinks: other fields, their order and the kept entry stay.
    assert list(new_doc) == list(old_doc)
    assert new_doc["annotations"] == old_doc["annotations"]
    assert new_doc["manifests"] == [old_doc["manifests"][0]]
    # Deterministic: the same input gives the same bytes.
    assert (
        filter_index(parse_manifest(multiarch(media_type)), [Platform("linux", "amd64")]).raw
        == filtered.raw
    )


ARM_INDEX = index_doc(
    [
        child("linux/amd64"),
        child("linux/arm64"),
        child("linux/arm/v7"),
        child("linux/arm/v6"),
        child("linux/arm64/v9"),
    ]
)


@pytest.mark.parametrize(
    ("wanted", "kept"),
    [
        (["linux/arm64/v8"], ["linux/arm64"]),
        (["linux/arm64"], ["linux/arm64", "linux/arm64/v9"]),
        (["linux/arm64/v9"], ["linux/arm64/v9"]),
        (["linux/arm/v7"], ["linux/arm/v7"]),
        (["linux/arm"], ["linux/arm/v7", "linux/arm/v6"]),
        (["linux/amd64", "linux/arm/v6"], ["linux/amd64", "linux/arm/v6"]),
    ],
)
def test_filter_variant_rules(wanted: list[str], kept: list[str]) -> None:
    index = parse_manifest(raw(ARM_INDEX))
    filtered = filter_index(index, [parse_platform(w) for w in wanted])
    assert [str(k.platform) for k in filtered.children()] == kept


def test_filter_all_match_returns_original_bytes() -> None:
    data = raw(index_doc([child("linux/amd64"), child("linux/arm64")]), indent=4)
    index = parse_manifest(data)
    same = filter_index(index, [parse_platform("linux/amd64"), parse_platform("linux/arm64")])
    assert same is index
    assert same.raw == data and same.digest == compute_digest(data)
    assert filter_index(index, []) is index


def test_filter_drops_children_without_platform() -> None:
    entries = [child("linux/amd64"), attestation("linux/amd64")]
    entries[1].pop("platform")
    filtered = filter_index(parse_manifest(raw(index_doc(entries))), [Platform("linux", "amd64")])
    assert [k.digest for k in filtered.children()] == [dgst("child-linux/amd64")]


def test_filter_none_match_lists_offered_platforms() -> None:
    index = parse_manifest(multiarch())
    with pytest.raises(UsageError) as info:
        filter_index(index, [parse_platform("linux/s390x")])
    message = str(info.value)
    assert "linux/s390x" in message and index.digest in message
    assert "linux/amd64" in message and "linux/arm64" in message
    assert info.value.exit_code == 2


def test_filter_refuses_an_image() -> None:
    with pytest.raises(ValueError):
        filter_index(parse_manifest(raw(image_doc())), [Platform("linux", "amd64")])
