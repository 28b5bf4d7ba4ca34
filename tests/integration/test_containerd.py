"""`bmsync containerd config` proven with a real containerd, skopeo and a namespaced mirror.

A release (one OCI image, one multi-arch index) is pushed upstream by the harness,
bundled and pushed by the CLI into a TLS mirror with Basic auth under
``test-namespace``. The generated files are then used by tools that are not bmsync:
``ctr`` pulls ``gcr.io/...`` through the generated ``certs.d`` with no other network,
containerd loads each generated ``config.toml`` form with its CRI plugin ``ok``, and
skopeo resolves ``gcr.io/...`` through the generated ``registries.conf``. The mirror's
access log is the witness that the pulls went to the namespace.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.cli import ROOT, Run, bmsync, write_images_config
from tests.conftest import USERS
from tests.harness.containerd import ContainerdServer
from tests.harness.images import Artifact, ImageFactory
from tests.harness.images import push as push_upstream
from tests.harness.pki import TestPKI
from tests.harness.registry import RegistryServer, start_registry
from tests.harness.skopeo import run_skopeo

NS = "test-namespace"
RBAC = "anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0"
NAUTILUS = "kubernetes-e2e-test-images/nautilus:1.0"
USER, PASSWORD = next(iter(USERS.items()))

def containerd_config(*args: str, stdin: str | None = None) -> Run:
    """``bmsync containerd config ARGS`` in a subprocess, no terminal."""
    return bmsync("containerd", "config", *args, stdin=stdin, timeout=60)


@dataclass(frozen=True)
class Site:
    mirror: RegistryServer
    images: dict[str, Artifact]
    pki: TestPKI
    root: Path

    @property
    def mirror_url(self) -> str:
        return f"https://{self.mirror.host}/{NS}"

    def generate(self, out: Path, *extra: str) -> Run:
        run = containerd_config(
            f"--private-registry={self.mirror_url}", "--cacert", str(self.pki.ca_cert),
            "--username", USER, "--password-stdin", "--hosts", "quay.io", "--out", str(out),
            *extra, stdin=PASSWORD + "\n",
        )
        assert run.code == 0, run.output
        assert PASSWORD not in run.output
        return run


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("containerd-site")
    upstream = start_registry(root / "upstream")
    mirror: RegistryServer | None = None
    try:
        f = ImageFactory(seed="bmsync-tests:test_containerd")
        base = f.layer(50_000)
        images: dict[str, Artifact] = {
            RBAC: f.image([base, f.layer(40_000)], media="oci"),
            NAUTILUS: f.multiarch(base=[base], layer_size=30_000, media="oci"),
        }
        for ref, artifact in images.items():
            repo, tag = ref.split(":")
            push_upstream(upstream.url, repo, tag, artifact)
        config = write_images_config(
            root / "images.yaml", [f"gcr.io/{r}" for r in images],
            registries={"gcr.io": {"endpoint": upstream.url}}, release="1.0.0",
        )
        env = {"DOCKER_CONFIG": str(root / "no-docker-config")}
        built = bmsync("bundle", "build", "--config", str(config), "--store",
                       str(root / "store"), "--out", str(root / "bundle"), env=env)
        assert built.code == 0, built.output
        archive = root / "bundle" / "bmpackages_1.0.0.tar.zst"
        mirror = start_registry(root / "mirror", auth="basic", users=USERS, tls=pki)
        pushed = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "push", "images", f"--source={archive}",
             f"--private-registry=https://{mirror.host}/{NS}", "--cacert", str(pki.ca_cert),
             "--username", USER, "--password-stdin"],
            input=PASSWORD + "\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, **env},
        )
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        yield Site(mirror, images, pki, root)
    finally:
        upstream.close()
        if mirror is not None:
            mirror.close()


def manifest_gets(mirror: RegistryServer, since: int, ref: str) -> list[str]:
    """Paths of the successful manifest GETs for ``ref``'s repository since ``since``."""
    repo = ref.split(":")[0]
    return [
        str(e) for e in mirror.since(since)
        if e.method == "GET" and e.status == 200
        and e.path.startswith(f"/v2/{NS}/{repo}/manifests/")
    ]


def images_ls(node: ContainerdServer) -> dict[str, str]:
    """``ctr -n k8s.io images ls``: REF -> DIGEST."""
    lines = node.ctr("images", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in lines if line.strip()}


def test_ctr_pulls_gcr_images_from_the_namespaced_mirror(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = site.generate(out)
    hosts_toml = out / "certs.d" / "gcr.io" / "hosts.toml"
    assert str(hosts_toml) in run.stdout
    # The same pull must work when the mirror is also the server (no public fallback).
    strict = tmp_path / "strict"
    site.generate(strict, "--no-fallback", "--format", "hosts")
    assert tomllib.loads((strict / "certs.d/gcr.io/hosts.toml").read_text())["server"] == (
        f"https://{site.mirror.host}/v2/{NS}")

    with ContainerdServer(tmp_path / "node") as node:
        for ref, certs_d, flags in (
            (RBAC, out / "certs.d", ()),
            (NAUTILUS, strict / "certs.d", ("--all-platforms",)),
        ):
            mark = site.mirror.mark()
            node.ctr("images", "pull", "--snapshotter", "native", *flags,
                     "--user", f"{USER}:{PASSWORD}", "--hosts-dir", str(certs_d),
                     f"gcr.io/{ref}", timeout=120)
            gets = manifest_gets(site.mirror, mark, ref)
            assert gets, f"no manifest GET under /v2/{NS}/ for {ref}: {site.mirror.since(mark)}"
            assert all("ns=gcr.io" in g for g in gets), gets
        listed = images_ls(node)
    for ref, artifact in site.images.items():
        assert listed.get(f"gcr.io/{ref}") == artifact.digest, listed


@pytest.mark.parametrize("form", ["config.toml", "config-legacy.toml"])
def test_each_generated_config_form_keeps_the_cri_plugin(
    site: Site, tmp_path: Path, form: str
) -> None:
    out = tmp_path / "out"
    site.generate(out, "--gcr-key", str(_gcr_key(tmp_path)))
    generated = (out / form).read_text()
    assert (out / form).stat().st_mode & 0o777 == 0o600
    registry = tomllib.loads(generated)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert ("config_path" in registry) != ("mirrors" in registry)
    with ContainerdServer(tmp_path / "node", extra_config=_merge_part(generated)) as node:
        assert node.plugin_status("io.containerd.grpc.v1", "cri") == "ok", node.log_tail()


def test_mixing_both_forms_is_what_breaks_the_cri_plugin(site: Site, tmp_path: Path) -> None:
    """The control: the check above would notice a file holding both forms."""
    out = tmp_path / "out"
    site.generate(out, "--format", "config-toml")
    site.generate(out, "--format", "config-toml-legacy")
    legacy_mirrors = [t for t in _tables((out / "config-legacy.toml").read_text())
                      if ".registry.mirrors." in t.splitlines()[0]]
    assert legacy_mirrors
    both = _merge_part((out / "config.toml").read_text()) + "\n".join(legacy_mirrors)
    with ContainerdServer(tmp_path / "node", extra_config=both) as node:
        assert node.plugin_status("io.containerd.grpc.v1", "cri") == "error"


def test_skopeo_reads_the_generated_registries_conf(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    site.generate(out)
    mark = site.mirror.mark()
    # skopeo gives --creds to the public host only; a mirror's login comes from the
    # auth file, here the docker config written for the cluster config.
    raw = run_skopeo(
        "--registries-conf", str(out / "registries.conf"), "inspect", "--raw",
        f"--authfile={out / 'pull-credential-config.json'}", f"--cert-dir={site.pki.cert_dir}",
        f"docker://gcr.io/{RBAC}",
    )
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == site.images[RBAC].digest
    assert manifest_gets(site.mirror, mark, RBAC), site.mirror.since(mark)


def test_cluster_config_round_trips_and_reports_changes(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    site.generate(out)
    cluster = yaml.safe_load((out / "cluster-config.yaml").read_text())
    [entry] = cluster["registryMirrors"]
    assert entry["endpoint"] == f"https://{site.mirror.host}/v2/{NS}"
    assert entry["hosts"] == ["quay.io"]
    # The operator's file: a cluster document first, the mirrors in a later one.
    doc = tmp_path / "cluster.yaml"
    doc.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: cluster-x}\n---\n"
                   + yaml.safe_dump(cluster))
    again = containerd_config("--from-cluster-config", str(doc), "--out", str(out))
    assert again.code == 0, again.output
    assert "0 files written" in again.stdout, again.stdout

    entry["endpoint"] = f"https://{site.mirror.host}/v2/other-namespace"
    doc.write_text(yaml.safe_dump(cluster))
    changed = containerd_config("--from-cluster-config", str(doc), "--out", str(out))
    assert changed.code == 0, changed.output
    assert f"changed   {out / 'certs.d/gcr.io/hosts.toml'}" in changed.stdout
    assert f'+ [host."https://{site.mirror.host}/v2/other-namespace"]' in changed.stdout
    assert f'- [host."https://{site.mirror.host}/v2/{NS}"]' in changed.stdout
    assert PASSWORD not in changed.output
    # The login came back from the pullCredentialConfigPath the first run wrote.
    auth = tomllib.loads((out / "config.toml").read_text())["plugins"][
        "io.containerd.grpc.v1.cri"]["registry"]["configs"][site.mirror.host]["auth"]
    assert auth == {"username": USER, "password": PASSWORD}


def test_cli_prints_files_with_secrets_redacted(pki: TestPKI, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = containerd_config("--private-registry=https://10.0.0.5:5000/ns", "--cacert",
                            str(pki.ca_cert), "--username", USER, "--password-stdin",
                            "--out", str(out), "--print", stdin=PASSWORD + "\n")
    assert run.code == 0, run.output
    assert PASSWORD not in run.output
    assert 'password = "<redacted>"' in run.stdout
    assert f"new       {out / 'config.toml'}" in run.stdout
    assert PASSWORD in (out / "config.toml").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--private-registry=ftp://10.0.0.5:5000/ns",), "unsupported scheme 'ftp'"),
        (("--private-registry=https://10.0.0.5:5000/Bad!",), "namespace"),
        (("--private-registry=https://10.0.0.5:5000/ns", "--cacert", "/nonexistent/ca.crt"),
         "CA file /nonexistent/ca.crt does not exist"),
        (("--private-registry=https://10.0.0.5:5000/ns", "--hosts", "quay.io,quay.io"),
         "host quay.io is listed twice"),
    ],
)
def test_cli_bad_input_writes_nothing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "out"
    run = containerd_config(*args, "--out", str(out))
    assert run.code == 2, run.output
    assert message in run.stderr
    assert run.stderr.startswith("bmsync: error: ")
    assert not out.exists()


def _merge_part(generated: str) -> str:
    """A generated config.toml without its ``version`` line, to append to a node's."""
    return "\n".join(line for line in generated.splitlines() if line != "version = 2") + "\n"


def _gcr_key(directory: Path) -> Path:
    key = directory / "gcr-key.json"
    key.write_text('{"type": "service_account", "client_email": "sync@example.iam",\n'
                   ' "private_key": "-----BEGIN PRIVATE KEY-----\\nabc\\n"}\n')
    return key



def _tables(text: str) -> list[str]:
    """The ``[table]`` sections of a TOML text, each with its header line."""
    tables: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("["):
            tables.append([line])
        elif tables:
            tables[-1].append(line)
    return ["\n".join(t) + "\n" for t in tables]
