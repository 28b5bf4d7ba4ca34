"""`bmsync verify --containerd-config` over what `bmsync containerd config` wrote, as a user
runs them: exit 0 when every host is mirrored, exit 6 naming the host that is not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.bundle.format import BlobEntry, BundleManifest, ImageEntry
from tests.cli import bmsync
from tests.harness.pki import TestPKI

MIRROR = "https://127.0.0.1:5000/test-namespace"
INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Path:
    out = tmp_path_factory.mktemp("nodeconfig") / "containerd"
    run = bmsync("containerd", "config", f"--private-registry={MIRROR}", "--cacert",
                 str(pki.ca_cert), "--hosts", "quay.io", "--out", str(out))
    assert run.code == 0, run.output
    return out


def layout(root: Path, *sources: str) -> Path:
    """A `bundle extract` layout's bundle.json listing ``sources`` (manifests only)."""
    images, blobs = [], {}
    for i, source in enumerate(sources):
        digest = "sha256:" + hashlib.sha256(source.encode()).hexdigest()
        repo, tag = source.split("/", 1)[1].rsplit(":", 1)
        images.append(ImageEntry(source, repo, tag, digest, digest, INDEX, 1, (digest,)))
        # Offsets tile the blob region: one-byte members take a header and a block each.
        blobs[digest] = BlobEntry(1, INDEX, True, 1024 * i)
    manifest = BundleManifest("1.0.0", "2024-01-01T00:00:00Z", None, (), tuple(images), blobs)
    root.mkdir()
    (root / "bundle.json").write_bytes(manifest.to_json())
    return root


def test_generated_config_passes(out: Path, pki: TestPKI) -> None:
    run = bmsync("verify", "--containerd-config", str(out / "config.toml"),
                 f"--private-registry={MIRROR}", "--cacert", str(pki.ca_cert),
                 "--hosts", "quay.io")
    assert run.code == 0, run.output
    assert "2 hosts: 2 mirrored, 0 not" in run.stdout
    assert "https://127.0.0.1:5000/v2/test-namespace  path ok  ca " in run.stdout
    assert run.stderr == ""

    as_json = bmsync("verify", "--containerd-config", str(out / "config-legacy.toml"),
                     f"--private-registry={MIRROR}", "--hosts", "quay.io", "--json")
    assert as_json.code == 0, as_json.output
    report = as_json.json()
    assert report["ok"] is True
    assert [(h["host"], h["status"], h["fallback"]) for h in report["containerd"]["hosts"]] == [
        ("gcr.io", "mirrored", "https://gcr.io"), ("quay.io", "mirrored", "https://quay.io")]


def test_host_missing_exits_6_and_names_it(out: Path, tmp_path: Path) -> None:
    run = bmsync("verify", "--containerd-config", str(out / "config.toml"),
                 f"--private-registry={MIRROR}", "--hosts", "quay.io,registry.k8s.io")
    assert run.code == 6, run.output
    assert "registry.k8s.io  not mirrored" in run.stdout
    assert (f"bmsync: error: registry.k8s.io: no {out}/certs.d/registry.k8s.io/hosts.toml"
            in run.stderr)

    # With --source the hosts are the bundle's source registries.
    source = layout(tmp_path / "layout", "gcr.io/a/b:1", "registry.k8s.io/pause:3.9")
    run = bmsync("verify", "--containerd-config", str(out / "certs.d"), f"--source={source}")
    assert run.code == 6, run.output
    assert "2 hosts: 1 mirrored, 1 not" in run.stdout
    assert "bmsync: error: registry.k8s.io: " in run.stderr
    assert "gcr.io:" not in run.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (("--node",), "give one"),
    (("--username", "alice"), "--username has no use with --containerd-config"),
])
def test_usage_errors(out: Path, flags: tuple[str, ...], message: str) -> None:
    run = bmsync("verify", "--containerd-config", str(out / "config.toml"), *flags)
    assert run.code == 2, run.output
    assert message in run.stderr


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text("version = 2\n[plugins\n")
    run = bmsync("verify", "--containerd-config", str(broken))
    assert run.code == 2, run.output
    assert run.stderr.startswith(f"bmsync: error: {broken}: not valid TOML")
