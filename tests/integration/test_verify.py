"""`bmsync verify` against real registries and a real containerd, run as a user runs it.

A bundle of two images (an OCI image, a two-platform OCI index sharing its base layer)
is pushed upstream once per module and built by ``bmsync bundle build``; each test
pushes it into a mirror of its own with ``bmsync push images`` and then changes the
mirror behind bmsync's back: a blob's files removed from the registry's storage, a tag
moved by another client (the harness pusher). The digests every assertion expects are
the ones the harness pushed upstream, not what bundle.json says.

The node tests start their own containerd (own root, state and socket) and pull with
``ctr`` through a ``hosts.toml`` that sends ``gcr.io`` to the mirror, as a node of an
air-gapped cluster does.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.bundle.format import BlobEntry, BundleManifest, ImageEntry
from pipeline.verify import (
    ABSENT,
    ELSEWHERE,
    OK,
    WRONG_DIGEST,
    NodeImage,
    parse_ctr_images,
    verify_node,
)
from tests.cli import Run, bmsync, write_images_config
from tests.conftest import USERS, RegistryFactory
from tests.harness.images import Image, ImageFactory, Index
from tests.harness.images import push as push_image
from tests.harness.registry import RegistryServer, start_registry

GCR = "gcr.io"
NS = "test-namespace"
VERSION = "2.0.0"
PROXY = "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0"
NAUTILUS = "kubernetes-e2e-test-images/nautilus:1.0"
NO_LOGIN = ("--need-credential=false",)

@dataclass(frozen=True)
class Release:
    upstream: RegistryServer
    proxy: Image
    nautilus: Index
    archive: Path

    @property
    def images(self) -> dict[str, Image | Index]:
        return {PROXY: self.proxy, NAUTILUS: self.nautilus}


def verify(*args: str, env: Mapping[str, str], stdin: str | None = None) -> Run:
    return bmsync("verify", *args, env=env, stdin=stdin)


def push(archive: Path, mirror: str, *login: str, env: Mapping[str, str],
         stdin: str | None = None) -> Run:
    run = bmsync("push", "images", f"--source={archive}", f"--private-registry={mirror}",
                 *(login or NO_LOGIN), env=env, stdin=stdin)
    assert run.code == 0, run.output
    return run


def mirror_of(server: RegistryServer) -> str:
    return f"{server.scheme}://{server.host}/{NS}"


def target(server: RegistryServer, ref: str) -> str:
    return f"{server.host}/{NS}/{ref}"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    root = tmp_path_factory.mktemp("verify")
    upstream = start_registry(root / "upstream")
    try:
        f = ImageFactory(seed="bmsync-tests:test_verify")
        base = f.layer(100_000)
        proxy = f.image([base, f.layer(50_000)], media="oci")
        nautilus = f.multiarch(base=[base], layer_size=30_000, media="oci")
        push_image(upstream.url, PROXY.split(":")[0], PROXY.split(":")[1], proxy)
        push_image(upstream.url, NAUTILUS.split(":")[0], NAUTILUS.split(":")[1], nautilus)
        config = write_images_config(root / "images.yaml", [f"{GCR}/{PROXY}", f"{GCR}/{NAUTILUS}"],
                                     registries={GCR: {"endpoint": upstream.url}},
                                     release=VERSION)
        run = bmsync("bundle", "build", "--config", str(config), "--store", str(root / "store"),
                     "--out", str(root / "out"), env={"DOCKER_CONFIG": str(root / "none")})
        assert run.code == 0, run.output
        archive = root / "out" / f"bmpackages_{VERSION}.tar.zst"
        assert archive.is_file()
        yield Release(upstream, proxy, nautilus, archive)
    finally:
        upstream.close()


@pytest.fixture
def env(tmp: Path) -> dict[str, str]:
    """No docker config.json of the machine may lend the mirror credentials."""
    return {"DOCKER_CONFIG": str(tmp / "no-docker-config")}


def row(stdout: str, name: str) -> list[str]:
    """The words of the table line for ``name`` (columns are padded to align)."""
    lines = [line.split() for line in stdout.splitlines()]
    [found] = [words for words in lines if words[:1] == [name]]
    return found[1:]


def remove_blob(server: RegistryServer, digest: str) -> None:
    """Delete a blob's bytes from the registry's storage (its links stay behind)."""
    data = server.blob_path(digest)
    assert data.is_file(), data
    shutil.rmtree(data.parent)


# -- the mirror -------------------------------------------------------------------------------


def test_pushed_mirror_matches_then_json(registry: RegistryServer, release: Release,
                                         env: dict[str, str]) -> None:
    push(release.archive, mirror_of(registry), env=env)
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 *NO_LOGIN, env=env)
    assert run.code == 0, run.output
    assert f"{mirror_of(registry)}: 2 images: 2 ok, 0 differ" in run.stdout
    for ref, artifact in release.images.items():
        assert row(run.stdout, target(registry, ref)) == [artifact.digest, "ok"]
    assert run.stderr == ""

    mark = registry.mark()
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 "--json", *NO_LOGIN, env=env)
    assert run.code == 0, run.output
    doc = run.json()
    assert doc == {
        "source": str(release.archive),
        "version": VERSION,
        "ok": True,
        "mirrors": [{
            "mirror": mirror_of(registry),
            "ok": True,
            "images": [
                {"source": f"{GCR}/{ref}", "target": target(registry, ref),
                 "expected": a.digest, "found": a.digest, "missing": [], "status": "ok"}
                for ref, a in release.images.items()
            ],
        }],
    }
    # Read-only, and every child manifest was asked for as a manifest, never as a blob.
    entries = registry.since(mark)
    assert all(e.method in ("GET", "HEAD") for e in entries), entries
    for child in release.nautilus.children:
        name = NAUTILUS.split(":")[0]
        assert ("HEAD", f"/v2/{NS}/{name}/manifests/{child.digest}") in {
            (e.method, e.path) for e in entries}
        assert not [e for e in entries if e.path.endswith(f"/blobs/{child.digest}")]


@pytest.mark.parametrize("what", ["layer", "child manifest"])
def test_missing_blob_names_the_image(what: str, registry: RegistryServer, release: Release,
                                      env: dict[str, str]) -> None:
    push(release.archive, mirror_of(registry), env=env)
    child = release.nautilus.children[1]
    gone = child.layers[-1].digest if what == "layer" else child.digest
    remove_blob(registry, gone)
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 "--json", *NO_LOGIN, env=env)
    assert run.code == 6, run.output
    assert run.stderr == (
        f"bmsync: error: {target(registry, NAUTILUS)}: lacks {gone} of"
        f" {release.nautilus.digest}\n"
    )
    rows = {i["source"]: i for i in run.json()["mirrors"][0]["images"]}
    assert rows[f"{GCR}/{NAUTILUS}"]["status"] == "missing blobs"
    assert rows[f"{GCR}/{NAUTILUS}"]["missing"] == [gone]
    assert rows[f"{GCR}/{NAUTILUS}"]["found"] == release.nautilus.digest
    assert rows[f"{GCR}/{PROXY}"]["status"] == "ok"
    assert run.json()["ok"] is False

    # The table says it too.
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 *NO_LOGIN, env=env)
    assert run.code == 6
    assert row(run.stdout, target(registry, NAUTILUS)) == [
        release.nautilus.digest, "missing", "blobs", "(1", "missing", "blob)"]


def test_moved_tag_names_old_and_new(registry: RegistryServer, release: Release,
                                     env: dict[str, str], image_factory: ImageFactory) -> None:
    push(release.archive, mirror_of(registry), env=env)
    other = image_factory.image()
    name, tag = PROXY.split(":")
    push_image(registry.url, f"{NS}/{name}", tag, other)
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 *NO_LOGIN, env=env)
    assert run.code == 6, run.output
    assert run.stderr == (
        f"bmsync: error: {target(registry, PROXY)}: points at {other.digest}, the bundle has"
        f" {release.proxy.digest}\n"
    )
    assert f"wrong digest (found {other.digest})" in run.stdout


def test_empty_mirror_every_image_missing(registry: RegistryServer, release: Release,
                                          env: dict[str, str]) -> None:
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(registry)}",
                 *NO_LOGIN, env=env)
    assert run.code == 6, run.output
    assert run.stderr.splitlines() == [
        f"bmsync: error: {target(registry, ref)}: not in the mirror (expected {a.digest})"
        for ref, a in release.images.items()
    ]


def test_basic_auth_and_tls(registry_factory: RegistryFactory, release: Release,
                            env: dict[str, str]) -> None:
    server = registry_factory(auth="basic", tls=True)
    assert server.ca_cert is not None
    user, password = next(iter(USERS.items()))
    login = ("--cacert", str(server.ca_cert), "--username", user, "--password-stdin")
    push(release.archive, mirror_of(server), *login, env=env, stdin=password + "\n")
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(server)}",
                 *login, env=env, stdin=password + "\n")
    assert run.code == 0, run.output
    assert f"{mirror_of(server)}: 2 images: 2 ok, 0 differ" in run.stdout
    assert password not in run.output

    remove_blob(server, release.proxy.layers[-1].digest)
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(server)}",
                 *login, env=env, stdin=password + "\n")
    assert run.code == 6, run.output
    assert f"{target(server, PROXY)}: lacks {release.proxy.layers[-1].digest}" in run.stderr

    # A wrong password is a credentials problem (3), not a difference (6).
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(server)}",
                 *login, env=env, stdin="not-the-password\n")
    assert run.code == 3, run.output
    # Without the CA the mirror is not trusted: a TLS error (4), nothing compared.
    run = verify(f"--source={release.archive}", f"--private-registry={mirror_of(server)}",
                 "--username", user, "--password-stdin", env=env, stdin=password + "\n")
    assert run.code == 4, run.output
    assert "--cacert" in run.stderr


@pytest.mark.parametrize("flags", [
    (),
    ("--private-registry=http://127.0.0.1:1/ns", "--node"),
    ("--private-registry=http://127.0.0.1:1/ns", "--namespace", "k8s.io"),
])
def test_mirror_or_node_usage(flags: tuple[str, ...], release: Release,
                              env: dict[str, str]) -> None:
    run = verify(f"--source={release.archive}", *flags, *NO_LOGIN, env=env)
    assert run.code == 2, run.output
    assert run.stderr.startswith("bmsync: error: ")


# -- a node: ctr's output, then a real containerd ----------------------------------------------

D1, D2, D3 = (f"sha256:{c * 64}" for c in "123")


@pytest.mark.parametrize(("output", "expected"), [
    ("REF TYPE DIGEST SIZE PLATFORMS LABELS \n", []),
    ("", []),
    (
        "REF                    TYPE                                       DIGEST"
        " SIZE     PLATFORMS   LABELS \n"
        f"gcr.io/a/b:1           application/vnd.oci.image.index.v1+json    {D1} 1.2 MiB"
        "  linux/amd64,linux/arm64/v8 - \n"
        f"gcr.io/a/b@{D1}  application/vnd.oci.image.index.v1+json    {D1} 1.2 MiB  linux/amd64"
        " io.cri-containerd.image=managed \n"
        f"{D2}  application/vnd.oci.image.manifest.v1+json {D3} 3.0 KiB  linux/amd64 - \n",
        [NodeImage("gcr.io/a/b:1", D1), NodeImage(f"gcr.io/a/b@{D1}", D1), NodeImage(D2, D3)],
    ),
])
def test_parse_ctr_images(output: str, expected: list[NodeImage]) -> None:
    assert parse_ctr_images(output) == expected


def _bundle(*images: tuple[str, str, str]) -> BundleManifest:
    """A bundle.json model of images (source, digest, upstream digest), manifests only."""
    entries = []
    blobs = {}
    for source, digest, upstream in images:
        repo = source.split("/", 1)[1].rsplit(":", 1)[0]
        entries.append(ImageEntry(source, repo, source.rsplit(":", 1)[1], digest, upstream,
                                  "application/vnd.oci.image.index.v1+json", 1, (digest,)))
        blobs[digest] = BlobEntry(1, "application/vnd.oci.image.index.v1+json", True, 0)
    return BundleManifest(VERSION, "2024-01-01T00:00:00Z", None, (), tuple(entries), blobs)


def test_node_rows_from_ctr_output() -> None:
    """Which names count and how: a table of what a node can hold."""
    manifest = _bundle(("gcr.io/a/b:1", D1, D3), ("gcr.io/a/c:2", D2, D2))
    listing = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
        f"gcr.io/a/b:1 t {D3} 1 KiB linux/amd64 -\n"  # the unfiltered upstream index
        f"gcr.io/a/b@{D1} t {D1} 1 KiB linux/amd64 -\n"  # the CRI's digest name: known
        f"gcr.io/a/b:other t {D2} 1 KiB linux/amd64 -\n"  # a digest of another repository
        f"{D2} t {D2} 1 KiB linux/amd64 -\n"  # the CRI's image-id name: not a reference
        f"docker.io/library/x:1 t {D3} 1 KiB linux/amd64 -\n"  # not a bundle repository
    )
    calls: list[list[str]] = []

    def runner(args: Sequence[str]) -> str:
        calls.append(list(args))
        return listing

    report = verify_node(manifest, runner, namespace="k8s.io")
    assert calls == [["-n", "k8s.io", "images", "ls"]]
    assert [(i.name, i.found, i.status) for i in report.images] == [
        ("gcr.io/a/b:1", D3, WRONG_DIGEST),
        ("gcr.io/a/c:2", None, ABSENT),
        ("gcr.io/a/b:other", D2, ELSEWHERE),
        (f"gcr.io/a/b@{D1}", D1, OK),
    ]
    assert [i.name for i in report.differences] == ["gcr.io/a/b:1", "gcr.io/a/b:other"]


@dataclass
class Containerd:
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.directory / "c.sock"

    def ctr(self, *args: str) -> str:
        done = subprocess.run(["ctr", "-a", str(self.socket), *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"ctr {' '.join(args)}: {done.stderr}"
        return done.stdout

    def pull(self, ref: str, hosts_dir: Path) -> None:
        """Pull into kubelet's namespace, resolving registries through ``hosts_dir``."""
        self.ctr("-n", "k8s.io", "images", "pull", "--snapshotter", "native",
                 "--hosts-dir", str(hosts_dir), ref)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A containerd of its own (root, state, socket in a short temp dir), stopped after."""
    # A unix socket path is limited to 108 bytes: pytest's tmp paths can be longer.
    directory = Path(tempfile.mkdtemp(prefix="bmsync-ctd-", dir="/tmp"))
    config = directory / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{directory}/root"\n'
        f'state = "{directory}/state"\n'
        # Not needed to hold images, and it would look for CNI and the host's runtime.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{directory}/c.sock"\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{directory}/opt"\n'
    )
    log = open(directory / "containerd.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    daemon = Containerd(directory, process)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise AssertionError(f"containerd exited with {process.returncode}:\n"
                                     + (directory / "containerd.log").read_text()[-3000:])
            done = subprocess.run(["ctr", "-a", str(daemon.socket), "version"],
                                  capture_output=True, timeout=10)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError("containerd did not answer in 20 s:\n"
                                     + (directory / "containerd.log").read_text()[-3000:])
            time.sleep(0.1)
        yield daemon
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def hosts_dir(root: Path, server: RegistryServer) -> Path:
    """A containerd hosts dir sending gcr.io to ``server``'s namespace, and nowhere else."""
    gcr = root / GCR
    gcr.mkdir(parents=True)
    (gcr / "hosts.toml").write_text(
        f'server = "{server.url}/v2/{NS}"\n'
        f'[host."{server.url}/v2/{NS}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  override_path = true\n"
    )
    return root


def test_node_pulled_through_the_mirror_then_from_elsewhere(
        containerd: Containerd, registry_factory: RegistryFactory, release: Release,
        env: dict[str, str], tmp: Path, image_factory: ImageFactory) -> None:
    mirror = registry_factory()
    push(release.archive, mirror_of(mirror), env=env)
    via_mirror = hosts_dir(tmp / "mirror.d", mirror)
    for ref in release.images:
        containerd.pull(f"{GCR}/{ref}", via_mirror)
    node = ("--node", "--address", str(containerd.socket))
    run = verify(f"--source={release.archive}", *node, env=env)
    assert run.code == 0, run.output
    for ref, artifact in release.images.items():
        assert row(run.stdout, f"{GCR}/{ref}") == [artifact.digest, "ok"]
    # Nothing was pulled into ctr's default namespace: there, every image is absent.
    run = verify(f"--source={release.archive}", *node, "--namespace", "default", "--json",
                 env=env)
    assert run.code == 0, run.output
    assert {i["status"] for i in run.json()["node"]["images"]} == {"absent"}

    # Another registry serves other images under the same gcr.io names.
    elsewhere = registry_factory()
    name, tag = PROXY.split(":")
    stray, moved = image_factory.image(), image_factory.image()
    push_image(elsewhere.url, f"{NS}/{name}", "v9", stray)
    push_image(elsewhere.url, f"{NS}/{name}", tag, moved)
    via_elsewhere = hosts_dir(tmp / "elsewhere.d", elsewhere)
    containerd.pull(f"{GCR}/{name}:v9", via_elsewhere)
    run = verify(f"--source={release.archive}", *node, env=env)
    assert run.code == 6, run.output
    assert run.stderr == (
        f"bmsync: error: {GCR}/{name}:v9: node has {stray.digest}, which is not in the bundle"
        " (pulled from elsewhere)\n"
    )

    containerd.pull(f"{GCR}/{PROXY}", via_elsewhere)
    run = verify(f"--source={release.archive}", *node, "--json", env=env)
    assert run.code == 6, run.output
    assert f"bmsync: error: {GCR}/{PROXY}: node has {moved.digest}, the bundle has" \
        f" {release.proxy.digest}\n" in run.stderr
    rows = {i["name"]: i for i in run.json()["node"]["images"]}
    assert rows[f"{GCR}/{PROXY}"] == {
        "name": f"{GCR}/{PROXY}", "source": f"{GCR}/{PROXY}", "expected": release.proxy.digest,
        "found": moved.digest, "status": "wrong digest",
    }
    assert rows[f"{GCR}/{NAUTILUS}"]["status"] == "ok"
    assert rows[f"{GCR}/{name}:v9"]["status"] == "pulled from elsewhere"


def test_node_without_containerd_is_a_transport_error(release: Release, env: dict[str, str],
                                                      tmp: Path) -> None:
    run = verify(f"--source={release.archive}", "--node", "--address", str(tmp / "none.sock"),
                 env=env)
    assert run.code == 4, run.output
    assert "--address" in run.stderr
