"""Credentials from docker config.json, credential helpers, gcr.io keys and env."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import CredentialError
from pipeline.registry import credentials
from pipeline.registry.credentials import (
    Credential,
    docker_config_path,
    from_docker_config,
    from_env,
    from_gcr_key,
)

SECRET = "s3cr3t-Do-Not-Print"


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write_config(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH for fake docker-credential-* programs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def _helper(bin_dir: Path, name: str, body: str) -> Path:
    """A shell-script helper; it saves its stdin (the server URL) beside itself."""
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = get ] || exit 9\ncat > "{bin_dir}/{name}.stdin"\n{body}\n'
    )
    script.chmod(0o755)
    return script


def _found(username: str, secret: str) -> str:
    answer = json.dumps({"ServerURL": "x", "Username": username, "Secret": secret})
    return f"echo '{answer}'"


# --- auths: exact host matching -------------------------------------------------

AUTHS = {
    "gcr.io": _auth("gcr-user", "p1"),
    "https://eu.gcr.io/v1/": _auth("eu-user", "p2"),
    "127.0.0.1:5000": _auth("port-user", "p3"),
    "http://localhost:5001": _auth("http-user", "p4"),
    "https://index.docker.io/v1/": _auth("hub-user", "p5"),
}


@pytest.mark.parametrize(
    ("host", "expected_user"),
    [
        ("gcr.io", "gcr-user"),
        ("GCR.io", "gcr-user"),
        ("https://gcr.io", "gcr-user"),
        ("eu.gcr.io", "eu-user"),
        ("us.gcr.io", None),
        ("gcr.io.evil.com", None),
        ("evilgcr.io", None),
        ("io", None),
        ("127.0.0.1:5000", "port-user"),
        ("127.0.0.1", None),
        ("127.0.0.1:50000", None),
        ("localhost:5001", "http-user"),
        ("localhost", None),
        ("docker.io", "hub-user"),
        ("index.docker.io", "hub-user"),
        ("registry-1.docker.io", "hub-user"),
        ("quay.io", None),
    ],
)
def test_auths_match_exact_host(tmp_path: Path, host: str, expected_user: str | None) -> None:
    path = _write_config(tmp_path, {"auths": AUTHS})
    cred = from_docker_config(host, path)
    assert (cred.username if cred else None) == expected_user


@pytest.mark.parametrize(
    "key", ["gcr.io.evil.com", "evil.com/gcr.io", "https://evil.com/gcr.io", "eu.gcr.io", "io"]
)
def test_lookalike_keys_never_serve_gcr_io(tmp_path: Path, key: str) -> None:
    path = _write_config(tmp_path, {"auths": {key: _auth("attacker", "x")}})
    assert from_docker_config("gcr.io", path) is None


@pytest.mark.parametrize(
    "key",
    [
        "https://index.docker.io/v1/",
        "index.docker.io",
        "registry-1.docker.io",
        "docker.io",
        "https://registry-1.docker.io",
    ],
)
@pytest.mark.parametrize("host", ["docker.io", "registry-1.docker.io", "index.docker.io"])
def test_docker_hub_aliases(tmp_path: Path, key: str, host: str) -> None:
    path = _write_config(tmp_path, {"auths": {key: _auth("hub", "pw")}})
    cred = from_docker_config(host, path)
    assert cred is not None and (cred.username, cred.password) == ("hub", "pw")


def test_auth_password_may_contain_colons(tmp_path: Path) -> None:
    key_json = '{"type": "service_account", "private_key": "a:b:c"}'
    path = _write_config(
        tmp_path, {"auths": {"r1": _auth("u", "pa:ss:word"), "r2": _auth("_json_key", key_json)}}
    )
    first = from_docker_config("r1", path)
    second = from_docker_config("r2", path)
    assert first is not None and (first.username, first.password) == ("u", "pa:ss:word")
    assert second is not None and second.password == key_json
    assert "auths" in first.source


def test_separate_username_password_and_identity_token(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        {
            "auths": {
                "a.example": {"username": "alice", "password": "pw"},
                "b.example": {"identitytoken": "refresh-token"},
                "c.example": {},
            }
        },
    )
    a = from_docker_config("a.example", path)
    b = from_docker_config("b.example", path)
    assert a is not None and (a.username, a.password, a.identity_token) == ("alice", "pw", None)
    assert b is not None and b.identity_token == "refresh-token"
    # credsStore leaves empty entries behind: they hold no credential.
    assert from_docker_config("c.example", path) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f'{{"auths": {{"gcr.io": {{"auth": "{SECRET}"', "not valid JSON"),
        (f'["{SECRET}"]', "not a JSON object"),
        (f'{{"auths": ["{SECRET}"]}}', "'auths' is not an object"),
        (f'{{"auths": {{"gcr.io": {{"auth": "!!{SECRET}!!"}}}}}}', "not base64"),
        (
            json.dumps({"auths": {"gcr.io": {"auth": base64.b64encode(SECRET.encode()).decode()}}}),
            "not base64 of user:password",
        ),
        (f'{{"credHelpers": {{"gcr.io": 7}}, "x": "{SECRET}"}}', "credHelpers"),
        (f'{{"credsStore": ["{SECRET}"]}}', "credsStore"),
    ],
)
def test_malformed_config_names_file_not_content(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(CredentialError) as info:
        from_docker_config("gcr.io", path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert SECRET not in message
    assert info.value.exit_code == 3


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(CredentialError, match="does not exist"):
        from_docker_config("gcr.io", missing)


def test_default_missing_path_means_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert from_docker_config("gcr.io") is None


def test_default_path_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".docker").mkdir()
    _write_config(tmp_path / ".docker", {"auths": {"gcr.io": _auth("home", "pw")}})
    cred = from_docker_config("gcr.io")
    assert cred is not None and cred.username == "home"


def test_docker_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert docker_config_path() == tmp_path / "home" / ".docker" / "config.json"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    assert docker_config_path() == tmp_path / "dc" / "config.json"
    assert docker_config_path(str(tmp_path / "x.json")) == tmp_path / "x.json"
    # A directory, as docker's --config takes, means the config.json inside it.
    assert docker_config_path(tmp_path) == tmp_path / "config.json"


# --- credential helpers ---------------------------------------------------------


def test_cred_helper_for_host_wins_over_auths(tmp_path: Path, helper_bin: Path) -> None:
    _helper(helper_bin, "gcloud", _found("oauth2accesstoken", "ya29.token"))
    path = _write_config(
        tmp_path,
        {"auths": {"gcr.io": _auth("file-user", "pw")}, "credHelpers": {"gcr.io": "gcloud"}},
    )
    cred = from_docker_config("gcr.io", path)
    assert cred is not None
    assert (cred.username, cred.password) == ("oauth2accesstoken", "ya29.token")
    assert cred.source == "credHelpers (gcloud)"
    assert (helper_bin / "gcloud.stdin").read_text() == "gcr.io"


def test_cred_helper_is_only_for_its_exact_host(tmp_path: Path, helper_bin: Path) -> None:
    _helper(helper_bin, "gcloud", _found("u", "s"))
    path = _write_config(tmp_path, {"credHelpers": {"gcr.io": "gcloud"}})
    assert from_docker_config("gcr.io.evil.com", path) is None
    assert from_docker_config("eu.gcr.io", path) is None
    assert not (helper_bin / "gcloud.stdin").exists()


def test_cred_helper_not_found_means_none(tmp_path: Path, helper_bin: Path) -> None:
    _helper(helper_bin, "pass", "echo 'credentials not found in native keychain'; exit 1")
    path = _write_config(
        tmp_path,
        {"auths": {"gcr.io": _auth("file-user", "pw")}, "credHelpers": {"gcr.io": "pass"}},
    )
    # Docker asks only the host's helper when one is configured.
    assert from_docker_config("gcr.io", path) is None


def test_cred_helper_identity_token(tmp_path: Path, helper_bin: Path) -> None:
    _helper(helper_bin, "acr", _found("<token>", "refresh-123"))
    path = _write_config(tmp_path, {"credHelpers": {"r.example": "acr"}})
    cred = from_docker_config("r.example", path)
    assert cred is not None
    assert cred.identity_token == "refresh-123" and cred.password == ""


def test_creds_store_then_auths(tmp_path: Path, helper_bin: Path) -> None:
    _helper(
        helper_bin,
        "store",
        f'case "$(cat "{helper_bin}/store.stdin")" in\n'
        f"  https://index.docker.io/v1/) {_found('hub-user', 'hub-pw')} ;;\n"
        "  *) echo 'credentials not found in native keychain' >&2; exit 1 ;;\n"
        "esac",
    )
    path = _write_config(
        tmp_path,
        {"credsStore": "store", "auths": {"quay.io": _auth("file-user", "pw")}},
    )
    hub = from_docker_config("registry-1.docker.io", path)
    assert hub is not None and (hub.username, hub.source) == ("hub-user", "credsStore (store)")
    assert (helper_bin / "store.stdin").read_text() == "https://index.docker.io/v1/"
    # The store holds nothing for quay.io: the auths entry is used.
    quay = from_docker_config("quay.io", path)
    assert quay is not None and quay.username == "file-user"
    assert from_docker_config("ghcr.io", path) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f"echo '{SECRET}'; echo 'boom' >&2; exit 3", "exit status 3"),
        (f"echo 'not json {SECRET}'", "not JSON"),
        (f'echo \'{{"Username": "u", "Password": "{SECRET}"}}\'', "Username/Secret"),
        (f"echo '[\"{SECRET}\"]'", "Username/Secret"),
    ],
)
def test_broken_helper_fails_closed_without_echoing_output(
    tmp_path: Path, helper_bin: Path, body: str, expected: str
) -> None:
    _helper(helper_bin, "broken", body)
    path = _write_config(
        tmp_path,
        {"auths": {"gcr.io": _auth("file-user", "pw")}, "credsStore": "broken"},
    )
    with pytest.raises(CredentialError) as info:
        from_docker_config("gcr.io", path)
    message = str(info.value)
    assert "docker-credential-broken" in message and "gcr.io" in message
    assert expected in message
    assert SECRET not in message


def test_missing_helper_program_fails_closed(tmp_path: Path, helper_bin: Path) -> None:
    path = _write_config(tmp_path, {"credHelpers": {"gcr.io": "nonexistent-xyz"}})
    with pytest.raises(CredentialError, match="docker-credential-nonexistent-xyz.*gcr.io"):
        from_docker_config("gcr.io", path)


def test_slow_helper_times_out(
    tmp_path: Path, helper_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT_SECONDS", 0.5)
    # `sleep` runs as a child of the script: the whole group must be killed, or the
    # open pipe would keep us waiting for it.
    _helper(helper_bin, "slow", "sleep 30")
    path = _write_config(tmp_path, {"credHelpers": {"gcr.io": "slow"}})
    started = time.monotonic()
    with pytest.raises(CredentialError, match="docker-credential-slow.*gcr.io.*timed out"):
        from_docker_config("gcr.io", path)
    assert time.monotonic() - started < 5


# --- gcr.io service-account keys ------------------------------------------------


def test_gcr_key(tmp_path: Path) -> None:
    text = (
        json.dumps(
            {
                "type": "service_account",
                "client_email": "sync@proj.iam.gserviceaccount.com",
                "private_key": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n",
            },
            indent=2,
        )
        + "\n"
    )
    key = tmp_path / "key.json"
    key.write_text(text)
    cred = from_gcr_key(key)
    assert cred.username == "_json_key"
    assert cred.password == text
    assert cred.source == f"gcrKeyPath {key}"


@pytest.mark.parametrize(
    "content",
    [
        f"not json {SECRET}",
        json.dumps({"type": "authorized_user", "client_email": "a@b", "k": SECRET}),
        json.dumps({"type": "service_account", "k": SECRET}),
        json.dumps({"type": "service_account", "client_email": "", "k": SECRET}),
        json.dumps([SECRET]),
    ],
)
def test_bad_gcr_key_names_path_not_content(tmp_path: Path, content: str) -> None:
    key = tmp_path / "key.json"
    key.write_text(content)
    with pytest.raises(CredentialError) as info:
        from_gcr_key(key)
    assert str(key) in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_gcr_key(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="does not exist"):
        from_gcr_key(tmp_path / "absent.json")


# --- environment ----------------------------------------------------------------


def test_env_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BMSYNC_USER", "robot")
    monkeypatch.setenv("BMSYNC_PASS", SECRET)
    cred = from_env("BMSYNC_USER", "BMSYNC_PASS")
    assert (cred.username, cred.password) == ("robot", SECRET)
    assert cred.source == "env BMSYNC_USER/BMSYNC_PASS"


@pytest.mark.parametrize(
    ("user", "password", "named", "not_named"),
    [
        (None, SECRET, ["BMSYNC_USER"], ["BMSYNC_PASS"]),
        ("robot", "", ["BMSYNC_PASS"], ["BMSYNC_USER"]),
        (None, None, ["BMSYNC_USER", "BMSYNC_PASS"], []),
    ],
)
def test_env_missing_names_variables(
    monkeypatch: pytest.MonkeyPatch,
    user: str | None,
    password: str | None,
    named: list[str],
    not_named: list[str],
) -> None:
    for name, value in (("BMSYNC_USER", user), ("BMSYNC_PASS", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(CredentialError) as info:
        from_env("BMSYNC_USER", "BMSYNC_PASS")
    message = info.value.message
    assert all(n in message for n in named)
    assert not any(n in message for n in not_named)
    assert SECRET not in str(info.value)


# --- never shown ----------------------------------------------------------------


def test_repr_and_str_hide_secrets() -> None:
    cred = Credential("alice", SECRET, identity_token="tok-" + SECRET, source="test")
    for shown in (repr(cred), str(cred), f"{cred}", repr([cred])):
        assert "alice" in shown and "<redacted>" in shown
        assert SECRET not in shown
