"""Generated test images and the harness's own minimal pusher.

``ImageFactory(seed)`` makes layers (gzip streams of tars of random files), configs,
OCI or Docker schema 2 manifests and OCI indexes / Docker manifest lists. Everything
is deterministic from the seed and the order of calls, so two factories with the same
seed called the same way produce byte-identical images (bench runs are comparable).

``Pusher`` uploads them with the distribution API over ``requests`` — monolithic blob
uploads (``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>&digest=``), cross-
repository mounts when it already pushed a blob elsewhere, ``HEAD`` to skip blobs that
are present, then manifests (children before an index). It is independent of
``pipeline`` on purpose: it is the witness tests compare bmsync against.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import itertools
import json
import re
import tarfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urljoin, urlsplit

import requests
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.harness.errors import PushError

MediaKind = Literal["oci", "docker"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_ALL = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

_MEDIA: dict[str, dict[str, str]] = {
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG,
            "layer": OCI_LAYER_GZIP},
    "docker": {"manifest": DOCKER_MANIFEST, "index": DOCKER_MANIFEST_LIST,
               "config": DOCKER_CONFIG, "layer": DOCKER_LAYER_GZIP},
}
_EPOCH = "1970-01-01T00:00:00Z"
MB = 1_000_000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_bytes(value: Any) -> bytes:
    # Fixed formatting: the bytes are what gets pushed and digested.
    return json.dumps(value, indent=2).encode() + b"\n"


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, as in an index's ``platform`` field."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must be os/arch[/variant], not {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def as_json(self) -> dict[str, str]:
        value = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            value["variant"] = self.variant
        return value


@dataclass(frozen=True)
class Layer:
    """A compressed layer: ``data`` is the gzip stream, ``diff_id`` the tar's digest."""

    data: bytes
    digest: str
    diff_id: str
    uncompressed_size: int

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Image:
    """An image manifest with its config and layers.

    ``digest`` is the sha256 of ``manifest_bytes``, the exact bytes a push sends;
    ``size`` is the manifest's length (its descriptor size). ``blobs`` maps digest ->
    bytes for the config and every layer, in push order.
    """

    manifest_bytes: bytes
    media_type: str
    digest: str
    config_bytes: bytes
    config_digest: str
    layers: tuple[Layer, ...]
    platform: Platform

    @property
    def size(self) -> int:
        return len(self.manifest_bytes)

    @property
    def manifest(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.manifest_bytes)
        return parsed

    @property
    def blobs(self) -> dict[str, bytes]:
        blobs = {self.config_digest: self.config_bytes}
        for layer in self.layers:
            blobs[layer.digest] = layer.data
        return blobs

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """digest -> (media type, bytes) of every manifest to push, children first."""
        return {self.digest: (self.media_type, self.manifest_bytes)}

    @property
    def content_size(self) -> int:
        """Bytes of every blob and the manifest: what a full copy transfers."""
        return sum(len(b) for b in self.blobs.values()) + self.size

    @property
    def children(self) -> tuple[Image, ...]:
        return ()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list over ``children`` (pushed before it)."""

    manifest_bytes: bytes
    media_type: str
    digest: str
    children: tuple[Image, ...]

    @property
    def size(self) -> int:
        return len(self.manifest_bytes)

    @property
    def manifest(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.manifest_bytes)
        return parsed

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob of every child, each once."""
        blobs: dict[str, bytes] = {}
        for child in self.children:
            blobs.update(child.blobs)
        return blobs

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """digest -> (media type, bytes): the children first, then the index."""
        manifests: dict[str, tuple[str, bytes]] = {}
        for child in self.children:
            manifests.update(child.manifests)
        manifests[self.digest] = (self.media_type, self.manifest_bytes)
        return manifests

    @property
    def content_size(self) -> int:
        return sum(len(b) for b in self.blobs.values()) + sum(
            len(body) for _, body in self.manifests.values()
        )

    @property
    def platforms(self) -> tuple[Platform, ...]:
        return tuple(child.platform for child in self.children)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


Artifact = Image | Index


class ImageFactory:
    """Deterministic generator of layers, images and indexes.

    The n-th ``layer()`` call of a factory seeded ``s`` always yields the same bytes;
    likewise ``image()`` numbers its configs so two images with the same layers still
    differ (a label ``org.bmsync.test.serial``) unless ``labels`` is given. Layers are
    gzip streams of stored (level 0) deflate blocks by default: the content is random,
    so compressing would only cost time. Not thread-safe (the counters).
    """

    def __init__(self, seed: int | str = 0, *, compresslevel: int = 0) -> None:
        self.seed = str(seed)
        self.compresslevel = compresslevel
        self._layers = itertools.count()
        self._images = itertools.count()

    def random_bytes(self, size: int, key: str) -> bytes:
        """``size`` incompressible bytes, a pure function of the seed and ``key``.

        AES-CTR keystream: about 1 GB/s, against 250 MB/s for ``random.randbytes``.
        """
        secret = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        encryptor = Cipher(algorithms.AES(secret), modes.CTR(bytes(16))).encryptor()
        return encryptor.update(bytes(size)) + encryptor.finalize()

    def layer(self, size: int, *, files: int = 1) -> Layer:
        """A layer holding ``files`` random files of ``size`` bytes in total."""
        if size < 0 or files < 1:
            raise ValueError("size must be >= 0 and files >= 1")
        serial = next(self._layers)
        content = self.random_bytes(size, f"layer-{serial}")
        tar = _tar(
            (f"data/layer{serial}/file{i}.bin", part)
            for i, part in enumerate(_split(content, files))
        )
        compressed = gzip.compress(tar, compresslevel=self.compresslevel, mtime=0)
        return Layer(
            data=compressed,
            digest=sha256_digest(compressed),
            diff_id=sha256_digest(tar),
            uncompressed_size=len(tar),
        )

    def image(
        self,
        layers: Sequence[Layer] | None = None,
        *,
        media: MediaKind = "oci",
        platform: str | Platform = "linux/amd64",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Image:
        """An image of ``layers`` (default: one new 4 KiB layer).

        ``media`` picks OCI or Docker schema 2 media types for the manifest, config and
        layers; ``platform`` fills the config's os/architecture/variant.
        """
        kinds = _media(media)
        plat = platform if isinstance(platform, Platform) else Platform.parse(platform)
        chosen = tuple(layers) if layers is not None else (self.layer(4096),)
        serial = next(self._images)
        config: dict[str, Any] = {
            "created": _EPOCH,
            "architecture": plat.architecture,
            "os": plat.os,
        }
        if plat.variant:
            config["variant"] = plat.variant
        config["config"] = {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": dict(labels) if labels is not None
            else {"org.bmsync.test.serial": f"{self.seed}-{serial}"},
        }
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in chosen]}
        config["history"] = [
            {"created": _EPOCH, "created_by": f"bmsync test layer {i}"}
            for i in range(len(chosen))
        ]
        config_bytes = _json_bytes(config)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": kinds["manifest"],
            "config": {
                "mediaType": kinds["config"],
                "digest": sha256_digest(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": kinds["layer"], "digest": layer.digest, "size": layer.size}
                for layer in chosen
            ],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        manifest_bytes = _json_bytes(manifest)
        return Image(
            manifest_bytes=manifest_bytes,
            media_type=kinds["manifest"],
            digest=sha256_digest(manifest_bytes),
            config_bytes=config_bytes,
            config_digest=sha256_digest(config_bytes),
            layers=chosen,
            platform=plat,
        )

    def index(
        self,
        children: Sequence[Image],
        *,
        media: MediaKind = "oci",
        annotations: Mapping[str, str] | None = None,
    ) -> Index:
        """An OCI index or Docker manifest list listing ``children`` with platforms."""
        if not children:
            raise ValueError("an index needs at least one child")
        kinds = _media(media)
        entries = []
        for child in children:
            entry = child.descriptor()
            entry["platform"] = child.platform.as_json()
            entries.append(entry)
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": kinds["index"],
            "manifests": entries,
        }
        if annotations:
            index["annotations"] = dict(annotations)
        data = _json_bytes(index)
        return Index(
            manifest_bytes=data,
            media_type=kinds["index"],
            digest=sha256_digest(data),
            children=tuple(children),
        )

    def multiarch(
        self,
        platforms: Sequence[str] = ("linux/amd64", "linux/arm64/v8"),
        *,
        base: Sequence[Layer] = (),
        layer_size: int = 4096,
        media: MediaKind = "oci",
    ) -> Index:
        """An index with one child per platform, each ``base`` + its own new layer."""
        children = [
            self.image([*base, self.layer(layer_size)], media=media, platform=p)
            for p in platforms
        ]
        return self.index(children, media=media)


def _media(media: str) -> dict[str, str]:
    try:
        return _MEDIA[media]
    except KeyError:
        raise ValueError(f"media must be 'oci' or 'docker', not {media!r}") from None


def _split(content: bytes, parts: int) -> Iterator[bytes]:
    step = -(-len(content) // parts) if content else 0
    for i in range(parts):
        yield content[i * step:(i + 1) * step] if step else b""


def _tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A reproducible tar: fixed mtime, owner and mode."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- pushing -------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class PushStats:
    """What a Pusher did: requests sent and blob outcomes (for bench baselines)."""

    requests: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    mounted: int = 0
    skipped: int = 0
    manifests: int = 0
    token_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class Pusher:
    """Pushes artifacts to one registry over one ``requests.Session``.

    ``auth`` is ``(user, password)``: sent as Basic when the registry challenges Basic,
    exchanged at the realm for a Bearer token (cached per scope) when it challenges
    Bearer. ``verify`` is requests' ``verify`` (a CA file path for a test CA).
    Remembers which repository already holds which blob, to mount instead of upload.
    Not thread-safe: use one Pusher per thread. Raises ``PushError`` on any refusal.
    """

    def __init__(
        self,
        registry_url: str,
        *,
        auth: tuple[str, str] | None = None,
        verify: bool | str | Path = True,
        timeout: float = 60.0,
    ) -> None:
        self.base = registry_url.rstrip("/")
        self.auth = auth
        self.verify: bool | str = str(verify) if isinstance(verify, Path) else verify
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "bmsync-harness-pusher/1"
        # Loopback only: never route the harness through an HTTPS_PROXY of the host.
        self.session.trust_env = False
        self.stats = PushStats()
        self._tokens: dict[str, str] = {}  # challenged scope -> Authorization value
        self._repo_auth: dict[str, str] = {}  # repository -> last Authorization value
        self._known: dict[str, str] = {}  # blob digest -> a repository that holds it

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, repo: str, tag: str | None, artifact: Artifact) -> str:
        """Push blobs, child manifests, then the top manifest (at ``tag`` if given).

        Returns the digest of the exact manifest bytes pushed (also checked against the
        registry's ``Docker-Content-Digest``).
        """
        for digest, data in artifact.blobs.items():
            self.push_blob(repo, digest, data)
        for digest, (media_type, body) in artifact.manifests.items():
            reference = tag if (digest == artifact.digest and tag) else digest
            self.push_manifest(repo, reference, media_type, body)
        return artifact.digest

    def blob_exists(self, repo: str, digest: str) -> bool:
        response = self._request("HEAD", repo, f"/v2/{repo}/blobs/{digest}")
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._error("HEAD blob", response)

    def push_blob(self, repo: str, digest: str, data: bytes) -> str:
        """Make ``digest`` present in ``repo``: skip, mount or upload. Returns which."""
        if self.blob_exists(repo, digest):
            self._known.setdefault(digest, repo)
            self._count("skipped")
            return "skipped"
        params: dict[str, str] = {}
        source = self._known.get(digest)
        if source is not None and source != repo:
            params = {"mount": digest, "from": source}
        response = self._request("POST", repo, f"/v2/{repo}/blobs/uploads/", params=params)
        if response.status_code == 201 and params:
            self._count("mounted")
            return "mounted"
        if response.status_code != 202:
            raise self._error("POST upload", response)
        location = urljoin(self.base + "/", response.headers["Location"])
        separator = "&" if urlsplit(location).query else "?"
        url = f"{location}{separator}digest={quote(digest, safe=':')}"
        response = self._request(
            "PUT", repo, url, data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status_code != 201:
            raise self._error("PUT blob", response)
        self._known[digest] = repo
        with self.stats.lock:
            self.stats.uploaded += 1
            self.stats.uploaded_bytes += len(data)
        return "uploaded"

    def push_manifest(self, repo: str, reference: str, media_type: str, body: bytes) -> str:
        """PUT a manifest by tag or digest; returns the registry's digest for it."""
        response = self._request(
            "PUT", repo, f"/v2/{repo}/manifests/{reference}", data=body,
            headers={"Content-Type": media_type},
        )
        if response.status_code != 201:
            raise self._error(f"PUT manifest {reference}", response)
        expected = sha256_digest(body)
        answered = response.headers.get("Docker-Content-Digest", expected)
        if answered != expected:
            raise PushError(
                f"registry stored manifest {repo}:{reference} as {answered}, expected {expected}"
            )
        self._count("manifests")
        return expected

    # -- internals ------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self.stats.lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _request(
        self, method: str, repo: str, path_or_url: str, **kwargs: Any
    ) -> requests.Response:
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        headers = dict(kwargs.pop("headers", {}) or {})
        if repo in self._repo_auth:
            headers["Authorization"] = self._repo_auth[repo]
        response = self._send(method, url, headers, kwargs)
        if response.status_code != 401:
            return response
        authorization = self._authorize(response.headers.get("WWW-Authenticate", ""))
        if authorization is None:
            return response
        self._repo_auth[repo] = authorization
        headers["Authorization"] = authorization
        return self._send(method, url, headers, kwargs)

    def _send(
        self, method: str, url: str, headers: dict[str, str], kwargs: dict[str, Any]
    ) -> requests.Response:
        with self.stats.lock:
            self.stats.requests += 1
        try:
            return self.session.request(
                method, url, headers=headers, verify=self.verify, timeout=self.timeout,
                allow_redirects=False, **kwargs,
            )
        except requests.RequestException as exc:
            raise PushError(f"{method} {url.split('?')[0]}: {exc}") from exc

    def _authorize(self, challenge: str) -> str | None:
        scheme, _, rest = challenge.partition(" ")
        if self.auth is None:
            return None
        if scheme.lower() == "basic":
            user, password = self.auth
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if scheme.lower() != "bearer":
            return None
        params = dict(_CHALLENGE_PARAM.findall(rest))
        scope = params.get("scope", "")
        if scope in self._tokens:
            return self._tokens[scope]
        query: list[tuple[str, str]] = []
        if "service" in params:
            query.append(("service", params["service"]))
        query += [("scope", s) for s in scope.split()]
        with self.stats.lock:
            self.stats.token_requests += 1
        try:
            response = self.session.get(
                params["realm"], params=query, auth=self.auth, verify=self.verify,
                timeout=self.timeout,
            )
        except (KeyError, requests.RequestException) as exc:
            raise PushError(f"token request failed: {exc!r}") from exc
        if response.status_code != 200:
            raise self._error("GET token", response)
        body = response.json()
        value = "Bearer " + (body.get("token") or body["access_token"])
        self._tokens[scope] = value
        return value

    @staticmethod
    def _error(what: str, response: requests.Response) -> PushError:
        url = response.request.url or ""
        return PushError(
            f"{what} {url.split('?')[0]} -> {response.status_code}: {response.text[:300]}",
            status=response.status_code,
            body=response.text[:2000],
        )


def push(
    registry_url: str,
    repo: str,
    tag: str | None,
    artifact: Artifact,
    *,
    auth: tuple[str, str] | None = None,
    verify: bool | str | Path = True,
) -> str:
    """Push one image or index with a fresh Pusher; returns its manifest digest."""
    with Pusher(registry_url, auth=auth, verify=verify) as pusher:
        return pusher.push(repo, tag, artifact)


# -- image sets for bench and demo -----------------------------------------------------

SEED_REPOSITORIES = (
    "anthos-baremetal-release/kube-rbac-proxy",
    "anthos-baremetal-release/etcd",
    "anthos-baremetal-release/coredns",
    "anthos-baremetal-release/metrics-server",
    "anthos-baremetal-release/pause",
    "kubernetes-e2e-test-images/nautilus",
)


@dataclass(frozen=True)
class SeededImage:
    """One image pushed by ``seed_image_set``: ``reference`` is ``REPO:TAG``."""

    repository: str
    tag: str
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    content_size: int

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


def seed_image_set(
    registry_url: str,
    *,
    images: int = 20,
    total_mb: float = 500,
    shared_base_mb: float | None = None,
    seed: int | str = 0,
    repositories: Sequence[str] = SEED_REPOSITORIES,
    multiarch_every: int = 4,
    auth: tuple[str, str] | None = None,
    verify: bool | str | Path = True,
) -> list[SeededImage]:
    """Push ``images`` images over ``repositories`` and return what was pushed.

    About ``total_mb`` MB (10^6 bytes) of unique blob bytes: two shared base layers
    (``shared_base_mb`` together, default a fifth of the total) each reused by half the
    images, plus two own layers per image (per platform). Every ``multiarch_every``-th
    image is an index (linux/amd64 + linux/arm64/v8); media types alternate between OCI
    and Docker. Images are generated and pushed one at a time, so memory stays near
    the largest image. Deterministic from ``seed``.
    """
    if images < 1:
        raise ValueError("images must be >= 1")
    factory = ImageFactory(seed)
    total = int(total_mb * MB)
    shared = int(shared_base_mb * MB) if shared_base_mb is not None else total // 5
    shared = min(shared, total)
    bases = [factory.layer(shared // 2, files=2), factory.layer(shared - shared // 2, files=2)]
    is_multi = [multiarch_every > 0 and i % multiarch_every == multiarch_every - 1
                for i in range(images)]
    units = images + sum(is_multi)  # an index has two children with their own layers
    per_unit = max(0, (total - shared) // units)
    seeded: list[SeededImage] = []
    with Pusher(registry_url, auth=auth, verify=verify) as pusher:
        for i in range(images):
            repo = repositories[i % len(repositories)]
            tag = f"v1.{i // len(repositories)}.{i}"
            media: MediaKind = "oci" if i % 2 == 0 else "docker"
            base = bases[i % 2]
            artifact: Artifact
            if is_multi[i]:
                children = [
                    factory.image([base, *_own_layers(factory, per_unit)], media=media, platform=p)
                    for p in ("linux/amd64", "linux/arm64/v8")
                ]
                artifact = factory.index(children, media=media)
                platforms = tuple(str(p) for p in artifact.platforms)
            else:
                artifact = factory.image([base, *_own_layers(factory, per_unit)], media=media)
                platforms = ("linux/amd64",)
            digest = pusher.push(repo, tag, artifact)
            seeded.append(
                SeededImage(
                    repository=repo, tag=tag, digest=digest, media_type=artifact.media_type,
                    platforms=platforms, content_size=artifact.content_size,
                )
            )
    return seeded


def _own_layers(factory: ImageFactory, size: int) -> list[Layer]:
    # Two layers of 2/3 and 1/3: images have more than one layer in real life.
    big = size * 2 // 3
    return [factory.layer(big, files=3), factory.layer(size - big)]
