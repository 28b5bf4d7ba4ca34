"""Build registry clients from configuration: endpoint, CA and credentials per host.

One :class:`Transport` is shared per CA file, so every client of a run reuses the same
thread-local sessions and connection pools.
"""

from __future__ import annotations

import threading

from pipeline.config import RegistrySettings
from pipeline.reference import api_host
from pipeline.registry.client import RegistryClient
from pipeline.registry.credentials import (
    Credential,
    from_docker_config,
    from_env,
    from_gcr_key,
)
from pipeline.registry.transport import RetryPolicy, Transport


def credential_for(host: str, settings: RegistrySettings | None) -> Credential | None:
    """The credential to use for ``host``, in order of precedence.

    ``gcrKeyPath``, then ``usernameEnv``/``passwordEnv``, then ``dockerConfig`` (an
    explicit config.json), then the user's default docker config.json. Anonymous
    (None) when none of them has an entry for the host.
    """
    if settings is not None:
        if settings.gcr_key_path:
            return from_gcr_key(settings.gcr_key_path)
        if settings.username_env or settings.password_env:
            return from_env(settings.username_env or "", settings.password_env or "")
        if settings.docker_config:
            return from_docker_config(host, settings.docker_config)
    return from_docker_config(host)


class ClientPool:
    """One :class:`RegistryClient` per registry host, built on first use; thread-safe."""

    def __init__(
        self,
        settings: dict[str, RegistrySettings] | None = None,
        *,
        pool_size: int = 16,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._settings = dict(settings or {})
        self._pool_size = pool_size
        self._policy = policy
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}
        self._transports: dict[str | None, Transport] = {}

    def client(self, host: str) -> RegistryClient:
        with self._lock:
            existing = self._clients.get(host)
            if existing is not None:
                return existing
            settings = self._settings.get(host)
            cacert = settings.cacert if settings else None
            transport = self._transports.get(cacert)
            if transport is None:
                transport = Transport(cacert=cacert, policy=self._policy, pool_size=self._pool_size)
                self._transports[cacert] = transport
            client = RegistryClient(
                host,
                endpoint=settings.endpoint if settings else None,
                credential=credential_for(host, settings),
                transport=transport,
                api_host=api_host(host),
            )
            self._clients[host] = client
            return client
