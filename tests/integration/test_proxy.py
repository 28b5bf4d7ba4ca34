"""`bmsync pull` behind a forward proxy: HTTP_PROXY, CONNECT tunnels, NO_PROXY, proxy auth.

Operators run bmsync behind corporate proxies. These tests prove the traffic really goes
through the proxy (the proxy's records match the registry's access log), that TLS is
verified end to end through a CONNECT tunnel, and that a proxy's password never shows.
``tests.cli.bmsync`` strips proxy variables from the inherited environment, so each
run states its proxy settings explicitly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.cli import Run, bmsync, store_index, write_images_config
from tests.harness.forwardproxy import ForwardProxy
from tests.harness.images import Image, ImageFactory, Pusher, push
from tests.harness.net import free_port
from tests.harness.registry import RegistryServer

ProxyFactory = Callable[..., ForwardProxy]

GCR = "gcr.io"
REF = f"{GCR}/proxied/app:1"
PROXY_USER = "proxy-user"
PROXY_PASSWORD = "Pr0xy-s3cret-9f2c"


def _image(server: RegistryServer, factory: ImageFactory) -> Image:
    """An image with two layers pushed to ``server`` as proxied/app:1 (not via a proxy)."""
    image = factory.image([factory.layer(120_000), factory.layer(60_000)])
    push(server.url, "proxied/app", "1", image, verify=server.verify)
    return image


def _pull(tmp: Path, server: RegistryServer, env: dict[str, str], *args: str,
          cacert: bool = True, name: str = "store") -> Run:
    settings = {"endpoint": server.url}
    if cacert and server.ca_cert is not None:
        settings["cacert"] = str(server.ca_cert)
    config = write_images_config(tmp / f"{name}.yaml", [REF], registries={GCR: settings})
    return bmsync(*args, "pull", "--config", str(config), "--store", str(tmp / name), env=env)


def _requests_seen(server: RegistryServer, mark: int) -> list[tuple[str, str]]:
    return sorted((e.method, e.path) for e in server.since(mark))


# -- plain http through HTTP_PROXY -------------------------------------------------------


def test_pull_goes_through_http_proxy(registry: RegistryServer, image_factory: ImageFactory,
                                      forward_proxy: ProxyFactory, tmp: Path) -> None:
    image = _image(registry, image_factory)
    proxy = forward_proxy()
    mark = registry.mark()
    run = _pull(tmp, registry, {"HTTP_PROXY": proxy.url})
    assert run.code == 0, run.output
    assert store_index(tmp / "store")[REF]["digest"] == image.digest

    records = proxy.records
    assert all(r.target.startswith(f"{registry.url}/v2/proxied/app/") for r in records)
    assert all(r.status == 200 for r in records), records
    assert any(r.path.endswith("/manifests/1") for r in records)
    fetched = {r.path.rsplit("/", 1)[-1] for r in records if "/blobs/" in r.path}
    assert fetched == set(image.blobs)
    # Nothing reached the registry except through the proxy.
    assert _requests_seen(registry, mark) == sorted((r.method, r.path) for r in records)


# -- https through a CONNECT tunnel ----------------------------------------------------------


def test_pull_tunnels_https_and_verifies_the_ca(
    tls_registry: RegistryServer, image_factory: ImageFactory, forward_proxy: ProxyFactory,
    tmp: Path,
) -> None:
    image = _image(tls_registry, image_factory)
    proxy = forward_proxy()
    env = {"HTTPS_PROXY": proxy.url}

    mark = tls_registry.mark()
    run = _pull(tmp, tls_registry, env)
    assert run.code == 0, run.output
    assert store_index(tmp / "store")[REF]["digest"] == image.digest
    proxy.wait_idle()
    records = proxy.records
    # Only tunnels: not one request crossed the proxy in the clear.
    assert records and all(
        r.method == "CONNECT" and r.target == tls_registry.host and r.status == 200
        for r in records
    ), records
    # The image's bytes came down the tunnels (TLS framing adds to them).
    assert sum(r.bytes_down for r in records) > sum(len(b) for b in image.blobs.values())
    assert {path for _, path in _requests_seen(tls_registry, mark)} >= {
        f"/v2/proxied/app/blobs/{digest}" for digest in image.blobs
    }

    # Without the CA the registry's certificate is refused through the tunnel too:
    # the proxy does not terminate TLS, so the client checks the registry itself.
    proxy.clear()
    run = _pull(tmp, tls_registry, env, cacert=False, name="no-ca")
    assert run.code == 4, run.output
    assert "not trusted" in run.stderr
    assert [r.target for r in proxy.tunnels] and all(
        r.target == tls_registry.host and r.status == 200 for r in proxy.tunnels
    )
    assert not store_index(tmp / "no-ca")


# -- NO_PROXY ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("127.0.0.1", True),
        # requests matches CIDR blocks for IP hosts.
        ("127.0.0.0/8", True),
        # No name resolution: "localhost" does not cover the address 127.0.0.1.
        ("localhost", False),
        # For an IP host requests compares the address alone: an entry with a port
        # never matches it (for host names, host:port entries do match).
        ("127.0.0.1:{port}", False),
    ],
)
def test_no_proxy(no_proxy: str, bypassed: bool, registry: RegistryServer,
                  image_factory: ImageFactory, forward_proxy: ProxyFactory, tmp: Path) -> None:
    image = _image(registry, image_factory)
    proxy = forward_proxy()
    env = {
        "HTTP_PROXY": proxy.url,
        "HTTPS_PROXY": proxy.url,
        "NO_PROXY": no_proxy.format(port=registry.port),
    }
    run = _pull(tmp, registry, env)
    assert run.code == 0, run.output
    assert store_index(tmp / "store")[REF]["digest"] == image.digest
    if bypassed:
        assert proxy.records == []
    else:
        assert {r.path.rsplit("/", 1)[-1] for r in proxy.records if "/blobs/" in r.path} == set(
            image.blobs
        )


# -- proxy authentication ------------------------------------------------------------------


def test_proxy_credentials_in_url_are_used_and_never_printed(
    registry: RegistryServer, tls_registry: RegistryServer, image_factory: ImageFactory,
    forward_proxy: ProxyFactory, tmp: Path,
) -> None:
    image = _image(registry, image_factory)
    _image(tls_registry, image_factory)
    proxy = forward_proxy(auth=(PROXY_USER, PROXY_PASSWORD))
    env = {"HTTP_PROXY": proxy.url_with_credentials, "HTTPS_PROXY": proxy.url_with_credentials}

    plain = _pull(tmp, registry, env, "-vv", name="plain")
    assert plain.code == 0, plain.output
    assert store_index(tmp / "plain")[REF]["digest"] == image.digest
    tunneled = _pull(tmp, tls_registry, env, "-vv", name="tunneled")
    assert tunneled.code == 0, tunneled.output

    records = proxy.records
    assert {r.method for r in records} == {"GET", "CONNECT"}
    # Credentials went with every request and tunnel, and none was refused.
    assert all(r.proxy_auth and r.status == 200 for r in records), records
    for run in (plain, tunneled):
        assert "DEBUG" in run.stderr  # -vv really logged every request
        assert PROXY_PASSWORD not in run.output


def test_proxy_refuses_requests_without_credentials(forward_proxy: ProxyFactory,
                                                    registry: RegistryServer) -> None:
    proxy = forward_proxy(auth=(PROXY_USER, PROXY_PASSWORD))
    session = requests.Session()
    session.trust_env = False
    with session:
        answer = session.get(f"{registry.url}/v2/", proxies={"http": proxy.url}, timeout=10)
        assert answer.status_code == 407
        assert answer.headers["Proxy-Authenticate"].startswith("Basic ")
        wrong = f"http://{PROXY_USER}:nope@{proxy.host}"
        assert session.get(f"{registry.url}/v2/", proxies={"http": wrong},
                           timeout=10).status_code == 407
        ok = session.get(f"{registry.url}/v2/", proxies={"http": proxy.url_with_credentials},
                         timeout=10)
        assert ok.status_code == 200
    assert [(r.proxy_auth, r.status) for r in proxy.records] == [
        (False, 407), (True, 407), (True, 200)
    ]


def test_proxy_forwards_request_bodies(registry: RegistryServer, image_factory: ImageFactory,
                                       forward_proxy: ProxyFactory) -> None:
    # The harness's own pusher through the proxy: POST, PUT with bodies, HEAD.
    proxy = forward_proxy()
    image = image_factory.image([image_factory.layer(300_000)])
    with Pusher(registry.url) as pusher:
        pusher.session.proxies = {"http": proxy.url}
        assert pusher.push("via/proxy", "1", image) == image.digest
    assert all(registry.has_blob(digest) for digest in image.blobs)
    methods = {r.method for r in proxy.records}
    assert {"POST", "PUT"} <= methods
    uploaded = sum(r.bytes_up for r in proxy.records if r.method == "PUT")
    assert uploaded == sum(len(b) for b in image.blobs.values()) + len(image.manifest_bytes)


# -- the proxy stays on loopback -----------------------------------------------------------


def test_proxy_refuses_targets_off_loopback(forward_proxy: ProxyFactory) -> None:
    proxy = forward_proxy()
    session = requests.Session()
    session.trust_env = False
    proxies = {"http": proxy.url, "https": proxy.url}
    with session:
        # 192.0.2.0/24 is TEST-NET-1: nothing answers there, and nothing may be tried.
        answer = session.get("http://192.0.2.1:5000/v2/", proxies=proxies, timeout=10)
        assert answer.status_code == 403
        with pytest.raises(requests.exceptions.ProxyError, match="403"):
            session.get("https://192.0.2.1:5000/v2/", proxies=proxies, timeout=10)
        with pytest.raises(requests.exceptions.ProxyError, match="403"):
            session.get("https://registry.example:443/v2/", proxies=proxies, timeout=10)
    assert [(r.method, r.target, r.status) for r in proxy.records] == [
        ("GET", "http://192.0.2.1:5000/v2/", 403),
        ("CONNECT", "192.0.2.1:5000", 403),
        ("CONNECT", "registry.example:443", 403),
    ]


# -- proxy down ------------------------------------------------------------------------------


def test_proxy_down_is_one_line_exit_4(tls_registry: RegistryServer,
                                       image_factory: ImageFactory, tmp: Path) -> None:
    _image(tls_registry, image_factory)
    mark = tls_registry.mark()
    port = free_port()
    run = _pull(tmp, tls_registry, {"HTTPS_PROXY": f"http://127.0.0.1:{port}"})
    assert run.code == 4, run.output
    assert "Traceback" not in run.output
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"bmsync: error: {REF}: cannot reach proxy http://127.0.0.1:{port}")
    # No silent fallback to a direct connection.
    assert tls_registry.since(mark) == []


@pytest.mark.parametrize("tls", [False, True])
def test_wrong_proxy_credentials_say_so(tls: bool, registry_factory, image_factory: ImageFactory,  # type: ignore[no-untyped-def]
                                        forward_proxy: ProxyFactory, tmp: Path) -> None:
    server = registry_factory(tls=tls)
    _image(server, image_factory)
    proxy = forward_proxy(auth=("proxyuser", "proxy-Secret-9"))
    bad = proxy.url.replace("http://", "http://proxyuser:wrong-Secret-7@")
    env = {"HTTPS_PROXY" if tls else "HTTP_PROXY": bad}
    started = time.monotonic()
    run = _pull(tmp, server, env)
    assert run.code == 4, run.output
    assert "proxy authentication required (407)" in run.stderr
    assert "wrong-Secret-7" not in run.output
    assert time.monotonic() - started < 10
    assert len([r for r in proxy.records if r.status == 407]) == 1  # refused once: no retries
