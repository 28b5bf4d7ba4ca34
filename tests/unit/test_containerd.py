"""Generation of containerd, CRI-O and cluster config: outputs parsed back, bad input refused."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.containerd import (
    FORMATS,
    MirrorEndpoint,
    MirrorSettings,
    config_toml,
    config_toml_legacy,
    hosts_toml,
    read_cluster_config,
    redact,
    registries_conf,
    settings,
    write_config,
)
from pipeline.errors import BmsyncError, ConfigError, UsageError
from pipeline.reference import parse_mirror
from pipeline.registry.credentials import Credential

CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBdzCCAR2gAwIBAgIUD0Vx4Zf2mF7m7p7r5l1D8b8n3TAwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGdGVzdGNhMB4XDTI0MDEwMTAwMDAwMFoXDTM0MDEwMTAwMDAw
MFowETEPMA0GA1UEAwwGdGVzdGNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
-----END CERTIFICATE-----
"""
SECRET = 'p@ss"wo\\rd'
INSTALL = Path("/etc/containerd")
CRI = "io.containerd.grpc.v1.cri"


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text(CA_PEM)
    return path


def make(mirrors: list[str], ca: Path | None = None, *, hosts: tuple[str, ...] = (),
         login: bool = False, no_fallback: bool = False) -> MirrorSettings:
    credential = Credential("alice", SECRET) if login else None
    endpoints = [
        MirrorEndpoint(m, ca if m.scheme == "https" else None, credential)
        for m in map(parse_mirror, mirrors)
    ]
    return settings(endpoints, hosts=hosts, no_fallback=no_fallback)


def registry(text: str) -> dict[str, Any]:
    section: dict[str, Any] = tomllib.loads(text)["plugins"][CRI]["registry"]
    return section


@pytest.mark.parametrize(
    ("mirror", "url", "override"),
    [
        ("https://10.0.0.5:5000/test-namespace", "https://10.0.0.5:5000/v2/test-namespace", True),
        ("https://10.0.0.5:5000/v2/test-namespace", "https://10.0.0.5:5000/v2/test-namespace",
         True),
        ("10.0.0.5:5000/a/b", "https://10.0.0.5:5000/v2/a/b", True),
        ("https://10.0.0.5:5000", "https://10.0.0.5:5000", False),
        ("http://127.0.0.1:5000/ns", "http://127.0.0.1:5000/v2/ns", True),
    ],
)
def test_hosts_toml_mirror_url_and_override_path(
    ca: Path, mirror: str, url: str, override: bool
) -> None:
    s = make([mirror], ca)
    doc = tomllib.loads(hosts_toml(s, "gcr.io", install_dir=INSTALL))
    assert doc["server"] == "https://gcr.io"
    [(key, host)] = doc["host"].items()
    assert key == url
    assert host["capabilities"] == ["pull", "resolve"]
    assert host.get("override_path", False) is override
    if url.startswith("https"):
        copy = s.endpoints[0].mirror.host.replace(":", "_") + ".crt"
        assert host["ca"] == f"/etc/containerd/certs.d/gcr.io/{copy}"
    else:
        assert "ca" not in host


def test_several_mirrors_keep_their_order_everywhere(ca: Path) -> None:
    mirrors = ["https://a.example:5000/ns", "http://b.example:5001", "https://c.example/x"]
    s = make(mirrors, ca, hosts=("quay.io",))
    urls = ["https://a.example:5000/v2/ns", "http://b.example:5001", "https://c.example/v2/x"]
    assert s.hosts == ("gcr.io", "quay.io")
    for host in s.hosts:
        assert list(tomllib.loads(hosts_toml(s, host, install_dir=INSTALL))["host"]) == urls
    legacy = registry(config_toml_legacy(s, install_dir=INSTALL))
    assert legacy["mirrors"]["gcr.io"]["endpoint"] == urls
    assert legacy["mirrors"]["quay.io"]["endpoint"] == urls
    conf = tomllib.loads(registries_conf(s))["registry"]
    assert [r["prefix"] for r in conf] == ["gcr.io", "quay.io"]
    assert [r["location"] for r in conf] == ["gcr.io", "quay.io"]
    assert [m["location"] for m in conf[0]["mirror"]] == [
        "a.example:5000/ns", "b.example:5001", "c.example/x"]
    assert [m.get("insecure", False) for m in conf[0]["mirror"]] == [False, True, False]


def test_no_fallback_makes_the_mirror_the_server(ca: Path) -> None:
    s = make(["https://a.example:5000/ns", "https://b.example"], ca, no_fallback=True)
    doc = tomllib.loads(hosts_toml(s, "gcr.io", install_dir=INSTALL))
    assert doc["server"] == "https://a.example:5000/v2/ns"
    assert doc["override_path"] is True
    assert doc["ca"].endswith("a.example_5000.crt")
    assert list(doc["host"]) == ["https://a.example:5000/v2/ns", "https://b.example"]
    [entry] = tomllib.loads(registries_conf(s))["registry"]
    assert entry["location"] == "a.example:5000/ns"
    assert "gcr.io" not in json.dumps({k: v for k, v in entry.items() if k != "prefix"})


def test_config_toml_uses_config_path_and_carries_auth_never_mirrors(
    ca: Path, tmp_path: Path
) -> None:
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "client_email": "x@y.iam",\n "k": "v"}\n')
    endpoints = [MirrorEndpoint(parse_mirror("https://10.0.0.5:5000/ns"), ca,
                                Credential("alice", SECRET))]
    s = settings(endpoints, gcr_key_path=key)
    modern = registry(config_toml(s, install_dir=INSTALL))
    assert modern["config_path"] == "/etc/containerd/certs.d"
    assert "mirrors" not in modern
    assert modern["configs"]["10.0.0.5:5000"]["auth"] == {"username": "alice", "password": SECRET}
    assert modern["configs"]["gcr.io"]["auth"] == {"username": "_json_key",
                                                   "password": key.read_text()}
    legacy = registry(config_toml_legacy(s, install_dir=INSTALL))
    assert "config_path" not in legacy
    assert legacy["configs"]["10.0.0.5:5000"]["tls"]["ca_file"] == (
        "/etc/containerd/ca/10.0.0.5_5000.crt")
    assert legacy["configs"]["10.0.0.5:5000"]["auth"]["password"] == SECRET


def test_write_config_modes_paths_and_round_trip(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = make(["https://10.0.0.5:5000/ns"], ca, hosts=("quay.io",), login=True)
    changes = write_config(s, out)
    assert {c.status for c in changes} == {"new"}
    for name in ("config.toml", "config-legacy.toml", "pull-credential-config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((out / "certs.d/gcr.io/hosts.toml").stat().st_mode) == 0o644
    assert (out / "certs.d/gcr.io/10.0.0.5_5000.crt").read_text() == CA_PEM
    doc = tomllib.loads((out / "certs.d/quay.io/hosts.toml").read_text())
    assert Path(doc["host"]["https://10.0.0.5:5000/v2/ns"]["ca"]).read_text() == CA_PEM

    cluster = yaml.safe_load((out / "cluster-config.yaml").read_text())
    assert cluster == {"registryMirrors": [{
        "endpoint": "https://10.0.0.5:5000/v2/ns", "caCertPath": str(ca),
        "pullCredentialConfigPath": str(out / "pull-credential-config.json"),
        "hosts": ["quay.io"]}]}
    back = read_cluster_config(out / "cluster-config.yaml")
    assert back.hosts == ("quay.io",)
    assert [e.url for e in back.endpoints] == ["https://10.0.0.5:5000/v2/ns"]
    assert back.endpoints[0].credential is not None
    assert back.endpoints[0].credential.password == SECRET
    again = settings(back.endpoints, hosts=back.hosts)
    assert {c.status for c in write_config(again, out)} == {"unchanged"}


def test_a_changed_endpoint_is_reported_without_secrets(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_config(make(["https://10.0.0.5:5000/ns"], ca, login=True), out)
    changes = write_config(make(["https://10.0.0.5:5000/other"], ca, login=True), out)
    by_name = {c.path.relative_to(out).as_posix(): c for c in changes}
    assert by_name["config.toml"].status == "unchanged"
    hosts = by_name["certs.d/gcr.io/hosts.toml"]
    assert hosts.status == "changed"
    assert '[host."https://10.0.0.5:5000/v2/other"]' in hosts.added
    assert '[host."https://10.0.0.5:5000/v2/ns"]' in hosts.removed
    text = "\n".join(line for c in changes for line in c.added + c.removed)
    assert SECRET not in text


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('  password = "s3cret"', '  password = "<redacted>"'),
        ('      "auth": "YWxpY2U6czNjcmV0"', '      "auth": "<redacted>"'),
        ('      "auth": "YWxpY2U6czNjcmV0",', '      "auth": "<redacted>",'),
        ("  identitytoken = \"tok\"", '  identitytoken = "<redacted>"'),
        ('  username = "alice"', '  username = "alice"'),
    ],
)
def test_redact(line: str, shown: str) -> None:
    assert redact(line) == shown


def test_cluster_config_from_a_multi_document_file(tmp_path: Path, ca: Path) -> None:
    docker = tmp_path / "creds" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"10.0.0.5:5000": {"username": "bob",
                                                              "password": "pw"}}}))
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Namespace\n---\n"
        "apiVersion: baremetal.cluster.gke.io/v1\nkind: Cluster\n"
        "spec:\n  gcrKeyPath: key.json\n---\n"
        "registryMirrors:\n"
        "- endpoint: https://10.0.0.5:5000/v2/ns\n"
        "  caCertPath: ca.crt\n"
        "  pullCredentialConfigPath: creds/config.json\n"
        "  hosts: [quay.io, docker.io]\n"
    )
    back = read_cluster_config(path)
    assert back.gcr_key_path == tmp_path / "key.json"
    assert back.hosts == ("quay.io", "docker.io")
    [endpoint] = back.endpoints
    assert endpoint.ca_file == tmp_path / "ca.crt"
    assert endpoint.credential is not None and endpoint.credential.username == "bob"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("apiVersion: v1\n", "no registryMirrors"),
        ("registryMirrors:\n- caCertPath: /x\n", "registryMirrors[0]: needs an endpoint"),
        ("registryMirrors:\n- endpoint: ftp://h:5000/ns\n", "unsupported scheme 'ftp'"),
        ("registryMirrors: [\n", "not valid YAML"),
    ],
)
def test_bad_cluster_config(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_cluster_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def _bad_inputs(tmp_path: Path, ca: Path) -> dict[str, tuple[Any, str]]:
    not_pem = tmp_path / "not-pem.crt"
    not_pem.write_text("just some text\n")
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
    return {
        "scheme": (lambda: make(["ftp://10.0.0.5:5000/ns"], ca), "unsupported scheme 'ftp'"),
        "namespace": (lambda: make(["https://10.0.0.5:5000/Bad_NS!"], ca), "namespace"),
        "ca-missing": (lambda: make(["https://10.0.0.5:5000/ns"], tmp_path / "nope.crt"),
                       "does not exist"),
        "ca-not-pem": (lambda: make(["https://10.0.0.5:5000/ns"], not_pem),
                       "holds no PEM certificate"),
        "ca-broken": (lambda: make(["https://10.0.0.5:5000/ns"], broken), "does not decode"),
        "host-twice": (lambda: make(["https://10.0.0.5:5000/ns"], ca,
                                    hosts=("quay.io", "Quay.io")), "host quay.io is listed twice"),
        "mirror-twice": (lambda: make(["https://10.0.0.5:5000/ns", "10.0.0.5:5000/v2/ns"], ca),
                         "is listed twice"),
        "host-url": (lambda: make(["https://10.0.0.5:5000/ns"], ca, hosts=("https://quay.io",)),
                     "invalid mirrored host"),
        "no-mirror": (lambda: settings([]), "no mirror given"),
    }


@pytest.mark.parametrize("case", ["scheme", "namespace", "ca-missing", "ca-not-pem", "ca-broken",
                                  "host-twice", "mirror-twice", "host-url", "no-mirror"])
def test_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, ca: Path, case: str
) -> None:
    out = tmp_path / "out"
    build, message = _bad_inputs(tmp_path, ca)[case]

    def generate() -> None:
        write_config(build(), out)

    with pytest.raises(UsageError) as err:
        generate()
    assert message in str(err.value)
    assert not out.exists()


def test_gcr_io_named_in_hosts_is_not_a_duplicate(ca: Path) -> None:
    assert make(["https://10.0.0.5:5000/ns"], ca, hosts=("gcr.io", "quay.io")).hosts == (
        "gcr.io", "quay.io")


def test_unknown_format_writes_nothing(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(BmsyncError, match="unknown format"):
        write_config(make(["https://10.0.0.5:5000/ns"], ca), tmp_path / "out", ["hosts", "xml"])
    assert not (tmp_path / "out").exists()
    assert "hosts" in FORMATS
