"""`bmsync pull` against real registries, checked with skopeo, access logs and disk bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import (
    assert_blobs_sound,
    bmsync,
    store_blob,
    store_index,
    write_images_config,
)
from tests.harness.faultproxy import (
    Corrupt,
    CutBody,
    IgnoreRange,
    Redirect,
    fail,
    http_date,
    rate_limit,
)
from tests.harness.images import ImageFactory, push
from tests.harness.registry import RegistryServer
from tests.harness.skopeo import inspect_raw

GCR = "gcr.io"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gcr(endpoint: str, **extra: str) -> dict[str, dict[str, str]]:
    return {GCR: {"endpoint": endpoint, **extra}}


def blob_gets(server: RegistryServer, mark: int, digest: str | None = None) -> list[str]:
    return [
        e.path for e in server.since(mark)
        if e.method == "GET" and "/blobs/" in e.path and (digest is None or e.path.endswith(digest))
    ]


@pytest.fixture
def release(registry: RegistryServer, image_factory: ImageFactory) -> dict[str, object]:
    """Four images sharing one base layer: OCI, Docker, an OCI index and a Docker list."""
    f = image_factory
    base = f.layer(300_000)
    oci = f.image([base, f.layer(200_000)], media="oci")
    docker = f.image([base, f.layer(150_000)], media="docker")
    index = f.multiarch(base=[base], layer_size=100_000, media="oci")
    dlist = f.multiarch(base=[base], layer_size=50_000, media="docker")
    pushed = {
        "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0": oci,
        "anthos-baremetal-release/etcd:v3.4.13": docker,
        "kubernetes-e2e-test-images/nautilus:1.0": index,
        "anthos-baremetal-release/coredns:1.8.0": dlist,
    }
    for ref, artifact in pushed.items():
        repo, tag = ref.split(":")
        push(registry.url, repo, tag, artifact)
    return {"base": base, "images": pushed}


def test_pull_cold_then_warm(registry: RegistryServer, release: dict, tmp: Path) -> None:
    images: dict = release["images"]  # type: ignore[assignment]
    config = write_images_config(
        tmp / "images.yaml", [f"{GCR}/{r}" for r in images], registries=gcr(registry.url)
    )
    store = tmp / "store"
    mark = registry.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(store), "--json")
    assert run.code == 0, run.output
    report = run.json()
    assert report["summary"]["pulled"] == 4 and report["summary"]["failed"] == 0

    entries = store_index(store)
    for ref, artifact in images.items():
        name = f"{GCR}/{ref}"
        # Witness: skopeo reads the digest from the source registry.
        upstream = sha(inspect_raw(f"docker://{registry.host}/{ref}"))
        assert upstream == artifact.digest
        assert entries[name]["digest"] == upstream, name
        assert store_blob(store, upstream).read_bytes() == artifact.manifest_bytes
        for digest, data in artifact.blobs.items():
            assert store_blob(store, digest).read_bytes() == data
    # Every blob on disk hashes to its name.
    assert assert_blobs_sound(store) > 0
    # skopeo reads the OCI-typed images from the store as a standard OCI layout.
    for ref in ("anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0",
                "kubernetes-e2e-test-images/nautilus:1.0"):
        assert inspect_raw(f"oci:{store}:{GCR}/{ref}") == images[ref].manifest_bytes
    # The shared base layer crossed the wire once although four images need it.
    base = release["base"]
    assert len(blob_gets(registry, mark, base.digest)) == 1  # type: ignore[attr-defined]
    # Every blob was fetched at most once.
    gets = blob_gets(registry, mark)
    assert len(gets) == len(set(gets))

    # Warm: one request per image, no blob, nothing rewritten.
    before = (store / "index.json").read_bytes()
    mark = registry.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(store), "--json")
    assert run.code == 0, run.output
    warm = registry.since(mark)
    assert len(warm) == len(images), [str(e) for e in warm]
    assert all(e.method == "HEAD" and "/manifests/" in e.path for e in warm)
    assert run.json()["summary"]["present"] == 4
    assert (store / "index.json").read_bytes() == before


def test_tag_moved_is_pulled_again(registry: RegistryServer, image_factory: ImageFactory,
                                   tmp: Path) -> None:
    first = image_factory.image()
    push(registry.url, "app/web", "stable", first)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/app/web:stable"],
                                 registries=gcr(registry.url))
    store = tmp / "store"
    assert bmsync("pull", "--config", str(config), "--store", str(store)).code == 0
    second = image_factory.image()
    push(registry.url, "app/web", "stable", second)
    run = bmsync("pull", "--config", str(config), "--store", str(store), "--json")
    assert run.code == 0, run.output
    assert run.json()["images"][0]["status"] == "pulled"
    assert store_index(store)[f"{GCR}/app/web:stable"]["digest"] == second.digest


def test_a_blob_deleted_from_the_store_is_fetched_again(
        registry: RegistryServer, image_factory: ImageFactory, tmp: Path) -> None:
    """A layer deleted by hand (its verification mark left behind) makes the image
    incomplete: the next pull fetches that blob, and only it, and the image is whole."""
    layers = [image_factory.layer(300_000), image_factory.layer(200_000)]
    img = image_factory.image(layers)
    push(registry.url, "app/api", "1", img)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/app/api:1"],
                                 registries=gcr(registry.url))
    store = tmp / "store"
    assert bmsync("pull", "--config", str(config), "--store", str(store)).code == 0
    gone = layers[1]
    store_blob(store, gone.digest).unlink()

    mark = registry.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(store), "--json")
    assert run.code == 0, run.output
    assert [p.rsplit("/", 1)[1] for p in blob_gets(registry, mark)] == [gone.digest]
    assert run.json()["images"][0]["status"] == "pulled"
    assert store_blob(store, gone.digest).read_bytes() == gone.data
    assert assert_blobs_sound(store) > 0


def test_platform_filter_rewrites_index(registry: RegistryServer, image_factory: ImageFactory,
                                        registry_factory, tmp: Path) -> None:
    index = image_factory.multiarch(("linux/amd64", "linux/arm64/v8", "linux/s390x"))
    push(registry.url, "multi/app", "1.0", index)
    pinned = image_factory.multiarch(("linux/amd64", "linux/arm64/v8"))
    push(registry.url, "multi/pinned", "1.0", pinned)
    config = write_images_config(
        tmp / "c.yaml",
        [f"{GCR}/multi/app:1.0", f"{GCR}/multi/pinned@{pinned.digest}"],
        registries=gcr(registry.url),
    )
    store = tmp / "store"
    run = bmsync("pull", "--config", str(config), "--store", str(store),
                 "--platform", "linux/amd64", "--json")
    assert run.code == 0, run.output
    report = {i["source"].split("@")[0]: i for i in run.json()["images"]}

    entry = store_index(store)[f"{GCR}/multi/app:1.0"]
    kept = json.loads(store_blob(store, entry["digest"]).read_bytes())
    assert [m["platform"]["architecture"] for m in kept["manifests"]] == ["amd64"]
    assert entry["digest"] != index.digest
    assert entry["annotations"]["dev.bmsync.upstream-digest"] == index.digest
    assert report[f"{GCR}/multi/app:1.0"]["upstreamDigest"] == index.digest
    assert report[f"{GCR}/multi/app:1.0"]["digest"] == entry["digest"]
    amd64, arm64, s390x = index.children
    assert store_blob(store, amd64.layers[-1].digest).exists()
    assert not store_blob(store, arm64.layers[-1].digest).exists()
    assert not store_blob(store, s390x.layers[-1].digest).exists()

    # Witness: a registry accepts the filtered index (all its children are there) and
    # serves it under the rewritten digest.
    target = registry_factory()
    subprocess.run(
        ["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{store}:{GCR}/multi/app:1.0", f"docker://{target.host}/multi/app:1.0"],
        check=True, capture_output=True,
    )
    assert sha(inspect_raw(f"docker://{target.host}/multi/app:1.0")) == entry["digest"]

    # An image pinned by digest is kept whole, and the user is told.
    whole = store_index(store)[f"{GCR}/multi/pinned@{pinned.digest}"]
    assert whole["digest"] == pinned.digest
    assert "pinned by digest" in run.stderr

    # Warm, same platforms: one HEAD for the tagged image, nothing for the pinned one.
    mark = registry.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(store),
                 "--platform", "linux/amd64", "--json")
    assert run.code == 0 and run.json()["summary"]["present"] == 2, run.output
    assert [(e.method, e.path) for e in registry.since(mark)] == [
        ("HEAD", "/v2/multi/app/manifests/1.0")]
    # Other platforms: the image is pulled again and recorded under a new digest.
    run = bmsync("pull", "--config", str(config), "--store", str(store),
                 "--platform", "linux/arm64/v8", "--json")
    assert run.code == 0, run.output
    arm = store_index(store)[f"{GCR}/multi/app:1.0"]
    assert arm["digest"] not in (entry["digest"], index.digest)
    assert store_blob(store, arm64.layers[-1].digest).exists()


def test_platform_check_counts_every_blob(registry: RegistryServer,
                                         image_factory: ImageFactory, tmp: Path) -> None:
    img = image_factory.image([image_factory.layer(10_000), image_factory.layer(20_000)])
    push(registry.url, "single/app", "1", img)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/single/app:1"],
                                 registries=gcr(registry.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"),
                 "--platform", "linux/amd64", "--json")
    assert run.code == 0, run.output
    [image] = run.json()["images"]
    assert image["blobsFetched"] == len(img.blobs) == run.json()["summary"]["blobsFetched"]
    assert image["bytesFetched"] == run.json()["summary"]["bytesFetched"]


def test_tag_filters(registry: RegistryServer, image_factory: ImageFactory, tmp: Path) -> None:
    for tag in ("v3.4.1", "v3.4.2", "v3.5.0", "latest"):
        push(registry.url, "anthos-baremetal-release/etcd", tag, image_factory.image())
    config = write_images_config(
        tmp / "c.yaml",
        [{"name": f"{GCR}/anthos-baremetal-release/etcd", "tags": ["v3.4.*"]}],
        registries=gcr(registry.url),
    )
    store = tmp / "store"
    run = bmsync("pull", "--config", str(config), "--store", str(store))
    assert run.code == 0, run.output
    assert sorted(store_index(store)) == [
        f"{GCR}/anthos-baremetal-release/etcd:v3.4.1",
        f"{GCR}/anthos-baremetal-release/etcd:v3.4.2",
    ]


def test_basic_auth_from_docker_config(basic_registry: RegistryServer,
                                       image_factory: ImageFactory, tmp: Path) -> None:
    img = image_factory.image()
    push(basic_registry.url, "private/app", "1", img, auth=("alice", "wonderland-pass"))
    docker_dir = tmp / "docker"
    docker_dir.mkdir()
    auth = base64.b64encode(b"alice:wonderland-pass").decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {GCR: {"auth": auth}}}))
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/private/app:1"],
                                 registries=gcr(basic_registry.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"),
                 env={"DOCKER_CONFIG": str(docker_dir)})
    assert run.code == 0, run.output
    assert store_index(tmp / "store")[f"{GCR}/private/app:1"]["digest"] == img.digest

    # Wrong password: exit 3, the registry and user named, the password nowhere.
    bad = base64.b64encode(b"alice:not-the-password").decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {GCR: {"auth": bad}}}))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store2"),
                 env={"DOCKER_CONFIG": str(docker_dir)})
    assert run.code == 3, run.output
    assert "rejected the credentials of user 'alice'" in run.stderr
    assert "not-the-password" not in run.output and bad not in run.output
    assert "index.json" not in [p.name for p in (tmp / "store2").glob("*")] or not store_index(
        tmp / "store2"
    )

    # No credentials at all: a clear message saying what to give.
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store3"),
                 env={"DOCKER_CONFIG": str(tmp / "nowhere")})
    assert run.code == 3, run.output
    assert "requires credentials" in run.stderr


def test_token_auth_caches_tokens(token_registry: RegistryServer, image_factory: ImageFactory,
                                  tmp: Path) -> None:
    base = image_factory.layer(50_000)
    repos = ["tok/a", "tok/b"]
    for repo in repos:
        for tag in ("1", "2"):
            img = image_factory.image([base, image_factory.layer(10)])
            push(token_registry.url, repo, tag, img, auth=("alice", "wonderland-pass"))
    issuer = token_registry.token_issuer
    assert issuer is not None
    config = write_images_config(
        tmp / "c.yaml", [f"{GCR}/{r}:{t}" for r in repos for t in ("1", "2")],
        registries=gcr(token_registry.url, usernameEnv="REG_USER", passwordEnv="REG_PASS"),
    )
    mark = issuer.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"),
                 "--concurrency", "4",
                 env={"REG_USER": "alice", "REG_PASS": "wonderland-pass"})
    assert run.code == 0, run.output
    asked = issuer.since(mark)
    # One token per repository scope, whatever the number of requests and threads.
    assert sorted(s for r in asked for s in r.scopes) == [
        "repository:tok/a:pull", "repository:tok/b:pull"
    ]
    assert all(r.user == "alice" for r in asked)


def test_tls_needs_the_ca(tls_registry: RegistryServer, image_factory: ImageFactory,
                          tmp: Path) -> None:
    img = image_factory.image()
    push(tls_registry.url, "secure/app", "1", img, verify=tls_registry.verify)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/secure/app:1"],
                                 registries=gcr(tls_registry.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "s1"))
    assert run.code == 4, run.output
    assert "not trusted" in run.stderr and "--cacert" in run.stderr
    config = write_images_config(
        tmp / "c2.yaml", [f"{GCR}/secure/app:1"],
        registries=gcr(tls_registry.url, cacert=str(tls_registry.ca_cert)),
    )
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "s2"))
    assert run.code == 0, run.output
    assert store_index(tmp / "s2")[f"{GCR}/secure/app:1"]["digest"] == img.digest


def test_bad_input_is_named_and_the_rest_is_kept(registry: RegistryServer,
                                                 image_factory: ImageFactory, tmp: Path) -> None:
    good = image_factory.image()
    push(registry.url, "ok/app", "1", good)
    config = write_images_config(
        tmp / "c.yaml", [f"{GCR}/ok/app:1", f"{GCR}/missing/app:9"], registries=gcr(registry.url)
    )
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 5, run.output
    assert f"{GCR}/missing/app:9" in run.stderr and "not found" in run.stderr
    assert list(store_index(tmp / "store")) == [f"{GCR}/ok/app:1"]
    assert "1 failed" in run.stdout


def test_malformed_reference_makes_no_request(registry: RegistryServer, tmp: Path) -> None:
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/Bad/Name:1"],
                                 registries=gcr(registry.url))
    mark = registry.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 2
    assert "Bad/Name" in run.stderr and str(config) in run.stderr
    assert registry.since(mark) == []
    assert len(run.stderr.strip().splitlines()) == 1


def test_malformed_config(tmp: Path) -> None:
    config = tmp / "c.yaml"
    config.write_text('version: 1\nrelease: "1"\nimages:\n  - gcr.io/a/b:1\ncolour: blue\n')
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 2
    assert f"{config}:5" in run.stderr and "colour" in run.stderr


def test_registry_down(tmp: Path) -> None:
    from tests.harness.net import free_port

    config = write_images_config(tmp / "c.yaml", [f"{GCR}/a/b:1"],
                                 registries=gcr(f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 4, run.output
    assert "cannot reach 127.0.0.1" in run.stderr and "connection refused" in run.stderr
    assert time.monotonic() - started < 30


# -- faults injected between bmsync and the registry ---------------------------------------


def _one_image(registry: RegistryServer, f: ImageFactory, size: int = 400_000):  # type: ignore[no-untyped-def]
    img = f.image([f.layer(size)])
    push(registry.url, "fault/app", "1", img)
    return img


def test_429_with_retry_after_is_honoured(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory)
    proxy = fault_proxy(registry)
    proxy.add_rule(rate_limit(1), method="GET", path=r"/manifests/", times=1)
    proxy.add_rule(rate_limit(http_date(2)), method="GET", path=r"/blobs/", times=1)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    started = time.monotonic()
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    assert time.monotonic() - started >= 1.5
    statuses = [(r.method, r.path.rsplit("/", 2)[-2], r.status) for r in proxy.requests]
    assert ("GET", "manifests", 429) in statuses and ("GET", "manifests", 200) in statuses
    assert store_index(tmp / "store")[f"{GCR}/fault/app:1"]["digest"] == img.digest


def test_503_then_success(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory)
    proxy = fault_proxy(registry)
    proxy.add_rule(fail(503), method="GET", path=r"/blobs/", times=2)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    assert [r.status for r in proxy.requests if "/blobs/" in r.path].count(503) == 2
    assert_blobs_sound(tmp / "store")
    assert store_index(tmp / "store")[f"{GCR}/fault/app:1"]["digest"] == img.digest


def test_400_is_not_retried(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    _one_image(registry, image_factory)
    proxy = fault_proxy(registry)
    proxy.add_rule(fail(400), method="GET", path=r"/manifests/", times=5)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 5
    assert len([r for r in proxy.requests if "/manifests/" in r.path]) == 1


def test_cut_body_resumes_with_range(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory, 2_000_000)
    layer = img.layers[0]
    proxy = fault_proxy(registry)
    proxy.add_rule(CutBody(700_000), method="GET", path=layer.digest, times=1)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    layer_reqs = [r for r in proxy.requests if r.path.endswith(layer.digest)]
    assert len(layer_reqs) == 2
    assert layer_reqs[0].range is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", layer_reqs[1].range or "").group(1))  # type: ignore[union-attr]
    assert 0 < resumed_at <= 700_000
    assert store_blob(tmp / "store", layer.digest).read_bytes() == layer.data


def test_cut_bodies_resume_without_rereading_the_partial(  # type: ignore[no-untyped-def]
        registry, image_factory, fault_proxy, tmp, monkeypatch) -> None:
    """Three cuts in one pull: each retry asks for the rest (Range) and carries on with
    the running hash, so the partial file is read back once at most (when the store
    opens it), not once per attempt."""
    from pipeline import store as store_module
    from pipeline.config import RegistrySettings
    from pipeline.pull import pull_images
    from pipeline.reference import parse_reference
    from pipeline.registry.connect import ClientPool
    from pipeline.store import Store

    img = _one_image(registry, image_factory, 2_000_000)
    layer = img.layers[0]
    proxy = fault_proxy(registry)
    for keep in (400_000, 300_000, 300_000):
        proxy.add_rule(CutBody(keep), method="GET", path=layer.digest, times=1)
    read_back: list[int] = []
    real_file_digest = hashlib.file_digest

    def counting(file, algorithm):  # type: ignore[no-untyped-def]
        read_back.append(file.seek(0, 2))  # the partial's length when it is hashed
        file.seek(0)
        return real_file_digest(file, algorithm)

    monkeypatch.setattr(store_module.hashlib, "file_digest", counting)
    clients = ClientPool({GCR: RegistrySettings(GCR, endpoint=proxy.url)})
    report = pull_images([parse_reference(f"{GCR}/fault/app:1")], Store(tmp / "store"), clients)
    assert not report.failed, report.failed
    layer_reqs = [r for r in proxy.requests if r.path.endswith(layer.digest)]
    assert len(layer_reqs) == 4
    starts = [int(re.fullmatch(r"bytes=(\d+)-", r.range or "bytes=0-").group(1))  # type: ignore[union-attr]
              for r in layer_reqs]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] > 900_000, starts
    # The layer's partial was hashed from disk once, when it was empty; the retries
    # went on with the running hash.
    assert read_back.count(0) >= 1 and max(read_back) == 0, read_back
    assert store_blob(tmp / "store", layer.digest).read_bytes() == layer.data


def test_interrupted_pull_resumes_on_rerun(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory, 2_000_000)
    layer = img.layers[0]
    proxy = fault_proxy(registry)
    # Every attempt of the first run is cut: the run fails, the partial stays.
    proxy.add_rule(CutBody(600_000), method="GET", path=layer.digest, times=1)
    proxy.add_rule(CutBody(0), method="GET", path=layer.digest, times=10)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 4, run.output
    assert "connection lost" in run.stderr
    assert not store_index(tmp / "store")
    proxy.clear_rules()
    proxy.clear()
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"), "--json")
    assert run.code == 0, run.output
    [again] = [r for r in proxy.requests if r.path.endswith(layer.digest)]
    assert again.range is not None and int(again.range[6:-1]) >= 500_000
    # The report counts the bytes that crossed the wire, not the whole blob again, and
    # the image's own figure agrees with the total.
    report = run.json()
    assert report["summary"]["bytesFetched"] <= img.content_size - 500_000
    assert report["images"][0]["bytesFetched"] == report["summary"]["bytesFetched"]
    assert store_blob(tmp / "store", layer.digest).read_bytes() == layer.data


def test_range_ignored_restarts_cleanly(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory, 1_500_000)
    layer = img.layers[0]
    proxy = fault_proxy(registry)
    proxy.add_rule(CutBody(500_000), method="GET", path=layer.digest, times=1)
    proxy.add_rule(IgnoreRange(), method="GET", path=layer.digest, times=1)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    reqs = [r for r in proxy.requests if r.path.endswith(layer.digest)]
    assert reqs[1].range is not None and reqs[1].status == 200
    assert store_blob(tmp / "store", layer.digest).read_bytes() == layer.data


def test_wrong_blob_is_refused(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    img = _one_image(registry, image_factory)
    layer = img.layers[0]
    proxy = fault_proxy(registry)
    proxy.add_rule(Corrupt(16), method="GET", path=layer.digest, times=10)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 6, run.output
    assert layer.digest in run.stderr
    store = tmp / "store"
    assert not store_blob(store, layer.digest).exists()
    assert not any((store / ".bmsync" / "partial").iterdir())
    assert not store_index(store)


def test_redirect_drops_authorization(registry_factory, image_factory, fault_proxy,  # type: ignore[no-untyped-def]
                                      tmp) -> None:
    server = registry_factory(auth="basic")
    img = image_factory.image([image_factory.layer(200_000)])
    push(server.url, "redir/app", "1", img, auth=("alice", "wonderland-pass"))
    proxy = fault_proxy(server)
    proxy.add_rule(Redirect(307), method="GET", path=r"/blobs/", times=10)
    config = write_images_config(
        tmp / "c.yaml", [f"{GCR}/redir/app:1"],
        registries=gcr(proxy.url, usernameEnv="U", passwordEnv="P"),
    )
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"),
                 env={"U": "alice", "P": "wonderland-pass"})
    assert run.code == 0, run.output
    assert proxy.blob_requests, "the blob host was never asked"
    assert all(r.header("Authorization") is None for r in proxy.blob_requests)
    # ...while the registry itself did get credentials.
    assert any(r.header("Authorization") for r in proxy.requests)
    assert store_blob(tmp / "store", img.layers[0].digest).read_bytes() == img.layers[0].data


def test_two_processes_fetch_each_blob_once(registry: RegistryServer,
                                            image_factory: ImageFactory, tmp: Path) -> None:
    f = image_factory
    base = f.layer(3_000_000)
    refs = []
    for i in range(4):
        push(registry.url, f"proc/app{i}", "1", f.image([base, f.layer(1_000_000)]))
        refs.append(f"{GCR}/proc/app{i}:1")
    config = write_images_config(tmp / "c.yaml", refs, registries=gcr(registry.url))
    store = tmp / "store"
    mark = registry.mark()
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "-q", "pull", "--config", str(config),
             "--store", str(store)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    gets = blob_gets(registry, mark)
    assert len(gets) == len(set(gets)), gets
    assert len(blob_gets(registry, mark, base.digest)) == 1
    assert assert_blobs_sound(store) == 4 * 3 + 1  # manifest, config, own layer each; base once
    assert len(store_index(store)) == 4


def test_no_secret_in_any_output(registry_factory, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    """Canary: debug logging, planted secrets, a failure path; no secret in any form."""
    password = "Sup3r-S3cret/Canary+Pw=="
    basic = registry_factory(auth="basic", users={"canary": password})
    token = registry_factory(auth="token", users={"canary": password})
    img = image_factory.image()
    push(basic.url, "c/app", "1", img, auth=("canary", password))
    push(token.url, "c/app", "1", img, auth=("canary", password))
    docker_dir = tmp / "docker"
    docker_dir.mkdir()
    auth_b64 = base64.b64encode(f"canary:{password}".encode()).decode()
    (docker_dir / "config.json").write_text(
        json.dumps({"auths": {"quay.io": {"auth": auth_b64}}})
    )
    config = write_images_config(
        tmp / "c.yaml",
        [f"{GCR}/c/app:1", "quay.io/c/app:1", f"{GCR}/c/missing:1"],
        registries={
            GCR: {"endpoint": token.url, "usernameEnv": "U", "passwordEnv": "P"},
            "quay.io": {"endpoint": basic.url},
        },
    )
    run = bmsync("-vv", "pull", "--config", str(config), "--store", str(tmp / "store"),
                 env={"U": "canary", "P": password, "DOCKER_CONFIG": str(docker_dir)})
    assert run.code == 5, run.output  # the missing image fails; the two others pull
    assert "GET" in run.stderr  # debug logging was on
    from urllib.parse import quote, quote_plus

    forms = {password, auth_b64, quote(password, safe=""), quote_plus(password),
             base64.b64encode(password.encode()).decode()}
    for form in forms:
        assert form not in run.output, f"secret leaked as {form!r}"
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", run.output), "a JWT leaked"
    assert "Authorization" not in run.output


def test_tag_list_follows_pagination(registry, fault_proxy) -> None:  # type: ignore[no-untyped-def]
    """Pages linked by ``Link: <...>; rel="next"`` (distribution 2.8 sends one page, so
    the proxy plays a registry that paginates)."""
    from pipeline.registry.client import RegistryClient
    from tests.harness.faultproxy import respond

    proxy = fault_proxy(registry)
    pages = [
        (["v1.0", "v1.1", "v1.2"], '</v2/paged/app/tags/list?n=3&last=v1.2>; rel="next"'),
        (["v1.3", "v1.4", "v1.5"], '</v2/paged/app/tags/list?n=3&last=v1.5>; rel="next"'),
        (["v1.6"], None),
    ]
    for tags, link in pages:
        headers = {"Content-Type": "application/json"}
        if link:
            headers["Link"] = link
        body = json.dumps({"name": "paged/app", "tags": tags}).encode()
        proxy.add_rule(respond(200, body, headers), method="GET", path=r"/tags/list", times=1)
    client = RegistryClient(GCR, endpoint=proxy.url)
    assert client.list_tags("paged/app", page_size=3) == [f"v1.{i}" for i in range(7)]
    asked = [r.query for r in proxy.requests if r.path.endswith("/tags/list")]
    assert asked == ["n=3", "n=3&last=v1.2", "n=3&last=v1.5"]


def test_gcr_json_key(registry_factory, image_factory: ImageFactory, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    """gcr.io's service-account login: user ``_json_key``, the key file as password."""
    key = json.dumps({
        "type": "service_account",
        "client_email": "sync@proj.iam.example",
        "private_key": "-----BEGIN PRIVATE KEY-----\nMIIfake\n-----END PRIVATE KEY-----\n",
    })
    server = registry_factory(auth="token", users={"_json_key": key})
    img = image_factory.image()
    push(server.url, "anthos-baremetal-release/pause", "3.2", img, auth=("_json_key", key))
    key_path = tmp / "gcr-key.json"
    key_path.write_text(key)
    config = write_images_config(
        tmp / "c.yaml", [f"{GCR}/anthos-baremetal-release/pause:3.2"],
        registries=gcr(server.url, gcrKeyPath=str(key_path)),
    )
    mark = server.token_issuer.mark()
    run = bmsync("-vv", "pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    assert {r.user for r in server.token_issuer.since(mark)} == {"_json_key"}
    assert "MIIfake" not in run.output and "private_key" not in run.output
    assert store_index(tmp / "store")[f"{GCR}/anthos-baremetal-release/pause:3.2"]["digest"] == (
        img.digest
    )


def test_oversized_manifest_is_refused(registry, image_factory, fault_proxy, tmp) -> None:  # type: ignore[no-untyped-def]
    from tests.harness.faultproxy import respond

    _one_image(registry, image_factory)
    proxy = fault_proxy(registry)
    huge = b'{"schemaVersion":2,"pad":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    oci = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    proxy.add_rule(respond(200, huge, oci), method="GET", path=r"/manifests/", times=1)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 5, run.output
    assert "over the 4194304-byte limit" in run.stderr


def test_ctrl_c_stops_at_once_and_rerun_completes(registry, image_factory, fault_proxy,  # type: ignore[no-untyped-def]
                                                  tmp) -> None:
    import signal
    import sys

    from tests.harness.faultproxy import Delay

    img = _one_image(registry, image_factory, 1_000_000)
    proxy = fault_proxy(registry)
    proxy.add_rule(Delay(20), method="GET", path=r"/blobs/", times=10)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    store = tmp / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "pull", "--config", str(config),
         "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # The proxy records a request once answered: wait for the manifest, after which the
    # blob requests hang in the proxy's delay.
    deadline = time.monotonic() + 20
    while not any("/manifests/" in r.path for r in proxy.requests):
        assert time.monotonic() < deadline, "bmsync never asked for the manifest"
        time.sleep(0.05)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5
    assert "interrupted" in err and "Traceback" not in err
    assert not store_index(store)
    proxy.clear_rules()
    run = bmsync("pull", "--config", str(config), "--store", str(store))
    assert run.code == 0, run.output
    assert store_index(store)[f"{GCR}/fault/app:1"]["digest"] == img.digest


def test_platform_mismatch_and_empty_filter_fail_naming_the_image(
    registry: RegistryServer, image_factory: ImageFactory, tmp: Path
) -> None:
    single = image_factory.image(platform="linux/amd64")
    push(registry.url, "single/app", "1", single)
    multi = image_factory.multiarch(("linux/amd64", "linux/arm64/v8"))
    push(registry.url, "multi/app", "1", multi)
    push(registry.url, "tags/app", "v1.0", image_factory.image())
    config = write_images_config(
        tmp / "c.yaml",
        [f"{GCR}/single/app:1", f"{GCR}/multi/app:1",
         {"name": f"{GCR}/tags/app", "tags": ["v3.*"]}],
        registries=gcr(registry.url),
    )
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"),
                 "--platform", "linux/s390x", "--json")
    assert run.code == 1, run.output  # different kinds of failure
    errors = [line for line in run.stderr.splitlines() if line.startswith("bmsync: error:")]
    assert len(errors) == 3
    assert any(f"{GCR}/single/app:1 is a single-platform linux/amd64 image" in e
               and "change --platform" in e for e in errors)
    assert any(f"{GCR}/multi/app:1" in e and "linux/arm64/v8" in e for e in errors)
    assert any(f"{GCR}/tags/app: no tag matches tags ['v3.*']" in e for e in errors)
    assert not store_index(tmp / "store")
    report = run.json()
    assert len(report["resolveFailures"]) == 1 and report["summary"]["failed"] == 2


def test_verbosity_flags_after_the_command(registry: RegistryServer, image_factory: ImageFactory,
                                           tmp: Path) -> None:
    push(registry.url, "v/app", "1", image_factory.image())
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/v/app:1"], registries=gcr(registry.url))
    run = bmsync("pull", "-vv", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0, run.output
    assert "GET http://" in run.stderr  # -vv logs every request
    run = bmsync("pull", "-q", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 0 and run.stderr == ""


def test_https_endpoint_on_plain_http_registry(registry: RegistryServer, tmp: Path) -> None:
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/a/b:1"],
                                 registries=gcr(registry.url.replace("http://", "https://")))
    run = bmsync("pull", "--config", str(config), "--store", str(tmp / "store"))
    assert run.code == 4
    assert "does not speak TLS" in run.stderr and "http://" in run.stderr


def test_head_without_digest_falls_back_to_get_and_keeps_present(
    registry, image_factory, fault_proxy, tmp  # type: ignore[no-untyped-def]
) -> None:
    """A registry whose HEAD carries no Docker-Content-Digest: the GET decides, and an
    unchanged image stays "present" (index.json untouched)."""
    from tests.harness.faultproxy import respond

    _one_image(registry, image_factory)
    proxy = fault_proxy(registry)
    config = write_images_config(tmp / "c.yaml", [f"{GCR}/fault/app:1"],
                                 registries=gcr(proxy.url))
    store = tmp / "store"
    assert bmsync("pull", "--config", str(config), "--store", str(store)).code == 0
    before = (store / "index.json").read_bytes()
    oci = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    proxy.add_rule(respond(200, b"", oci), method="HEAD", path=r"/manifests/", times=1)
    mark = proxy.mark()
    run = bmsync("pull", "--config", str(config), "--store", str(store), "--json")
    assert run.code == 0, run.output
    assert run.json()["images"][0]["status"] == "present"
    assert [(r.method, "/manifests/" in r.path) for r in proxy.since(mark)] == [
        ("HEAD", True), ("GET", True)]
    assert (store / "index.json").read_bytes() == before
