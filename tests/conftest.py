"""Shared fixtures: real registries, a token issuer, a test CA, images, a fault proxy, S3.

Every server a fixture starts is stopped at teardown, whether the test passed or not.
A server that cannot start raises ``ServerStartError`` (with its log tail): the test
fails, it is never skipped.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.harness.faultproxy import FaultProxy
from tests.harness.forwardproxy import ForwardProxy
from tests.harness.images import ImageFactory
from tests.harness.pki import TestPKI, create_pki
from tests.harness.registry import RegistryServer, start_registry
from tests.harness.s3 import S3Server

USERS: Mapping[str, str] = {"alice": "wonderland-pass"}


class RegistryFactory(Protocol):
    def __call__(
        self,
        *,
        auth: str = "none",
        users: Mapping[str, str] | None = None,
        anonymous: Iterable[str] | None = None,
        tls: bool = False,
        token_algorithm: str = "ES256",
        config: Mapping[str, Any] | None = None,
    ) -> RegistryServer: ...


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A fresh directory for this test (pytest's ``tmp_path``)."""
    return tmp_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """One test CA and loopback server certificate for the whole session."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def registry_factory(tmp_path: Path, pki: TestPKI) -> Iterator[RegistryFactory]:
    """Start registries with options; all of them are closed at teardown.

    ``auth``: ``"none"``, ``"basic"`` or ``"token"`` (users default to alice's);
    ``anonymous``: actions granted without credentials in token mode (e.g.
    ``{"pull"}``); ``tls``: serve https with the session CA (``server.verify``,
    ``server.ca_cert``); ``config``: merged over the generated registry config.
    """
    counter = itertools.count()
    with contextlib.ExitStack() as stack:

        def make(
            *,
            auth: str = "none",
            users: Mapping[str, str] | None = None,
            anonymous: Iterable[str] | None = None,
            tls: bool = False,
            token_algorithm: str = "ES256",
            config: Mapping[str, Any] | None = None,
        ) -> RegistryServer:
            if users is None and auth != "none":
                users = USERS
            server = start_registry(
                tmp_path / f"registry-{next(counter)}",
                auth=auth,
                users=users,
                anonymous=frozenset(anonymous) if anonymous is not None else None,
                tls=pki if tls else None,
                token_pki=pki,
                token_algorithm=token_algorithm,
                config=config,
            )
            stack.callback(server.close)
            return server

        yield make


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> RegistryServer:
    """A plain-http registry without auth."""
    return registry_factory()


@pytest.fixture
def basic_registry(registry_factory: RegistryFactory) -> RegistryServer:
    """htpasswd Basic auth, user ``alice`` / ``wonderland-pass`` (``.auth``)."""
    return registry_factory(auth="basic")


@pytest.fixture
def token_registry(registry_factory: RegistryFactory) -> RegistryServer:
    """Token auth; the issuer is ``.token_issuer`` (users: alice; no anonymous access)."""
    return registry_factory(auth="token")


@pytest.fixture
def tls_registry(registry_factory: RegistryFactory) -> RegistryServer:
    """https with the session test CA (``.ca_cert``, ``.verify``, ``.pki.cert_dir``)."""
    return registry_factory(tls=True)


@pytest.fixture
def image_factory(request: pytest.FixtureRequest) -> ImageFactory:
    """An ImageFactory seeded by the test's id: stable per test, distinct across tests."""
    return ImageFactory(seed=f"bmsync-tests:{request.node.nodeid}")


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Start fault proxies: ``fault_proxy(registry_or_url, verify=None)``.

    With a RegistryServer, the proxy trusts its CA. All proxies stop at teardown.
    """
    with contextlib.ExitStack() as stack:

        def make(
            upstream: RegistryServer | str, *, verify: bool | str | None = None
        ) -> FaultProxy:
            if isinstance(upstream, RegistryServer):
                url = upstream.url
                if verify is None:
                    verify = upstream.verify
            else:
                url = upstream
            proxy = FaultProxy(url, verify=True if verify is None else verify)
            stack.callback(proxy.stop)
            return proxy.start()

        yield make


@pytest.fixture
def forward_proxy() -> Iterator[Callable[..., ForwardProxy]]:
    """Start forward proxies: ``forward_proxy(auth=None)``; ``auth=(user, password)``
    requires Basic proxy credentials. All proxies stop at teardown.
    """
    with contextlib.ExitStack() as stack:

        def make(*, auth: tuple[str, str] | None = None) -> ForwardProxy:
            proxy = ForwardProxy(auth=auth)
            stack.callback(proxy.stop)
            return proxy.start()

        yield make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session, stopped at its end.

    Session-scoped because ``weed mini`` takes about 1.7 s to start: tests share it, so
    each one writes under its own key prefix or creates its own bucket with
    ``s3_server.new_bucket()``. ``.bucket`` exists; ``.client()`` is signed with the
    server's keys (SigV4 is enforced); ``.env()`` configures a CLI subprocess.
    """
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server.start()
    finally:
        server.stop()
