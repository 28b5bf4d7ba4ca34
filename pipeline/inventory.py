"""What a mirror holds: the input for a delta built against a site's real content.

:func:`take_inventory` lists the tags of each repository (the bundle's repositories,
or every repository under the mirror's namespace from ``/v2/_catalog``), reads each
tag's manifest and its children, and collects every digest they reference: manifests,
configs and layers. The result is written in the inventory format that
``bmsync bundle build --base`` reads (:mod:`pipeline.bundle.delta`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pipeline.bundle.delta import INVENTORY_MEDIA_TYPE
from pipeline.errors import NotFound
from pipeline.manifest import Manifest
from pipeline.reference import Mirror
from pipeline.registry.client import RegistryClient


def catalog(client: RegistryClient, mirror: Mirror) -> list[str]:
    """Repositories under the mirror's namespace, from ``/v2/_catalog``."""
    prefix = f"{mirror.namespace}/" if mirror.namespace else ""
    return sorted(r for r in client.list_repositories() if r.startswith(prefix))


def take_inventory(client: RegistryClient, mirror: Mirror, repositories: Iterable[str],
                   *, concurrency: int = 8) -> dict[str, Any]:
    """The inventory document of ``repositories`` (full mirror paths) on ``mirror``."""
    digests: set[str] = set()
    repos = sorted(set(repositories))

    def one_repo(repo: str) -> set[str]:
        found: set[str] = set()
        try:
            tags = client.list_tags(repo)
        except NotFound:
            return found  # a repository the mirror does not have yet
        for tag in tags:
            try:
                top = client.get_manifest(repo, tag)
            except NotFound:
                continue  # deleted between listing and reading
            _collect(client, repo, top, found)
        return found

    with ThreadPoolExecutor(max(1, min(concurrency, len(repos) or 1))) as pool:
        for found in pool.map(one_repo, repos):
            digests |= found
    return {
        "schemaVersion": 1,
        "mediaType": INVENTORY_MEDIA_TYPE,
        "registry": str(mirror),
        "created": datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "repositories": repos,
        "digests": sorted(digests),
    }


def _collect(client: RegistryClient, repo: str, m: Manifest, found: set[str]) -> None:
    found.add(m.digest)
    if m.is_index:
        for child in m.children():
            if child.digest in found:
                continue
            try:
                _collect(client, repo, client.get_manifest(repo, child.digest), found)
            except NotFound:
                continue  # an incomplete index: its absent children are not held
        return
    found.update(d.digest for d in m.blobs())
