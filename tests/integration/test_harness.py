"""The harness proves itself against real servers, with skopeo as the independent reader.

If these fail, every other integration test's verdict is in doubt: they check that
images pushed by the factory are what skopeo reads back, that each auth mode accepts
and refuses what it should, and that every fault-proxy rule does what it claims.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import re
import socket
import tarfile
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import pytest
import requests

from tests.conftest import USERS, RegistryFactory
from tests.harness import (
    Corrupt,
    CutBody,
    Delay,
    FaultProxy,
    IgnoreRange,
    Image,
    ImageFactory,
    Index,
    Pusher,
    PushError,
    Redirect,
    RegistryServer,
    Reset,
    ServerStartError,
    ToolError,
    fail,
    free_port,
    http_date,
    inspect_raw,
    manifest_digest,
    push,
    rate_limit,
    run_skopeo,
    seed_image_set,
    sha256_digest,
    wait_for_port,
)
from tests.harness.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    MediaKind,
)
from tests.harness.skopeo import inspect

ALICE = ("alice", USERS["alice"])
ProxyFactory = Callable[..., FaultProxy]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- net ---------------------------------------------------------------------------------


def test_free_port_is_bindable_and_respects_bound() -> None:
    port = free_port(below=55535)
    assert 0 < port < 55535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_sees_a_listener_and_times_out_without_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        wait_for_port("127.0.0.1", listener.getsockname()[1], timeout=2)
    closed = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=str(closed)):
        wait_for_port("127.0.0.1", closed, timeout=0.2)
    assert time.monotonic() - started < 2


# -- images: what skopeo reads back is what the factory pushed -------------------------


def _artifact(factory: ImageFactory, kind: str) -> Image | Index:
    base = factory.layer(3000)
    if kind == "oci-image":
        return factory.image([base, factory.layer(5000, files=2)], media="oci")
    if kind == "docker-image":
        return factory.image([base, factory.layer(5000)], media="docker")
    media: MediaKind = "oci" if kind == "oci-index" else "docker"
    return factory.index(
        [
            factory.image([base, factory.layer(2000)], media=media, platform="linux/amd64"),
            factory.image([base, factory.layer(2000)], media=media, platform="linux/arm64/v8"),
        ],
        media=media,
    )


@pytest.mark.parametrize(
    ("kind", "media_type"),
    [
        ("oci-image", OCI_MANIFEST),
        ("docker-image", DOCKER_MANIFEST),
        ("oci-index", OCI_INDEX),
        ("docker-list", DOCKER_MANIFEST_LIST),
    ],
)
def test_pushed_manifest_reads_back_identically_with_skopeo(
    registry: RegistryServer, image_factory: ImageFactory, kind: str, media_type: str
) -> None:
    artifact = _artifact(image_factory, kind)
    digest = push(registry.url, "team/app", "v1", artifact)

    raw = inspect_raw(f"docker://{registry.host}/team/app:v1")
    assert raw == artifact.manifest_bytes
    assert manifest_digest(raw) == digest == artifact.digest == _sha(artifact.manifest_bytes)
    assert artifact.media_type == media_type
    assert artifact.manifest["mediaType"] == media_type
    for blob_digest in artifact.blobs:
        assert registry.has_blob(blob_digest)


def test_index_children_carry_their_platforms(
    registry: RegistryServer, image_factory: ImageFactory
) -> None:
    index = image_factory.multiarch(("linux/amd64", "linux/arm64/v8"), media="docker")
    push(registry.url, "multi", "v2", index)

    listed = index.manifest["manifests"]
    assert [m["platform"] for m in listed] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    arm = index.children[1]
    raw = inspect_raw(f"docker://{registry.host}/multi@{arm.digest}")
    assert raw == arm.manifest_bytes
    seen = inspect(f"docker://{registry.host}/multi@{arm.digest}")
    assert (seen["Os"], seen["Architecture"]) == ("linux", "arm64")
    assert seen["Layers"] == [layer.digest for layer in arm.layers]
    # skopeo 1.9 does not print the variant: compare the config it fetches instead.
    config = run_skopeo("inspect", "--config", "--raw", "--tls-verify=false",
                        f"docker://{registry.host}/multi@{arm.digest}")
    assert config == arm.config_bytes
    assert json.loads(config)["variant"] == "v8"


def test_layers_are_deterministic_gzip_tars_matching_config_diff_ids() -> None:
    first, second = ImageFactory(seed=7), ImageFactory(seed=7)
    a = first.image([first.layer(10_000, files=3)])
    b = second.image([second.layer(10_000, files=3)])
    other = ImageFactory(seed=8).image([ImageFactory(seed=8).layer(10_000, files=3)])
    assert a.digest == b.digest and a.manifest_bytes == b.manifest_bytes
    assert other.layers[0].digest != a.layers[0].digest

    layer = a.layers[0]
    tar_bytes = gzip.decompress(layer.data)
    config = a.config_bytes
    assert _sha(tar_bytes) == layer.diff_id
    assert f'"{layer.diff_id}"'.encode() in config
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
    assert sum(m.size for m in members) == 10_000 and len(members) == 3
    # Random content: gzip cannot shrink it, so layer size tracks the requested size.
    assert len(gzip.compress(tar_bytes, compresslevel=9)) > 10_000


def test_shared_base_layer_is_uploaded_once(
    registry: RegistryServer, image_factory: ImageFactory
) -> None:
    base = image_factory.layer(50_000)
    first = image_factory.image([base, image_factory.layer(1000)])
    second = image_factory.image([base, image_factory.layer(1000)], media="docker")
    with Pusher(registry.url) as pusher:
        pusher.push("apps/one", "v1", first)
        mark = registry.mark()
        pusher.push("apps/one", "v2", second)
        pusher.push("apps/two", "v1", second)

    entries = registry.since(mark)
    uploads = [e for e in entries if e.method == "PUT" and "/blobs/uploads/" in e.path]
    # v2 needs its config and own layer; apps/two gets everything by mount.
    assert len(uploads) == 2
    assert any(e.method == "HEAD" and e.path.endswith(base.digest) and e.status == 200
               for e in entries)
    mounts = [e for e in entries if e.method == "POST" and "mount=" in e.query]
    assert {e.status for e in mounts} == {201} and len(mounts) == 3
    assert pusher.stats.mounted == 3


def test_seed_image_set_pushes_readable_images(registry: RegistryServer) -> None:
    seeded = seed_image_set(registry.url, images=6, total_mb=2, seed="harness", multiarch_every=3)
    assert len(seeded) == 6
    assert sum(1 for s in seeded if len(s.platforms) == 2) == 2
    assert len({s.repository for s in seeded}) > 1
    for image in (seeded[0], seeded[2]):
        raw = inspect_raw(f"docker://{registry.host}/{image.reference}")
        assert manifest_digest(raw) == image.digest
    again = seed_image_set(registry.url, images=6, total_mb=2, seed="harness", multiarch_every=3)
    assert [s.digest for s in again] == [s.digest for s in seeded]
    stored = sum(p.stat().st_size for p in registry.root.rglob("data"))
    assert 1_800_000 < stored < 2_600_000


# -- registry process: access log, restarts, start failures ----------------------------


def test_access_log_records_each_request(
    registry: RegistryServer, image_factory: ImageFactory
) -> None:
    image = image_factory.image()
    push(registry.url, "logged", "v1", image)
    mark = registry.mark()
    session = requests.Session()
    # distribution 2.8 hides an OCI manifest from clients that do not accept its type.
    session.headers["Accept"] = image.media_type
    assert session.head(f"{registry.url}/v2/logged/manifests/v1").status_code == 200
    assert session.get(f"{registry.url}/v2/logged/tags/list?n=5").status_code == 200
    assert session.get(f"{registry.url}/v2/logged/blobs/{'sha256:' + '0' * 64}").status_code == 404

    entries = registry.since(mark)
    assert [(e.method, e.path, e.query, e.status) for e in entries] == [
        ("HEAD", "/v2/logged/manifests/v1", "", 200),
        ("GET", "/v2/logged/tags/list", "n=5", 200),
        ("GET", f"/v2/logged/blobs/sha256:{'0' * 64}", "", 404),
    ]
    assert entries[1].params == {"n": ["5"]}
    assert all(e.user_agent.startswith("python-requests") for e in entries)
    # Readiness probes are not counted.
    assert not any("probe" in e.user_agent for e in registry.access_log())
    registry.clear_access_log()
    session.get(f"{registry.url}/v2/")
    assert [(e.method, e.path) for e in registry.access_log()] == [("GET", "/v2/")]


def test_restart_keeps_port_and_storage_and_kill_stops_serving(
    registry: RegistryServer, image_factory: ImageFactory
) -> None:
    image = image_factory.image()
    push(registry.url, "durable", "v1", image)
    url, pid = registry.url, registry.pid

    registry.kill()
    assert not registry.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/", timeout=2)
    registry.restart()
    assert registry.url == url and registry.pid != pid
    assert inspect_raw(f"docker://{registry.host}/durable:v1") == image.manifest_bytes
    registry.stop()
    assert not registry.running


def test_start_failure_raises_with_log_tail(tmp_path_factory: pytest.TempPathFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RegistryServer(
            tmp_path_factory.mktemp("busy"), port=taken.getsockname()[1], start_timeout=5
        )
        with pytest.raises(ServerStartError, match="address already in use"):
            server.start()
    assert not server.running


def test_first_start_moves_off_a_port_taken_meanwhile(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RegistryServer(tmp_path_factory.mktemp("moved"))
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            taken = server.port
            server.start()
            assert server.port != taken
            assert requests.get(f"{server.url}/v2/").status_code == 200
    finally:
        server.close()
    assert not server.running


# -- basic auth ------------------------------------------------------------------------


def test_basic_auth_refuses_wrong_password_and_accepts_alice(
    basic_registry: RegistryServer, image_factory: ImageFactory
) -> None:
    url = f"{basic_registry.url}/v2/"
    anonymous = requests.get(url)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert requests.get(url, auth=("alice", "not-her-password")).status_code == 401
    assert requests.get(url, auth=ALICE).status_code == 200

    image = image_factory.image(media="docker")
    with pytest.raises(PushError) as refused:
        push(basic_registry.url, "private", "v1", image, auth=("alice", "wrong"))
    assert refused.value.status == 401
    push(basic_registry.url, "private", "v1", image, auth=ALICE)
    ref = f"docker://{basic_registry.host}/private:v1"
    assert inspect_raw(ref, creds=ALICE) == image.manifest_bytes
    with pytest.raises(ToolError):
        inspect_raw(ref, creds=("alice", "wrong"))


# -- token auth ------------------------------------------------------------------------


def _challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def test_token_flow_by_hand(token_registry: RegistryServer, image_factory: ImageFactory) -> None:
    issuer = token_registry.token_issuer
    assert issuer is not None
    push(token_registry.url, "secure/app", "v1", image_factory.image(), auth=ALICE)
    mark = issuer.mark()

    tags_url = f"{token_registry.url}/v2/secure/app/tags/list"
    challenged = requests.get(tags_url)
    assert challenged.status_code == 401
    challenge = _challenge(challenged.headers["WWW-Authenticate"])
    assert challenge == {
        "realm": issuer.realm,
        "service": issuer.service,
        "scope": "repository:secure/app:pull",
    }
    answer = requests.get(
        challenge["realm"],
        params=[("service", challenge["service"]), ("scope", challenge["scope"]),
                ("scope", "repository:other/repo:pull,push")],
        auth=ALICE,
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0
    claims = issuer.decode(body["token"])
    assert claims["sub"] == "alice" and claims["aud"] == issuer.service
    assert claims["access"] == [
        {"type": "repository", "name": "secure/app", "actions": ["pull"]},
        {"type": "repository", "name": "other/repo", "actions": ["pull", "push"]},
    ]

    tags = requests.get(tags_url, headers={"Authorization": f"Bearer {body['token']}"})
    assert tags.status_code == 200
    assert tags.json() == {"name": "secure/app", "tags": ["v1"]}

    (recorded,) = issuer.since(mark)
    assert recorded.params("scope") == ["repository:secure/app:pull",
                                        "repository:other/repo:pull,push"]
    assert recorded.user == "alice" and recorded.authorization == "basic"

    wrong = requests.get(challenge["realm"], params={"scope": challenge["scope"]},
                         auth=("alice", "wrong"))
    assert wrong.status_code == 401
    assert issuer.requests[-1].status == 401 and issuer.requests[-1].user is None

    # The OAuth2 form containerd tries first works too.
    oauth = requests.post(challenge["realm"], data={
        "grant_type": "password", "username": ALICE[0], "password": ALICE[1],
        "service": issuer.service, "scope": challenge["scope"], "client_id": "containerd",
    })
    assert oauth.status_code == 200
    bearer = {"Authorization": f"Bearer {oauth.json()['access_token']}"}
    assert requests.get(tags_url, headers=bearer).status_code == 200
    assert issuer.requests[-1].method == "POST" and issuer.requests[-1].user == "alice"


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_skopeo_pulls_with_token_auth(
    registry_factory: RegistryFactory, image_factory: ImageFactory, algorithm: str
) -> None:
    server = registry_factory(auth="token", token_algorithm=algorithm)
    issuer = server.token_issuer
    assert issuer is not None
    image = image_factory.image()
    push(server.url, "tok/app", "v1", image, auth=ALICE)
    mark = issuer.mark()

    raw = inspect_raw(f"docker://{server.host}/tok/app:v1", creds=ALICE)
    assert manifest_digest(raw) == image.digest
    asked = issuer.since(mark)
    assert asked and all(r.user == "alice" and r.status == 200 for r in asked)
    assert any("repository:tok/app:pull" in r.scopes for r in asked)
    with pytest.raises(ToolError):
        inspect_raw(f"docker://{server.host}/tok/app:v1", creds=("alice", "wrong"))


def test_anonymous_token_grants_only_pull(
    registry_factory: RegistryFactory, image_factory: ImageFactory
) -> None:
    server = registry_factory(auth="token", anonymous={"pull"})
    issuer = server.token_issuer
    assert issuer is not None
    image = image_factory.image()
    push(server.url, "public/app", "v1", image, auth=ALICE)

    assert inspect_raw(f"docker://{server.host}/public/app:v1") == image.manifest_bytes
    with pytest.raises(PushError) as refused:
        push(server.url, "public/app", "v2", image_factory.image())
    assert refused.value.status == 401
    anonymous = [r for r in issuer.requests if r.user is None and r.status == 200]
    assert anonymous
    assert all(a.actions == ("pull",) for r in anonymous for a in r.granted)


# -- TLS -------------------------------------------------------------------------------


def test_tls_registry_trusts_only_with_the_test_ca(
    tls_registry: RegistryServer, image_factory: ImageFactory
) -> None:
    assert tls_registry.url.startswith("https://") and tls_registry.ca_cert is not None
    assert requests.get(f"{tls_registry.url}/v2/", verify=tls_registry.verify).status_code == 200
    localhost = f"https://localhost:{tls_registry.port}/v2/"
    assert requests.get(localhost, verify=tls_registry.verify).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_registry.url}/v2/")

    image = image_factory.image()
    push(tls_registry.url, "tls/app", "v1", image, verify=tls_registry.ca_cert)
    ref = f"docker://{tls_registry.host}/tls/app:v1"
    assert tls_registry.pki is not None
    raw = inspect_raw(ref, tls_verify=True, cert_dir=tls_registry.pki.cert_dir)
    assert raw == image.manifest_bytes
    with pytest.raises(ToolError, match="certificate"):
        inspect_raw(ref, tls_verify=True)


def test_proxy_in_front_of_a_tls_registry(
    tls_registry: RegistryServer, fault_proxy: ProxyFactory, image_factory: ImageFactory
) -> None:
    proxy = fault_proxy(tls_registry)  # trusts the registry's CA
    image = image_factory.image()
    push(proxy.url, "tls/proxied", "v1", image)
    assert inspect_raw(f"docker://{proxy.host}/tls/proxied:v1") == image.manifest_bytes
    assert tls_registry.has_blob(image.layers[0].digest)


# -- fault proxy -----------------------------------------------------------------------


@pytest.fixture
def proxied(
    basic_registry: RegistryServer, image_factory: ImageFactory, fault_proxy: ProxyFactory
) -> tuple[FaultProxy, Image]:
    """A proxy in front of a Basic-auth registry holding a 64 KB-layer image."""
    image = image_factory.image([image_factory.layer(64_000)])
    push(basic_registry.url, "proxied/app", "v1", image, auth=ALICE)
    return fault_proxy(basic_registry), image


def _blob_url(proxy: FaultProxy, digest: str) -> str:
    return f"{proxy.url}/v2/proxied/app/blobs/{digest}"


def test_proxy_passes_through_pushes_and_pulls(
    basic_registry: RegistryServer, fault_proxy: ProxyFactory, image_factory: ImageFactory
) -> None:
    proxy = fault_proxy(basic_registry)
    image = image_factory.image([image_factory.layer(20_000)], media="docker")
    push(proxy.url, "via/proxy", "v1", image, auth=ALICE)

    seen = proxy.requests
    uploads = [r for r in seen if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert len(uploads) == 2, "upload Locations were rewritten to the proxy"
    assert all(r.header("Authorization") and r.status == 201 for r in uploads)
    assert uploads[1].body_size == image.layers[0].size
    assert basic_registry.has_blob(image.layers[0].digest)
    raw = inspect_raw(f"docker://{proxy.host}/via/proxy:v1", creds=ALICE)
    assert raw == image.manifest_bytes
    assert proxy.requests[-1].method == "GET" and proxy.requests[-1].status == 200

    # A chunked request body (no Content-Length) is forwarded whole.
    data = b"chunked blob " * 1000
    started = requests.post(f"{proxy.url}/v2/via/proxy/blobs/uploads/", auth=ALICE)
    assert started.status_code == 202
    assert started.headers["Location"].startswith(proxy.url)
    put = requests.put(started.headers["Location"], params={"digest": _sha(data)},
                       data=iter([data[:5000], data[5000:]]), auth=ALICE)
    assert put.status_code == 201
    assert proxy.requests[-1].header("Transfer-Encoding") == "chunked"
    assert basic_registry.has_blob(_sha(data))


def test_proxy_rate_limits_with_retry_after(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    url = f"{proxy.url}/v2/proxied/app/manifests/v1"
    headers = {"Accept": image.media_type}
    proxy.add_rule(rate_limit(2), method="GET", path=r"/manifests/")
    date_rule = proxy.add_rule(rate_limit(http_date(30)), method="GET", path=r"/manifests/")

    first = requests.get(url, auth=ALICE, headers=headers)
    assert first.status_code == 429 and first.headers["Retry-After"] == "2"
    assert first.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    second = requests.get(url, auth=ALICE, headers=headers)
    assert second.status_code == 429
    retry_at = parsedate_to_datetime(second.headers["Retry-After"])
    assert 20 < retry_at.timestamp() - time.time() <= 31
    third = requests.get(url, auth=ALICE, headers=headers)
    assert third.status_code == 200 and third.content == image.manifest_bytes
    assert date_rule.hits == 1 and date_rule.exhausted
    assert [r.status for r in proxy.requests] == [429, 429, 200]


def test_proxy_fails_n_times_then_passes(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    digest = image.layers[0].digest
    proxy.add_rule(fail(503), method="GET", path=r"/blobs/", times=2)
    statuses = [requests.get(_blob_url(proxy, digest), auth=ALICE).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    # The rule only matches GET: a HEAD went straight through.
    proxy.add_rule(fail(500), method="GET", path=r"/blobs/")
    assert requests.head(_blob_url(proxy, digest), auth=ALICE).status_code == 200


def test_proxy_cuts_the_body_after_k_bytes(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    layer = image.layers[0]
    proxy.add_rule(CutBody(keep=1000), method="GET", path=r"/blobs/sha256:")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    basic = base64.b64encode(":".join(ALICE).encode()).decode()
    conn.request("GET", f"/v2/proxied/app/blobs/{layer.digest}",
                 headers={"Authorization": f"Basic {basic}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(layer.size)
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    assert cut.value.partial == layer.data[:1000]
    conn.close()
    whole = requests.get(_blob_url(proxy, layer.digest), auth=ALICE)
    assert whole.content == layer.data


def test_proxy_serves_flipped_bytes_of_the_same_length(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    layer = image.layers[0]
    proxy.add_rule(Corrupt(count=8), method="GET", path=r"/blobs/")
    corrupted = requests.get(_blob_url(proxy, layer.digest), auth=ALICE).content
    assert len(corrupted) == layer.size
    assert sha256_digest(corrupted) != layer.digest
    assert sum(a != b for a, b in zip(corrupted, layer.data, strict=True)) == 8


def test_proxy_ignores_range(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    layer = image.layers[0]
    ranged = {"Range": "bytes=100-199"}
    honoured = requests.get(_blob_url(proxy, layer.digest), auth=ALICE, headers=ranged)
    assert honoured.status_code == 206 and honoured.content == layer.data[100:200]

    proxy.add_rule(IgnoreRange(), method="GET", path=r"/blobs/")
    ignored = requests.get(_blob_url(proxy, layer.digest), auth=ALICE, headers=ranged)
    assert ignored.status_code == 200 and ignored.content == layer.data
    assert proxy.requests[-1].range == "bytes=100-199"


def test_proxy_redirects_blobs_to_a_host_that_gets_no_credentials(
    proxied: tuple[FaultProxy, Image],
) -> None:
    proxy, image = proxied
    layer = image.layers[0]
    proxy.add_rule(Redirect(), method="GET", path=r"/blobs/", times=2)
    redirected = requests.get(_blob_url(proxy, layer.digest), auth=ALICE, allow_redirects=False)
    assert redirected.status_code == 307
    location = redirected.headers["Location"]
    assert location.startswith(proxy.blob_host_url)

    # requests drops Authorization when a redirect changes host or port.
    followed = requests.get(_blob_url(proxy, layer.digest), auth=ALICE)
    assert [r.status_code for r in followed.history] == [307]
    assert followed.status_code == 200 and followed.content == layer.data
    ranged = requests.get(location, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == layer.data[:10]

    redirects = [r for r in proxy.requests if r.action == "Redirect"]
    assert len(redirects) == 2
    assert all(r.header("Authorization") is not None and r.status == 307 for r in redirects)
    blob_hits = proxy.blob_requests
    assert [hit.status for hit in blob_hits] == [200, 206]
    assert all(hit.header("Authorization") is None for hit in blob_hits)
    assert blob_hits[1].range == "bytes=0-9"


def test_proxy_resets_the_connection(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    proxy.add_rule(Reset(), path=r"/manifests/")
    url = f"{proxy.url}/v2/proxied/app/manifests/v1"
    with pytest.raises(requests.ConnectionError):
        requests.get(url, auth=ALICE, headers={"Accept": image.media_type})
    after = requests.get(url, auth=ALICE, headers={"Accept": image.media_type})
    assert after.content == image.manifest_bytes
    assert [r.status for r in proxy.requests] == [None, 200]


def test_proxy_delays_then_passes(proxied: tuple[FaultProxy, Image]) -> None:
    proxy, image = proxied
    proxy.add_rule(Delay(0.3), method="HEAD")
    started = time.monotonic()
    response = requests.head(_blob_url(proxy, image.layers[0].digest), auth=ALICE)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3
