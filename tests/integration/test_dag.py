"""The Luigi DAG end to end (issue 7): `bmsync run release|nightly|import` and Luigi's
own command line, against real registries, SeaweedFS, a file:// store and `luigid`.

Witnesses: the registries' access logs (what was fetched, pushed, and how often),
skopeo reading the source and the mirror (digests), the object store read with boto3
or the file system (what was published, and that nothing was re-written), the bytes
of the archives (sha256 against the catalog).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli import ROOT, Run, bmsync, store_index
from tests.conftest import RegistryFactory
from tests.harness.faultproxy import Delay, fail
from tests.harness.images import ImageFactory, Layer
from tests.harness.images import push as push_upstream
from tests.harness.luigid import LuigidServer
from tests.harness.registry import AccessEntry, RegistryServer
from tests.harness.s3 import S3Server
from tests.harness.skopeo import inspect_raw, manifest_digest

KIB = 1024
REPOS = ("alpha", "beta", "gamma", "delta")


@dataclass
class Upstream:
    """A source registry standing in for gcr.io, with images pushed by the harness."""

    registry: RegistryServer
    factory: ImageFactory
    base: Layer
    digests: dict[str, str]  # "repo:tag" -> manifest digest pushed

    def push(self, repo: str, tag: str, size: int = 96 * KIB) -> tuple[str, set[str]]:
        """Push a new single-platform image; returns its digest and its own blobs."""
        own = self.factory.layer(size)
        image = self.factory.image([self.base, own])
        digest = push_upstream(self.registry.url, f"anthos-baremetal-release/{repo}", tag,
                               image)
        self.digests[f"{repo}:{tag}"] = digest
        return digest, {own.digest, image.config_digest, digest}


@pytest.fixture
def upstream(registry_factory: RegistryFactory, image_factory: ImageFactory) -> Upstream:
    up = Upstream(registry_factory(), image_factory, image_factory.layer(160 * KIB), {})
    for repo in REPOS:
        up.push(repo, "1.0")
    return up


def pipeline_yaml(path: Path, upstream_url: str, objects: str, *,
                  images: list[Any] | None = None, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "release": "1.0.0",
        "platforms": ["linux/amd64"],
        "registries": {"gcr.io": {"endpoint": upstream_url}},
        "images": images or [f"gcr.io/anthos-baremetal-release/{r}:1.0" for r in REPOS],
        "workDir": "work",
        "objectStore": objects,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def site_yaml(path: Path, objects: str, mirror: RegistryServer, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "objectStore": objects,
        "workDir": "site",
        "mirrors": [{"url": f"http://{mirror.host}/test-namespace", "needCredential": False}],
        "containerd": {"out": "node-config"},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = 240) -> Run:
    return bmsync(*args, env=env, timeout=timeout)


def ok(result: Run) -> Run:
    assert result.code == 0, result.output
    return result


def blob_gets(entries: list[AccessEntry]) -> Counter[str]:
    """Blob digests fetched with a 2xx GET, and how often."""
    return Counter(e.path.rsplit("/", 1)[1] for e in entries
                   if e.method == "GET" and "/blobs/sha256:" in e.path and e.status < 300)


def writes(entries: list[AccessEntry]) -> list[AccessEntry]:
    return [e for e in entries if e.method in ("PUT", "POST", "PATCH", "DELETE")]


def mirror_digest(mirror: RegistryServer, repo: str, tag: str) -> str:
    return manifest_digest(inspect_raw(
        f"docker://{mirror.host}/test-namespace/anthos-baremetal-release/{repo}:{tag}"))


def source_digest(upstream: Upstream, repo: str, tag: str) -> str:
    return manifest_digest(inspect_raw(
        f"docker://{upstream.registry.host}/anthos-baremetal-release/{repo}:{tag}"))


def file_catalog(objects_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((objects_dir / "catalog.json").read_text())
    return doc


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: equal states wrote nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


# -- release and import through SeaweedFS ----------------------------------------------


def test_release_and_import_through_s3_then_reruns_do_nothing(
    tmp: Path, upstream: Upstream, registry_factory: RegistryFactory, s3_server: S3Server,
) -> None:
    bucket = s3_server.new_bucket("dag")
    objects = f"s3://{bucket}/releases"
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": s3_server.endpoint}
    cfg = pipeline_yaml(tmp / "connected" / "pipeline.yaml", upstream.registry.url, objects)

    ok(run("run", "release", "--config", str(cfg), env=env))
    s3 = s3_server.client()
    catalog = json.loads(s3.get_object(Bucket=bucket, Key="releases/catalog.json")["Body"].read())
    entry = catalog["versions"]["1.0.0"]
    assert catalog["latest"] == "1.0.0"
    body = s3.get_object(Bucket=bucket, Key="releases/1.0.0/bmpackages_1.0.0.tar.zst")["Body"]
    assert "sha256:" + hashlib.sha256(body.read()).hexdigest() == entry["digest"]
    lock = json.loads((tmp / "connected" / "work" / "1.0.0" / "lock.json").read_text())
    assert {i["source"]: i["digest"] for i in lock["images"]} == {
        f"gcr.io/anthos-baremetal-release/{r}:1.0": source_digest(upstream, r, "1.0")
        for r in REPOS
    }

    # A re-run: the catalog lists the version, so nothing else is even looked at.
    before = {o["Key"]: o["ETag"] for o in
              s3.list_objects_v2(Bucket=bucket)["Contents"]}
    mark = upstream.registry.mark()
    ok(run("run", "release", "--config", str(cfg), env=env))
    assert upstream.registry.since(mark) == []
    assert {o["Key"]: o["ETag"] for o in
            s3.list_objects_v2(Bucket=bucket)["Contents"]} == before

    mirror = registry_factory()
    site = site_yaml(tmp / "site" / "site.yaml", objects, mirror)
    ok(run("run", "import", "--config", str(site), env=env))
    for r in REPOS:
        assert mirror_digest(mirror, r, "1.0") == upstream.digests[f"{r}:1.0"]
    hosts = (tmp / "site" / "node-config" / "certs.d" / "gcr.io" / "hosts.toml").read_text()
    assert f"http://{mirror.host}/v2/test-namespace" in hosts
    reports = list((tmp / "site" / "site" / "1.0.0").glob("mirror-*.json"))
    assert len(reports) == 1

    mark = mirror.mark()
    node = tree_state(tmp / "site" / "node-config")
    ok(run("run", "import", "--config", str(site), env=env))
    # Done already: only the check that the mirror still serves every tag (one manifest
    # HEAD per image, no blob request, no verify pass, no push), nothing rewritten.
    again = [(e.method, e.path) for e in mirror.since(mark) if e.status != 401]
    assert sorted(again) == sorted(
        ("HEAD", f"/v2/test-namespace/anthos-baremetal-release/{r}/manifests/1.0")
        for r in REPOS), again
    assert tree_state(tmp / "site" / "node-config") == node


# -- a killed run, then a re-run that does only the rest -------------------------------


def test_worker_killed_mid_pull_then_rerun_fetches_only_the_rest(
    tmp: Path, upstream: Upstream, fault_proxy: Any,
) -> None:
    proxy = fault_proxy(upstream.registry)
    # Each image's own layer arrives slowly, so the kill lands between images.
    proxy.add_rule(Delay(1.5), method="GET", path=r"/blobs/sha256:", times=1000)
    cfg = pipeline_yaml(tmp / "pipeline.yaml", proxy.url, f"file://{tmp / 'objects'}")
    store = tmp / "work" / "store"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "release", "--config", str(cfg),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (store / "index.json").exists() and len(store_index(store)) >= 1:
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.05)
        else:
            pytest.fail("no image was pulled in time")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    pulled = set(store_index(store))
    assert 1 <= len(pulled) < len(REPOS), pulled
    complete = {p.name for p in (store / "blobs" / "sha256").iterdir()}
    assert not (tmp / "objects" / "catalog.json").exists()

    proxy.clear_rules()
    mark = upstream.registry.mark()
    ok(run("run", "release", "--config", str(cfg)))
    fetched = blob_gets(upstream.registry.since(mark))
    assert fetched, "the re-run fetched nothing"
    assert {d.split(":")[1] for d in fetched}.isdisjoint(complete), (
        "a blob already in the store was fetched again")
    assert max(fetched.values()) == 1
    # The images pulled before the kill cost no manifest request either.
    got = {e.path for e in upstream.registry.since(mark) if "/manifests/" in e.path}
    for name in pulled:
        repo = name.split("/", 1)[1].rsplit(":", 1)[0]
        assert not any(f"/{repo}/manifests/" in p for p in got), name
    assert file_catalog(tmp / "objects")["latest"] == "1.0.0"


# -- one image fails; the rest stays; Luigi's own command line -------------------------


def test_one_failing_image_fails_the_run_by_name_and_the_rest_stays_cached(
    tmp: Path, upstream: Upstream, fault_proxy: Any,
) -> None:
    proxy = fault_proxy(upstream.registry)
    cfg = pipeline_yaml(tmp / "pipeline.yaml", proxy.url, f"file://{tmp / 'objects'}")
    bad = upstream.digests["gamma:1.0"]
    proxy.add_rule(fail(500), path=f"/gamma/manifests/{bad}", times=1000)

    # Luigi's own command line, with the shipped luigi.cfg: a failure is not exit 0.
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(ROOT / "configs" / "luigi.cfg")}
    luigi_bin = Path(sys.executable).parent / "luigi"
    done = subprocess.run(
        [str(luigi_bin), "--module", "tasks", "ReleaseBundle", "--config", str(cfg),
         "--local-scheduler"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 13, done.stdout + done.stderr
    assert "gcr.io/anthos-baremetal-release/gamma:1.0" in done.stderr
    assert "Traceback" not in done.stderr
    stored = set(store_index(tmp / "work" / "store"))
    assert stored == {f"gcr.io/anthos-baremetal-release/{r}:1.0" for r in REPOS if r != "gamma"}
    assert not (tmp / "objects" / "catalog.json").exists()

    again = run("run", "release", "--config", str(cfg))
    assert again.code == 13, again.output
    assert "gamma:1.0" in again.stderr and "bmsync: error:" in again.stderr

    proxy.clear_rules()
    mark = upstream.registry.mark()
    ok(run("run", "release", "--config", str(cfg)))
    fetched = set(blob_gets(upstream.registry.since(mark)))
    gamma = json.loads(inspect_raw(
        f"docker://{upstream.registry.host}/anthos-baremetal-release/gamma:1.0"))
    assert fetched == {gamma["config"]["digest"]} | {
        layer["digest"] for layer in gamma["layers"] if layer["digest"] != upstream.base.digest}


# -- nightly: versions, deltas, zero bytes when nothing changed; site order ------------


def test_nightly_versions_deltas_and_site_import_order(
    tmp: Path, upstream: Upstream, registry_factory: RegistryFactory,
) -> None:
    objects_dir = tmp / "objects"
    objects = f"file://{objects_dir}"
    cfg = pipeline_yaml(tmp / "pipeline.yaml", upstream.registry.url, objects, images=[
        {"name": "gcr.io/anthos-baremetal-release/alpha", "tags": ["1.*"]},
        "gcr.io/anthos-baremetal-release/beta:1.0",
    ])
    day = "2026-11-20"
    ok(run("run", "nightly", "--config", str(cfg), "--date", day))
    first = "2026.11.20.1"
    catalog = file_catalog(objects_dir)
    assert catalog["latest"] == first and catalog["versions"][first]["base"] is None

    # Nothing changed: no version, no blob fetched, nothing written to the object store.
    state = tree_state(objects_dir)
    mark = upstream.registry.mark()
    done = ok(run("run", "nightly", "--config", str(cfg), "--date", day))
    assert "nothing changed since 2026.11.20.1" in done.stderr
    assert blob_gets(upstream.registry.since(mark)) == Counter()
    assert tree_state(objects_dir) == state

    # A new tag that matches the filter: the next .N, a delta carrying only its blobs.
    digest, own = upstream.push("alpha", "1.1")
    mark = upstream.registry.mark()
    ok(run("run", "nightly", "--config", str(cfg), "--date", day))
    second = "2026.11.20.2"
    catalog = file_catalog(objects_dir)
    assert catalog["latest"] == second
    assert catalog["versions"][second]["base"]["version"] == first
    assert set(blob_gets(upstream.registry.since(mark))) == own - {digest}
    delta = json.loads((objects_dir / second / f"bmpackages_{second}.bundle.json").read_text())
    carried = {d for d, b in delta["blobs"].items() if b["inArchive"]}
    assert carried == own
    archive = objects_dir / second / f"bmpackages_{second}.tar.zst"
    assert sha256_file(archive) == catalog["versions"][second]["digest"]

    # Rebuilt from its lock with Luigi's command line: the same bytes (SOURCE_DATE_EPOCH
    # comes from the lock), so the catalog's digest still holds.
    local = tmp / "work" / second / f"bmpackages_{second}.tar.zst"
    for p in local.parent.glob("bmpackages_*"):
        p.unlink()
    luigi_bin = Path(sys.executable).parent / "luigi"
    subprocess.run([str(luigi_bin), "--module", "tasks", "BuildBundle", "--config", str(cfg),
                    "--version", second, "--local-scheduler"], cwd=ROOT, check=True,
                   capture_output=True, timeout=240)
    assert sha256_file(local) == catalog["versions"][second]["digest"]

    # The site: the delta before its base is refused, naming the base; nothing pushed.
    mirror = registry_factory()
    site = site_yaml(tmp / "site.yaml", objects, mirror)
    mark = mirror.mark()
    refused = run("run", "import", "--config", str(site), "--release", second)
    assert refused.code == 13, refused.output
    assert f"push bundle {first} first" in refused.stderr
    assert [e for e in writes(mirror.since(mark)) if "/manifests/" in e.path] == []

    ok(run("run", "import", "--config", str(site), "--release", first))
    ok(run("run", "import", "--config", str(site), "--release", second))
    assert mirror_digest(mirror, "alpha", "1.1") == digest
    assert mirror_digest(mirror, "beta", "1.0") == upstream.digests["beta:1.0"]

    # A tag that moved: the next .N again, still a delta against the full first one.
    moved, _ = upstream.push("beta", "1.0")
    ok(run("run", "nightly", "--config", str(cfg), "--date", day))
    third = "2026.11.20.3"
    catalog = file_catalog(objects_dir)
    assert catalog["latest"] == third
    assert catalog["versions"][third]["base"]["version"] == first
    ok(run("run", "import", "--config", str(site)))  # latest
    assert mirror_digest(mirror, "beta", "1.0") == moved


@pytest.fixture
def released(tmp: Path, upstream: Upstream) -> tuple[Path, Path]:
    """Release 1.0.0 of the four images published to ``tmp/objects`` (file://); returns
    the object store's folder and the pipeline.yaml."""
    objects_dir = tmp / "objects"
    cfg = pipeline_yaml(tmp / "pipeline.yaml", upstream.registry.url, f"file://{objects_dir}")
    ok(run("run", "release", "--config", str(cfg)))
    return objects_dir, cfg


def test_import_of_a_version_not_yet_arrived_exits_8(
    tmp: Path, released: tuple[Path, Path], registry_factory: RegistryFactory,
) -> None:
    objects_dir, cfg = released
    # The transfer system delivered the catalog before the archive.
    (objects_dir / "1.0.0" / "bmpackages_1.0.0.tar.zst").unlink()
    mirror = registry_factory()
    site = site_yaml(tmp / "site.yaml", f"file://{objects_dir}", mirror)
    result = run("run", "import", "--config", str(site))
    assert result.code == 8, result.output
    assert "1.0.0/bmpackages_1.0.0.tar.zst has not arrived yet" in result.stderr
    assert mirror.access_log() == []


# -- a central luigid with several worker processes on one store ----------------------


@pytest.fixture
def luigid(tmp: Path) -> Iterator[LuigidServer]:
    server = LuigidServer(tmp / "luigid").start()
    try:
        yield server
    finally:
        server.stop()


def test_central_scheduler_with_several_workers_fetches_each_blob_once(
    tmp: Path, upstream: Upstream, luigid: LuigidServer,
) -> None:
    cfg = pipeline_yaml(tmp / "pipeline.yaml", upstream.registry.url, f"file://{tmp / 'obj'}")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "release", "--config", str(cfg),
           "--workers", "2", "--scheduler-url", luigid.url]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err
    fetched = blob_gets(upstream.registry.access_log())
    assert fetched and max(fetched.values()) == 1, fetched
    assert upstream.base.digest in fetched
    done = luigid.task_list("DONE")
    pulls = [t for t in done if t.startswith("PullImage")]
    assert len(pulls) == len(REPOS)
    assert any(t.startswith("PublishBundle") for t in done)
    assert file_catalog(tmp / "obj")["latest"] == "1.0.0"


def test_nightly_delta_against_a_site_inventory(
    tmp: Path, upstream: Upstream, registry_factory: RegistryFactory,
) -> None:
    objects_dir = tmp / "objects"
    images: list[Any] = [{"name": "gcr.io/anthos-baremetal-release/alpha", "tags": ["1.*"]}]
    cfg = pipeline_yaml(tmp / "pipeline.yaml", upstream.registry.url, f"file://{objects_dir}",
                        images=images)
    ok(run("run", "nightly", "--config", str(cfg), "--date", "2026-11-21"))
    mirror = registry_factory()
    site = site_yaml(tmp / "site.yaml", f"file://{objects_dir}", mirror)
    ok(run("run", "import", "--config", str(site)))
    # What the site reports back across the gap: the digests its mirror holds.
    inventory = tmp / "inventory.json"
    ok(run("inventory", f"--private-registry=http://{mirror.host}/test-namespace",
           "--need-credential=false", "--out", str(inventory)))

    cfg = pipeline_yaml(tmp / "pipeline.yaml", upstream.registry.url, f"file://{objects_dir}",
                        images=images, baseInventory=str(inventory))
    digest, own = upstream.push("alpha", "1.1")
    ok(run("run", "nightly", "--config", str(cfg), "--date", "2026-11-21"))
    version = "2026.11.21.2"
    entry = file_catalog(objects_dir)["versions"][version]
    assert entry["base"]["kind"] == "inventory"
    delta = json.loads((objects_dir / version / f"bmpackages_{version}.bundle.json").read_text())
    assert {d for d, b in delta["blobs"].items() if b["inArchive"]} == own
    ok(run("run", "import", "--config", str(site)))
    assert mirror_digest(mirror, "alpha", "1.1") == digest


def test_reimport_pushes_again_what_the_mirror_lost_and_runs_do_not_overlap(
    tmp: Path, upstream: Upstream, released: tuple[Path, Path],
    registry_factory: RegistryFactory,
) -> None:
    objects_dir, cfg = released
    mirror = registry_factory()
    site = site_yaml(tmp / "site.yaml", f"file://{objects_dir}", mirror)
    ok(run("run", "import", "--config", str(site)))

    # The mirror loses a tag (an operator's mistake, a restored backup).
    tags = (mirror.root / "docker" / "registry" / "v2" / "repositories" / "test-namespace"
            / "anthos-baremetal-release" / "beta" / "_manifests" / "tags" / "1.0")
    shutil.rmtree(tags)
    mark = mirror.mark()
    ok(run("run", "import", "--config", str(site)))
    assert mirror_digest(mirror, "beta", "1.0") == upstream.digests["beta:1.0"]
    assert [e for e in writes(mirror.since(mark)) if "/manifests/" in e.path]

    # A second run in the same work folder while one holds it: refused, exit 15.
    with open(tmp / "work" / ".bmsync-run.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run("run", "release", "--config", str(cfg))
    assert busy.code == 15, busy.output
    assert "another bmsync run is in progress" in busy.stderr


def test_checks_before_any_task_fail_with_one_line_and_their_code(
    tmp: Path, released: tuple[Path, Path], registry_factory: RegistryFactory,
) -> None:
    objects_dir, cfg = released
    mirror = registry_factory(auth="basic")
    site = site_yaml(tmp / "site.yaml", f"file://{objects_dir}", mirror, mirrors=[{
        "url": f"http://{mirror.host}/test-namespace", "usernameEnv": "MIRROR_USER",
        "passwordEnv": "MIRROR_PASSWORD"}])
    bad = {"MIRROR_USER": "alice", "MIRROR_PASSWORD": "not-her-password"}
    # In a task: the task fails (13), with its one line.
    first = run("run", "import", "--config", str(site), env=bad)
    assert first.code == 13, first.output
    assert "rejected the credentials of user 'alice'" in first.stderr
    ok(run("run", "import", "--config", str(site),
           env={"MIRROR_USER": "alice", "MIRROR_PASSWORD": "wonderland-pass"}))
    # In the check of what is done already (the mirror is asked): that error's code.
    wrong = run("run", "import", "--config", str(site), env=bad)
    assert wrong.code == 3, wrong.output
    assert "Traceback" not in wrong.output and "not-her-password" not in wrong.output
    assert wrong.stderr.count("bmsync: error:") == 1, wrong.stderr

    started = time.monotonic()
    gone = run("run", "release", "--config", str(cfg), "--scheduler-url",
               "http://127.0.0.1:1/")
    assert gone.code == 4, gone.output
    assert "cannot reach the scheduler at http://127.0.0.1:1/" in gone.stderr
    assert time.monotonic() - started < 30
