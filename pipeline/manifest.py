"""Image manifests and indexes: parsing, validation, platform filtering.

A :class:`Manifest` always travels with the exact bytes it was received as, and its
digest is computed from those bytes, never from re-serialised JSON (re-serialising
changes the digest and breaks every pull by digest). The only place new manifest
bytes are made is :func:`filter_index`, and only when it drops children.

Covers OCI image-spec v1 (``image-manifest.md``, ``image-index.md``,
``descriptor.md``) and Docker's schema 2 manifest and manifest list. Docker schema 1
is refused. Values here are immutable and safe to share between threads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from pipeline.errors import IntegrityError, ProtocolError, UsageError
from pipeline.platform import Platform

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Indexes first: a registry holding both answers with the index, which keeps every
# platform (and the upstream digest) by default.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

# distribution refuses manifests over 4 MiB (registry/handlers "maxManifestBodySize");
# containerd and go-containerregistry use the same bound when reading.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# Content types registries and static servers send that say nothing about the kind
# of manifest; the JSON document decides then.
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})

_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256|sha512):([a-f0-9]+)")


def is_digest(text: str) -> bool:
    """Whether ``text`` is ``sha256:`` + 64 or ``sha512:`` + 128 lowercase hex digits."""
    match = _DIGEST_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return False
    return len(match.group(2)) == _DIGEST_HEX[match.group(1)]


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``; ``algorithm`` is ``sha256`` or ``sha512``."""
    if algorithm not in _DIGEST_HEX:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _platform_json(platform: Platform) -> dict[str, str]:
    out = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        out["variant"] = platform.variant
    return out


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob or child.

    ``annotations`` is stored read-only (a copy of what is passed in) and takes no
    part in hashing, so descriptors can live in sets.
    """

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A private read-only copy: a caller mutating its dict must not change us.
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))
        object.__setattr__(self, "urls", tuple(self.urls))

    def to_json(self) -> dict[str, Any]:
        """The descriptor as OCI JSON: mediaType, digest, size, then the optional
        urls, annotations and platform when set."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = _platform_json(self.platform)
        return out


@dataclass(frozen=True)
class Manifest:
    """A manifest or index with the exact bytes it came as.

    Build it with :func:`parse_manifest`, which validates the document; the accessors
    below assume a validated document. ``digest`` is computed from ``raw``.
    """

    raw: bytes = field(repr=False)
    media_type: str
    digest: str

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @cached_property
    def _doc(self) -> dict[str, Any]:
        # cached_property writes the instance __dict__ directly, which a frozen
        # dataclass allows; the value is derived from raw and never changes.
        doc: dict[str, Any] = json.loads(self.raw)
        return doc

    def children(self) -> list[Descriptor]:
        """The entries of an index, in order, with their platforms; [] for an image."""
        if not self.is_index:
            return []
        return [_descriptor(entry) for entry in self._doc["manifests"]]

    def config(self) -> Descriptor:
        """The config descriptor of an image manifest; ProtocolError for an index."""
        self._require_image("config")
        return _descriptor(self._doc["config"])

    def layers(self) -> list[Descriptor]:
        """The layer descriptors of an image manifest, base layer first."""
        self._require_image("layers")
        return [_descriptor(entry) for entry in self._doc["layers"]]

    def blobs(self) -> list[Descriptor]:
        """Every blob an image manifest needs: the config, then the layers."""
        return [self.config(), *self.layers()]

    def descriptor(self) -> Descriptor:
        """The descriptor that points at this manifest."""
        return Descriptor(self.media_type, self.digest, len(self.raw))

    def _require_image(self, what: str) -> None:
        if self.is_index:
            raise ProtocolError(
                f"manifest {self.digest} is an index ({self.media_type}), it has no {what}"
            )


def _descriptor(entry: Mapping[str, Any]) -> Descriptor:
    platform = entry.get("platform")
    return Descriptor(
        media_type=entry["mediaType"],
        digest=entry["digest"],
        size=entry["size"],
        platform=Platform.from_json(platform) if platform is not None else None,
        annotations=entry.get("annotations") or {},
        urls=tuple(entry.get("urls") or ()),
    )


def parse_manifest(
    raw: bytes, content_type: str | None = None, *, expected_digest: str | None = None
) -> Manifest:
    """Validate ``raw`` and return it as a Manifest.

    The media type is the document's ``mediaType``, else ``content_type`` (an HTTP
    Content-Type; parameters are ignored, and generic types such as
    ``application/json`` say nothing), else inferred from the fields present
    (``manifests``: OCI index; ``config`` and ``layers``: OCI manifest).

    With ``expected_digest``, the bytes must hash to it (with its algorithm,
    sha256 or sha512), else IntegrityError naming both digests; the Manifest's
    digest then uses that algorithm. Without it, the digest is sha256.

    Raises ProtocolError naming the manifest's digest for: more than
    MAX_MANIFEST_SIZE bytes, invalid JSON or duplicate keys, a schemaVersion other
    than 2 (schema 1 says so), unknown media types, a ``mediaType`` and a
    ``content_type`` that disagree on index versus image, a document that is both
    or neither, and descriptors with malformed digests, sizes or platforms.
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ProtocolError(
            f"manifest of {len(raw)} bytes is over the {MAX_MANIFEST_SIZE}-byte limit"
        )
    algorithm = "sha256"
    if expected_digest is not None:
        if not is_digest(expected_digest):
            raise ProtocolError(f"malformed expected manifest digest {expected_digest[:80]!r}")
        algorithm = expected_digest.split(":", 1)[0]
    digest = compute_digest(raw, algorithm)
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(
            f"manifest digest mismatch: expected {expected_digest}, got {digest}",
            expected=expected_digest,
            actual=digest,
        )

    doc = _load_json(raw, digest)
    media_type = _media_type(doc, content_type, digest)
    _check_document(doc, media_type, digest)
    return Manifest(raw=raw, media_type=media_type, digest=digest)


def _load_json(raw: bytes, digest: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Duplicate keys read differently in different JSON parsers (first or last
        # wins), so two clients could see two different manifests under one digest.
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ProtocolError(f"manifest {digest} has duplicate key {key[:40]!r}")
            out[key] = value
        return out

    try:
        doc = json.loads(raw, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"manifest {digest} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"manifest {digest} is not a JSON object")
    return doc


def _schema1_error(digest: str) -> ProtocolError:
    return ProtocolError(
        f"manifest {digest} is a Docker schema 1 manifest, which is not supported",
        hint="push the image again with a current client to get a schema 2 or OCI manifest",
    )


def _kind(media_type: str) -> str:
    return "index" if media_type in INDEX_TYPES else "image"


def _media_type(doc: Mapping[str, Any], content_type: str | None, digest: str) -> str:
    schema = doc.get("schemaVersion")
    if schema == 1 and not isinstance(schema, bool):
        raise _schema1_error(digest)

    header = (content_type or "").split(";", 1)[0].strip().lower()
    if header in _SCHEMA1_TYPES:
        raise _schema1_error(digest)
    if header in _GENERIC_TYPES:
        header = ""
    elif header not in INDEX_TYPES | IMAGE_TYPES:
        raise ProtocolError(f"manifest {digest} has unsupported content type {header!r}")

    declared = doc.get("mediaType")
    if declared is not None:
        if not isinstance(declared, str):
            raise ProtocolError(f"manifest {digest} has a mediaType that is not a string")
        if declared in _SCHEMA1_TYPES:
            raise _schema1_error(digest)
        if declared not in INDEX_TYPES | IMAGE_TYPES:
            raise ProtocolError(f"manifest {digest} has unsupported media type {declared[:100]!r}")
        if header and _kind(header) != _kind(declared):
            raise ProtocolError(
                f"manifest {digest} says it is {declared} but was served as {header}"
            )
        return declared
    if header:
        return header
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    raise ProtocolError(
        f"manifest {digest} has no mediaType and neither 'manifests' nor 'config' and 'layers'"
    )


def _check_document(doc: Mapping[str, Any], media_type: str, digest: str) -> None:
    schema = doc.get("schemaVersion")
    if schema != 2 or isinstance(schema, bool):
        raise ProtocolError(f"manifest {digest} has schemaVersion {schema!r}, expected 2")
    # A document carrying both index and image fields can be read as either
    # (CVE-2021-41190, the OCI "ambiguous manifest" advisory): refuse it.
    if "manifests" in doc and ("config" in doc or "layers" in doc):
        raise ProtocolError(f"manifest {digest} has both index and image fields")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ProtocolError(f"index {digest} has no 'manifests' list")
        for i, entry in enumerate(entries):
            _check_descriptor(entry, f"index {digest}: manifests[{i}]", index_entry=True)
        return
    config = doc.get("config")
    layers = doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise ProtocolError(f"manifest {digest} needs a 'config' object and a 'layers' list")
    _check_descriptor(config, f"manifest {digest}: config", index_entry=False)
    for i, layer in enumerate(layers):
        _check_descriptor(layer, f"manifest {digest}: layers[{i}]", index_entry=False)


def _check_descriptor(entry: Any, where: str, *, index_entry: bool) -> None:
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where} is not an object")
    media_type = entry.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ProtocolError(f"{where} has no mediaType")
    digest = entry.get("digest")
    if not isinstance(digest, str) or not is_digest(digest):
        shown = digest[:80] if isinstance(digest, str) else digest
        raise ProtocolError(f"{where} has malformed digest {shown!r}")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"{where} ({digest}) has invalid size {size!r}")
    annotations = entry.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values())
    ):
        raise ProtocolError(f"{where} ({digest}) has annotations that are not strings")
    urls = entry.get("urls")
    if urls is not None and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
        raise ProtocolError(f"{where} ({digest}) has urls that are not strings")
    platform = entry.get("platform")
    if platform is not None:
        if not index_entry or not isinstance(platform, dict):
            raise ProtocolError(f"{where} ({digest}) has an invalid platform")
        if not isinstance(platform.get("os"), str) or not isinstance(
            platform.get("architecture"), str
        ):
            raise ProtocolError(f"{where} ({digest}) platform lacks os or architecture")


def filter_index(index: Manifest, wanted: Sequence[Platform]) -> Manifest:
    """The index reduced to the children whose platform matches one of ``wanted``.

    A child matches when any wanted platform ``matches`` it (see Platform.matches).
    Children without a platform (attestation manifests, for one) are dropped. An
    empty ``wanted`` means no filter. When every child is kept the ORIGINAL
    manifest is returned, same bytes and digest, so upstream digests survive.

    Otherwise the new index is the original document with only ``manifests``
    shortened: every other field, every kept entry (unknown fields included) and
    all key order stay as they were; it is serialised as compact UTF-8 JSON
    (``json.dumps`` with separators ``(",", ":")``, ``ensure_ascii=False``, no key
    sorting), so the same input always gives the same bytes. It keeps the
    original media type and gets a new digest.

    Raises UsageError naming the platforms on offer when no child matches, and
    ValueError when ``index`` is not an index.
    """
    if not index.is_index:
        raise ValueError(f"filter_index needs an index, {index.digest} is {index.media_type}")
    if not wanted:
        return index
    doc = json.loads(index.raw)
    entries: list[dict[str, Any]] = doc["manifests"]
    kept = [
        entry
        for entry, child in zip(entries, index.children(), strict=True)
        if child.platform is not None and any(w.matches(child.platform) for w in wanted)
    ]
    if len(kept) == len(entries):
        return index
    if not kept:
        offered = sorted({str(c.platform) for c in index.children() if c.platform is not None})
        raise UsageError(
            f"index {index.digest} has no manifest for "
            f"{', '.join(str(w) for w in wanted)}; "
            f"it offers {', '.join(offered) if offered else 'no platforms'}",
            hint="change the platforms list or drop it to keep every platform",
        )
    doc["manifests"] = kept
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return parse_manifest(raw, index.media_type)
