"""Bundle format v1: the ``bundle.json`` model, member names and archive names (DESIGN.md §5).

``bundle.json`` is the first member of every archive and also sits beside it as
``bmpackages_<VERSION>.bundle.json``. It is the plan a reader makes before it reads
any blob: the images with their digests, and every blob with its size, media type,
whether the archive carries it (a delta leaves out what its base has) and the offset of
its tar header, counted from the first ``blobs/`` member.

:func:`parse_manifest` never trusts its input: every field is type-checked, digests and
names are validated, offsets must tile the blob region exactly, and every blob an image
needs must be declared. Serialisation is deterministic (sorted keys, fixed separators),
so equal content gives equal bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pipeline.errors import IntegrityError
from pipeline.store import REF_NAME_ANNOTATION

SCHEMA_VERSION = 1
MEDIA_TYPE = "application/vnd.bmsync.bundle.v1+json"
BUNDLE_JSON = "bundle.json"
OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
BLOBS_PREFIX = "blobs/sha256/"
# Thousands of images and tens of thousands of blobs fit in a few MiB; the bound keeps a
# hostile bundle.json (a huge list of numbers) from using hundreds of MB while parsed.
MAX_BUNDLE_JSON = 16 * 1024 * 1024
REF_NAME = REF_NAME_ANNOTATION
CONTAINERD_NAME = "io.containerd.image.name"

# A sha256 digest as bundles and the nodes' image lists write them.
SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BLOB_NAME = re.compile(r"^blobs/sha256/[0-9a-f]{64}$")

EXTENSIONS = {"zstd": ".tar.zst", "xz": ".tar.xz", "none": ".tar"}


def archive_name(version: str, compression: str) -> str:
    """``bmpackages_<VERSION>.tar.zst`` (or ``.tar.xz``, ``.tar``)."""
    return f"bmpackages_{version}{EXTENSIONS[compression]}"


def sidecar_manifest_name(version: str) -> str:
    return f"bmpackages_{version}.bundle.json"


def blob_member(digest: str) -> str:
    return BLOBS_PREFIX + digest.split(":", 1)[1]


def allowed_member(name: str) -> bool:
    """The only names a bundle may hold."""
    return name in (BUNDLE_JSON, OCI_LAYOUT, INDEX_JSON) or bool(BLOB_NAME.match(name))


@dataclass(frozen=True)
class BlobEntry:
    size: int
    media_type: str
    in_archive: bool
    offset: int | None  # of the tar header, from the first blobs/ member; None when absent

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size,
            "mediaType": self.media_type,
            "inArchive": self.in_archive,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


@dataclass(frozen=True)
class ImageEntry:
    source: str  # full source reference, "gcr.io/repo/name:tag"
    repository: str  # "repo/name" (the mirror path drops the host)
    tag: str | None
    digest: str  # the manifest in the bundle
    upstream_digest: str  # the manifest upstream (differs after a platform filter)
    media_type: str
    size: int  # bytes of every blob it needs, manifests included
    blobs: tuple[str, ...]  # every digest it needs: layers, configs, manifests, itself

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "upstreamDigest": self.upstream_digest,
            "mediaType": self.media_type,
            "size": self.size,
            "blobs": list(self.blobs),
        }


@dataclass(frozen=True)
class BaseRef:
    """What a delta needs at the site: an earlier bundle or an inventory of a mirror.

    ``digest`` is the sha256 of the base's ``bundle.json`` (for a bundle: the same bytes
    as its archive's first member and its ``.bundle.json`` sidecar) or of the inventory
    file.
    """

    kind: str  # "bundle" | "inventory"
    digest: str
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "digest": self.digest}
        if self.kind == "bundle":
            out["version"] = self.version
        return out

    def describe(self) -> str:
        if self.kind == "bundle":
            return f"bundle {self.version} ({self.digest})"
        return f"inventory {self.digest}"


@dataclass(frozen=True)
class BaseContent:
    """What a site already holds: the base's reference and every digest it has."""

    ref: BaseRef
    digests: frozenset[str]


@dataclass(frozen=True)
class BundleManifest:
    version: str
    created: str
    base: BaseRef | None
    platforms: tuple[str, ...]
    images: tuple[ImageEntry, ...]
    blobs: Mapping[str, BlobEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blobs", MappingProxyType(dict(self.blobs)))

    @property
    def is_delta(self) -> bool:
        return self.base is not None

    def archive_blobs(self) -> list[tuple[str, BlobEntry]]:
        """The blobs the archive carries, in archive order (by offset)."""
        carried = [(d, b) for d, b in self.blobs.items() if b.in_archive]
        carried.sort(key=lambda item: item[1].offset or 0)
        return carried

    def missing_blobs(self) -> list[str]:
        """Digests the images need that the archive does not carry (a delta's base)."""
        return sorted(d for d, b in self.blobs.items() if not b.in_archive)

    def to_json(self) -> bytes:
        doc = {
            "schemaVersion": SCHEMA_VERSION,
            "mediaType": MEDIA_TYPE,
            "version": self.version,
            "created": self.created,
            "base": self.base.to_json() if self.base else None,
            "platforms": list(self.platforms),
            "images": [i.to_json() for i in self.images],
            "blobs": {d: self.blobs[d].to_json() for d in sorted(self.blobs)},
        }
        return (json.dumps(doc, sort_keys=True, indent=1, separators=(",", ": ")) + "\n").encode()


def parse_manifest(raw: bytes, *, source: str) -> BundleManifest:
    """Parse and validate ``bundle.json`` bytes; ``source`` names them in messages.

    Raises IntegrityError naming the source and the first problem found.
    """
    if len(raw) > MAX_BUNDLE_JSON:
        raise IntegrityError(f"{source}: bundle.json is {len(raw)} bytes, over the limit")
    if not raw.lstrip()[:1] == b"{":
        raise IntegrityError(f"{source}: bundle.json is not a JSON object")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{source}: bundle.json is not valid JSON ({e})") from None
    except RecursionError:
        raise IntegrityError(f"{source}: bundle.json nests too deeply") from None
    return _Parser(source).manifest(doc)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> IntegrityError:
        return IntegrityError(f"{self.source}: bundle.json {where}: {problem}")

    def obj(self, value: Any, where: str, keys: Sequence[str],
            optional: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be an object")
        unknown = set(value) - set(keys) - set(optional)
        if unknown:
            raise self.fail(where, f"unknown key {sorted(unknown)[0]!r}")
        missing = [k for k in keys if k not in value]
        if missing:
            raise self.fail(where, f"missing key {missing[0]!r}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, "must be a non-empty string")
        return value

    def digest(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not SHA256_DIGEST.match(value):
            raise self.fail(where, f"invalid digest {value!r}")
        return value

    def size(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(where, f"invalid size {value!r}")
        return value

    def manifest(self, doc: Any) -> BundleManifest:
        top = self.obj(
            doc, "top level",
            ["schemaVersion", "mediaType", "version", "created", "base", "platforms",
             "images", "blobs"],
        )
        if top["schemaVersion"] != SCHEMA_VERSION:
            raise self.fail(
                "schemaVersion",
                f"{top['schemaVersion']!r} is not supported (this bmsync reads {SCHEMA_VERSION})",
            )
        if top["mediaType"] != MEDIA_TYPE:
            raise self.fail("mediaType", f"{top['mediaType']!r} is not {MEDIA_TYPE}")
        version = self.string(top["version"], "version")
        if not _VERSION.match(version):
            raise self.fail("version", f"{version!r} is not a valid bundle version")
        created = self.string(top["created"], "created")
        base = None if top["base"] is None else self.base(top["base"])
        platforms = top["platforms"]
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise self.fail("platforms", "must be a list of strings")
        blobs = self.blobs(top["blobs"])
        images = top["images"]
        if not isinstance(images, list):
            raise self.fail("images", "must be a list")
        parsed = tuple(self.image(i, n, blobs) for n, i in enumerate(images))
        sources = [i.source for i in parsed]
        if len(set(sources)) != len(sources):
            raise self.fail("images", "lists an image twice")
        self.check_offsets(blobs)
        if base is None and any(not b.in_archive for b in blobs.values()):
            raise self.fail("blobs", "a full bundle must carry every blob (inArchive false)")
        return BundleManifest(version, created, base, tuple(platforms), parsed, blobs)

    def base(self, value: Any) -> BaseRef:
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind == "bundle":
            b = self.obj(value, "base", ["kind", "digest", "version"])
            return BaseRef("bundle", self.digest(b["digest"], "base.digest"),
                           self.string(b["version"], "base.version"))
        if kind == "inventory":
            b = self.obj(value, "base", ["kind", "digest"])
            return BaseRef("inventory", self.digest(b["digest"], "base.digest"))
        raise self.fail("base", "kind must be 'bundle' or 'inventory'")

    def blobs(self, value: Any) -> dict[str, BlobEntry]:
        if not isinstance(value, dict):
            raise self.fail("blobs", "must be an object")
        out: dict[str, BlobEntry] = {}
        for digest, entry in value.items():
            where = f"blobs[{digest}]"
            self.digest(digest, where)
            e = self.obj(entry, where, ["size", "mediaType", "inArchive"], ["offset"])
            in_archive = e["inArchive"]
            if not isinstance(in_archive, bool):
                raise self.fail(where, "inArchive must be true or false")
            offset = e.get("offset")
            if in_archive:
                offset = self.size(offset, f"{where}.offset")
            elif offset is not None:
                raise self.fail(where, "an absent blob has no offset")
            out[digest] = BlobEntry(
                self.size(e["size"], f"{where}.size"),
                self.string(e["mediaType"], f"{where}.mediaType"),
                in_archive,
                offset,
            )
        return out

    def image(self, value: Any, n: int, blobs: Mapping[str, BlobEntry]) -> ImageEntry:
        where = f"images[{n}]"
        i = self.obj(
            value, where,
            ["source", "repository", "tag", "digest", "upstreamDigest", "mediaType", "size",
             "blobs"],
        )
        tag = i["tag"]
        if tag is not None and not isinstance(tag, str):
            raise self.fail(f"{where}.tag", "must be a string or null")
        needed = i["blobs"]
        if not isinstance(needed, list) or not needed:
            raise self.fail(f"{where}.blobs", "must be a non-empty list of digests")
        for d in needed:
            self.digest(d, f"{where}.blobs")
            if d not in blobs:
                raise self.fail(f"{where}.blobs", f"{d} is not declared in blobs")
        digest = self.digest(i["digest"], f"{where}.digest")
        if digest not in needed:
            raise self.fail(f"{where}.blobs", "does not list the image's own manifest")
        return ImageEntry(
            source=self.string(i["source"], f"{where}.source"),
            repository=self.string(i["repository"], f"{where}.repository"),
            tag=tag,
            digest=digest,
            upstream_digest=self.digest(i["upstreamDigest"], f"{where}.upstreamDigest"),
            media_type=self.string(i["mediaType"], f"{where}.mediaType"),
            size=self.size(i["size"], f"{where}.size"),
            blobs=tuple(needed),
        )

    def check_offsets(self, blobs: Mapping[str, BlobEntry]) -> None:
        """Blobs in the archive must tile the blob region: each starts where the last ends."""
        from pipeline.bundle.tarstream import member_span

        expected = 0
        for digest, entry in sorted(
            ((d, b) for d, b in blobs.items() if b.in_archive), key=lambda x: x[1].offset or 0
        ):
            if entry.offset != expected:
                raise self.fail(
                    f"blobs[{digest}].offset",
                    f"{entry.offset} does not follow the previous member (expected {expected})",
                )
            expected += member_span(entry.size)
