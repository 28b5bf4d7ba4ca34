"""The ``dag`` benchmark: issue 7's targets for ``bmsync run release|nightly|import``.

Registered in ``bench.run.BENCHMARKS``; run it with ``python -m bench.run --only dag``.
It brings its own image set (the lab's 20 large images say little about scheduling):

Setup (untimed): a source registry standing in for gcr.io, seeded by the harness's
``Pusher`` with 100 images (25 repositories x tags ``1.0``-``1.3``), each a shared
base layer of 5 MB plus one own layer of 400 KB (about 45 MB unique); two mirror
registries (one for the release site, one for the nightly site); ``pipeline.yaml``
and ``site.yaml`` files (JSON is YAML) with ``file://`` object stores in the work
directory.

Timed, each as one ``bmsync run ...`` process (wall time of the whole process):

- release: cold, then the no-op re-run ``lab.repeat`` times (median; target < 5 s),
  with the source registry's requests for each re-run (must be 0);
- import of that release into its mirror, cold, then the no-op re-run (median), with
  the mirror's requests;
- nightly: a full first version, a run with nothing changed (no new version), then
  one changed image (a new tag ``1.4`` in one repository, matching the ``1.*`` filter:
  the shared base plus one new own layer) and the next nightly, a delta; the site
  imports both versions in order.

For the delta the witnesses are independent of bmsync: the blobs and bytes the source
registry served (its access log), the blobs the archive carries (``inArchive`` in the
published ``bundle.json``) and the archive's size in the object store directory, the
blobs the mirror received (the ``digest=`` of each completed upload in its access log,
sized from the mirror's own storage). Each is compared with the changed image's new
blobs as the harness generated them (its own layer, its config, its manifest).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.harness.images import ImageFactory, Layer, Pusher
from tests.harness.registry import AccessEntry, RegistryServer, start_registry

if TYPE_CHECKING:
    from bench.run import Lab, Row

KB = 1000
MB = 1000 * KB
PREFIX = "anthos-baremetal-release/dag"
REPOS = 25
TAGS = ("1.0", "1.1", "1.2", "1.3")
NEW_TAG = "1.4"
BASE_SIZE = 5 * MB
OWN_SIZE = 400 * KB
DAY = "2026-11-20"
FIRST, SECOND = "2026.11.20.1", "2026.11.20.2"
NS = "test-namespace"
NOOP_TARGET = 5.0


@dataclass
class Source:
    registry: RegistryServer
    factory: ImageFactory
    base: Layer

    def push(self, pusher: Pusher, repo: str, tag: str) -> tuple[dict[str, int], str, int]:
        """Push base + a new own layer at ``repo:tag``. Returns the image's new blobs
        (own layer and config) -> size, its manifest digest and the manifest's size."""
        own = self.factory.layer(OWN_SIZE)
        image = self.factory.image([self.base, own])
        pusher.push(repo, tag, image)
        blobs = {own.digest: own.size, image.config_digest: len(image.config_bytes)}
        return blobs, image.digest, image.size


def _repo(i: int) -> str:
    return f"{PREFIX}-{i:02d}"


def _pipeline_yaml(path: Path, source: RegistryServer, images: list[Any],
                   objects: Path) -> Path:
    doc = {
        "version": 1,
        "release": "1.0.0",
        "platforms": ["linux/amd64"],
        "registries": {"gcr.io": {"endpoint": source.url}},
        "images": images,
        "workDir": str(path.parent / "work"),
        "objectStore": f"file://{objects}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _site_yaml(path: Path, objects: Path, mirror: RegistryServer) -> Path:
    doc = {
        "version": 1,
        "objectStore": f"file://{objects}",
        "workDir": str(path.parent / "site"),
        "mirrors": [{"url": f"http://{mirror.host}/{NS}", "needCredential": False}],
        "containerd": {"out": str(path.parent / "node-config")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _blob_gets(entries: list[AccessEntry]) -> dict[str, int]:
    """Blobs served with a 2xx GET -> body bytes the registry wrote (summed)."""
    got: dict[str, int] = {}
    for e in entries:
        if e.method == "GET" and "/blobs/sha256:" in e.path and e.status < 300:
            digest = e.path.rsplit("/", 1)[1]
            got[digest] = got.get(digest, 0) + e.size
    return got


def _uploads(mirror: RegistryServer, entries: list[AccessEntry]) -> dict[str, int]:
    """Blobs whose upload completed (the ``PUT ...?digest=`` answered 201) -> their size
    in the mirror's storage."""
    done: dict[str, int] = {}
    for e in entries:
        if e.method == "PUT" and "/blobs/uploads/" in e.path and e.status == 201:
            for digest in e.params.get("digest", []):
                done[digest] = mirror.blob_path(digest).stat().st_size
    return done


def _methods(entries: list[AccessEntry]) -> str:
    """``HEAD 300 GET 200 ...``: the requests by method, most frequent first."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.method] = counts.get(e.method, 0) + 1
    return " ".join(f"{m} {n}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _manifest_puts(entries: list[AccessEntry]) -> int:
    return sum(1 for e in entries
               if e.method == "PUT" and "/manifests/" in e.path and e.status == 201)


def _runs(ts: list[float]) -> str:
    return "runs " + " ".join(f"{t:.2f}" for t in ts)


def bench_dag(lab: Lab) -> list[Row]:
    from bench.run import BMSYNC, Row, _run

    work = lab.work / "dag"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    servers: list[RegistryServer] = []
    try:
        registry = start_registry(work / "source")
        servers.append(registry)
        factory = ImageFactory("bench-dag")
        source = Source(registry, factory, factory.layer(BASE_SIZE, files=2))
        with Pusher(registry.url) as pusher:
            for r in range(REPOS):
                for tag in TAGS:
                    source.push(pusher, _repo(r), tag)
        release_mirror = start_registry(work / "mirror-release")
        nightly_mirror = start_registry(work / "mirror-nightly")
        servers += [release_mirror, nightly_mirror]

        refs = [f"gcr.io/{_repo(r)}:{t}" for r in range(REPOS) for t in TAGS]
        rel_objects = work / "objects-release"
        rel_cfg = _pipeline_yaml(work / "release" / "pipeline.yaml", registry, list(refs),
                                 rel_objects)
        rel_site = _site_yaml(work / "release-site" / "site.yaml", rel_objects, release_mirror)
        filters = [{"name": f"gcr.io/{_repo(r)}", "tags": ["1.*"]} for r in range(REPOS)]
        ni_objects = work / "objects-nightly"
        ni_cfg = _pipeline_yaml(work / "nightly" / "pipeline.yaml", registry, filters,
                                ni_objects)
        ni_site = _site_yaml(work / "nightly-site" / "site.yaml", ni_objects, nightly_mirror)

        def bm(*args: str) -> float:
            return _run([BMSYNC, "-q", "run", *args])

        rows: list[Row] = []

        # -- release: cold, then the no-op re-run -------------------------------------
        mark = registry.mark()
        cold = bm("release", "--config", str(rel_cfg))
        entries = registry.since(mark)
        got = _blob_gets(entries)
        rows.append(Row("run release (cold, 100 images)", cold, sum(got.values()),
                        len(entries), f"{len(got)} blobs fetched"))
        noop: list[float] = []
        noop_requests: list[int] = []
        for _ in range(lab.repeat):
            mark = registry.mark()
            noop.append(bm("release", "--config", str(rel_cfg)))
            noop_requests.append(len(registry.since(mark)))
        rows.append(Row("run release (no-op re-run)", statistics.median(noop), 0,
                        max(noop_requests), _runs(noop),
                        {"seconds": statistics.median(noop),
                         "requests": float(max(noop_requests))}))

        # -- import of the release: cold, then the no-op re-run -----------------------
        mark = release_mirror.mark()
        cold = bm("import", "--config", str(rel_site))
        entries = release_mirror.since(mark)
        up = _uploads(release_mirror, entries)
        rows.append(Row("run import (cold, 100 images)", cold, sum(up.values()), len(entries),
                        f"{len(up)} blobs uploaded, {_manifest_puts(entries)} manifests;"
                        f" {_methods(entries)}"))
        noop = []
        noop_requests = []
        for _ in range(lab.repeat):
            mark = release_mirror.mark()
            noop.append(bm("import", "--config", str(rel_site)))
            noop_requests.append(len(release_mirror.since(mark)))
        rows.append(Row("run import (no-op re-run)", statistics.median(noop), 0,
                        max(noop_requests), _runs(noop)))

        # -- nightly: full, nothing changed, one changed image ------------------------
        mark = registry.mark()
        full = bm("nightly", "--config", str(ni_cfg), "--date", DAY)
        entries = registry.since(mark)
        got = _blob_gets(entries)
        full_archive = ni_objects / FIRST / f"bmpackages_{FIRST}.tar.zst"
        rows.append(Row("run nightly (full)", full, sum(got.values()), len(entries),
                        f"{FIRST}: {len(got)} blobs fetched; archive"
                        f" {full_archive.stat().st_size} B"))

        before = _tree(ni_objects)
        mark = registry.mark()
        same = bm("nightly", "--config", str(ni_cfg), "--date", DAY)
        entries = registry.since(mark)
        got = _blob_gets(entries)
        unchanged = _tree(ni_objects) == before
        nightly_noop_ok = unchanged and not got
        rows.append(Row("run nightly (nothing changed)", same, sum(got.values()), len(entries),
                        f"{len(got)} blob GETs; object store "
                        f"{'untouched' if unchanged else 'WRITTEN'}"))

        with Pusher(registry.url) as pusher:
            new_blobs, manifest_digest, manifest_size = source.push(pusher, _repo(0), NEW_TAG)
        new = {**new_blobs, manifest_digest: manifest_size}

        mark = registry.mark()
        delta_s = bm("nightly", "--config", str(ni_cfg), "--date", DAY)
        entries = registry.since(mark)
        fetched = _blob_gets(entries)
        version_dir = ni_objects / SECOND
        archive = version_dir / f"bmpackages_{SECOND}.tar.zst"
        doc = json.loads((version_dir / f"bmpackages_{SECOND}.bundle.json").read_text())
        carried = {d: int(b["size"]) for d, b in doc["blobs"].items() if b["inArchive"]}
        folder = sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file())
        base = (doc.get("base") or {}).get("version")
        rows.append(Row("run nightly (1 changed image)", delta_s, sum(fetched.values()),
                        len(entries),
                        f"{SECOND}: {len(fetched)} blobs fetched; delta on {base} published,"
                        f" {archive.stat().st_size} B archive ({folder} B with sidecars),"
                        f" {len(carried)} blobs carried ({sum(carried.values())} B)"))

        mark = nightly_mirror.mark()
        imp_s = bm("import", "--config", str(ni_site), "--release", FIRST)
        entries = nightly_mirror.since(mark)
        up = _uploads(nightly_mirror, entries)
        rows.append(Row("run import (full nightly)", imp_s, sum(up.values()), len(entries),
                        f"{FIRST}: {len(up)} blobs uploaded, {_manifest_puts(entries)}"
                        " manifests"))
        mark = nightly_mirror.mark()
        imp_s = bm("import", "--config", str(ni_site), "--release", SECOND)
        entries = nightly_mirror.since(mark)
        pushed = _uploads(nightly_mirror, entries)
        rows.append(Row("run import (delta, in order)", imp_s, sum(pushed.values()), len(entries),
                        f"{len(pushed)} blobs uploaded, {_manifest_puts(entries)} manifests;"
                        f" {_methods(entries)}"))

        witness = sum(new.values())
        rows[-1].facts.update({
            "new_bytes": float(witness),
            "new_blob_bytes": float(sum(new_blobs.values())),
            "fetched_ok": float(set(fetched) == set(new_blobs)),
            "fetched_bytes": float(sum(fetched.values())),
            "carried_ok": float(set(carried) == set(new)),
            "carried_bytes": float(sum(carried.values())),
            "archive_bytes": float(archive.stat().st_size),
            "pushed_ok": float(set(pushed) == set(new_blobs)),
            "pushed_bytes": float(sum(pushed.values())),
            "nightly_noop_ok": float(nightly_noop_ok),
        })
        return rows
    finally:
        for server in servers:
            server.close()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with size and mtime: equal states wrote nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def summary(rows: list[Row]) -> list[str]:
    noop = rows[1].facts
    facts = rows[-1].facts
    met = noop["seconds"] < NOOP_TARGET and noop["requests"] == 0
    only = facts["fetched_ok"] and facts["carried_ok"] and facts["pushed_ok"]

    def yes(ok: float) -> str:
        return "yes" if ok else "NO"

    return [
        f"no-op re-run of a 100-image release: {noop['seconds']:.2f} s (median),"
        f" {noop['requests']:.0f} registry requests (target < {NOOP_TARGET:.0f} s and 0:"
        f" {'met' if met else 'MISSED'})",
        f"changed image's new content (harness): {facts['new_blob_bytes']:.0f} B of blobs"
        f" (own layer + config), {facts['new_bytes']:.0f} B with its manifest",
        f"  fetched from the source: {facts['fetched_bytes']:.0f} B, only its blobs:"
        f" {yes(facts['fetched_ok'])}",
        f"  carried in the delta:    {facts['carried_bytes']:.0f} B (archive published:"
        f" {facts['archive_bytes']:.0f} B), only its blobs + manifest:"
        f" {yes(facts['carried_ok'])}",
        f"  pushed to the mirror:    {facts['pushed_bytes']:.0f} B, only its blobs:"
        f" {yes(facts['pushed_ok'])}",
        f"nightly with one changed image moves only its new blobs through every stage:"
        f" {'met' if only else 'MISSED'}; nightly with nothing changed moved nothing:"
        f" {yes(facts['nightly_noop_ok'])}",
    ]
