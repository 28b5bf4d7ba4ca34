"""The job configs of issue 7: ``pipeline.yaml``, ``site.yaml`` and nightly version names.

Documents are written line by line so that every expected line number can be read off
the table; expected paths are built with ``pathlib`` from the test's folder, and expected
version names are written out by hand (or by ``date.strftime``), never by the code
under test.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, UsageError
from pipeline.jobconfig import (
    ContainerdOutput,
    check_version_scheme,
    load_pipeline_config,
    load_site_config,
    object_store_problem,
)
from pipeline.nightly import run_number, version_name
from pipeline.reference import Mirror

# Lines 1-4 of every pipeline.yaml below: the images config part (DESIGN.md §12).
IMAGES_PART = [
    "version: 1",
    'release: "1.30.0"',
    "images:",
    "  - gcr.io/anthos-baremetal-release/etcd:v3.4.13",
]


def write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_config_error(error: ConfigError, path: Path, line: int | None, key: str,
                        fragment: str) -> None:
    """The message starts with ``FILE:LINE: KEY: `` and holds ``fragment``; one line."""
    where = f"{path}:{line}: {key}: " if line is not None else f"{path}: {key}: "
    message = str(error)
    assert message.startswith(where), message
    assert fragment in message, message
    assert "\n" not in message
    assert (error.path, error.line, error.key) == (str(path), line, key)
    assert error.exit_code == 2


# -- pipeline.yaml ------------------------------------------------------------------------


def test_pipeline_minimal_gets_defaults(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    path = write(folder, "pipeline.yaml",
                 [*IMAGES_PART, "workDir: work", "objectStore: file:///srv/bundles"])
    cfg = load_pipeline_config(path)
    assert cfg.path == str(path)
    assert cfg.work_dir == folder / "work"
    assert cfg.store == folder / "work" / "store"
    assert cfg.object_store == "file:///srv/bundles"
    assert cfg.endpoint_url is None
    assert cfg.version_scheme == "{yyyy}.{mm}.{dd}.{n}"
    assert cfg.full_every == 7
    assert cfg.base_inventory is None
    assert cfg.version_dir("2026.11.24.1") == folder / "work" / "2026.11.24.1"
    # The images config part is the images loader's.
    assert cfg.images.release == "1.30.0"
    assert [str(s.reference) for s in cfg.images.images] == [
        "gcr.io/anthos-baremetal-release/etcd:v3.4.13"]


def test_pipeline_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "conf"
    path = write(folder, "pipeline.yaml", [
        *IMAGES_PART,
        "workDir: /var/lib/bmsync/work",
        "store: ~/store",
        "objectStore: s3://bundles/nightly/site-a",
        "endpointUrl: https://s3.local:9000",
        'versionScheme: "{release}-{yyyy}{mm}{dd}.{n}"',
        "fullEvery: 3",
        "baseInventory: inv/site-a.json",
    ])
    cfg = load_pipeline_config(path)
    assert cfg.work_dir == Path("/var/lib/bmsync/work")
    assert cfg.store == home / "store"
    assert cfg.object_store == "s3://bundles/nightly/site-a"
    assert cfg.endpoint_url == "https://s3.local:9000"
    assert cfg.version_scheme == "{release}-{yyyy}{mm}{dd}.{n}"
    assert cfg.full_every == 3
    assert cfg.base_inventory == folder / "inv" / "site-a.json"


def test_pipeline_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config named by a relative path resolves its paths against its own folder,
    not against the current directory's parent or anything else."""
    write(tmp_path / "cfg", "pipeline.yaml",
          [*IMAGES_PART, "workDir: w", "store: s", "objectStore: file:///b"])
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline_config(Path("cfg") / "pipeline.yaml")
    assert cfg.work_dir == tmp_path / "cfg" / "w"
    assert cfg.store == tmp_path / "cfg" / "s"
    assert cfg.path == str(tmp_path / "cfg" / "pipeline.yaml")


VALID_OBJECT_STORES = ["file:///srv/bundles", "file:///", "s3://bucket", "s3://bucket/",
                       "s3://bucket/a/b"]


@pytest.mark.parametrize("url", VALID_OBJECT_STORES)
def test_object_store_valid(url: str) -> None:
    assert object_store_problem(url) is None


# (extra lines from line 5 on, key, line, fragment of the message)
PIPELINE_ERRORS: list[tuple[list[str], str, int | None, str]] = [
    (["objectStore: file:///srv/b"], "workDir", None, "required key is missing"),
    (["workDir: w"], "objectStore", None, "required key is missing"),
    (["workDir: ''", "objectStore: file:///b"], "workDir", 5, "must be a non-empty string"),
    (["workDir: 5", "objectStore: file:///b"], "workDir", 5, "got 5"),
    (["workDir: w", "objectStore: http://x"], "objectStore", 6,
     "'http://x' is not an object store URL"),
    (["workDir: w", "objectStore: s3://"], "objectStore", 6, "'s3://' names no bucket"),
    (["workDir: w", "objectStore: s3:///prefix"], "objectStore", 6, "names no bucket"),
    (["workDir: w", "objectStore: file://relative/dir"], "objectStore", 6,
     "'file://relative/dir' must be an absolute file:///PATH"),
    (["workDir: w", "objectStore: /srv/bundles"], "objectStore", 6,
     "is not an object store URL"),
    (["workDir: w", "objectStore: [s3://b]"], "objectStore", 6, "must be a non-empty string"),
    (["workDir: w", "objectStore: s3://b", "endpointUrl: s3.local:9000"], "endpointUrl", 7,
     "must start with http:// or https://"),
    # The same rule as site.yaml's: an endpoint is printed, so no credentials in it.
    (["workDir: w", "objectStore: s3://b", "endpointUrl: https://AKIA1:s3cret@s3.local"],
     "endpointUrl", 7, "credentials do not belong in the endpoint"),
    (["workDir: w", "objectStore: s3://b", "endpointUrl: https://s3.local/?x=1"],
     "endpointUrl", 7, "must not have a query or fragment"),
    (["workDir: w", "objectStore: s3://b", "fullEvery: 0"], "fullEvery", 7,
     "must be a whole number of at least 1, got 0"),
    (["workDir: w", "objectStore: s3://b", "fullEvery: -2"], "fullEvery", 7, "got -2"),
    (["workDir: w", "objectStore: s3://b", "fullEvery: x"], "fullEvery", 7, "got 'x'"),
    (["workDir: w", "objectStore: s3://b", 'fullEvery: "7"'], "fullEvery", 7, "got '7'"),
    (["workDir: w", "objectStore: s3://b", "fullEvery: true"], "fullEvery", 7, "got True"),
    (["workDir: w", "objectStore: s3://b", "fullEvery: 1.5"], "fullEvery", 7, "got 1.5"),
    (["workDir: w", "objectStore: s3://b", 'versionScheme: "{yyyy}.{mm}.{dd}"'],
     "versionScheme", 7, "lacks {n}"),
    (["workDir: w", "objectStore: s3://b", 'versionScheme: "{yyyy}.{week}.{n}"'],
     "versionScheme", 7, "uses unknown field {week}"),
    (["workDir: w", "objectStore: s3://b", 'versionScheme: "{yyyy}.{n"'],
     "versionScheme", 7, "is malformed"),
    # Unknown keys are the images loader's errors, with a suggestion.
    (["workDir: w", "objectStore: s3://b", "fullevery: 3"], "fullevery", 7,
     "did you mean 'fullEvery'?"),
]


@pytest.mark.parametrize(("extra", "key", "line", "fragment"), PIPELINE_ERRORS)
def test_pipeline_errors(tmp_path: Path, extra: list[str], key: str, line: int | None,
                         fragment: str) -> None:
    path = write(tmp_path, "pipeline.yaml", [*IMAGES_PART, *extra])
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert_config_error(info.value, path, line, key, fragment)


def test_pipeline_error_names_line_after_comments(tmp_path: Path) -> None:
    """The line is the file's, counting comments and blank lines."""
    path = write(tmp_path, "pipeline.yaml", [
        *IMAGES_PART, "", "# the job", "workDir: w", "", "objectStore: s3://b",
        "# every few nights", "fullEvery: 0"])
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert str(info.value).startswith(f"{path}:11: fullEvery: ")


# -- site.yaml ----------------------------------------------------------------------------

SITE_HEAD = ["version: 1", "objectStore: file:///srv/incoming", "workDir: work"]  # lines 1-3


def test_site_minimal(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", [
        *SITE_HEAD, "mirrors:", "  - url: 10.0.0.5:5000/test-namespace",
        "    needCredential: false"])
    site = load_site_config(path)
    assert site.path == str(path)
    assert site.object_store == "file:///srv/incoming"
    assert site.endpoint_url is None
    assert site.work_dir == tmp_path / "work"
    assert site.version_dir("1.30.0") == tmp_path / "work" / "1.30.0"
    assert site.hosts == ()
    assert site.containerd is None
    [m] = site.mirrors
    assert m.url == "10.0.0.5:5000/test-namespace"
    assert m.mirror == Mirror("https", "10.0.0.5:5000", "test-namespace")
    assert (m.cacert, m.need_credential, m.docker_config, m.username_env, m.password_env) == (
        None, False, None, None, None)
    assert site.mirror("10.0.0.5:5000/test-namespace") is m


def test_site_full(tmp_path: Path) -> None:
    folder = tmp_path / "site-a"
    path = write(folder, "site.yaml", [
        "version: 1",
        "objectStore: s3://bundles/site-a",
        "endpointUrl: https://s3.site.local:9000",
        "workDir: ../var/work",
        "mirrors:",
        "  - url: https://mirror.site:5000/v2/test-namespace",
        "    cacert: certs/ca.crt",
        "    dockerConfig: /etc/bmsync/docker.json",
        "  - url: http://10.0.0.5:5000",
        "    needCredential: true",
        "    usernameEnv: MIRROR_USER",
        "    passwordEnv: MIRROR_PASSWORD",
        "  - url: mirror2.site/team/images",
        "    needCredential: false",
        "hosts: [quay.io, index.docker.io, Registry.K8s.io]",
        "containerd:",
        "  out: out/containerd",
        "  installDir: /etc/containerd",
        "  noFallback: true",
        "  gcrKeyPath: keys/gcr.json",
    ])
    site = load_site_config(path)
    assert site.object_store == "s3://bundles/site-a"
    assert site.endpoint_url == "https://s3.site.local:9000"
    assert site.work_dir == tmp_path / "var" / "work"
    first, second, third = site.mirrors
    assert first.mirror == Mirror("https", "mirror.site:5000", "test-namespace")
    assert first.cacert == folder / "certs" / "ca.crt"
    assert first.docker_config == Path("/etc/bmsync/docker.json")
    assert first.need_credential is True
    assert (first.username_env, first.password_env) == (None, None)
    assert second.mirror == Mirror("http", "10.0.0.5:5000", None)
    assert (second.username_env, second.password_env) == ("MIRROR_USER", "MIRROR_PASSWORD")
    assert second.cacert is None and second.docker_config is None
    assert third.mirror == Mirror("https", "mirror2.site", "team/images")
    assert third.need_credential is False
    assert site.hosts == ("quay.io", "docker.io", "registry.k8s.io")
    assert site.containerd == ContainerdOutput(
        out=folder / "out" / "containerd", install_dir=Path("/etc/containerd"),
        no_fallback=True, gcr_key_path=folder / "keys" / "gcr.json")
    assert site.mirror("http://10.0.0.5:5000") is second


def test_site_unknown_mirror_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", [
        *SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false"])
    with pytest.raises(UsageError) as info:
        load_site_config(path).mirror("b.site:5000")
    assert "has no mirror b.site:5000" in str(info.value)
    assert "a.site:5000" in str(info.value)


def test_site_containerd_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", [
        *SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
        "containerd:", "  out: gen"])
    assert load_site_config(path).containerd == ContainerdOutput(tmp_path / "gen", None, False,
                                                                 None)


# (whole document, key, line, fragment of the message)
SITE_ERRORS: list[tuple[list[str], str, int, str]] = [
    # missing required keys: the top mapping's line
    (["version: 1", "workDir: w", "mirrors: []"], "objectStore", 1, "required key is missing"),
    (["version: 1", "objectStore: s3://b", "mirrors: []"], "workDir", 1,
     "required key is missing"),
    ([*SITE_HEAD], "mirrors", 1, "required key is missing"),
    # unknown keys, with a suggestion
    ([*SITE_HEAD, "mirror:", "  - url: a:5000"], "mirror", 4, "did you mean 'mirrors'?"),
    ([*SITE_HEAD, "mirrors:", "  - url: a:5000", "    needCredentials: false"],
     "mirrors[0].needCredentials", 6, "did you mean 'needCredential'?"),
    ([*SITE_HEAD, "mirrors:", "  - url: a:5000", "    needCredential: false", "containerd:",
      "  out: o", "  nofallback: true"], "containerd.nofallback", 9,
     "did you mean 'noFallback'?"),
    # object store URLs
    (["version: 1", "objectStore: http://x", "workDir: w", "mirrors: []"], "objectStore", 2,
     "'http://x' is not an object store URL"),
    (["version: 1", "objectStore: s3://", "workDir: w", "mirrors: []"], "objectStore", 2,
     "names no bucket"),
    (["version: 1", "objectStore: file://relative", "workDir: w", "mirrors: []"],
     "objectStore", 2, "must be an absolute file:///PATH"),
    ([*SITE_HEAD, "endpointUrl: ftp://s3", "mirrors: []"], "endpointUrl", 4,
     "must start with http:// or https://"),
    ([*SITE_HEAD, "endpointUrl: https://key:secret@s3", "mirrors: []"], "endpointUrl", 4,
     "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"),
    ([*SITE_HEAD, "endpointUrl: https://s3/bucket", "mirrors: []"], "endpointUrl", 4,
     "the bucket and prefix go in the object store URL"),
    (["version: 2", "objectStore: s3://b", "workDir: w", "mirrors: []"], "version", 1,
     "unsupported version 2"),
    # mirrors
    ([*SITE_HEAD, "mirrors: []"], "mirrors", 4, "empty list"),
    ([*SITE_HEAD, "mirrors:"], "mirrors", 4, "must be a list"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000/ns", "    needCredential: false",
      "  - url: https://a.site:5000/v2/ns/", "    needCredential: false"], "mirrors[1]", 7,
     "mirror https://a.site:5000/v2/ns/ is listed twice"),
    ([*SITE_HEAD, "mirrors:", "  - needCredential: false"], "mirrors[0].url", 5,
     "required key is missing"),
    ([*SITE_HEAD, "mirrors:", "  - url: ftp://a:5000", "    needCredential: false"],
     "mirrors[0].url", 5, "unsupported scheme 'ftp'"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000"], "mirrors[0]", 5,
     "an unattended import never prompts"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: true",
      "    cacert: ca.crt"], "mirrors[0]", 5, "mirror a.site:5000 needs a login and none is"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    usernameEnv: U"],
     "mirrors[0].usernameEnv", 6, "needs passwordEnv beside it"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "    passwordEnv: P"], "mirrors[0].passwordEnv", 7, "needs usernameEnv beside it"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    usernameEnv: MY-USER",
      "    passwordEnv: P"], "mirrors[0].usernameEnv", 6,
     "'MY-USER' is not an environment variable name"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    dockerConfig: d.json",
      "    usernameEnv: U", "    passwordEnv: P"], "mirrors[0]", 5,
     "give dockerConfig or usernameEnv/passwordEnv, not both"),
    ([*SITE_HEAD, "mirrors:", "  - url: http://a.site:5000", "    needCredential: false",
      "    cacert: ca.crt"], "mirrors[0].cacert", 7,
     "mirror http://a.site:5000 is plain http: a CA file means nothing there"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", '    needCredential: "yes"'],
     "mirrors[0].needCredential", 6, "must be true or false, got a string (yes)"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: 0"],
     "mirrors[0].needCredential", 6, "must be true or false, got an integer (0)"),
    # containerd
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "containerd:", "  installDir: /etc/containerd"], "containerd.out", 8,
     "required key is missing"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "containerd:", "  out: o", "  noFallback: always"], "containerd.noFallback", 9,
     "must be true or false"),
    # hosts
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "hosts:", "  - quay.io", "  - not a host!"], "hosts[1]", 9,
     "invalid registry host 'not a host!'"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "hosts:", "  - quay.io:99999"], "hosts[0]", 8, "out of range"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "hosts: quay.io"], "hosts", 7, "must be a list"),
    ([*SITE_HEAD, "mirrors:", "  - url: a.site:5000", "    needCredential: false",
      "hosts: [5000]"], "hosts[0]", 7, "must be a string"),
]


@pytest.mark.parametrize(("lines", "key", "line", "fragment"), SITE_ERRORS)
def test_site_errors(tmp_path: Path, lines: list[str], key: str, line: int,
                     fragment: str) -> None:
    path = write(tmp_path, "site.yaml", lines)
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    assert_config_error(info.value, path, line, key, fragment)


def test_site_missing_credentials_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", [*SITE_HEAD, "mirrors:", "  - url: a.site:5000"])
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    assert info.value.hint is not None
    for way_out in ("dockerConfig", "usernameEnv/passwordEnv", "needCredential: false"):
        assert way_out in info.value.hint


@pytest.mark.parametrize("lines", [
    ["# nothing here"],
    ["version: 1", "mirrors: [a"],
])
def test_site_unreadable_documents(tmp_path: Path, lines: list[str]) -> None:
    path = write(tmp_path, "site.yaml", lines)
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    assert str(info.value).startswith(str(path))


def test_site_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_site_config(tmp_path / "site.yaml")
    assert str(info.value) == f"{tmp_path / 'site.yaml'}: no such file"


# -- version schemes and names ------------------------------------------------------------

@pytest.mark.parametrize("scheme", [
    "{yyyy}.{mm}.{dd}.{n}", "{release}-{yyyy}{mm}{dd}.{n}", "nightly-{n}", "{n}",
])
def test_version_scheme_accepted(scheme: str) -> None:
    check_version_scheme(scheme)


@pytest.mark.parametrize(("scheme", "fragment"), [
    ("{yyyy}.{mm}.{dd}", "lacks {n}"),
    ("{{n}}", "lacks {n}"),
    ("{yyyy}.{hh}.{n}", "unknown field {hh}"),
    ("{}.{n}", "unknown field {}"),
    ("{0}.{n}", "unknown field {0}"),
    ("{n.real}", "unknown field {n.real}"),
    ("{yyyy}.{n", "malformed"),
    ("{yyyy}}.{n}", "malformed"),
])
def test_version_scheme_rejected(scheme: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        check_version_scheme(scheme)
    assert fragment in str(info.value)
    assert repr(scheme) in str(info.value)


@pytest.mark.parametrize("scheme", [
    "{{literal}}-{yyyy}.{n}",  # braces: not a bundle name
    "{yyyy}/{mm}/{dd}.{n}",  # "2026/03/05.1": not a bundle name (a '/' in a file name)
    "night {n}",             # a space: not a bundle name
    "{n}.{n}",               # run_number raises re.error (group 'n' defined twice)
    "{yyyy:.2}.{n}",         # run_number ignores the spec: never reads its own names back
])
def test_version_scheme_rejects_unusable(scheme: str) -> None:
    with pytest.raises(UsageError):
        check_version_scheme(scheme)


DAY = date(2026, 3, 5)

VERSION_NAMES = [
    ("{yyyy}.{mm}.{dd}.{n}", DAY, 1, "2026.03.05.1"),
    ("{yyyy}.{mm}.{dd}.{n}", date(2026, 11, 24), 12, "2026.11.24.12"),
    ("{yyyy}.{mm}.{dd}.{n}", date(987, 1, 9), 3, "0987.01.09.3"),
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, 2, "1.30.0-20260305.2"),
    ("{yyyy}{mm}{dd}{n}", date(2026, 12, 31), 4, "202612314"),
    ("nightly-{n}", DAY, 7, "nightly-7"),
    ("{{x}}{n}", DAY, 1, "{x}1"),
]


@pytest.mark.parametrize(("scheme", "day", "n", "expected"), VERSION_NAMES)
def test_version_name(scheme: str, day: date, n: int, expected: str) -> None:
    assert version_name(scheme, day, n, "1.30.0") == expected


@pytest.mark.parametrize("day", [date(2026, 1, 1), date(2026, 2, 28), date(2030, 10, 9)])
def test_default_scheme_matches_strftime(day: date) -> None:
    assert version_name("{yyyy}.{mm}.{dd}.{n}", day, 5, "r") == day.strftime("%Y.%m.%d") + ".5"


@pytest.mark.parametrize(("scheme", "day", "n", "expected"), VERSION_NAMES)
def test_run_number_inverts_version_name(scheme: str, day: date, n: int, expected: str) -> None:
    assert run_number(scheme, day, "1.30.0", expected) == n


RUN_NUMBERS: list[tuple[str, date, str, str, int | None]] = [
    # scheme, day, release, version, expected run number
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.03.05.17", 17),
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.03.06.1", None),   # another day
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2025.03.05.1", None),   # another year
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.3.5.1", None),     # not zero-padded
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.03.05.", None),    # no number
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.03.05.x", None),
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026.03.05.1.1", None),  # whole name only
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "2026x03x05x1", None),   # '.' is literal
    ("{yyyy}.{mm}.{dd}.{n}", DAY, "1.30.0", "1.30.0", None),         # a release version
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, "1.30.0", "1.30.0-20260305.3", 3),
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, "1.30.0", "1.31.0-20260305.3", None),  # other release
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, "1.30.0", "1x30x0-20260305.3", None),
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, "1.30.0", "1.30.0-20260304.3", None),  # other day
    ("{release}-{yyyy}{mm}{dd}.{n}", DAY, "1.30.0", "2026.03.05.3", None),  # other scheme
    ("nightly-{n}", DAY, "1.30.0", "nightly-40", 40),               # no date: counts on
    ("nightly-{n}", DAY, "1.30.0", "nightly-", None),
]


@pytest.mark.parametrize(("scheme", "day", "release", "version", "expected"), RUN_NUMBERS)
def test_run_number(scheme: str, day: date, release: str, version: str,
                    expected: int | None) -> None:
    assert run_number(scheme, day, release, version) == expected


def test_a_site_yaml_given_as_pipeline_yaml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("version: 1\nobjectStore: file:///srv/o\nworkDir: w\nmirrors:\n"
                    "  - url: http://127.0.0.1:5000/ns\n    needCredential: false\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert str(info.value).startswith(f"{path}:4: mirrors: unknown key")
    assert "this looks like a site.yaml" in str(info.value)


def test_a_pipeline_yaml_given_as_site_yaml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text('version: 1\nrelease: "1.0"\nimages: [gcr.io/a/b:1]\nworkDir: w\n'
                    "objectStore: file:///srv/o\n")
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    assert str(info.value).startswith(f"{path}:2: release: unknown key")
    assert "this looks like a pipeline.yaml" in str(info.value)


def test_pipeline_endpoint_credentials_are_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline.yaml", [
        *IMAGES_PART, "workDir: w", "objectStore: s3://b",
        "endpointUrl: https://AKIAEXAMPLE:s3cr3t-value@s3.local:9000"])
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert "s3cr3t-value" not in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)
    assert "AWS_ACCESS_KEY_ID" in str(info.value)  # S3 advice, not a registry's
