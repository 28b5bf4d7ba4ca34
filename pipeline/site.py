"""A disconnected site's import, step by step, from ``site.yaml`` (pipeline.jobconfig).

fetch -> verify the archive -> push into each mirror -> verify each mirror -> write the
containerd config. Each step is one function the Luigi tasks (``tasks.site``) call;
each writes its result atomically into ``<workDir>/<version>/`` so a re-run skips it.
Credentials come only from the config's ``dockerConfig`` or environment variables:
an unattended import never prompts.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.bundle.format import BundleManifest, parse_manifest, sidecar_manifest_name
from pipeline.containerd import MirrorEndpoint, MirrorSettings, render, settings, write_config
from pipeline.errors import CredentialError, IntegrityError, ItemsFailed, NotFound, NotYetArrived
from pipeline.jobconfig import SiteConfig, SiteMirror
from pipeline.objstore import ObjectStore, open_store
from pipeline.publish import FetchReport, fetch, read_catalog
from pipeline.reference import mirror_target
from pipeline.registry.client import RegistryClient
from pipeline.registry.credentials import Credential, from_docker_config, from_env
from pipeline.registry.transport import Transport
from pipeline.store import atomic_write

log = logging.getLogger("bmsync.site")

FETCHED = "fetched.json"
VERIFIED = "verified.json"


def objects(site: SiteConfig) -> ObjectStore:
    return open_store(site.object_store, endpoint_url=site.endpoint_url)


def latest_version(site: SiteConfig) -> str:
    """The catalog's latest version; NotYetArrived (exit 8) when it lists none."""
    store = objects(site)
    latest = read_catalog(store).latest
    if latest is None:
        raise NotYetArrived(f"{store.url}: no catalog.json yet, or it lists no version",
                            hint="try again once the first bundle has arrived")
    return latest


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def fetch_version(site: SiteConfig, version: str) -> FetchReport:
    """Download ``version`` into its folder, verified against the sidecar and catalog;
    then record it in ``fetched.json`` (the step's result)."""
    folder = site.version_dir(version)
    report = fetch(objects(site), version, folder)
    if not (folder / sidecar_manifest_name(version)).is_file():
        # Everything after reads it: the step is not done until it is here.
        raise NotYetArrived(f"{site.object_store}: {version}/{sidecar_manifest_name(version)}"
                            " has not arrived yet", hint="try again later")
    _write_json(folder / FETCHED, report.to_json())
    log.info("fetched %s into %s", version, folder)
    return report


def fetched_archive(site: SiteConfig, version: str) -> Path:
    """The archive ``fetch_version`` left (its first part when split)."""
    record = site.version_dir(version) / FETCHED
    try:
        doc = json.loads(record.read_bytes())
        return Path(doc["files"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise IntegrityError(f"{record} is missing or damaged",
                             hint="delete it and run the import again") from None


def bundle_manifest(site: SiteConfig, version: str) -> BundleManifest:
    path = site.version_dir(version) / sidecar_manifest_name(version)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IntegrityError(f"cannot read {path}: {e.strerror}",
                             hint="fetch the version again") from None
    return parse_manifest(raw, source=str(path))


def verify_fetched(site: SiteConfig, version: str) -> None:
    """Check the fetched archive in one pass; record the result in ``verified.json``."""
    from pipeline.bundle.verify import verify_bundle

    report = verify_bundle(fetched_archive(site, version), require_sidecar=True)
    _write_json(site.version_dir(version) / VERIFIED, report.to_json())
    log.info("verified %s: %d blobs match their digests, %d images complete", report.archive,
             report.blobs, len(report.manifest.images))


def credential(m: SiteMirror) -> Credential | None:
    if not m.need_credential:
        return None
    if m.docker_config is not None:
        found = from_docker_config(m.mirror.host, m.docker_config)
        if found is None:
            raise CredentialError(f"{m.docker_config} holds no login for {m.mirror.host}",
                                  hint="add one with docker login, or fix dockerConfig")
        return found
    assert m.username_env and m.password_env
    return from_env(m.username_env, m.password_env)


def mirror_client(m: SiteMirror, *, concurrency: int = 8) -> RegistryClient:
    transport = Transport(cacert=str(m.cacert) if m.cacert else None,
                          pool_size=max(16, concurrency * 2))
    return RegistryClient(m.mirror.host, endpoint=m.mirror.base_url, credential=credential(m),
                          transport=transport)


def push_version(site: SiteConfig, version: str, mirror_url: str, *,
                 concurrency: int = 8) -> None:
    """Push the fetched archive into one mirror; raises when any image failed."""
    from pipeline.bundle.reader import open_bundle
    from pipeline.mirror import push_bundle

    m = site.mirror(mirror_url)
    client = mirror_client(m, concurrency=concurrency)
    with open_bundle(fetched_archive(site, version)) as reader:
        [report] = push_bundle(reader.manifest, [(m.mirror, client)], reader=reader,
                               concurrency=concurrency)
    if report.failed:
        first = report.failed[0]
        names = ", ".join(i.target for i in report.failed)
        raise ItemsFailed(f"{len(report.failed)} images failed to push to {m.mirror}: {names};"
                      f" first: {first.error}", first.exit_code)
    s = report.to_json()["summary"]
    log.info("pushed %s to %s: %s images pushed, %s present; %d bytes uploaded",
             version, m.mirror, s["pushed"], s["present"], report.bytes_uploaded)


def mirror_serves(site: SiteConfig, version: str, mirror_url: str, *,
                  concurrency: int = 8) -> bool:
    """Whether every image of the fetched ``version`` is at its tag in the mirror with
    the bundle's digest (one HEAD per image). False when it is not fetched yet."""
    try:
        manifest = bundle_manifest(site, version)
    except IntegrityError:
        return False
    m = site.mirror(mirror_url)
    client = mirror_client(m, concurrency=concurrency)

    def at_tag(entry: Any) -> bool:
        target = mirror_target(entry.source, entry.digest, m.mirror)
        try:
            return client.manifest_digest(target.repository, target.identifier) == entry.digest
        except NotFound:
            return False

    with ThreadPoolExecutor(max(1, min(concurrency, len(manifest.images) or 1))) as pool:
        return all(pool.map(at_tag, manifest.images))


def verify_pushed(site: SiteConfig, version: str, mirror_url: str, *,
                  concurrency: int = 8) -> Path:
    """Check every image and blob of ``version`` in the mirror (pipeline.verify); write
    the report when all is well, else raise naming the first problem."""
    from pipeline.verify import verify_mirror

    m = site.mirror(mirror_url)
    report = verify_mirror(bundle_manifest(site, version), m.mirror,
                           mirror_client(m, concurrency=concurrency), concurrency=concurrency)
    bad = report.differences
    if bad:
        raise IntegrityError(f"{m.mirror}: {len(bad)} images do not match bundle {version};"
                             f" first: {bad[0].target}: {bad[0].problem}",
                             hint="run the import again to push what is missing")
    path = verification_path(site, version, mirror_url)
    _write_json(path, report.to_json())
    log.info("verified %s: it serves all %d images of %s", m.mirror, len(report.images),
             version)
    return path


def verification_path(site: SiteConfig, version: str, mirror_url: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(site.mirror(mirror_url).mirror))
    return site.version_dir(version) / f"mirror-{slug}.json"


def containerd_settings(site: SiteConfig) -> MirrorSettings:
    endpoints = [MirrorEndpoint(m.mirror, m.cacert, credential(m),
                                m.docker_config if m.need_credential else None)
                 for m in site.mirrors]
    gcr_key = site.containerd.gcr_key_path if site.containerd else None
    return settings(endpoints, hosts=site.hosts, gcr_key_path=gcr_key,
                    no_fallback=bool(site.containerd and site.containerd.no_fallback))


def containerd_current(site: SiteConfig) -> bool:
    """Whether the containerd files on disk are what the site config generates."""
    out = site.containerd
    if out is None:
        return True
    node_dir = (out.install_dir or out.out).absolute()
    for generated in render(containerd_settings(site), install_dir=node_dir):
        target = out.out / generated.path
        try:
            # Content and mode, as write_config decides (a login file must be 0600).
            if (target.read_bytes() != generated.data
                    or (target.stat().st_mode & 0o777) != generated.mode):
                return False
        except OSError:
            return False
    return True


def write_containerd(site: SiteConfig) -> list[str]:
    """Write the node config the site config describes; the files written."""
    out = site.containerd
    if out is None:
        return []
    changes = write_config(containerd_settings(site), out.out, install_dir=out.install_dir)
    written = [c for c in changes if c.status != "unchanged"]
    log.info("wrote the node config into %s: %d files new or changed", out.out, len(written))
    return [f"{c.status} {c.path}" for c in changes]


def check_arrived(site: SiteConfig, version: str) -> None:
    """Raise NotYetArrived (exit 8) unless the catalog lists ``version`` and its
    checksum sidecar and every file it lists are in the site's object store."""
    store = objects(site)
    catalog = read_catalog(store)
    entry = catalog.versions.get(version)
    if entry is None:
        known = ", ".join(sorted(catalog.versions)) or "none"
        raise NotYetArrived(f"{store.url}: the catalog does not list {version} (yet);"
                            f" it lists: {known}", hint="check the version, or try again later")
    name = str(entry.get("archive", ""))
    wanted = [f"{name}.sha256", sidecar_manifest_name(version),
              *(str(f) for f in entry.get("files", []))]
    for f in wanted:
        if store.head(f"{version}/{f}") is None:
            raise NotYetArrived(f"{store.url}: {version}/{f} has not arrived yet",
                                hint="try again later")
