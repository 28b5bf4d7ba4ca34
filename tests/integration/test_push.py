"""`bmsync push images` and `bmsync inventory` against real registries, run as a user runs them.

Witnesses, none of them bmsync's own code: the mirror's access log (what reached the
registry, in which order, with which status), skopeo (reads the mirror on its own; every
digest must equal the digest the harness pushed upstream, not what bundle.json says),
and the records of the fault and forward proxies.

The release (three images sharing a base layer: OCI, Docker, a multi-arch OCI index) is
pushed once per module to an upstream registry, and its archives are built once, on
first use, by ``bmsync bundle build``; every test pushes them into mirrors of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.cli import ROOT, Run, bmsync, write_images_config
from tests.conftest import RegistryFactory
from tests.harness.faultproxy import (
    Action,
    Delay,
    FaultProxy,
    Reset,
    Respond,
    rate_limit,
)
from tests.harness.forwardproxy import ForwardProxy
from tests.harness.images import Artifact, Image, ImageFactory, Layer
from tests.harness.images import push as push_upstream
from tests.harness.registry import AccessEntry, RegistryServer, start_registry
from tests.harness.skopeo import inspect_raw, manifest_digest

GCR = "gcr.io"
NS = "test-namespace"
VERSION = "1.30.0"
RBAC = "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0"
ETCD = "anthos-baremetal-release/etcd:v3.4.13"
NAUTILUS = "kubernetes-e2e-test-images/nautilus:1.0"
# Only in release 1.1: the base layer plus one new layer.
RBAC_NEXT = "anthos-baremetal-release/kube-rbac-proxy:v0.7.0"
NO_LOGIN = ("--need-credential=false",)
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# -- the release and its archives ------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """What the harness pushed upstream; ``images`` is release 1.30.0 (REPO:TAG -> image)."""

    upstream: RegistryServer
    images: dict[str, Artifact]
    base: Layer
    next_image: Image  # RBAC_NEXT
    next_layer: Layer

    @property
    def blobs(self) -> set[str]:
        """Configs and layers of every image of 1.30.0, each once."""
        return {d for a in self.images.values() for d in a.blobs}

    @property
    def blob_bytes(self) -> int:
        """Bytes of those blobs: what a push into an empty mirror uploads."""
        sizes = {d: len(b) for a in self.images.values() for d, b in a.blobs.items()}
        return sum(sizes.values())

    @property
    def digests(self) -> set[str]:
        """Every digest of 1.30.0: manifests (indexes and children), configs, layers."""
        return self.blobs | {d for a in self.images.values() for d in a.manifests}


class Bundles:
    """The release's archives, each built by the CLI on first use and kept for the module."""

    def __init__(self, root: Path, release: Release, docker_config: Path) -> None:
        self.root = root
        self.release = release
        self.env = {"DOCKER_CONFIG": str(docker_config)}
        self._built: dict[str, Path] = {}

    def config(self, name: str, refs: Sequence[str], version: str) -> Path:
        return write_images_config(
            self.root / f"{name}.yaml", [f"{GCR}/{r}" for r in refs],
            registries={GCR: {"endpoint": self.release.upstream.url}}, release=version,
        )

    def build(self, out: Path, config: Path, *extra: str) -> Path:
        run = bmsync("bundle", "build", "--config", str(config), "--store",
                     str(self.root / "store"), "--out", str(out), *extra, env=self.env)
        assert run.code == 0, run.output
        return out

    def get(self, kind: str) -> Path:
        """``zstd``, ``xz``, ``none``, ``split`` (the first part), ``layout`` (extracted
        from the zstd archive) or ``delta`` (1.1 against the zstd archive)."""
        if kind not in self._built:
            self._built[kind] = self._make(kind)
        return self._built[kind]

    def _make(self, kind: str) -> Path:
        full = self.config("full", list(self.release.images), VERSION)
        name = f"bmpackages_{VERSION}"
        out = self.root / kind
        if kind == "zstd":
            return self.build(out, full) / f"{name}.tar.zst"
        if kind == "xz":
            return self.build(out, full, "--compression", "xz") / f"{name}.tar.xz"
        if kind == "none":
            return self.build(out, full, "--compression", "none") / f"{name}.tar"
        if kind == "split":
            built = self.build(out, full, "--split-size", "1M")
            parts = sorted(built.glob(f"{name}.tar.zst.part-*"))
            assert len(parts) >= 2, parts
            return parts[0]
        if kind == "layout":
            run = bmsync("bundle", "extract", str(self.get("zstd")), "--to", str(out))
            assert run.code == 0, run.output
            return out
        if kind == "delta":
            config = self.config("next", [ETCD, NAUTILUS, RBAC_NEXT], "1.1")
            built = self.build(out, config, "--base", str(self.get("zstd")))
            return built / "bmpackages_1.1.tar.zst"
        raise ValueError(kind)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    upstream = start_registry(tmp_path_factory.mktemp("upstream"))
    try:
        f = ImageFactory(seed="bmsync-tests:test_push")
        base = f.layer(400_000)
        images: dict[str, Artifact] = {
            RBAC: f.image([base, f.layer(300_000)], media="oci"),
            ETCD: f.image([base, f.layer(200_000)], media="docker"),
            NAUTILUS: f.multiarch(base=[base], layer_size=150_000, media="oci"),
        }
        next_layer = f.layer(120_000)
        next_image = f.image([base, next_layer], media="oci")
        for ref, artifact in [*images.items(), (RBAC_NEXT, next_image)]:
            repo, tag = ref.split(":")
            push_upstream(upstream.url, repo, tag, artifact)
        yield Release(upstream, images, base, next_image, next_layer)
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def bundles(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("bundles")
    return Bundles(root, release, root / "no-docker-config")


@pytest.fixture
def env(bundles: Bundles) -> dict[str, str]:
    """No docker config.json of the machine may lend the mirror credentials."""
    return dict(bundles.env)


# -- running bmsync ------------------------------------------------------------------------


def run_bmsync(*args: str, env: Mapping[str, str], stdin: str | None = None) -> Run:
    """Like :func:`tests.cli.bmsync`, with ``stdin`` piped in (still no terminal)."""
    if stdin is None:
        return bmsync(*args, env=env)
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full_env.update(env)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], input=stdin, capture_output=True,
        text=True, env=full_env, timeout=120, cwd=ROOT,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def push_images(source: Path, mirrors: str | Sequence[str], *flags: str, env: Mapping[str, str],
                login: Sequence[str] = NO_LOGIN, stdin: str | None = None) -> Run:
    """``bmsync push images --source=SOURCE --private-registry=M... FLAGS LOGIN``."""
    targets = [mirrors] if isinstance(mirrors, str) else list(mirrors)
    return run_bmsync("push", "images", f"--source={source}",
                      *[f"--private-registry={m}" for m in targets], *flags, *login,
                      env=env, stdin=stdin)


def mirror_of(host: str, scheme: str = "http") -> str:
    return f"{scheme}://{host}/{NS}"


# -- what the mirror holds and what it was sent ---------------------------------------------


def assert_mirror_holds(host: str, images: Mapping[str, Artifact], *,
                        creds: tuple[str, str] | None = None, cert_dir: Path | None = None,
                        children: bool = False) -> None:
    """skopeo reads every image at its tag under the namespace: the upstream digests."""
    for ref, artifact in images.items():
        raw = inspect_raw(f"docker://{host}/{NS}/{ref}", creds=creds, cert_dir=cert_dir,
                          tls_verify=cert_dir is not None)
        assert manifest_digest(raw) == artifact.digest, f"{ref} in the mirror"
        for child in artifact.children if children else ():
            name = ref.rsplit(":", 1)[0]
            raw = inspect_raw(f"docker://{host}/{NS}/{name}@{child.digest}", creds=creds,
                              cert_dir=cert_dir, tls_verify=cert_dir is not None)
            assert manifest_digest(raw) == child.digest


_API = re.compile(r"^/v2/(?P<repo>.+?)/(?P<kind>blobs|manifests)/(?P<rest>.*)$")


def api_parts(entry: AccessEntry) -> tuple[str, str, str] | None:
    """(repository, ``blobs``/``manifests``, rest of the path) of a distribution API call."""
    match = _API.match(entry.path)
    return (match["repo"], match["kind"], match["rest"]) if match else None


def made_present(entries: Sequence[AccessEntry]) -> dict[tuple[str, str], int]:
    """(repository, digest or tag) -> position of the first 201 that put it there:
    a blob commit (``PUT ...?digest=``), a mount (``POST ?mount=``) or a manifest PUT."""
    found: dict[tuple[str, str], int] = {}
    for i, e in enumerate(entries):
        parts = api_parts(e)
        if parts is None or e.status != 201:
            continue
        repo, kind, rest = parts
        key: str | None = None
        if kind == "blobs" and e.method == "PUT":
            key = e.params["digest"][0]
        elif kind == "blobs" and e.method == "POST" and "mount" in e.params:
            key = e.params["mount"][0]
        elif kind == "manifests" and e.method == "PUT":
            key = rest
        if key is not None:
            found.setdefault((repo, key), i)
    return found


def commits(entries: Sequence[AccessEntry]) -> list[str]:
    """Digests of the blob uploads the registry accepted (``PUT ...?digest=`` -> 201)."""
    out = []
    for e in entries:
        parts = api_parts(e)
        if parts and parts[1] == "blobs" and e.method == "PUT" and e.status == 201:
            out.append(e.params["digest"][0])
    return out


def mounts(entries: Sequence[AccessEntry]) -> list[str]:
    out = []
    for e in entries:
        parts = api_parts(e)
        if parts and e.method == "POST" and "mount" in e.params and e.status == 201:
            out.append(e.params["mount"][0])
    return out


def writes(entries: Sequence[AccessEntry]) -> list[str]:
    return [str(e) for e in entries if e.method in WRITES]


def assert_publish_order(entries: Sequence[AccessEntry], images: Mapping[str, Artifact]) -> None:
    """Into a fresh mirror: every blob of a manifest got its 201 in that repository before
    the manifest's PUT; child manifests (by digest) before the index; the tag last."""
    at = made_present(entries)
    for ref, artifact in images.items():
        name, tag = ref.rsplit(":", 1)
        repo = f"{NS}/{name}"
        assert (repo, tag) in at, f"{repo}:{tag} was never PUT"
        tag_at = at[(repo, tag)]
        manifests: list[Artifact] = [*artifact.children] or [artifact]
        for m in manifests:
            m_at = tag_at
            if m is not artifact:
                assert (repo, m.digest) in at, f"child {m.digest} of {ref} was never PUT"
                m_at = at[(repo, m.digest)]
                assert m_at < tag_at, f"{ref}: tag PUT before its child {m.digest}"
            for blob in m.blobs:
                assert (repo, blob) in at, f"{ref}: blob {blob} never got a 201 in {repo}"
                assert at[(repo, blob)] < m_at, f"{ref}: manifest PUT before its blob {blob}"


def tag_heads(images: Mapping[str, Artifact]) -> list[tuple[str, str]]:
    out = []
    for ref in images:
        name, tag = ref.rsplit(":", 1)
        out.append(("HEAD", f"/v2/{NS}/{name}/manifests/{tag}"))
    return sorted(out)


# -- a plain push: namespace, order, digests, mounts, report, warm re-run -----------------------


def test_push_into_namespace_then_warm(registry: RegistryServer, bundles: Bundles,
                                       release: Release, env: dict[str, str], tmp: Path) -> None:
    report = tmp / "report.json"
    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), "--report", str(report),
                      env=env)
    assert run.code == 0, run.output
    assert "3 images: 3 pushed, 0 already present, 0 retagged, 0 failed" in run.stdout
    entries = registry.since(mark)
    # Everything landed under the namespace; the source host was dropped.
    assert all(e.path == "/v2/" or e.path.startswith(f"/v2/{NS}/") for e in entries), entries
    assert_publish_order(entries, release.images)
    assert_mirror_holds(registry.host, release.images, children=True)
    # Each blob crossed the wire once; the shared base was mounted into the two others.
    assert sorted(commits(entries)) == sorted(release.blobs)
    assert sorted(mounts(entries)) == [release.base.digest] * 2

    doc = json.loads(report.read_text())
    [m] = doc["mirrors"]
    assert m["mirror"] == f"http://{registry.host}/{NS}" and m["dryRun"] is False
    assert {i["target"]: (i["status"], i["digest"], i["upstreamDigest"]) for i in m["images"]} == {
        f"{registry.host}/{NS}/{ref}": ("pushed", a.digest, a.digest)
        for ref, a in release.images.items()
    }
    assert m["summary"]["blobsUploaded"] == len(release.blobs)
    assert m["summary"]["blobsMounted"] == 2
    assert m["summary"]["bytesUploaded"] == release.blob_bytes

    # Warm: one HEAD per image on its tag, not one blob request.
    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    assert "3 images: 0 pushed, 3 already present" in run.stdout
    entries = registry.since(mark)
    assert sorted((e.method, e.path) for e in entries) == tag_heads(release.images), entries
    assert all(e.status == 200 for e in entries)


# -- authentication and TLS ---------------------------------------------------------------


def test_basic_auth_password_stdin(basic_registry: RegistryServer, bundles: Bundles,
                                   release: Release, env: dict[str, str]) -> None:
    user, password = basic_registry.auth or ("", "")
    login = ("--username", user, "--password-stdin")
    mark = basic_registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(basic_registry.host), env=env,
                      login=login, stdin=password + "\n")
    assert run.code == 0, run.output
    assert password not in run.output
    entries = basic_registry.since(mark)
    assert_publish_order([e for e in entries if e.status != 401], release.images)
    assert_mirror_holds(basic_registry.host, release.images, creds=(user, password))

    # Warm: one HEAD per image, plus only 401 challenges; no blob request at all.
    mark = basic_registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(basic_registry.host), env=env,
                      login=login, stdin=password + "\n")
    assert run.code == 0, run.output
    entries = basic_registry.since(mark)
    assert not [e for e in entries if "/blobs/" in e.path], entries
    answered = [e for e in entries if e.status != 401]
    assert sorted((e.method, e.path) for e in answered) == tag_heads(release.images), entries


def test_password_stdin_serves_every_mirror_host(registry_factory: RegistryFactory,
                                                 bundles: Bundles, release: Release,
                                                 env: dict[str, str]) -> None:
    """Standard input holds one password: it is read once, for all the mirror hosts."""
    first, second = registry_factory(auth="basic"), registry_factory(auth="basic")
    user, password = first.auth or ("", "")
    run = push_images(bundles.get("zstd"), [mirror_of(first.host), mirror_of(second.host)],
                      env=env, login=("--username", user, "--password-stdin"),
                      stdin=password + "\n")
    assert run.code == 0, run.output
    for server in (first, second):
        assert_mirror_holds(server.host, release.images, creds=(user, password))


def test_token_auth_password_from_environment(token_registry: RegistryServer, bundles: Bundles,
                                              release: Release, env: dict[str, str]) -> None:
    user, password = token_registry.auth or ("", "")
    env = {**env, "BMSYNC_PASSWORD": password}
    mark = token_registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(token_registry.host), env=env,
                      login=("--username", user))
    assert run.code == 0, run.output
    assert password not in run.output
    entries = [e for e in token_registry.since(mark) if e.status != 401]
    assert_publish_order(entries, release.images)
    assert_mirror_holds(token_registry.host, release.images, creds=(user, password))

    mark = token_registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(token_registry.host), env=env,
                      login=("--username", user))
    assert run.code == 0, run.output
    entries = token_registry.since(mark)
    assert not [e for e in entries if "/blobs/" in e.path], entries
    answered = [e for e in entries if e.status != 401]
    assert sorted((e.method, e.path) for e in answered) == tag_heads(release.images), entries


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_wrong_password_exits_3_without_showing_it(auth: str, registry_factory: RegistryFactory,
                                                   bundles: Bundles, env: dict[str, str]) -> None:
    server = registry_factory(auth=auth)
    secret = "not-the-Pa55word-7c1e"
    mark = server.mark()
    run = push_images(bundles.get("zstd"), mirror_of(server.host), env=env,
                      login=("--username", "alice", "--password", secret))
    assert run.code == 3, run.output
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("bmsync: error: "), run.stderr
    assert "rejected the credentials of user 'alice'" in run.stderr
    assert secret not in run.output
    assert not writes(server.since(mark))
    # Not even the request log at -vv shows it.
    run = push_images(bundles.get("zstd"), mirror_of(server.host), "-vv", env=env,
                      login=("--username", "alice", "--password", secret))
    assert run.code == 3 and secret not in run.output


def test_missing_credentials_without_a_terminal(basic_registry: RegistryServer,
                                                bundles: Bundles, env: dict[str, str]) -> None:
    mark = basic_registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(basic_registry.host), env=env, login=())
    assert run.code == 2, run.output
    for flag in ("--username", "--password-stdin", "$BMSYNC_PASSWORD", "--docker-config",
                 "--need-credential=false"):
        assert flag in run.stderr, flag
    # A user without a password, no terminal to ask on.
    run = push_images(bundles.get("zstd"), mirror_of(basic_registry.host), env=env,
                      login=("--username", "alice"))
    assert run.code == 2, run.output
    assert "password for alice" in run.stderr and "--password-stdin" in run.stderr
    assert basic_registry.since(mark) == []
    # --need-credential=false against a mirror that wants a login: refused, clearly.
    run = push_images(bundles.get("zstd"), mirror_of(basic_registry.host), env=env)
    assert run.code == 3, run.output
    assert "requires credentials and none were given" in run.stderr
    assert not writes(basic_registry.since(mark))


def test_tls_mirror_with_cacert(tls_registry: RegistryServer, bundles: Bundles,
                                release: Release, env: dict[str, str]) -> None:
    assert tls_registry.pki is not None
    mirror = f"{tls_registry.host}/{NS}"  # no scheme: https
    mark = tls_registry.mark()
    run = push_images(bundles.get("zstd"), mirror, env=env,
                      login=(*NO_LOGIN, "--cacert", str(tls_registry.ca_cert)))
    assert run.code == 0, run.output
    assert_publish_order(tls_registry.since(mark), release.images)
    assert_mirror_holds(tls_registry.host, release.images, cert_dir=tls_registry.pki.cert_dir)


def test_tls_mirror_through_connect_proxy(tls_registry: RegistryServer, bundles: Bundles,
                                          release: Release, env: dict[str, str],
                                          forward_proxy: Callable[..., ForwardProxy]) -> None:
    assert tls_registry.pki is not None
    proxy = forward_proxy()
    env = {**env, "HTTPS_PROXY": proxy.url}
    # The cluster-config form of a mirror address is accepted as is.
    mirror = f"https://{tls_registry.host}/v2/{NS}"
    mark = tls_registry.mark()
    run = push_images(bundles.get("zstd"), mirror, env=env,
                      login=(*NO_LOGIN, "--cacert", str(tls_registry.ca_cert)))
    assert run.code == 0, run.output
    proxy.wait_idle()
    assert proxy.records and all(
        r.method == "CONNECT" and r.target == tls_registry.host and r.status == 200
        for r in proxy.records
    ), proxy.records
    # The blobs went up the tunnels (TLS framing adds to them).
    assert sum(r.bytes_up for r in proxy.records) > release.blob_bytes
    assert_publish_order(tls_registry.since(mark), release.images)
    assert_mirror_holds(tls_registry.host, release.images, cert_dir=tls_registry.pki.cert_dir)

    # The proxy does not terminate TLS: without the CA the mirror is refused end to end.
    proxy.clear()
    mark = tls_registry.mark()
    run = push_images(bundles.get("zstd"), mirror, env=env)
    assert run.code == 4, run.output
    assert "not trusted" in run.stderr and "--cacert" in run.stderr
    assert proxy.tunnels and tls_registry.since(mark) == []


# -- crash, faults, mounts ------------------------------------------------------------------


def test_registry_killed_mid_push_then_rerun_uploads_only_the_rest(
    registry: RegistryServer, bundles: Bundles, release: Release, env: dict[str, str],
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    proxy = fault_proxy(registry)
    # The proxy holds the first upload into nautilus; etcd and rbac need none of its
    # blobs, so they finish meanwhile, and then the registry dies under the held upload.
    hold = proxy.add_rule(Delay(2.0), method="PATCH", path=r"/nautilus/blobs/uploads/")
    args = ["push", "images", f"--source={bundles.get('zstd')}",
            f"--private-registry={mirror_of(proxy.host)}", *NO_LOGIN]
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    finished = {(f"{NS}/{ref.rsplit(':', 1)[0]}", ref.rsplit(":", 1)[1])
                for ref in (ETCD, RBAC)}
    mark = registry.mark()
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], env={**full_env, **env}, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while hold.hits == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hold.hits == 1, "the upload to hold never came"
        deadline = time.monotonic() + 1.5  # well inside the hold
        while not finished <= made_present(registry.since(mark)).keys():
            assert time.monotonic() < deadline, "etcd and rbac did not finish during the hold"
            time.sleep(0.02)
        registry.kill()
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 5, out + err
    assert f"{NS}/{NAUTILUS}" in err
    assert "3 images: 2 pushed, 0 already present, 0 retagged, 1 failed" in out
    done_before = commits(registry.access_log(mark, sync=False))
    assert done_before, "nothing was committed before the kill"

    registry.restart()
    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(proxy.host), env=env)
    assert run.code == 0, run.output
    assert "3 images: 1 pushed, 2 already present" in run.stdout
    done_now = commits(registry.since(mark))
    # Only what the first run did not commit moved, and each of those once.
    assert done_now, "the held upload was never redone"
    assert not set(done_now) & set(done_before)
    assert sorted(done_before + done_now) == sorted(release.blobs)
    assert_mirror_holds(registry.host, release.images, children=True)


FAULTS: dict[str, Action] = {"429": rate_limit(1), "reset": Reset()}


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_blob_upload_survives_a_fault(fault: str, method: str, registry: RegistryServer,
                                      bundles: Bundles, release: Release, env: dict[str, str],
                                      fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(registry)
    rule = proxy.add_rule(FAULTS[fault], method=method, path=r"/blobs/uploads/")
    mark = registry.mark()
    started = time.monotonic()
    run = push_images(bundles.get("zstd"), mirror_of(proxy.host), env=env)
    elapsed = time.monotonic() - started
    assert run.code == 0, run.output
    assert rule.hits == 1
    if fault == "429":
        assert elapsed >= 1.0, "Retry-After: 1 was not honoured"
    entries = registry.since(mark)
    assert sorted(commits(entries)) == sorted(release.blobs)
    assert_publish_order(entries, release.images)
    assert_mirror_holds(registry.host, release.images)


def test_mirror_that_refuses_mounts_gets_uploads(registry: RegistryServer, bundles: Bundles,
                                                 release: Release, env: dict[str, str],
                                                 fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(registry)
    # What a registry that declines a mount answers: 202, and no blob mounted.
    refuse = proxy.add_rule(Respond(202), method="POST", path=r"/blobs/uploads/$",
                            query=r"(^|&)mount=", times=100)
    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(proxy.host), "--json", env=env)
    assert run.code == 0, run.output
    assert refuse.hits == 2  # the base layer, into etcd and into nautilus
    assert not any("mount" in parse_qs(r.query) for r in proxy.requests if r.status != 202)
    entries = registry.since(mark)
    # The base went up into each of the three repositories instead.
    assert sorted(commits(entries)) == sorted([*release.blobs, *[release.base.digest] * 2])
    assert mounts(entries) == []
    [m] = run.json()["mirrors"]
    assert m["summary"]["blobsMounted"] == 0
    assert m["summary"]["blobsUploaded"] == len(release.blobs) + 2
    assert_publish_order(entries, release.images)
    assert_mirror_holds(registry.host, release.images)


# -- what is refused, and what is only planned ----------------------------------------------


def test_delta_whose_base_is_absent_pushes_nothing(registry: RegistryServer, bundles: Bundles,
                                                   env: dict[str, str]) -> None:
    mark = registry.mark()
    run = push_images(bundles.get("delta"), mirror_of(registry.host), env=env)
    assert run.code == 5, run.output
    assert f"leaves to its base bundle {VERSION}" in run.stderr, run.stderr
    assert "nothing was pushed" in run.stderr and f"push bundle {VERSION} first" in run.stderr
    assert writes(registry.since(mark)) == []


def test_delta_asks_about_each_blob_once(registry: RegistryServer, bundles: Bundles,
                                         release: Release, env: dict[str, str]) -> None:
    """The base check's answers serve the push: no blob is asked about (HEAD) twice in
    one repository, and the new image lands at its upstream digest."""
    assert push_images(bundles.get("zstd"), mirror_of(registry.host), env=env).code == 0
    mark = registry.mark()
    run = push_images(bundles.get("delta"), mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    heads = [e.path for e in registry.since(mark) if e.method == "HEAD" and "/blobs/" in e.path]
    assert f"/v2/{NS}/{RBAC_NEXT.split(':')[0]}/blobs/{release.base.digest}" in heads
    assert len(heads) == len(set(heads)), sorted(heads)
    assert_mirror_holds(registry.host, {RBAC_NEXT: release.next_image})


def test_delta_blob_held_by_another_repository_is_mounted(
        registry: RegistryServer, bundles: Bundles, release: Release, env: dict[str, str],
        tmp: Path) -> None:
    """A delta adds an image in a repository the mirror does not have yet; the base layer
    it leaves out is in the mirror, but only in other repositories: it is mounted from
    one of them (never uploaded: the archive does not hold it), then the image's own
    blobs are uploaded and the image reads back at its upstream digest."""
    assert push_images(bundles.get("zstd"), mirror_of(registry.host), env=env).code == 0
    f = ImageFactory(seed="bmsync-tests:test_push:new-repo")
    own = f.layer(120_000)
    newcomer = f.image([release.base, own], media="oci")
    ref = "anthos-baremetal-release/node-exporter:v1.0.0"
    push_upstream(release.upstream.url, ref.split(":")[0], "v1.0.0", newcomer)
    config = bundles.config("new-repo", [ETCD, ref], "1.2")
    out = bundles.build(tmp / "new-repo", config, "--base", str(bundles.get("zstd")))
    manifest = json.loads((out / "bmpackages_1.2.bundle.json").read_text())
    assert not manifest["blobs"][release.base.digest]["inArchive"]

    mark = registry.mark()
    run = push_images(out / "bmpackages_1.2.tar.zst", mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    entries = registry.since(mark)
    assert mounts(entries) == [release.base.digest]
    assert sorted(commits(entries)) == sorted([own.digest, newcomer.config_digest])
    assert_mirror_holds(registry.host, {ETCD: release.images[ETCD], ref: newcomer})


def test_dry_run_pushes_nothing(registry: RegistryServer, bundles: Bundles, release: Release,
                                env: dict[str, str]) -> None:
    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), "--dry-run", "--json",
                      env=env)
    assert run.code == 0, run.output
    [m] = run.json()["mirrors"]
    assert m["dryRun"] is True
    assert {i["status"] for i in m["images"]} == {"planned"}
    assert writes(registry.since(mark)) == []
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), "--dry-run",
                      env=env)
    assert run.code == 0 and "3 would push" in run.stdout, run.output
    assert writes(registry.since(mark)) == []


def test_two_mirrors_get_everything(registry_factory: RegistryFactory, bundles: Bundles,
                                    release: Release, env: dict[str, str]) -> None:
    one, two = registry_factory(), registry_factory()
    marks = one.mark(), two.mark()
    run = push_images(bundles.get("zstd"), [mirror_of(one.host), mirror_of(two.host)], env=env)
    assert run.code == 0, run.output
    for server, mark in zip((one, two), marks, strict=True):
        entries = server.since(mark)
        assert sorted(commits(entries)) == sorted(release.blobs)
        assert_publish_order(entries, release.images)
        assert_mirror_holds(server.host, release.images)


def test_moved_tag_refused_with_no_overwrite_else_retagged(
    registry: RegistryServer, bundles: Bundles, release: Release, env: dict[str, str],
    image_factory: ImageFactory, tmp: Path,
) -> None:
    assert push_images(bundles.get("zstd"), mirror_of(registry.host), env=env).code == 0
    assert_mirror_holds(registry.host, release.images)
    name, tag = RBAC.rsplit(":", 1)
    other = image_factory.image([image_factory.layer(2000)])
    push_upstream(registry.url, f"{NS}/{name}", tag, other)
    target = f"{registry.host}/{NS}/{RBAC}"
    report = tmp / "refused.json"

    mark = registry.mark()
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), "--no-overwrite",
                      "--report", str(report), env=env)
    assert run.code == 2, run.output
    assert target in run.stderr and other.digest in run.stderr, run.stderr
    assert "--no-overwrite" in run.stderr
    assert not [e for e in registry.since(mark) if e.method in WRITES and name in e.path]
    [m] = json.loads(report.read_text())["mirrors"]
    assert {i["target"]: i["status"] for i in m["images"]} == {
        f"{registry.host}/{NS}/{ref}": "failed" if ref == RBAC else "present"
        for ref in release.images
    }
    assert_mirror_holds(registry.host, {RBAC: other})

    run = push_images(bundles.get("zstd"), mirror_of(registry.host), "--json",
                      env=env)
    assert run.code == 0, run.output
    [m] = run.json()["mirrors"]
    [moved] = [i for i in m["images"] if i["target"] == target]
    assert moved["status"] == "retagged"
    assert (moved["oldDigest"], moved["digest"]) == (other.digest, release.images[RBAC].digest)
    assert m["summary"]["retagged"] == 1
    assert_mirror_holds(registry.host, release.images)
    # The text report says the same: old -> new.
    push_upstream(registry.url, f"{NS}/{name}", tag, other)
    run = push_images(bundles.get("zstd"), mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    assert f"{release.images[RBAC].digest}  retagged (was {other.digest})" in run.stdout


def test_mirror_without_digest_headers_still_pushes_once_and_refuses_moved_tags(
    registry: RegistryServer, bundles: Bundles, release: Release, env: dict[str, str],
    image_factory: ImageFactory, fault_proxy: Callable[..., FaultProxy],
) -> None:
    """A mirror whose HEAD answers carry no Docker-Content-Digest: the tag's digest comes
    from a GET (hashed), so a warm push writes nothing and --no-overwrite still holds."""
    from tests.harness.faultproxy import respond

    assert push_images(bundles.get("zstd"), mirror_of(registry.host), env=env).code == 0
    proxy = fault_proxy(registry)
    oci = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    proxy.add_rule(respond(200, b"", oci), method="HEAD", path=r"/manifests/", times=10_000)

    mark = registry.mark()
    warm = push_images(bundles.get("zstd"), mirror_of(proxy.host), env=env)
    assert warm.code == 0, warm.output
    assert [e for e in registry.since(mark) if e.method in WRITES] == []

    name, tag = RBAC.rsplit(":", 1)
    other = image_factory.image([image_factory.layer(2000)])
    push_upstream(registry.url, f"{NS}/{name}", tag, other)
    mark = registry.mark()
    refused = push_images(bundles.get("zstd"), mirror_of(proxy.host), "--no-overwrite",
                          env=env)
    assert refused.code == 2, refused.output
    assert other.digest in refused.stderr and "--no-overwrite" in refused.stderr
    assert not [e for e in registry.since(mark) if e.method in WRITES and name in e.path]


def test_tampered_blob_never_yields_a_manifest(registry: RegistryServer, bundles: Bundles,
                                               release: Release, env: dict[str, str],
                                               tmp: Path) -> None:
    # Flip bytes inside rbac's own layer in a copy of the uncompressed archive (a stream:
    # no seek table), beside its now stale .sha256 sidecar. Only the blob's digest can
    # catch it, and it must before anything that names the blob is committed.
    rbac = release.images[RBAC]
    assert isinstance(rbac, Image)
    bad_layer = rbac.layers[-1]
    data = bytearray(bundles.get("none").read_bytes())
    at = data.find(bad_layer.data)
    assert at > 0 and data.find(bad_layer.data, at + 1) == -1
    middle = at + len(bad_layer.data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    archive = tmp / bundles.get("none").name
    archive.write_bytes(bytes(data))
    sidecar = bundles.get("none").with_name(archive.name + ".sha256")
    (tmp / sidecar.name).write_bytes(sidecar.read_bytes())  # stale now
    report = tmp / "report.json"

    mark = registry.mark()
    run = push_images(archive, mirror_of(registry.host), "--report", str(report),
                      env=env)
    assert run.code == 6, run.output
    assert bad_layer.digest in run.stderr, run.stderr
    entries = registry.since(mark)
    name = RBAC.rsplit(":", 1)[0]
    assert not [e for e in entries
                if e.method == "PUT" and e.path.startswith(f"/v2/{NS}/{name}/manifests/")]
    assert bad_layer.digest not in commits(entries)
    assert not registry.has_blob(bad_layer.digest)
    assert report.exists(), "--report was not written when the push stopped on a bad blob"
    assert bad_layer.digest in report.read_text()
    # Only the image that needs the bad blob fails: the others are pushed and tagged.
    statuses = {i["source"]: i["status"]
                for i in json.loads(report.read_text())["mirrors"][0]["images"]}
    assert statuses.pop(f"gcr.io/{RBAC}") == "failed"
    assert set(statuses.values()) == {"pushed"}, statuses
    others = {ref: art for ref, art in release.images.items() if ref != RBAC}
    assert_mirror_holds(registry.host, others)


def test_stream_cut_short_tags_only_complete_images(registry: RegistryServer, bundles: Bundles,
                                                    release: Release, env: dict[str, str],
                                                    tmp: Path) -> None:
    """A truncated stream: images whose members all came before the cut get their tags,
    the others fail naming the truncation; nothing is tagged on a partial image."""
    whole = bundles.get("none").read_bytes()
    manifest = json.loads(whole[512:whole.index(b"\n}\n") + 3])
    # Cut in the middle of the last blob member (the top manifest of the last image).
    last, entry = max(manifest["blobs"].items(), key=lambda kv: kv[1].get("offset", -1))
    at = whole.find(b"blobs/sha256/" + last.split(":")[1].encode())  # its tar header
    assert at > 0 and at % 512 == 0
    archive = tmp / bundles.get("none").name
    archive.write_bytes(whole[:at + 512 + entry["size"] // 2])
    report = tmp / "report.json"
    mark = registry.mark()
    run = push_images(archive, mirror_of(registry.host), "--report", str(report), env=env)
    assert run.code != 0, run.output
    assert "truncated" in run.output, run.output
    assert report.exists(), run.output
    images = json.loads(report.read_text())["mirrors"][0]["images"]
    failed = [i for i in images if i["status"] == "failed"]
    pushed = [i for i in images if i["status"] == "pushed"]
    assert failed and pushed, images
    assert all(last in json.dumps(manifest["images"][[m["source"] for m in manifest["images"]]
                                                     .index(i["source"])]) for i in failed)
    tags = [e.path for e in registry.since(mark)
            if e.method == "PUT" and "/manifests/" in e.path and "sha256:" not in e.path]
    assert len(tags) == len(pushed)


def test_colliding_sources_named_before_any_request(registry_factory: RegistryFactory,
                                                    image_factory: ImageFactory,
                                                    env: dict[str, str], tmp: Path) -> None:
    gcr, quay, mirror = registry_factory(), registry_factory(), registry_factory()
    push_upstream(gcr.url, "x/y", "1", image_factory.image())
    push_upstream(quay.url, "x/y", "1", image_factory.image())
    config = write_images_config(
        tmp / "images.yaml", ["gcr.io/x/y:1", "quay.io/x/y:1"],
        registries={"gcr.io": {"endpoint": gcr.url}, "quay.io": {"endpoint": quay.url}},
        release="2.0",
    )
    run = bmsync("bundle", "build", "--config", str(config), "--store", str(tmp / "store"),
                 "--out", str(tmp / "out"), env=env)
    assert run.code == 0, run.output
    mark = mirror.mark()
    run = push_images(tmp / "out" / "bmpackages_2.0.tar.zst", mirror_of(mirror.host), env=env)
    assert run.code == 2, run.output
    assert "gcr.io/x/y:1" in run.stderr and "quay.io/x/y:1" in run.stderr
    assert f"{mirror.host}/{NS}/x/y:1" in run.stderr
    assert mirror.since(mark) == []


# -- every kind of source ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xz", "none", "split", "layout"])
def test_streaming_and_layout_sources(kind: str, registry: RegistryServer, bundles: Bundles,
                                      release: Release, env: dict[str, str]) -> None:
    mark = registry.mark()
    run = push_images(bundles.get(kind), mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    entries = registry.since(mark)
    assert sorted(commits(entries)) == sorted(release.blobs)
    assert_publish_order(entries, release.images)
    assert_mirror_holds(registry.host, release.images, children=kind == "xz")


# -- inventory and a delta against it -----------------------------------------------------------


def test_inventory_then_delta_against_it(registry: RegistryServer, bundles: Bundles,
                                         release: Release, env: dict[str, str],
                                         image_factory: ImageFactory, tmp: Path) -> None:
    assert push_images(bundles.get("zstd"), mirror_of(registry.host), env=env).code == 0
    assert_mirror_holds(registry.host, release.images)
    # Something else under the namespace, and something outside it.
    extra = image_factory.image()
    push_upstream(registry.url, f"{NS}/tools/debug", "1", extra)
    push_upstream(registry.url, "elsewhere/app", "1", image_factory.image())
    repos = {f"{NS}/{ref.rsplit(':', 1)[0]}" for ref in release.images}

    everything = tmp / "everything.json"
    run = run_bmsync("inventory", f"--private-registry={mirror_of(registry.host)}",
                     "--out", str(everything), *NO_LOGIN, env=env)
    assert run.code == 0, run.output
    doc = json.loads(everything.read_text())
    assert doc["repositories"] == sorted(repos | {f"{NS}/tools/debug"})
    assert set(doc["digests"]) == release.digests | {extra.digest, *extra.blobs}

    inventory = tmp / "inventory.json"
    run = run_bmsync("inventory", f"--private-registry={mirror_of(registry.host)}",
                     f"--source={bundles.get('zstd')}", "--out", str(inventory), *NO_LOGIN,
                     env=env)
    assert run.code == 0, run.output
    doc = json.loads(inventory.read_text())
    assert doc["repositories"] == sorted(repos)
    assert set(doc["digests"]) == release.digests

    # A delta for this site carries only what its mirror lacks.
    config = bundles.config("site", [ETCD, NAUTILUS, RBAC_NEXT], "1.1")
    out = bundles.build(tmp / "delta", config, "--base", str(inventory))
    manifest = json.loads((out / "bmpackages_1.1.bundle.json").read_text())
    assert manifest["base"]["kind"] == "inventory"
    nxt = release.next_image
    assert {d for d, b in manifest["blobs"].items() if b["inArchive"]} == {
        release.next_layer.digest, nxt.config_digest, nxt.digest
    }
    mark = registry.mark()
    run = push_images(out / "bmpackages_1.1.tar.zst", mirror_of(registry.host), env=env)
    assert run.code == 0, run.output
    assert sorted(commits(registry.since(mark))) == sorted([release.next_layer.digest,
                                                            nxt.config_digest])
    assert_mirror_holds(registry.host, {**release.images, RBAC_NEXT: nxt})



def test_prompts_for_credentials_on_a_terminal(basic_registry: RegistryServer, bundles: Bundles,
                                               release: Release, env: dict[str, str]) -> None:
    """On a terminal, a username prompt and a hidden password prompt (no echo)."""
    import pty
    import select

    user, password = basic_registry.auth or ("", "")
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full_env.update(env)
    pid, fd = pty.fork()
    if pid == 0:  # the child: bmsync on the terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "pipeline.cli", "push", "images",
                                   f"--source={bundles.get('zstd')}",
                                   f"--private-registry={mirror_of(basic_registry.host)}"],
                  full_env)
    screen = b""

    def read_until(marker: bytes, deadline: float = 30) -> None:
        nonlocal screen
        end = time.monotonic() + deadline
        while marker not in screen:
            assert time.monotonic() < end, screen.decode(errors="replace")
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"Username for")
    os.write(fd, user.encode() + b"\n")
    read_until(b"Password for")
    typed_at = len(screen)
    os.write(fd, password.encode() + b"\n")
    read_until(b"image")
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, screen.decode(errors="replace")
    assert password.encode() not in screen[typed_at:], "the password was echoed"
    assert password.encode() not in screen
    assert_mirror_holds(basic_registry.host, release.images, creds=(user, password))
