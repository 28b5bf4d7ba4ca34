"""Image references and mirror addresses: parse, normalise, rewrite.

References follow the grammar of the distribution project's ``reference`` package
(``name[:tag][@digest]``), with two deliberate narrowings: the first path component is
a registry host only when it contains ``.`` or ``:`` or is ``localhost`` (so an
uppercase first component is a repository error, not a host), and digests are limited
to ``sha256`` and ``sha512``, the algorithms the OCI image spec registers.

Every :class:`Reference` and :class:`Mirror` is valid by construction: the dataclasses
check their fields, so code handed one never re-validates it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.errors import InvalidReference, UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

# Names under which Docker Hub appears in references and docker config files; all
# mean the same registry, whose API is served by registry-1.docker.io.
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API})

DEFAULT_TAG = "latest"
MAX_REPOSITORY_LENGTH = 255

_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = re.compile(
    rf"(?:(?P<name>{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*)|\[(?P<ipv6>[0-9a-fA-F:.]+)\])"
    r"(?::(?P<port>[0-9]+))?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]+")
_WHITESPACE = re.compile(r"\s")


def _host_problem(host: str) -> tuple[str | None, str]:
    """``(reason, normalised)``: reason is None when ``host`` is a valid ``host[:port]``."""
    match = _HOST.fullmatch(host)
    if match is None:
        return f"invalid registry host {host!r}", host
    port = match["port"]
    if port is not None and not 0 < int(port) <= 65535:
        return f"port {port} of registry host {host!r} is out of range", host
    if match["ipv6"] is not None:
        try:
            address = ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return f"invalid IPv6 address in registry host {host!r}", host
        name = f"[{address.compressed}]"
    else:
        # Host names are case-insensitive (RFC 4343): one spelling per registry keeps
        # settings lookups and duplicate checks exact.
        name = match["name"].lower()
        if port is None and name in DOCKER_HUB_ALIASES:
            name = DOCKER_HUB
    return None, name if port is None else f"{name}:{port}"


def normalize_registry(host: str) -> str:
    """The canonical spelling of a registry ``host[:port]``, as :attr:`Reference.registry`.

    Lowercases the name, compresses an IPv6 address, and maps Docker Hub's aliases
    (``index.docker.io``, ``registry-1.docker.io``) to ``docker.io``. Raises
    :class:`UsageError` naming ``host`` when it is not a host name, IPv4 or ``[IPv6]``
    address with an optional port.
    """
    reason, normalised = _host_problem(host)
    if reason is not None:
        raise UsageError(reason)
    return normalised


def api_host(registry: str) -> str:
    """The host serving ``registry``'s API: ``registry-1.docker.io`` for Docker Hub,
    else the registry itself."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def _repository_problem(repository: str) -> str | None:
    if not repository:
        return "missing repository name"
    if len(repository) > MAX_REPOSITORY_LENGTH:
        return (
            f"repository is {len(repository)} characters long, "
            f"at most {MAX_REPOSITORY_LENGTH} are allowed"
        )
    for component in repository.split("/"):
        if not component:
            return "empty path component (leading, trailing or doubled '/')"
        if _PATH_COMPONENT.fullmatch(component):
            continue
        if component != component.lower() and _PATH_COMPONENT.fullmatch(component.lower()):
            return f"repository component {component!r} has uppercase letters (must be lowercase)"
        return (
            f"invalid repository component {component!r} (lowercase letters and digits, "
            "separated by '.', '_', '__' or '-')"
        )
    return None


def _tag_problem(tag: str) -> str | None:
    if not tag:
        return "empty tag after ':'"
    if _TAG.fullmatch(tag) is None:
        return (
            f"invalid tag {tag!r} (letters, digits, '_', '.' and '-', not starting with "
            "'.' or '-', at most 128 characters)"
        )
    return None


def _digest_problem(digest: str) -> str | None:
    algorithm, sep, encoded = digest.partition(":")
    if not sep:
        return f"invalid digest {digest!r} (write ALGORITHM:HEX, e.g. sha256:...)"
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        return f"unsupported digest algorithm {algorithm!r} (sha256 or sha512)"
    if len(encoded) != length or _LOWER_HEX.fullmatch(encoded) is None:
        return f"{algorithm} digest must be {length} lowercase hex characters, got {encoded!r}"
    return None


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``registry/repository[:tag][@digest]``.

    ``tag`` and ``digest`` may both be set (the tag is then informational, the digest
    is what gets pulled) or both be None (a bare repository, as in a filtered entry of
    the images config). Construction validates every field and raises
    :class:`InvalidReference`; ``registry`` must already be normalised
    (:func:`normalize_registry`).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        reason, normalised = _host_problem(self.registry)
        if reason is None and normalised != self.registry:
            reason = f"registry host {self.registry!r} is not normalised (write {normalised!r})"
        reason = (
            reason
            or _repository_problem(self.repository)
            or (None if self.tag is None else _tag_problem(self.tag))
            or (None if self.digest is None else _digest_problem(self.digest))
        )
        if reason is not None:
            raise InvalidReference(self._text(), reason)

    def _text(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self._text()

    @property
    def api_host(self) -> str:
        """The host serving the registry API (``registry-1.docker.io`` for Docker Hub)."""
        return api_host(self.registry)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What goes in ``/v2/<repository>/manifests/<identifier>``: the digest if set, else
        the tag. Raises :class:`InvalidReference` for a bare repository (neither set)."""
        if self.digest is not None:
            return self.digest
        if self.tag is not None:
            return self.tag
        raise InvalidReference(str(self), "names no tag or digest to fetch")

    def with_digest(self, digest: str) -> Reference:
        """The same reference pinned to ``digest``; the tag is kept."""
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str) -> Reference:
        """The same repository at ``tag``, without a digest.

        The digest is dropped because it was the resolution of the previous tag (or
        none): keeping it would make the new reference pull the old image.
        """
        return Reference(self.registry, self.repository, tag, None)


def _parse(text: str, default_tag: str | None) -> Reference:
    if not text:
        raise InvalidReference(text, "empty reference")
    if _WHITESPACE.search(text):
        raise InvalidReference(text, "contains whitespace")
    if "://" in text:
        raise InvalidReference(text, "a reference has no scheme; write e.g. gcr.io/repo/name:tag")

    name, at, digest = text.partition("@")
    if at:
        reason = _digest_problem(digest) if "@" not in digest else "more than one '@'"
        if reason is not None:
            raise InvalidReference(text, reason)

    tag: str | None = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        # A ':' after the last '/' separates the tag; one before it belongs to the host.
        name, tag = name[:colon], name[colon + 1 :]
        reason = _tag_problem(tag)
        if reason is not None:
            raise InvalidReference(text, reason)

    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        reason, registry = _host_problem(first)
        if reason is not None:
            raise InvalidReference(text, reason)
        repository = rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and repository and "/" not in repository:
        # Docker Hub's official images live under library/ (nginx -> library/nginx).
        repository = f"library/{repository}"

    reason = _repository_problem(repository)
    if reason is not None:
        raise InvalidReference(text, reason)
    if tag is None and not at:
        tag = default_tag
    return Reference(registry, repository, tag, digest if at else None)


def parse_reference(text: str) -> Reference:
    """Parse ``[host[:port]/]path[:tag][@digest]`` into a normalised :class:`Reference`.

    Without a tag or digest the tag is ``latest``; Docker Hub short names expand
    (``nginx`` -> ``docker.io/library/nginx:latest``). Raises :class:`InvalidReference`
    naming ``text`` and the reason.
    """
    return _parse(text, DEFAULT_TAG)


def parse_repository(text: str) -> Reference:
    """Parse ``[host[:port]/]path`` (no tag, no digest) into a bare :class:`Reference`.

    Used where tags are chosen separately (filters). Raises :class:`InvalidReference`
    when ``text`` does not parse or carries a tag or digest.
    """
    ref = _parse(text, None)
    if ref.tag is not None or ref.digest is not None:
        raise InvalidReference(text, "a repository name must not carry a tag or digest")
    return ref


@dataclass(frozen=True)
class Mirror:
    """A mirror registry and the namespace that images are pushed under.

    Construction validates the fields and raises :class:`UsageError`; ``host`` must be
    normalised (:func:`normalize_registry`).
    """

    scheme: str
    host: str
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("https", "http"):
            raise UsageError(f"invalid mirror scheme {self.scheme!r}", hint="use https or http")
        if normalize_registry(self.host) != self.host:
            raise UsageError(f"mirror host {self.host!r} is not normalised")
        if self.namespace is not None:
            reason = _repository_problem(self.namespace)
            if reason is not None:
                raise UsageError(f"invalid mirror namespace {self.namespace!r}: {reason}")

    @property
    def base_url(self) -> str:
        """``scheme://host[:port]`` of the registry API (no namespace, no ``/v2``)."""
        return f"{self.scheme}://{api_host(self.host)}"

    def __str__(self) -> str:
        """``scheme://host[:port][/namespace]``, which :func:`parse_mirror` reads back."""
        text = f"{self.scheme}://{self.host}"
        if self.namespace is None:
            return text
        if self.namespace.split("/", 1)[0] == "v2":
            # parse_mirror drops a leading v2 (the cluster-config form): keep one to drop.
            return f"{text}/v2/{self.namespace}"
        return f"{text}/{self.namespace}"


def parse_mirror(text: str) -> Mirror:
    """Parse a mirror address: ``[http[s]://]HOST[:PORT][/v2][/NAMESPACE...][/]``.

    Without a scheme the mirror is https; http must be written out. A leading ``v2``
    path component is dropped so the cluster-config form
    (``https://HOST:PORT/v2/NAMESPACE``) is accepted as is; a namespace that really
    starts with ``v2`` must therefore be written ``HOST/v2/v2/...``. Raises
    :class:`UsageError` naming ``text``.
    """

    def fail(reason: str, hint: str | None = None) -> UsageError:
        return UsageError(f"invalid mirror {text!r}: {reason}", hint=hint)

    if not text:
        raise fail("empty address", "write HOST:PORT[/NAMESPACE]")
    if _WHITESPACE.search(text):
        raise fail("contains whitespace")
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in ("https", "http"):
            raise fail(f"unsupported scheme {scheme!r}", "use https:// (the default) or http://")
    else:
        scheme, rest = "https", text
    if "?" in rest or "#" in rest:
        raise fail("query strings and fragments are not allowed")
    if rest.endswith("/"):
        rest = rest[:-1]
    host, _, path = rest.partition("/")
    if "@" in host:
        raise fail(
            "credentials do not belong in the address",
            "use --username/--password or --docker-config",
        )
    if not host:
        raise fail("missing host")
    reason, host = _host_problem(host)
    if reason is not None:
        raise fail(reason)
    components = path.split("/") if path else []
    if "" in components:
        raise fail("empty path component (doubled '/')")
    if components[:1] == ["v2"]:
        components = components[1:]
    namespace = "/".join(components) or None
    if namespace is not None:
        reason = _repository_problem(namespace)
        if reason is not None:
            raise fail(f"namespace: {reason}")
    return Mirror(scheme, host, namespace)


def mirror_reference(ref: Reference, mirror: Mirror) -> Reference:
    """Where ``ref`` lives on ``mirror``: the source host is dropped and the namespace
    prefixed; tag and digest are kept.

    ``gcr.io/kubernetes-e2e-test-images/nautilus:1.0`` on
    ``172.18.0.20:5000/test-namespace`` is
    ``172.18.0.20:5000/test-namespace/kubernetes-e2e-test-images/nautilus:1.0``.
    Raises :class:`InvalidReference` when the prefixed repository is too long.
    """
    repository = f"{mirror.namespace}/{ref.repository}" if mirror.namespace else ref.repository
    return Reference(mirror.host, repository, ref.tag, ref.digest)


def mirror_target(source: str, digest: str, mirror: Mirror) -> Reference:
    """Where a bundle image (``source``, manifest ``digest``) lives in ``mirror``: at
    its tag, or by digest when the source has none. Push, verify and the import's
    check all ask here."""
    ref = parse_reference(source)
    return mirror_reference(
        Reference(ref.registry, ref.repository, ref.tag, None if ref.tag else digest), mirror
    )


def check_mirror_collisions(refs: Iterable[Reference], mirror: Mirror) -> None:
    """Raise :class:`UsageError` if two different source repositories would push the same
    tag to the same repository of ``mirror``.

    Dropping the source host makes ``gcr.io/x/y:1`` and ``quay.io/x/y:1`` the same
    mirror path; pushing both would leave whichever came last behind the tag. Call it
    before pushing anything. References by digest alone never collide (the registry
    keeps every digest). The message names every collision found.
    """
    first_by_target: dict[tuple[str, str], Reference] = {}
    collisions: list[str] = []
    for ref in refs:
        if ref.tag is None:
            continue
        target = mirror_reference(ref, mirror)
        key = (target.repository, ref.tag)
        first = first_by_target.setdefault(key, ref)
        if first.name != ref.name:
            collisions.append(
                f"{first} and {ref} would both be pushed to "
                f"{target.registry}/{target.repository}:{ref.tag}"
            )
    if collisions:
        raise UsageError(
            f"images collide on mirror {mirror}: " + "; ".join(collisions),
            hint="push them to mirrors with different namespaces, or keep only one",
        )
