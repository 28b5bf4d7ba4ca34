"""The node config checker: what `bmsync containerd config` generates passes, and each way a
hand-written config keeps a host off its mirror is named, with the fallback that remains."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.containerd import MirrorEndpoint, settings, write_config
from pipeline.errors import ConfigError
from pipeline.nodeconfig import (
    FORM_CERTS_DIR,
    FORM_CONFIG_PATH,
    FORM_MIRRORS,
    FORM_NONE,
    MIRRORED,
    MISCONFIGURED,
    NOT_MIRRORED,
    HostCheck,
    NodeConfigReport,
    check_node_config,
)
from pipeline.reference import parse_mirror
from tests.harness.pki import TestPKI, create_pki

CRI = 'plugins."io.containerd.grpc.v1.cri"'
NS_MIRROR = "https://10.0.0.5:5000/test-namespace"
NS_API = "https://10.0.0.5:5000/v2/test-namespace"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_pki(tmp_path_factory.mktemp("nodeconfig-pki")).ca_cert


def generate(out: Path, mirrors: list[str], ca: Path, *, hosts: tuple[str, ...] = ("quay.io",),
             no_fallback: bool = False) -> Path:
    endpoints = [MirrorEndpoint(m, ca if m.scheme == "https" else None)
                 for m in map(parse_mirror, mirrors)]
    write_config(settings(endpoints, hosts=hosts, no_fallback=no_fallback), out)
    return out


def host(report: NodeConfigReport, name: str) -> HostCheck:
    return next(h for h in report.hosts if h.host == name)


def hosts_toml(root: Path, text: str, name: str = "gcr.io") -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "hosts.toml").write_text(text)
    return root


# -- what the generator writes --------------------------------------------------------------


@pytest.mark.parametrize(("mirrors", "apis"), [
    ([NS_MIRROR], [NS_API]),
    (["https://10.0.0.5:5000"], ["https://10.0.0.5:5000/v2"]),
    (["http://127.0.0.1:5000/a/b"], ["http://127.0.0.1:5000/v2/a/b"]),
    ([NS_MIRROR, "http://127.0.0.1:5000"], [NS_API, "http://127.0.0.1:5000/v2"]),
])
@pytest.mark.parametrize("no_fallback", [False, True])
@pytest.mark.parametrize("target", ["config.toml", "certs.d", "config-legacy.toml"])
def test_generated_configs_pass(tmp_path: Path, ca: Path, mirrors: list[str], apis: list[str],
                                no_fallback: bool, target: str) -> None:
    out = generate(tmp_path / "out", mirrors, ca, no_fallback=no_fallback)
    expected = [parse_mirror(m) for m in mirrors]
    report = check_node_config(out / target, ["quay.io"], expected=expected, expected_ca=ca)

    assert report.ok, report.to_json()
    assert report.form == {"config.toml": FORM_CONFIG_PATH, "certs.d": FORM_CERTS_DIR,
                           "config-legacy.toml": FORM_MIRRORS}[target]
    assert [h.host for h in report.hosts] == ["gcr.io", "quay.io"]
    for check in report.hosts:
        assert check.status == MIRRORED
        tried = [e.api for e in check.endpoints if not e.server]
        assert tried == apis
        assert all(e.path_ok and not e.ca_missing for e in check.endpoints)
        https = [e for e in check.endpoints if e.api and e.api.startswith("https")]
        assert all(len(e.ca_files) == 1 and Path(e.ca_files[0]).is_file() for e in https)
        if no_fallback and target != "config-legacy.toml":
            assert check.fallback is None
            assert check.endpoints[-1].server and check.endpoints[-1].api == apis[0]
        else:
            # The legacy form always keeps the public host; hosts.toml does unless told.
            assert check.fallback == f"https://{check.host}"


def test_generated_config_lacks_a_host_and_another_mirror(tmp_path: Path, ca: Path) -> None:
    out = generate(tmp_path / "out", [NS_MIRROR], ca)
    report = check_node_config(out / "config.toml", ["quay.io", "docker.io"],
                               expected=[parse_mirror("https://10.0.0.5:5000/other")])

    assert not report.ok
    assert [h.status for h in report.hosts] == [NOT_MIRRORED] * 3
    assert host(report, "gcr.io").expected_missing == ("https://10.0.0.5:5000/other",)
    assert any(f"found: {NS_API}" in p for p in host(report, "gcr.io").problems)
    docker = host(report, "docker.io")
    assert docker.endpoints == () and docker.fallback == "https://registry-1.docker.io"
    assert "certs.d/docker.io/hosts.toml" in docker.problems[0]


def test_expected_ca_must_be_the_one_configured(tmp_path: Path, ca: Path) -> None:
    out = generate(tmp_path / "out", [NS_MIRROR], ca)
    other: TestPKI = create_pki(tmp_path / "other-pki")
    report = check_node_config(out / "certs.d", expected=[parse_mirror(NS_MIRROR)],
                               expected_ca=other.ca_cert)

    gcr = host(report, "gcr.io")
    assert gcr.status == MISCONFIGURED
    assert f"does not hold the certificate of {other.ca_cert}" in gcr.problems[0]


def test_output_directory_instead_of_certs_d_is_named(tmp_path: Path, ca: Path) -> None:
    out = generate(tmp_path / "out", [NS_MIRROR], ca)
    report = check_node_config(out)
    assert not report.ok
    assert report.problems == (f"holds no host directory but has {out / 'certs.d'}:"
                               " give that instead",)


# -- hand-written hosts.toml ----------------------------------------------------------------

GOOD = f"""
[host."{NS_API}"]
  capabilities = ["pull", "resolve"]
  override_path = true
"""


@pytest.mark.parametrize(("text", "status", "problem", "fallback"), [
    (GOOD, MIRRORED, None, "https://gcr.io"),
    (f'server = "https://gcr.io"\n{GOOD}', MIRRORED, None, "https://gcr.io"),
    (f'server = "gcr.io"\n{GOOD}', MIRRORED, None, "https://gcr.io"),
    (f'server = "{NS_API}"\noverride_path = true\n{GOOD}', MIRRORED, None, None),
    # A [host] without capabilities gets all three.
    (f'[host."{NS_API}"]\noverride_path = true\n', MIRRORED, None, "https://gcr.io"),
    ('[host."https://10.0.0.5:5000/v2"]\n', MIRRORED, None, "https://gcr.io"),
    ('[host."https://10.0.0.5:5000/"]\n', MIRRORED, None, "https://gcr.io"),
    (f'[host."{NS_API}"]\n', NOT_MIRRORED, "add override_path = true", "https://gcr.io"),
    ('[host."https://10.0.0.5:5000/test-namespace"]\noverride_path = true\n', NOT_MIRRORED,
     "requests go to https://10.0.0.5:5000/test-namespace/<repo>", "https://gcr.io"),
    ('[host."https://10.0.0.5:5000"]\noverride_path = true\n', NOT_MIRRORED,
     "drop override_path", "https://gcr.io"),
    (f'[host."{NS_API}"]\noverride_path = true\ncapabilities = ["resolve"]\n', NOT_MIRRORED,
     "no pull capability", "https://gcr.io"),
    (f'[host."{NS_API}"]\noverride_path = true\ncapabilities = ["pull"]\n', NOT_MIRRORED,
     "no resolve capability", "https://gcr.io"),
    (f'{GOOD}\n[host."http://127.0.0.1:5000/v2/ns"]\n', MISCONFIGURED,
     "containerd appends /v2", "https://gcr.io"),
    (f'[host."https://gcr.io"]\n{GOOD}', MIRRORED, None, "https://gcr.io"),
    # What containerd 1.6 ignores whole: the host is pulled from upstream.
    (f'server = "{NS_API}"\noverride_path = true\n', NOT_MIRRORED, "invalid `host` tree",
     "https://gcr.io"),
    (f'[host."{NS_API}"]\ncapabilities = ["pull", "fetch"]\n', NOT_MIRRORED,
     "unknown capability 'fetch'", "https://gcr.io"),
    (f'[host."{NS_API}"\n', NOT_MIRRORED, "not valid TOML", "https://gcr.io"),
    (f'[host."{NS_API}"]\nca = 5\n', NOT_MIRRORED, "ca of", "https://gcr.io"),
    ("", NOT_MIRRORED, "containerd pulls gcr.io from https://gcr.io", "https://gcr.io"),
])
def test_hand_written_hosts_toml(tmp_path: Path, text: str, status: str, problem: str | None,
                                 fallback: str | None) -> None:
    report = check_node_config(hosts_toml(tmp_path, text))
    gcr = report.hosts[0]
    assert gcr.status == status, gcr.problems
    assert gcr.fallback == fallback
    if problem is None:
        assert gcr.problems == ()
    else:
        assert any(problem in p for p in gcr.problems), gcr.problems


def test_ca_paths_relative_to_the_host_directory(tmp_path: Path, ca: Path) -> None:
    root = hosts_toml(tmp_path / "certs.d", GOOD + '  ca = ["mirror.crt", "gone.crt"]\n')
    (root / "gcr.io" / "mirror.crt").write_bytes(ca.read_bytes())
    gcr = check_node_config(root).hosts[0]

    endpoint = gcr.endpoints[0]
    assert endpoint.ca_files == (str(root / "gcr.io" / "mirror.crt"),
                                 str(root / "gcr.io" / "gone.crt"))
    assert endpoint.ca_missing == (str(root / "gcr.io" / "gone.crt"),)
    assert gcr.status == NOT_MIRRORED
    assert "gone.crt cannot be read: every pull fails" in gcr.problems[0]


def test_docker_hub_upstream_is_its_api_host(tmp_path: Path) -> None:
    text = f'server = "https://registry-1.docker.io"\n{GOOD}'
    report = check_node_config(hosts_toml(tmp_path, text, "docker.io"), ["docker.io"])
    docker = host(report, "docker.io")
    assert docker.status == MIRRORED
    assert docker.fallback == "https://registry-1.docker.io"


def test_host_with_port_directory_forms(tmp_path: Path) -> None:
    hosts_toml(tmp_path, GOOD, "reg.example:5000")
    hosts_toml(tmp_path, GOOD.replace("test-namespace", "other"), "reg.example_5000_")
    check = host(check_node_config(tmp_path, ["reg.example:5000"]), "reg.example:5000")
    # containerd looks for name_port_ first.
    assert check.configured_by == str(tmp_path / "reg.example_5000_" / "hosts.toml")


# -- config.toml forms ----------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_path_roots_first_holding_the_host_wins(tmp_path: Path) -> None:
    hosts_toml(tmp_path / "second", GOOD)
    hosts_toml(tmp_path / "second", GOOD, "quay.io")
    hosts_toml(tmp_path / "first", '[host."http://127.0.0.1:5000"]\n', "quay.io")
    config = write(tmp_path / "config.toml",
                   f'version = 2\n[{CRI}.registry]\nconfig_path = "first:{tmp_path}/second"\n')
    report = check_node_config(config, ["quay.io"])

    assert report.certs_dirs == (tmp_path / "first", tmp_path / "second")
    assert host(report, "gcr.io").configured_by == str(tmp_path / "second/gcr.io/hosts.toml")
    assert [e.api for e in host(report, "quay.io").endpoints] == ["http://127.0.0.1:5000/v2"]
    assert report.ok


@pytest.mark.parametrize(("text", "problem"), [
    (f'version = 2\n[{CRI}.registry]\nconfig_path = "/nonexistent/certs.d"\n',
     "registry.config_path names /nonexistent/certs.d, which is not a directory"),
    (f'version = 2\n[{CRI}.registry]\nconfig_path = "CERTS"\n'
     f'[{CRI}.registry.mirrors."gcr.io"]\nendpoint = ["{NS_API}"]\n',
     "runs without its CRI plugin"),
    (f'version = 2\ndisabled_plugins = ["cri"]\n[{CRI}.registry]\nconfig_path = "CERTS"\n',
     "disabled_plugins holds the CRI plugin"),
    ("version = 2\n", "sets neither registry.config_path nor registry.mirrors"),
])
def test_config_toml_problems(tmp_path: Path, text: str, problem: str) -> None:
    certs = hosts_toml(tmp_path / "certs.d", GOOD)
    config = write(tmp_path / "config.toml", text.replace("CERTS", str(certs)))
    report = check_node_config(config)
    assert not report.ok
    assert any(problem in p for p in report.problems), report.problems


def test_neither_form_leaves_every_host_upstream(tmp_path: Path) -> None:
    report = check_node_config(write(tmp_path / "config.toml", "version = 2\n"), ["quay.io"])
    assert report.form == FORM_NONE
    assert [(h.status, h.fallback) for h in report.hosts] == [
        (NOT_MIRRORED, "https://gcr.io"), (NOT_MIRRORED, "https://quay.io")]


@pytest.mark.parametrize(("mirrors", "apis", "status", "problem"), [
    (f'."gcr.io"]\nendpoint = ["{NS_API}"]', [NS_API], MIRRORED, None),
    # The wildcard serves every host not listed.
    (f'."*"]\nendpoint = ["{NS_API}"]', [NS_API], MIRRORED, None),
    # Without a scheme: http for localhost, https otherwise.
    ('."gcr.io"]\nendpoint = ["127.0.0.1:5000/v2/ns"]', ["http://127.0.0.1:5000/v2/ns"],
     MIRRORED, None),
    ('."gcr.io"]\nendpoint = ["10.0.0.5:5000"]', ["https://10.0.0.5:5000/v2"], MIRRORED, None),
    # The legacy form uses the path as written: no /v2 is added before the namespace.
    ('."gcr.io"]\nendpoint = ["https://10.0.0.5:5000/test-namespace"]',
     ["https://10.0.0.5:5000/test-namespace"], NOT_MIRRORED, "https://HOST:PORT/v2/NAMESPACE"),
    ('."gcr.io"]\nendpoint = ["https://gcr.io"]', [], NOT_MIRRORED, "no mirror endpoint"),
    ('."quay.io"]\nendpoint = ["https://10.0.0.5:5000"]', [], NOT_MIRRORED,
     'no registry.mirrors."gcr.io"'),
    ('."gcr.io"]\nendpoint = "https://10.0.0.5:5000"', [], NOT_MIRRORED,
     "endpoint must be a list"),
])
def test_legacy_mirrors(tmp_path: Path, mirrors: str, apis: list[str], status: str,
                        problem: str | None) -> None:
    config = write(tmp_path / "config.toml", f"version = 2\n[{CRI}.registry.mirrors{mirrors}\n")
    gcr = check_node_config(config).hosts[0]
    assert gcr.status == status, gcr.problems
    assert [e.api for e in gcr.endpoints] == apis
    assert gcr.fallback == "https://gcr.io"
    if problem is not None:
        assert any(problem in p for p in gcr.problems), gcr.problems


def test_legacy_ca_from_registry_configs(tmp_path: Path, ca: Path) -> None:
    config = write(tmp_path / "config.toml", f"""
version = 1
[plugins.cri.registry.mirrors."gcr.io"]
  endpoint = ["{NS_API}", "https://10.0.0.6:5000"]
[plugins.cri.registry.configs."10.0.0.5:5000".tls]
  ca_file = "{ca}"
[plugins.cri.registry.configs."10.0.0.6:5000".tls]
  ca_file = "missing.crt"
  insecure_skip_verify = true
""")
    gcr = check_node_config(config).hosts[0]
    first, second = gcr.endpoints
    assert first.ca_files == (str(ca),) and first.ca_missing == ()
    assert second.ca_missing == (str(tmp_path / "missing.crt"),) and second.skip_verify
    assert gcr.status == MISCONFIGURED
    assert gcr.problems == (f"https://10.0.0.6:5000: CA file {tmp_path / 'missing.crt'} cannot"
                            " be read: every pull fails",)


# -- what cannot be checked at all ----------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "message"), [
    ("absent.toml", None, "does not exist"),
    ("config.toml", "version = 2\n[plugins\n", "not valid TOML"),
    ("config.toml", f"[{CRI}]\nregistry = 3\n", "must be a table"),
    ("hosts.toml", GOOD, "is a hosts.toml, not a containerd config.toml"),
])
def test_unreadable_config_is_a_config_error(tmp_path: Path, name: str, text: str | None,
                                             message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        check_node_config(path)
    assert raised.value.exit_code == 2
    assert str(path) in str(raised.value) and message in str(raised.value)
