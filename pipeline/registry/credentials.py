"""Registry credentials: docker ``config.json``, credential helpers, gcr.io keys, env.

Each ``from_*`` function returns a :class:`Credential` or raises
:class:`~pipeline.errors.CredentialError`; ``from_docker_config`` alone may also
return ``None`` ("this config holds nothing for that host": go anonymous).

Lookups fail closed: a credential source that exists but cannot be read, or a
credential helper that breaks, raises rather than silently falling back to
anonymous access, so a nightly sync never pulls from the wrong place or with the
wrong identity without saying so. No message ever holds a secret or the content of
a file or helper output that may hold one; messages name the file, the helper, the
host or the variable instead.

All functions are thread-safe: they keep no state between calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CredentialError
from pipeline.reference import DOCKER_HUB, DOCKER_HUB_ALIASES

# The server URL Docker itself files Docker Hub credentials under (`docker login`
# with no argument); helpers expect exactly this string for Docker Hub.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"

# Seconds a credential helper may take. Read at call time so tests can shorten it.
HELPER_TIMEOUT_SECONDS = 10.0

# What docker-credential-helpers print (credentials.ErrCredentialsNotFound) when they
# hold nothing for a server; any other failure is an error.
_NOT_FOUND_TEXT = "credentials not found"
# Username a helper returns when Secret is an identity (OAuth2 refresh) token
# rather than a password (docker-credential-helpers, "tokenUsername").
_TOKEN_USERNAME = "<token>"


@dataclass(frozen=True, repr=False)
class Credential:
    """A username/password pair, optionally with an identity token, and its origin.

    ``identity_token`` is a docker ``identitytoken`` (an OAuth2 refresh token for the
    Bearer flow); when it is set, ``username`` and ``password`` may be empty.
    ``source`` says where the credential came from, for messages. ``repr`` and
    ``str`` show the username and the source only, never the secrets.
    """

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = ""

    def __repr__(self) -> str:
        token = ", identity_token=<redacted>" if self.identity_token else ""
        return (
            f"Credential(username={self.username!r}, password=<redacted>{token}, "
            f"source={self.source!r})"
        )

    __str__ = __repr__


def docker_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The docker config file to read.

    ``explicit`` (a file, or a directory holding ``config.json`` like docker's
    ``--config``), else ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``. The path is not checked for existence.
    """
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser()
        return path / "config.json" if path.is_dir() else path
    env_dir = os.environ.get("DOCKER_CONFIG")
    if env_dir:
        return Path(env_dir).expanduser() / "config.json"
    return Path.home() / ".docker" / "config.json"


def registry_host(server: str) -> str:
    """The registry host a ``config.json`` key or a server name stands for.

    Strips the scheme and any path, lowercases, and maps every Docker Hub alias
    (``https://index.docker.io/v1/``, ``index.docker.io``, ``registry-1.docker.io``)
    to ``docker.io``. The port stays: ``host:5000`` and ``host`` are different
    registries.
    """
    text = server.strip().lower()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    return DOCKER_HUB if text in DOCKER_HUB_ALIASES else text


def from_docker_config(host: str, path: str | os.PathLike[str] | None = None) -> Credential | None:
    """The credential a docker config file gives for registry ``host``, or None.

    ``host`` is a registry host (``gcr.io``, ``127.0.0.1:5000``, any Docker Hub
    alias). ``path`` as for :func:`docker_config_path`; an explicit path that does
    not exist raises, the default one missing means None.

    Docker's precedence: ``credHelpers[host]`` when present decides alone (its
    "not found" means None); else ``credsStore`` when set is asked, and when it
    holds nothing the ``auths`` entries are used; else the ``auths`` entries.
    Keys match the EXACT host after :func:`registry_host` (a key for ``gcr.io``
    never serves ``eu.gcr.io`` or ``gcr.io.evil.com``).

    Raises CredentialError for an unreadable or malformed file (naming the file,
    never its content) and for a helper that is missing, times out, fails or
    answers garbage (naming the helper and the host, never its output).
    """
    config_file = docker_config_path(path)
    explicit = path is not None and str(path) != ""
    try:
        data = config_file.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise CredentialError(
                f"docker config {config_file} does not exist",
                hint="check --docker-config / dockerConfig",
            ) from None
        return None
    except OSError as exc:
        raise CredentialError(
            f"cannot read docker config {config_file}: {exc.strerror or type(exc).__name__}"
        ) from None
    config = _load_config(data, config_file)

    wanted = registry_host(host)
    auth_keys = [key for key in config.auths if registry_host(key) == wanted]

    helper = config.cred_helpers.get(wanted)
    if helper is None:
        # credHelpers keys are written like auths keys; match them the same way.
        for key, name in config.cred_helpers.items():
            if registry_host(key) == wanted:
                helper = name
                break
    if helper is not None:
        return _run_helper(helper, _server_url(wanted, auth_keys), wanted, "credHelpers")

    if config.creds_store:
        found = _run_helper(
            config.creds_store, _server_url(wanted, auth_keys), wanted, "credsStore"
        )
        if found is not None:
            return found

    for key in auth_keys:
        credential = _from_auth_entry(config.auths[key], key, config_file)
        if credential is not None:
            return credential
    return None


def from_gcr_key(path: str | os.PathLike[str]) -> Credential:
    """A gcr.io service-account key file as a credential.

    Username ``_json_key``, password the file's text exactly as read (gcr.io and
    Artifact Registry take the key JSON as the Basic password). The file must be a
    JSON object with ``"type": "service_account"`` and a ``client_email``; anything
    else raises CredentialError naming the path, never the content.
    """
    key_path = Path(path).expanduser()
    try:
        text = key_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialError(
            f"gcr key file {key_path} does not exist", hint="check gcrKeyPath"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CredentialError(f"cannot read gcr key file {key_path}: {reason}") from None
    try:
        key = json.loads(text)
    except json.JSONDecodeError:
        raise CredentialError(
            f"gcr key file {key_path} is not valid JSON",
            hint="use the JSON key downloaded for the service account",
        ) from None
    if (
        not isinstance(key, dict)
        or key.get("type") != "service_account"
        or not isinstance(key.get("client_email"), str)
        or not key["client_email"]
    ):
        raise CredentialError(
            f"gcr key file {key_path} is not a service-account key "
            '(needs "type": "service_account" and a "client_email")',
            hint="use the JSON key downloaded for the service account",
        )
    return Credential(username="_json_key", password=text, source=f"gcrKeyPath {key_path}")


def from_env(username_env: str, password_env: str) -> Credential:
    """A credential from two environment variables, both set and non-empty.

    Raises CredentialError naming the variables that are missing or empty.
    """
    username = os.environ.get(username_env, "")
    password = os.environ.get(password_env, "")
    missing = [
        name for name, value in ((username_env, username), (password_env, password)) if not value
    ]
    if missing:
        raise CredentialError(
            f"environment variable{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)} not set or empty",
            hint=f"export {username_env} and {password_env}",
        )
    return Credential(
        username=username, password=password, source=f"env {username_env}/{password_env}"
    )


@dataclass(frozen=True)
class _DockerConfig:
    auths: Mapping[str, Any]
    cred_helpers: Mapping[str, str]
    creds_store: str | None


def _load_config(data: bytes, config_file: Path) -> _DockerConfig:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CredentialError(f"docker config {config_file} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CredentialError(f"docker config {config_file} is not a JSON object")
    auths = doc.get("auths", {})
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise CredentialError(f"docker config {config_file}: 'auths' is not an object")
    helpers = doc.get("credHelpers", {})
    if helpers is None:
        helpers = {}
    if not isinstance(helpers, dict) or not all(isinstance(v, str) and v for v in helpers.values()):
        raise CredentialError(
            f"docker config {config_file}: 'credHelpers' must map hosts to helper names"
        )
    store = doc.get("credsStore")
    if store is not None and not isinstance(store, str):
        raise CredentialError(f"docker config {config_file}: 'credsStore' is not a string")
    return _DockerConfig(auths=auths, cred_helpers=helpers, creds_store=store or None)


def _from_auth_entry(entry: Any, key: str, config_file: Path) -> Credential | None:
    """One ``auths`` entry; None when it holds no credential (credsStore leaves ``{}``)."""
    where = f"docker config {config_file}: auths[{key!r}]"
    if not isinstance(entry, dict):
        raise CredentialError(f"{where} is not an object")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    token = entry.get("identitytoken") or None
    if not all(isinstance(v, str) for v in (username, password)) or not (
        token is None or isinstance(token, str)
    ):
        raise CredentialError(f"{where}: username, password and identitytoken must be strings")
    encoded = entry.get("auth")
    if encoded:
        if not isinstance(encoded, str):
            raise CredentialError(f"{where}: 'auth' is not a string")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialError(f"{where}: 'auth' is not base64 of user:password") from None
        # Split at the first ':' only: passwords (and gcr JSON keys) contain colons,
        # usernames cannot.
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialError(f"{where}: 'auth' is not base64 of user:password")
    if not username and not password and not token:
        return None
    return Credential(
        username=username,
        password=password,
        identity_token=token,
        source=f"{config_file} auths",
    )


def _server_url(host: str, auth_keys: list[str]) -> str:
    """The server URL to ask a helper for: how docker would have filed it.

    ``docker login`` stores under the server string it was given, which is also the
    ``auths`` key it writes; when such a key exists we ask for it verbatim.
    """
    if auth_keys:
        return auth_keys[0]
    return DOCKER_HUB_SERVER_URL if host == DOCKER_HUB else host


def _run_helper(name: str, server_url: str, host: str, kind: str) -> Credential | None:
    """Run ``docker-credential-<name> get`` for ``server_url`` (docker's helper protocol)."""
    label = f"credential helper docker-credential-{name} ({kind}) for {host}"
    if "/" in name or os.sep in name:
        raise CredentialError(f"{label}: invalid helper name")
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        raise CredentialError(
            f"{label}: program docker-credential-{name} not found on PATH",
            hint="install the helper or remove it from the docker config",
        )
    try:
        # A new session, so that on timeout the whole process group (a shell script
        # and whatever it started) is killed and its pipes close.
        proc = subprocess.Popen(
            [program, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise CredentialError(
            f"{label}: cannot run: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        out, err = proc.communicate(server_url.encode("utf-8"), timeout=HELPER_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise CredentialError(f"{label}: timed out after {HELPER_TIMEOUT_SECONDS:g} s") from None

    if proc.returncode != 0:
        if _NOT_FOUND_TEXT in (out + err).decode("utf-8", "replace").lower():
            return None
        # The output is never quoted: a half-working helper may print secrets.
        raise CredentialError(f"{label}: failed with exit status {proc.returncode}")
    try:
        answer = json.loads(out)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CredentialError(f"{label}: answered something that is not JSON") from None
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("Username", ""), str)
        or not isinstance(answer.get("Secret"), str)
        or not answer["Secret"]
    ):
        raise CredentialError(f"{label}: answer lacks a Username/Secret pair")
    username: str = answer.get("Username", "")
    secret: str = answer["Secret"]
    source = f"{kind} ({name})"
    if username == _TOKEN_USERNAME:
        return Credential(username="", password="", identity_token=secret, source=source)
    return Credential(username=username, password=secret, source=source)
