"""`bmsync bundle build|inspect|verify|extract` against real registries and tools.

Witnesses: `zstd`, `xz` and GNU `tar` read the archives; `sha256sum` checks the sidecar;
skopeo reads the extracted layout; the bytes on disk hash to their names.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cli import assert_blobs_sound, bmsync, store_blob, write_images_config
from tests.harness.images import ImageFactory, push
from tests.harness.registry import RegistryServer
from tests.harness.skopeo import inspect_raw

GCR = "gcr.io"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sh(cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True,
                          cwd=cwd).stdout


@pytest.fixture
def release(registry: RegistryServer, image_factory: ImageFactory) -> dict[str, Any]:
    """Three images (OCI, Docker, a multi-arch index) sharing a base layer."""
    f = image_factory
    base = f.layer(400_000)
    images = {
        "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0":
            f.image([base, f.layer(300_000)], media="oci"),
        "anthos-baremetal-release/etcd:v3.4.13": f.image([base, f.layer(200_000)], media="docker"),
        "kubernetes-e2e-test-images/nautilus:1.0":
            f.multiarch(base=[base], layer_size=100_000, media="oci"),
    }
    for ref, artifact in images.items():
        repo, tag = ref.split(":")
        push(registry.url, repo, tag, artifact)
    return {"images": images, "base": base}


def _config(tmp: Path, registry: RegistryServer, refs: list[str], release: str = "1.30.0",
            name: str = "images.yaml", platforms: list[str] | None = None) -> Path:
    return write_images_config(
        tmp / name, [f"{GCR}/{r}" for r in refs],
        registries={GCR: {"endpoint": registry.url}}, release=release, platforms=platforms,
    )


def _build(tmp: Path, config: Path, out: str = "out", *extra: str,
           env: dict[str, str] | None = None) -> Path:
    run = bmsync("bundle", "build", "--config", str(config), "--store", str(tmp / "store"),
                 "--out", str(tmp / out), *extra, env=env)
    assert run.code == 0, run.output
    return tmp / out


def test_build_inspect_verify_extract(registry: RegistryServer, release: dict[str, Any],
                                      tmp: Path) -> None:
    images = release["images"]
    config = _config(tmp, registry, list(images))
    out = _build(tmp, config)
    archive = out / "bmpackages_1.30.0.tar.zst"
    assert sorted(p.name for p in out.iterdir()) == [
        "bmpackages_1.30.0.bundle.json", "bmpackages_1.30.0.tar.zst",
        "bmpackages_1.30.0.tar.zst.sha256",
    ]
    # zstd and tar read it; bundle.json first, then the layout files, then blobs.
    members = sh(f"zstd -dc {archive} | tar -tf -").split()
    assert members[:3] == ["bundle.json", "oci-layout", "index.json"]
    assert all(m.startswith("blobs/sha256/") for m in members[3:])
    # sha256sum agrees with the sidecar.
    assert sh("sha256sum -c bmpackages_1.30.0.tar.zst.sha256", cwd=out).strip().endswith("OK")
    # The sidecar bundle.json is the archive's first member.
    first = sh(f"zstd -dc {archive} | tar -xOf - bundle.json")
    assert first == (out / "bmpackages_1.30.0.bundle.json").read_text()
    doc = json.loads(first)
    for ref, artifact in images.items():
        [entry] = [i for i in doc["images"] if i["source"] == f"{GCR}/{ref}"]
        assert entry["digest"] == entry["upstreamDigest"] == artifact.digest

    run = bmsync("bundle", "inspect", str(archive))
    assert run.code == 0, run.output
    assert "bundle      1.30.0" in run.stdout and "none: a full bundle" in run.stdout
    for ref, artifact in images.items():
        assert f"{GCR}/{ref}" in run.stdout and artifact.digest in run.stdout

    run = bmsync("bundle", "verify", str(archive))
    assert run.code == 0, run.output
    assert "OK, bundle 1.30.0" in run.stdout and "matches the sidecar" in run.stdout

    dest = tmp / "extracted"
    run = bmsync("bundle", "extract", str(archive), "--to", str(dest))
    assert run.code == 0, run.output
    assert assert_blobs_sound(dest) == len(doc["blobs"])
    for ref in ("anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0",
                "kubernetes-e2e-test-images/nautilus:1.0"):
        assert sha(inspect_raw(f"oci:{dest}:{GCR}/{ref}")) == images[ref].digest
    etcd = images["anthos-baremetal-release/etcd:v3.4.13"]
    assert store_blob(dest, etcd.digest).read_bytes() == etcd.manifest_bytes
    # Extracting again onto an existing directory is refused, nothing changes.
    run = bmsync("bundle", "extract", str(archive), "--to", str(dest))
    assert run.code == 2 and "already exists" in run.stderr


def test_reproducible_bytes(registry: RegistryServer, release: dict[str, Any],
                            tmp: Path) -> None:
    config = _config(tmp, registry, list(release["images"]))
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    a = _build(tmp, config, "a", env=env) / "bmpackages_1.30.0.tar.zst"
    b = _build(tmp, config, "b", env=env) / "bmpackages_1.30.0.tar.zst"
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads((tmp / "a" / "bmpackages_1.30.0.bundle.json").read_text())
    assert doc["created"] == "2023-11-14T22:13:20Z"
    # GNU tar's view: every member owned by 0/0, dated SOURCE_DATE_EPOCH.
    lines = sh(f"zstd -dc {a} | tar --utc --numeric-owner -tvf -").splitlines()
    assert lines and all(" 0/0 " in line and " 2023-11-14 22:13 " in line for line in lines)


@pytest.mark.parametrize(("compression", "suffix", "reader"),
                         [("xz", ".tar.xz", "xz -dc"), ("none", ".tar", "cat")])
def test_other_compressions(compression: str, suffix: str, reader: str,
                            registry: RegistryServer, release: dict[str, Any], tmp: Path) -> None:
    config = _config(tmp, registry, list(release["images"]))
    out = _build(tmp, config, "out", "--compression", compression)
    archive = out / f"bmpackages_1.30.0{suffix}"
    assert sh(f"{reader} {archive} | tar -tf - | head -1").strip() == "bundle.json"
    assert bmsync("bundle", "verify", str(archive)).code == 0
    run = bmsync("bundle", "extract", str(archive), "--to", str(tmp / "x"))
    assert run.code == 0, run.output
    ref = "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0"
    assert sha(inspect_raw(f"oci:{tmp / 'x'}:{GCR}/{ref}")) == release["images"][ref].digest


def test_platform_filter_recorded(registry: RegistryServer, release: dict[str, Any],
                                  tmp: Path) -> None:
    ref = "kubernetes-e2e-test-images/nautilus:1.0"
    config = _config(tmp, registry, [ref], platforms=["linux/amd64"])
    out = _build(tmp, config)
    run = bmsync("bundle", "inspect", str(out / "bmpackages_1.30.0.tar.zst"), "--json")
    doc = json.loads(run.stdout)
    [image] = doc["images"]
    assert doc["platforms"] == ["linux/amd64"]
    assert image["upstreamDigest"] == release["images"][ref].digest
    assert image["digest"] != image["upstreamDigest"]
    arm64 = release["images"][ref].children[1]
    assert arm64.layers[-1].digest not in doc["blobs"]
    run = bmsync("bundle", "inspect", str(out / "bmpackages_1.30.0.tar.zst"))
    assert f"(upstream {image['upstreamDigest']})" in run.stdout


def test_delta_carries_only_new_blobs(registry: RegistryServer, release: dict[str, Any],
                                      image_factory: ImageFactory, tmp: Path) -> None:
    images = release["images"]
    old_refs = list(images)
    v1 = _build(tmp, _config(tmp, registry, old_refs, release="1.0", name="v1.yaml"), "v1")
    base_archive = v1 / "bmpackages_1.0.tar.zst"
    # 1.1: one image changes a layer, one is new; the base layer is shared.
    new_layer = image_factory.layer(250_000)
    changed = image_factory.image([release["base"], new_layer])
    push(registry.url, "anthos-baremetal-release/kube-rbac-proxy", "v0.7.0", changed)
    refs = [*old_refs[1:], "anthos-baremetal-release/kube-rbac-proxy:v0.7.0"]
    config = _config(tmp, registry, refs, release="1.1", name="v11.yaml")
    v11 = _build(tmp, config, "v11", "--base", str(base_archive))
    delta = v11 / "bmpackages_1.1.tar.zst"
    doc = json.loads((v11 / "bmpackages_1.1.bundle.json").read_text())
    base_json = (v1 / "bmpackages_1.0.bundle.json").read_bytes()
    assert doc["base"] == {"kind": "bundle", "version": "1.0", "digest": sha(base_json)}
    carried = {d for d, b in doc["blobs"].items() if b["inArchive"]}
    assert carried == {new_layer.digest, changed.config_digest, changed.digest}
    new_bytes = new_layer.size + len(changed.config_bytes) + len(changed.manifest_bytes)
    assert delta.stat().st_size < new_bytes + 1_000_000

    run = bmsync("bundle", "verify", str(delta))
    assert run.code == 0 and "pass --base" in run.stdout
    run = bmsync("bundle", "verify", str(delta), "--base", str(base_archive))
    assert run.code == 0 and "holds the" in run.stdout
    run = bmsync("bundle", "verify", str(delta), "--base",
                 str(v11 / "bmpackages_1.1.bundle.json"))
    assert run.code == 6 and "not of the given base" in run.stderr

    # A delta cannot be extracted alone; onto the base's layout it can.
    run = bmsync("bundle", "extract", str(delta), "--to", str(tmp / "alone"))
    assert run.code == 2 and "--onto" in run.stderr and not (tmp / "alone").exists()
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    run = bmsync("bundle", "extract", str(delta), "--onto", str(empty))
    assert run.code == 7 and "extract the base bundle there first" in run.stderr
    assert not (empty / "blobs" / "sha256" / new_layer.digest.split(":")[1]).exists()
    site = tmp / "site"
    assert bmsync("bundle", "extract", str(base_archive), "--to", str(site)).code == 0
    run = bmsync("bundle", "extract", str(delta), "--onto", str(site))
    assert run.code == 0, run.output
    ref = f"{GCR}/anthos-baremetal-release/kube-rbac-proxy:v0.7.0"
    assert sha(inspect_raw(f"oci:{site}:{ref}")) == changed.digest
    old = f"{GCR}/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0"
    assert sha(inspect_raw(f"oci:{site}:{old}")) == images[old_refs[0]].digest

    # An inventory of what a site's mirror holds works as a base too.
    inventory = tmp / "inventory.json"
    inventory.write_text(json.dumps({
        "schemaVersion": 1, "mediaType": "application/vnd.bmsync.inventory.v1+json",
        "registry": "127.0.0.1:5000/ns", "digests": sorted(json.loads(base_json)["blobs"]),
    }))
    inv = _build(tmp, config, "inv", "--base", str(inventory))
    doc = json.loads((inv / "bmpackages_1.1.bundle.json").read_text())
    assert doc["base"]["kind"] == "inventory"
    assert {d for d, b in doc["blobs"].items() if b["inArchive"]} == carried


def test_split_parts(registry: RegistryServer, release: dict[str, Any], tmp: Path) -> None:
    config = _config(tmp, registry, list(release["images"]))
    whole = _build(tmp, config, "whole", env={"SOURCE_DATE_EPOCH": "1"})
    out = _build(tmp, config, "split", "--split-size", "1M", env={"SOURCE_DATE_EPOCH": "1"})
    parts = sorted(out.glob("bmpackages_1.30.0.tar.zst.part-*"))
    assert len(parts) >= 2
    assert all(p.stat().st_size == 1024 * 1024 for p in parts[:-1])
    joined = b"".join(p.read_bytes() for p in parts)
    assert joined == (whole / "bmpackages_1.30.0.tar.zst").read_bytes()
    sums = (out / "bmpackages_1.30.0.tar.zst.sha256").read_text().splitlines()
    assert len(sums) == len(parts) + 1
    assert sums[-1] == f"{hashlib.sha256(joined).hexdigest()}  bmpackages_1.30.0.tar.zst"
    for line, part in zip(sums, parts, strict=False):
        assert line == f"{hashlib.sha256(part.read_bytes()).hexdigest()}  {part.name}"

    # Any part's name, or the joined name, opens the set.
    for name in (parts[1], out / "bmpackages_1.30.0.tar.zst"):
        run = bmsync("bundle", "verify", str(name))
        assert run.code == 0, run.output
    assert bmsync("bundle", "extract", str(parts[0]), "--to", str(tmp / "x")).code == 0
    # A corrupt part is named; a missing one too.
    data = bytearray(parts[1].read_bytes())
    data[100] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    run = bmsync("bundle", "verify", str(parts[0]))
    assert run.code == 6 and parts[1].name in run.stderr
    parts[1].unlink()
    run = bmsync("bundle", "verify", str(parts[0]))
    assert run.code == 6 and f"{parts[1].name}: part 2 of {len(parts)} is missing" in run.stderr


def test_random_access_from_threads(registry: RegistryServer, release: dict[str, Any],
                                    tmp: Path) -> None:
    from pipeline.bundle.reader import open_bundle

    config = _config(tmp, registry, list(release["images"]))
    archive = _build(tmp, config) / "bmpackages_1.30.0.tar.zst"
    store = tmp / "store"
    with open_bundle(archive) as reader:
        assert reader.seekable
        digests = [d for d, _ in reader.manifest.archive_blobs()]
        errors: list[BaseException] = []

        def read(digest: str) -> None:
            try:
                got = reader.open_blob(digest).read()
                assert got == store_blob(store, digest).read_bytes(), digest
            except BaseException as e:  # collected and re-raised in the test thread
                errors.append(e)

        threads = [threading.Thread(target=read, args=(d,)) for d in list(reversed(digests)) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_inspect_reads_only_the_first_member(registry: RegistryServer, release: dict[str, Any],
                                             tmp: Path) -> None:
    config = _config(tmp, registry, list(release["images"]))
    archive = _build(tmp, config) / "bmpackages_1.30.0.tar.zst"
    cut = tmp / "cut" / archive.name
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[:64 * 1024])  # the first frame and a little more
    run = bmsync("bundle", "inspect", str(cut))
    assert run.code == 0, run.output
    assert "bundle      1.30.0" in run.stdout
    run = bmsync("bundle", "verify", str(cut), "--no-checksum")
    assert run.code == 6 and "truncated" in run.stderr


def test_build_fails_without_writing_when_an_image_fails(
    registry: RegistryServer, release: dict[str, Any], tmp: Path
) -> None:
    refs = [*release["images"], "anthos-baremetal-release/missing:1"]
    config = _config(tmp, registry, refs)
    run = bmsync("bundle", "build", "--config", str(config), "--store", str(tmp / "store"),
                 "--out", str(tmp / "out"))
    assert run.code == 5, run.output
    assert "missing:1" in run.stderr and "no archive written" in run.stderr
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())


def test_extract_onto_a_store_waits_for_its_index_lock(registry: RegistryServer,
                                                       release: dict[str, Any],
                                                       tmp: Path) -> None:
    """``extract --onto`` a bmsync store merges index.json under the store's index lock,
    as a pull into that store does: while another holder has the lock, the blobs land
    but the index is left alone; once it is released, the bundle's images join the
    entries already there (none is lost)."""
    import fcntl
    import os
    import sys
    import time

    from pipeline.store import Store
    from tests.cli import ROOT

    images = release["images"]
    archive = _build(tmp, _config(tmp, registry, list(images))) / "bmpackages_1.30.0.tar.zst"
    site = Store(tmp / "site-store")
    kept = site.write_blob(b'{"schemaVersion": 2}')
    oci_manifest = "application/vnd.oci.image.manifest.v1+json"
    site.add_image("example.com/keep:1", {"mediaType": oci_manifest, "digest": kept, "size": 20})
    before = (tmp / "site-store" / "index.json").read_bytes()
    fd = os.open(tmp / "site-store" / ".bmsync" / "locks" / "index.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "-q", "bundle", "extract", str(archive),
             "--onto", str(tmp / "site-store")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        manifests = [img.digest for img in images.values()]
        deadline = time.monotonic() + 30
        while not all(site.has_blob(d) for d in manifests) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "extract merged the index while the lock was held"
        assert (tmp / "site-store" / "index.json").read_bytes() == before
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    index = json.loads((tmp / "site-store" / "index.json").read_text())
    by_name = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
               for m in index["manifests"]}
    assert by_name == {"example.com/keep:1": kept,
                       **{f"{GCR}/{r}": img.digest for r, img in images.items()}}
