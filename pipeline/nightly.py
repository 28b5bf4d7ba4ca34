"""The nightly sync's decisions: which version, full or delta, or nothing to do.

A nightly run resolves the config's tags (filters included) to digests, then compares
them with the latest published version's ``bundle.json`` (the object store is the
record, so a second machine sees the same history):

- the same images at the same digests: nothing changed, no new version;
- a lock of this machine not yet published, with the same pins and newer than every
  published version: a crashed earlier run, whose version is finished;
- otherwise a new version, ``versionScheme`` with the next run number of the day.

A new version is a full bundle when no full one is published or ``fullEvery - 1``
deltas followed the last full one; otherwise a delta against the last full bundle (or
against ``baseInventory`` when configured). The base's file is copied into the version
folder and pinned by digest in the lock, so a re-run builds the same bytes.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from pipeline.bundle.format import BundleManifest, parse_manifest, sidecar_manifest_name
from pipeline.errors import IntegrityError, NotYetArrived, StoreError
from pipeline.jobconfig import PipelineConfig
from pipeline.manifest import compute_digest
from pipeline.objstore import ObjectStore
from pipeline.publish import Catalog, read_catalog
from pipeline.registry.connect import ClientPool
from pipeline.release import (
    LOCK_NAME,
    Lock,
    client_pool,
    read_lock,
    resolve_pins,
    resolve_release,
)
from pipeline.release import (
    objects as release_objects,
)
from pipeline.store import atomic_write

log = logging.getLogger("bmsync.nightly")


@dataclass(frozen=True)
class NightlyPlan:
    version: str
    changed: bool  # False: ``version`` is the published version holding these pins
    reason: str  # one line for the log: why this version, full or delta


def version_name(scheme: str, day: date, n: int, release: str) -> str:
    return scheme.format(yyyy=f"{day.year:04d}", mm=f"{day.month:02d}", dd=f"{day.day:02d}",
                         n=n, release=release)


def run_number(scheme: str, day: date, release: str, version: str) -> int | None:
    """The ``{n}`` of ``version`` when it is a version of ``day`` under ``scheme``."""
    pattern = ""
    for literal, name, _spec, _conv in string.Formatter().parse(scheme):
        pattern += re.escape(literal)
        if name == "n":
            pattern += r"(?P<n>[0-9]+)"
        elif name is not None:
            pattern += re.escape(version_name(f"{{{name}}}", day, 0, release))
    m = re.fullmatch(pattern, version)
    return int(m.group("n")) if m else None


def plan_nightly(cfg: PipelineConfig, day: date, *, objects: ObjectStore | None = None,
                 clients: ClientPool | None = None) -> NightlyPlan:
    """Decide tonight's version (see the module docstring); writes its lock when new."""
    objects = objects or release_objects(cfg)
    pins = resolve_pins(cfg.images, clients or client_pool(cfg))
    platforms = tuple(str(p) for p in cfg.images.platforms)
    wanted = frozenset((p.source, p.digest) for p in pins)
    catalog = read_catalog(objects)

    latest = catalog.latest
    if latest is not None:
        manifest = _published_manifest(objects, latest)
        have = frozenset((i.source, i.upstream_digest) for i in manifest.images)
        if have == wanted and tuple(manifest.platforms) == platforms:
            return NightlyPlan(latest, False,
                               f"nothing changed since {latest}: no new version")

    newest_published = max((str(e.get("created", "")) for e in catalog.versions.values()),
                           default="")
    for lock in _local_locks(cfg):
        if (lock.kind == "nightly" and lock.version not in catalog.versions
                and lock.pins() == wanted and lock.platforms == platforms
                and _stamp(lock.resolved) >= newest_published):
            return NightlyPlan(lock.version, True,
                               f"finishing {lock.version}, resolved by an earlier run")

    release = cfg.images.release
    taken = [run_number(cfg.version_scheme, day, release, v)
             for v in [*catalog.versions, *_local_versions(cfg)]]
    n = 1 + max((t for t in taken if t is not None), default=0)
    version = version_name(cfg.version_scheme, day, n, release)
    base, reason = _choose_base(cfg, objects, catalog, version)
    resolve_release(cfg, version, kind="nightly", base=base, pins=pins)
    return NightlyPlan(version, True, f"{version}: {reason}")


def _stamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _published_manifest(objects: ObjectStore, version: str) -> BundleManifest:
    key = f"{version}/{sidecar_manifest_name(version)}"
    got = objects.get_bytes(key)
    if got is None:
        raise NotYetArrived(f"{objects.url}/{key}: the catalog lists {version} but its"
                            " bundle.json is missing", hint="publish it again")
    return parse_manifest(got[0], source=f"{objects.url}/{key}")


def _local_versions(cfg: PipelineConfig) -> list[str]:
    if not cfg.work_dir.is_dir():
        return []
    return [p.name for p in cfg.work_dir.iterdir() if (p / LOCK_NAME).is_file()]


def _local_locks(cfg: PipelineConfig) -> list[Lock]:
    locks = []
    for version in _local_versions(cfg):
        try:
            locks.append(read_lock(cfg.version_dir(version) / LOCK_NAME))
        except (IntegrityError, StoreError) as e:
            log.warning("ignoring %s", e)
    return locks


def _choose_base(cfg: PipelineConfig, objects: ObjectStore, catalog: Catalog,
                 version: str) -> tuple[dict[str, str] | None, str]:
    """The lock's base for a new version (copying its file into the version folder)."""
    order = sorted(catalog.versions, key=lambda v: (catalog.versions[v].get("created", ""), v))
    fulls = [v for v in order if not catalog.versions[v].get("base")]
    if not fulls:
        return None, "a full bundle (none is published yet)"
    last_full = fulls[-1]
    since = len(order) - 1 - order.index(last_full)
    if since + 1 >= cfg.full_every:
        return None, f"a full bundle ({since} deltas since {last_full}, fullEvery {cfg.full_every})"
    folder = cfg.version_dir(version)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.base_inventory is not None:
        raw = _read(cfg.base_inventory)
        name = "base.inventory.json"
        base = {"kind": "inventory", "file": name, "digest": compute_digest(raw)}
        reason = f"a delta against the inventory {cfg.base_inventory}"
    else:
        key = f"{last_full}/{sidecar_manifest_name(last_full)}"
        got = objects.get_bytes(key)
        if got is None:
            raise NotYetArrived(f"{objects.url}/{key} is missing", hint="publish it again")
        raw = got[0]
        name = "base.bundle.json"
        base = {"kind": "bundle", "file": name, "digest": compute_digest(raw),
                "version": last_full}
        reason = f"a delta against the full bundle {last_full}"
    atomic_write(folder / name, raw)
    return base, reason


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None

