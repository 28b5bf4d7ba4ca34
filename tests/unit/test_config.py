from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pipeline.config import ImagesConfig, RegistrySettings, load_images_config
from pipeline.errors import ConfigError
from pipeline.platform import Platform
from pipeline.reference import parse_reference
from pipeline.tagfilter import TagFilter

REPO = Path(__file__).resolve().parents[2]

HEAD = 'version: 1\nrelease: "1.30.0"\n'


def write(tmp_path: Path, text: str, name: str = "images.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **kwargs: object) -> ImagesConfig:
    return load_images_config(write(tmp_path, text), **kwargs)  # type: ignore[arg-type]


def test_example_config_loads() -> None:
    config = load_images_config(REPO / "configs" / "images.yaml")
    assert config.version == 1
    assert config.release == "1.30.0"
    assert config.platforms == (Platform("linux", "amd64"),)
    assert config.registry("gcr.io").endpoint == "http://127.0.0.1:5101"
    refs = [str(spec.reference) for spec in config.images]
    assert "gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0" in refs
    etcd = next(s for s in config.images if s.reference.repository.endswith("/etcd"))
    assert etcd.filter == TagFilter(globs=("v3.4.*",), latest=3)
    assert (etcd.reference.tag, etcd.reference.digest) == (None, None)


def test_full_config(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        r"""
        version: 1
        release: "1.30.0"
        platforms: [linux/amd64, linux/arm64/v8]
        registries:
          GCR.io:
            endpoint: HTTP://127.0.0.1:5101/
            cacert: certs/gcr-ca.crt
            gcrKeyPath: /etc/bmsync/gcr-key.json
          index.docker.io:
            usernameEnv: HUB_USER
            passwordEnv: HUB_PASSWORD
          "localhost:5000":
            dockerConfig: ~/docker/config.json
          quay.io:
        images:
          - gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0
          - nginx
          - name: gcr.io/anthos-baremetal-release/etcd
            tags: ["v3.4.*"]
            regex: '^v3\.4\.'
            semver: '>=3.4 <3.5'
            latest: 3
          - name: gcr.io/anthos-baremetal-release/etcd
            latest: 1
        """,
    )
    assert config.path == str(tmp_path / "images.yaml")
    assert config.platforms == (Platform("linux", "amd64"), Platform("linux", "arm64", "v8"))
    assert set(config.registries) == {"gcr.io", "docker.io", "localhost:5000", "quay.io"}
    assert config.registries["gcr.io"] == RegistrySettings(
        host="gcr.io",
        endpoint="http://127.0.0.1:5101",
        cacert=str(tmp_path / "certs" / "gcr-ca.crt"),
        gcr_key_path="/etc/bmsync/gcr-key.json",
    )
    assert config.registry("registry-1.docker.io") == RegistrySettings(
        host="docker.io", username_env="HUB_USER", password_env="HUB_PASSWORD"
    )
    assert config.registry("localhost:5000").docker_config == os.path.expanduser(
        "~/docker/config.json"
    )
    assert config.registry("quay.io") == RegistrySettings(host="quay.io")
    assert config.registry("ghcr.io") == RegistrySettings(host="ghcr.io")
    assert [(str(s.reference), s.filter, s.line) for s in config.images] == [
        ("gcr.io/anthos-baremetal-release/kube-rbac-proxy:v0.6.0-gke.0", None, 16),
        ("docker.io/library/nginx:latest", None, 17),
        (
            "gcr.io/anthos-baremetal-release/etcd",
            TagFilter(globs=("v3.4.*",), regex=r"^v3\.4\.", semver=">=3.4 <3.5", latest=3),
            18,
        ),
        ("gcr.io/anthos-baremetal-release/etcd", TagFilter(latest=1), 23),
    ]
    assert config.images[1].reference == parse_reference("nginx")


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, HEAD + "platforms:\nregistries:\nimages: [nginx]\n")
    assert config.platforms == ()
    assert dict(config.registries) == {}
    assert dict(config.extra) == {}


def test_extra_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        HEAD + "objectStore:\n  url: s3://bucket/prefix\nfullEvery: 7\nimages: [nginx]\n",
        extra_keys=("objectStore", "versionScheme", "fullEvery"),
    )
    assert dict(config.extra) == {"objectStore": {"url": "s3://bucket/prefix"}, "fullEvery": 7}
    assert dict(config.extra_lines) == {"objectStore": 3, "fullEvery": 5}
    with pytest.raises(ConfigError) as info:
        load(tmp_path, HEAD + "fullEvery: 7\nimages: [nginx]\n")
    assert (info.value.key, info.value.line) == ("fullEvery", 3)
    # Values of extra keys are built with the safe constructor: no Python objects.
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            HEAD + "images: [nginx]\nobjectStore: !!python/object:os.system ls\n",
            extra_keys=("objectStore",),
        )
    assert info.value.line == 4
    assert "invalid YAML: could not determine a constructor" in str(info.value)


ERRORS = [
    # YAML text, key, line, message fragment
    (
        HEAD + "images: [nginx]\nimagez: []\n",
        "imagez",
        4,
        "unknown key (allowed: version, release, platforms, registries, images)",
    ),
    (
        HEAD + "images:\n  - nginx\n  - name: gcr.io/x/etcd\n    tagz: [a]\n",
        "images[1].tagz",
        6,
        "did you mean 'tags'?",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpont: http://x\nimages: [nginx]\n",
        "registries.gcr.io.endpont",
        5,
        "did you mean 'endpoint'?",
    ),
    (HEAD + "images: [nginx]\nrelease: '2'\n", "release", 4, "duplicate key (first at line 2)"),
    ('release: "1"\nimages: [nginx]\n', "version", 1, "required key is missing"),
    ("version: 1\nimages: [nginx]\n", "release", 1, "required key is missing"),
    (HEAD, "images", 1, "required key is missing"),
    (
        'version: 2\nrelease: "1"\nimages: [nginx]\n',
        "version",
        1,
        "unsupported version 2 (supported: 1)",
    ),
    ('version: "1"\nrelease: "1"\nimages: [nginx]\n', "version", 1, "must be an integer"),
    ("version: 1\nrelease: 1.30\nimages: [nginx]\n", "release", 2, 'quote it: release: "1.30"'),
    (
        "version: 1\nrelease: 1.30\nimages: [nginx]\n",
        "release",
        2,
        "must be a string, got a number",
    ),
    ("version: 1\nrelease: 2024-01-02\nimages: [nginx]\n", "release", 2, "got a date"),
    ("version: 1\nrelease: 1.30.0/x\nimages: [nginx]\n", "release", 2, "cannot name a bundle file"),
    ("version: 1\nrelease: ..\nimages: [nginx]\n", "release", 2, "cannot name a bundle file"),
    ('version: 1\nrelease: ""\nimages: [nginx]\n', "release", 2, "must not be empty"),
    (
        HEAD + "platforms: [linux/amd64, windows]\nimages: [nginx]\n",
        "platforms[1]",
        3,
        "invalid platform 'windows'",
    ),
    (HEAD + "platforms: linux/amd64\nimages: [nginx]\n", "platforms", 3, "must be a list"),
    (
        HEAD + "platforms:\n  - linux/amd64\n  - linux/amd64\nimages: [nginx]\n",
        "platforms[1]",
        5,
        "duplicate platform linux/amd64 (first at line 4)",
    ),
    (HEAD + "images: []\n", "images", 3, "empty list"),
    (HEAD + "images:\n", "images", 3, "must be a list, got nothing (null)"),
    (
        HEAD + "images:\n  - nginx\n  - gcr.io/Anthos/app:1\n",
        "images[1]",
        5,
        "invalid image reference 'gcr.io/Anthos/app:1'",
    ),
    (HEAD + "images:\n  - gcr.io/a/b:\n", "images[0]", 4, "the tag after ':' is missing"),
    (HEAD + "images:\n  - 'gcr.io/a/b:'\n", "images[0]", 4, "empty tag"),
    (HEAD + "images:\n  - 42\n", "images[0]", 4, "must be a string, got an integer"),
    (
        HEAD + "images:\n  - gcr.io/a/b:1\n  - nginx\n  - gcr.io/a/b:1\n",
        "images[2]",
        6,
        "duplicate image gcr.io/a/b:1 (first at line 4)",
    ),
    (
        HEAD + "images:\n  - nginx:latest\n  - docker.io/library/nginx\n",
        "images[1]",
        5,
        "duplicate image docker.io/library/nginx:latest (first at line 4)",
    ),
    (
        HEAD
        + "images:\n  - name: gcr.io/x/etcd\n    latest: 1\n"
        + "  - name: gcr.io/x/etcd\n    latest: 1\n",
        "images[1]",
        6,
        "duplicate image gcr.io/x/etcd (first at line 4)",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd:v3.4.0\n    latest: 1\n",
        "images[0].name",
        4,
        "must not carry a tag or digest",
    ),
    (HEAD + "images:\n  - name: gcr.io/x/etcd\n", "images[0]", 4, "but not which tags"),
    (HEAD + "images:\n  - tags: [v1]\n", "images[0].name", 4, "required key is missing"),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    tags: v3.4.*\n",
        "images[0].tags",
        5,
        "must be a list",
    ),
    (HEAD + "images:\n  - name: gcr.io/x/etcd\n    tags: []\n", "images[0].tags", 5, "empty list"),
    (
        HEAD + "images:\n  - name: gcr.io/x/e\n    tags: [v1, '']\n",
        "images[0].tags[1]",
        5,
        "must not be empty",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    regex: 'v(3'\n",
        "images[0].regex",
        5,
        "invalid regex 'v(3'",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    tags: [v3*]\n    semver: '>=3.4,'\n",
        "images[0].semver",
        6,
        "invalid semver constraint '>=3.4,'",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    semver: 3.4\n",
        "images[0].semver",
        5,
        "quote it",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    latest: 0\n",
        "images[0].latest",
        5,
        "at least 1",
    ),
    (
        HEAD + "images:\n  - name: gcr.io/x/etcd\n    latest: '3'\n",
        "images[0].latest",
        5,
        "must be an integer",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpoint: ftp://127.0.0.1:5101\nimages: [nginx]\n",
        "registries.gcr.io.endpoint",
        5,
        "must start with http:// or https://",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpoint: http://127.0.0.1:5101/v2\nimages: [nginx]\n",
        "registries.gcr.io.endpoint",
        5,
        "must not have a path",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpoint: http://u:p@127.0.0.1:5101\nimages: [nginx]\n",
        "registries.gcr.io.endpoint",
        5,
        "credentials do not belong in the endpoint",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpoint: http://127.0.0.1:99999\nimages: [nginx]\n",
        "registries.gcr.io.endpoint",
        5,
        "out of range",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    endpoint: http://127.0.0.1:5101?x=1\nimages: [nginx]\n",
        "registries.gcr.io.endpoint",
        5,
        "must not have a query",
    ),
    (
        HEAD
        + "registries:\n  gcr.io:\n    gcrKeyPath: k.json\n    dockerConfig: c.json\n"
        + "images: [nginx]\n",
        "registries.gcr.io.dockerConfig",
        6,
        "gcrKeyPath already gives the credentials for gcr.io",
    ),
    (
        HEAD + "registries:\n  gcr.io:\n    usernameEnv: USER\nimages: [nginx]\n",
        "registries.gcr.io.usernameEnv",
        5,
        "needs passwordEnv beside it",
    ),
    (
        HEAD
        + "registries:\n  gcr.io:\n    usernameEnv: U\n    passwordEnv: my-password\n"
        + "images: [nginx]\n",
        "registries.gcr.io.passwordEnv",
        6,
        "'my-password' is not an environment variable name",
    ),
    (
        HEAD + "registries:\n  docker.io: {}\n  index.docker.io: {}\nimages: [nginx]\n",
        "registries.index.docker.io",
        5,
        "same registry as 'docker.io' at line 4",
    ),
    (
        HEAD + "registries:\n  bad_host: {}\nimages: [nginx]\n",
        "registries.bad_host",
        4,
        "invalid registry host 'bad_host'",
    ),
    (
        HEAD + "registries: [gcr.io]\nimages: [nginx]\n",
        "registries",
        3,
        "must be a mapping, got a list",
    ),
    (HEAD + "images: [nginx]\n1: x\n", None, 4, "keys must be strings, got an integer"),
    (HEAD + "images:\n  - nginx\n  - [oops\n", None, 6, "invalid YAML"),
    (HEAD + "images:\n  - nginx\n    bad: indent\n", None, 5, "invalid YAML"),
    ("- just\n- a list\n", None, 1, "must be a mapping, got a list"),
    (HEAD + "images: [!custom nginx]\n", "images[0]", 3, "must be a string, got a !custom value"),
    (HEAD + "images: [nginx]\n? [a, b]\n: x\n", None, 4, "keys must be strings, got a list"),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), ERRORS)
def test_config_errors(
    tmp_path: Path, text: str, key: str | None, line: int, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_images_config(path)
    error = info.value
    assert (error.path, error.key, error.line) == (str(path), key, line)
    message = str(error)
    assert fragment in message
    where = f"{path}:{line}: {key}: " if key else f"{path}:{line}: "
    assert message.startswith(where)
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_images_config(path)
    assert str(info.value) == f"{path}: no such file"


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# only a comment\n")
    with pytest.raises(ConfigError) as info:
        load_images_config(path)
    assert str(info.value).startswith(f"{path}: empty file")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "images.yaml"
    path.write_bytes(b"version: 1\nrelease: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_images_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text"


def test_extra_keys_must_not_shadow_own_keys(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "images: [nginx]\n")
    with pytest.raises(ValueError, match="release"):
        load_images_config(path, extra_keys=("release",))
