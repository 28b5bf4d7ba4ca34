from __future__ import annotations

import pytest

from pipeline.errors import InvalidReference, UsageError
from pipeline.reference import (
    Mirror,
    Reference,
    check_mirror_collisions,
    mirror_reference,
    normalize_registry,
    parse_mirror,
    parse_reference,
    parse_repository,
)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8

VALID = [
    # text, registry, repository, tag, digest, canonical str()
    (
        "gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0",
        "gcr.io",
        "anthos-baremetal-release/kube-rbac-proxy",
        "v0.6.0-gke.0",
        None,
        "gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0",
    ),
    (
        "gcr.io/a/b",
        "gcr.io",
        "a/b",
        "latest",
        None,
        "gcr.io/a/b:latest",
    ),
    (f"gcr.io/a/b@{SHA256}", "gcr.io", "a/b", None, SHA256, f"gcr.io/a/b@{SHA256}"),
    (f"gcr.io/a/b@{SHA512}", "gcr.io", "a/b", None, SHA512, f"gcr.io/a/b@{SHA512}"),
    (f"gcr.io/a/b:1.0@{SHA256}", "gcr.io", "a/b", "1.0", SHA256, f"gcr.io/a/b:1.0@{SHA256}"),
    ("172.18.0.20:5000/ns/app:1", "172.18.0.20:5000", "ns/app", "1", None, None),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("localhost:5000/app:v1", "localhost:5000", "app", "v1", None, None),
    ("[::1]:5000/app:v1", "[::1]:5000", "app", "v1", None, None),
    ("[2001:db8:0::1]/app", "[2001:db8::1]", "app", "latest", None, "[2001:db8::1]/app:latest"),
    ("registry.example.com:443/a/b/c/d:x", "registry.example.com:443", "a/b/c/d", "x", None, None),
    ("GCR.io/a/b:t", "gcr.io", "a/b", "t", None, "gcr.io/a/b:t"),
    ("nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io", "library/nginx", "1.25", None, "docker.io/library/nginx:1.25"),
    ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
    (
        "docker.io/nginx",
        "docker.io",
        "library/nginx",
        "latest",
        None,
        "docker.io/library/nginx:latest",
    ),
    (
        "index.docker.io/nginx:1",
        "docker.io",
        "library/nginx",
        "1",
        None,
        "docker.io/library/nginx:1",
    ),
    (
        "registry-1.docker.io/user/app",
        "docker.io",
        "user/app",
        "latest",
        None,
        "docker.io/user/app:latest",
    ),
    (
        "gcr.io/a_b/c__d/e-f/g---h/i.j:T_a.g-1",
        "gcr.io",
        "a_b/c__d/e-f/g---h/i.j",
        "T_a.g-1",
        None,
        None,
    ),
    ("gcr.io/x/y:" + "t" * 128, "gcr.io", "x/y", "t" * 128, None, None),
    ("gcr.io/" + "a" * 255, "gcr.io", "a" * 255, "latest", None, "gcr.io/" + "a" * 255 + ":latest"),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "canonical"), VALID)
def test_parse_valid_reference(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    canonical: str | None,
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert str(ref) == (canonical or text)
    assert ref.name == f"{registry}/{repository}"
    # The canonical form reads back as the same reference.
    assert parse_reference(str(ref)) == ref


INVALID = [
    ("", "empty"),
    ("Nginx", "uppercase"),
    ("gcr.io/Anthos/app", "uppercase"),
    ("gcr.io/a//b", "empty path component"),
    ("//a", "empty path component"),
    ("gcr.io/a/", "empty path component"),
    ("gcr.io/", "missing repository"),
    ("gcr.io/a/b:", "empty tag"),
    ("gcr.io/a/b:.tag", "invalid tag"),
    ("gcr.io/a/b:" + "t" * 129, "invalid tag"),
    ("gcr.io/a/b@sha256:abc", "64 lowercase hex"),
    ("gcr.io/a/b@sha256:" + "A" * 64, "64 lowercase hex"),
    ("gcr.io/a/b@sha512:" + "a" * 64, "128 lowercase hex"),
    ("gcr.io/a/b@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("gcr.io/a/b@" + "a" * 64, "ALGORITHM:HEX"),
    (f"gcr.io/a/b@{SHA256}@{SHA256}", "more than one '@'"),
    ("gcr.io/" + "a" * 256, "at most 255"),
    ("gcr.io/a b", "whitespace"),
    (" gcr.io/a/b", "whitespace"),
    ("gcr.io/a/b:v1\n", "whitespace"),
    ("https://gcr.io/a/b", "no scheme"),
    ("gcr.io/a-/b", "invalid repository component"),
    ("gcr.io/a/b$c", "invalid repository component"),
    ("-bad.io/a", "invalid registry host"),
    ("gcr.io:99999/a", "out of range"),
    ("[::g]:5000/a", "invalid registry host"),
    ("[1:2:3]:5000/a", "invalid IPv6"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_parse_invalid_reference(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert repr(text) in str(info.value)
    assert reason in info.value.reason


def test_reference_properties() -> None:
    hub = parse_reference("nginx:1.25")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.identifier == "1.25"
    gcr = parse_reference(f"gcr.io/a/b:1@{SHA256}")
    assert gcr.api_host == "gcr.io"
    assert gcr.identifier == SHA256


def test_with_digest_keeps_tag_and_with_tag_drops_digest() -> None:
    ref = parse_reference("gcr.io/a/b:1")
    pinned = ref.with_digest(SHA256)
    assert str(pinned) == f"gcr.io/a/b:1@{SHA256}"
    assert str(pinned.with_tag("2")) == "gcr.io/a/b:2"
    with pytest.raises(InvalidReference):
        ref.with_digest("sha256:short")
    with pytest.raises(InvalidReference):
        ref.with_tag("-x")


def test_reference_constructor_validates() -> None:
    with pytest.raises(InvalidReference, match="not normalised"):
        Reference("index.docker.io", "library/nginx", "latest")
    with pytest.raises(InvalidReference, match="uppercase"):
        Reference("gcr.io", "A/b", "1")


def test_parse_repository_has_no_tag() -> None:
    ref = parse_repository("gcr.io/anthos-baremetal-release/etcd")
    assert (ref.tag, ref.digest) == (None, None)
    assert str(ref) == "gcr.io/anthos-baremetal-release/etcd"
    with pytest.raises(InvalidReference, match="names no tag or digest"):
        _ = ref.identifier
    for text in ("gcr.io/a/b:1", f"gcr.io/a/b@{SHA256}"):
        with pytest.raises(InvalidReference, match="must not carry a tag or digest"):
            parse_repository(text)


@pytest.mark.parametrize(
    ("host", "normalised"),
    [
        ("gcr.io", "gcr.io"),
        ("GCR.IO:443", "gcr.io:443"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("[0:0::1]:5000", "[::1]:5000"),
    ],
)
def test_normalize_registry(host: str, normalised: str) -> None:
    assert normalize_registry(host) == normalised


MIRRORS = [
    # text, scheme, host, namespace, str()
    ("172.18.0.20:5000", "https", "172.18.0.20:5000", None, "https://172.18.0.20:5000"),
    (
        "172.18.0.20:5000/test-namespace",
        "https",
        "172.18.0.20:5000",
        "test-namespace",
        "https://172.18.0.20:5000/test-namespace",
    ),
    (
        "http://127.0.0.1:5000/test-namespace",
        "http",
        "127.0.0.1:5000",
        "test-namespace",
        "http://127.0.0.1:5000/test-namespace",
    ),
    (
        "https://172.18.0.20:5000/v2/test-namespace",
        "https",
        "172.18.0.20:5000",
        "test-namespace",
        "https://172.18.0.20:5000/test-namespace",
    ),
    ("https://172.18.0.20:5000/v2/", "https", "172.18.0.20:5000", None, "https://172.18.0.20:5000"),
    ("mirror.local/a/b/", "https", "mirror.local", "a/b", "https://mirror.local/a/b"),
    ("HTTPS://Mirror.Local:5000/ns", "https", "mirror.local:5000", "ns", None),
    ("[::1]:5000/ns", "https", "[::1]:5000", "ns", "https://[::1]:5000/ns"),
    # A namespace starting with v2 is written behind the dropped v2, and printed that way.
    ("mirror.local/v2/v2", "https", "mirror.local", "v2", "https://mirror.local/v2/v2"),
    ("mirror.local/v2/v2/a", "https", "mirror.local", "v2/a", "https://mirror.local/v2/v2/a"),
]


@pytest.mark.parametrize(("text", "scheme", "host", "namespace", "canonical"), MIRRORS)
def test_parse_mirror(
    text: str, scheme: str, host: str, namespace: str | None, canonical: str | None
) -> None:
    mirror = parse_mirror(text)
    assert (mirror.scheme, mirror.host, mirror.namespace) == (scheme, host, namespace)
    assert mirror.base_url == f"{scheme}://{host}"
    if canonical is not None:
        assert str(mirror) == canonical
        assert parse_mirror(str(mirror)) == mirror


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("ftp://172.18.0.20:5000/ns", "unsupported scheme 'ftp'"),
        ("172.18.0.20:5000/ns?x=1", "query"),
        ("172.18.0.20:5000/ns#frag", "query"),
        ("172.18.0.20:5000/Test-Namespace", "uppercase"),
        ("172.18.0.20:5000//ns", "empty path component"),
        ("https://user:pw@172.18.0.20:5000/ns", "credentials"),
        ("https:///ns", "missing host"),
        ("bad_host:5000", "invalid registry host"),
        ("host:5000/ns with space", "whitespace"),
    ],
)
def test_parse_mirror_invalid(text: str, reason: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_mirror(text)
    assert repr(text) in str(info.value)
    assert reason in str(info.value)


def test_docker_hub_mirror_uses_api_host() -> None:
    assert parse_mirror("index.docker.io/myorg").base_url == "https://registry-1.docker.io"


@pytest.mark.parametrize(
    ("source", "mirror", "expected"),
    [
        (
            "gcr.io/kubernetes-e2e-test-images/nautilus:1.0",
            "172.18.0.20:5000",
            "172.18.0.20:5000/kubernetes-e2e-test-images/nautilus:1.0",
        ),
        (
            "gcr.io/kubernetes-e2e-test-images/nautilus:1.0",
            "172.18.0.20:5000/test-namespace",
            "172.18.0.20:5000/test-namespace/kubernetes-e2e-test-images/nautilus:1.0",
        ),
        (
            "gcr.io/kubernetes-e2e-test-images/nautilus:1.0",
            "https://172.18.0.20:5000/v2/test-namespace",
            "172.18.0.20:5000/test-namespace/kubernetes-e2e-test-images/nautilus:1.0",
        ),
        (
            f"gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0@{SHA256}",
            "http://127.0.0.1:5000/a/b",
            f"127.0.0.1:5000/a/b/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0@{SHA256}",
        ),
        ("nginx", "127.0.0.1:5000/hub", "127.0.0.1:5000/hub/library/nginx:latest"),
    ],
)
def test_mirror_reference(source: str, mirror: str, expected: str) -> None:
    target = mirror_reference(parse_reference(source), parse_mirror(mirror))
    assert str(target) == expected
    assert target == parse_reference(expected)


def test_mirror_reference_too_long() -> None:
    ref = parse_reference("gcr.io/" + "a" * 250)
    with pytest.raises(InvalidReference, match="at most 255"):
        mirror_reference(ref, Mirror("https", "127.0.0.1:5000", "namespace"))


def test_collision_names_both_sources_and_the_mirror_path() -> None:
    refs = [
        parse_reference("gcr.io/x/y:1"),
        parse_reference("gcr.io/x/y:2"),
        parse_reference("quay.io/x/y:1"),
    ]
    with pytest.raises(UsageError) as info:
        check_mirror_collisions(refs, parse_mirror("172.18.0.20:5000/ns"))
    message = str(info.value)
    assert "gcr.io/x/y:1" in message
    assert "quay.io/x/y:1" in message
    assert "172.18.0.20:5000/ns/x/y:1" in message
    assert "gcr.io/x/y:2" not in message


@pytest.mark.parametrize(
    "sources",
    [
        # Different tags of one mirror repository, same source listed twice, a tag and its
        # pinned form, and digest-only references never overwrite each other.
        ["gcr.io/x/y:1", "quay.io/x/y:2"],
        ["gcr.io/x/y:1", "gcr.io/x/y:1"],
        ["gcr.io/x/y:1", f"gcr.io/x/y:1@{SHA256}"],
        [f"gcr.io/x/y@{SHA256}", f"quay.io/x/y@{SHA512}"],
        ["gcr.io/a/y:1", "gcr.io/b/y:1"],
    ],
)
def test_no_collision(sources: list[str]) -> None:
    refs = [parse_reference(s) for s in sources]
    # The contract here is the absence of an error: these sets are pushed as they are.
    check_mirror_collisions(refs, parse_mirror("m.local:5000"))
