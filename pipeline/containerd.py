"""Node configuration that makes containerd, CRI-O and the cluster pull from the mirrors.

From the mirrors (in the order they are tried) and the mirrored hosts (``gcr.io``
always, then any others), this module renders, as pure functions returning text:

- ``certs.d/<host>/hosts.toml`` (containerd >= 1.5): each mirror is a ``[host."URL"]``
  with ``capabilities = ["pull", "resolve"]``; a namespaced mirror's URL is
  ``https://HOST:PORT/v2/NS`` with ``override_path = true`` (containerd otherwise
  appends ``/v2`` itself and the namespace is lost); ``ca`` names the CA copied beside
  the file. ``server`` is the public host, or, with ``no_fallback``, the first mirror,
  because containerd 1.6 tries ``server`` after every ``[host]`` and a public
  ``server`` is a silent fallback;
- ``config.toml`` using ``config_path`` (points the CRI plugin at ``certs.d``) plus
  ``registry.configs."HOST:PORT".auth`` for mirrors that need a login (hosts.toml cannot
  hold credentials in containerd 1.6) and gcr.io's ``_json_key`` auth;
- ``config-legacy.toml``: ``registry.mirrors."<host>".endpoint`` lists with
  ``registry.configs`` TLS and auth, for nodes older than 1.5. It never shares a file
  with ``config_path``: containerd then refuses ``mirrors`` and runs without its CRI
  plugin. The legacy form always keeps the public host as a last fallback;
- ``registries.conf`` (v2) for CRI-O and podman;
- ``cluster-config.yaml``: the cluster config ``registryMirrors`` block.

:func:`write_config` renders everything first and writes only when every input was
valid, each file atomically; files holding credentials get mode 0600. Paths written
into the files are where the output directory is installed on the node
(``install_dir``, by default the output directory itself).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, CredentialError, UsageError
from pipeline.reference import Mirror, api_host, normalize_registry, parse_mirror
from pipeline.registry.credentials import Credential, from_docker_config, from_gcr_key
from pipeline.store import atomic_write

UPSTREAM = "gcr.io"
CRI = 'plugins."io.containerd.grpc.v1.cri"'
CERTS_DIR = "certs.d"
CONFIG_TOML = "config.toml"
CONFIG_TOML_LEGACY = "config-legacy.toml"
CLUSTER_CONFIG = "cluster-config.yaml"
REGISTRIES_CONF = "registries.conf"
PULL_CREDENTIAL_CONFIG = "pull-credential-config.json"
LEGACY_CA_DIR = "ca"

FORMATS = ("hosts", "config-toml", "config-toml-legacy", "cluster-config", "registries-conf")

REDACTED = "<redacted>"

# Where the public hosts' APIs live when they are the fallback ``server``.
LOCALHOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def hostname_of(netloc: str) -> str:
    """``HOST`` of ``HOST[:PORT]`` (``[v6]`` kept in brackets)."""
    if netloc.startswith("["):
        return netloc.split("]", 1)[0] + "]"
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def upstream_url(host: str) -> str:
    """What containerd pulls ``host`` from when no mirror answers (its default server):
    the generator writes it as ``server`` and the checker compares against it."""
    scheme = "http" if hostname_of(host) in LOCALHOSTS else "https"
    return f"{scheme}://{api_host(host)}"


@dataclass(frozen=True)
class MirrorEndpoint:
    """One mirror, with what a node needs to reach it.

    ``ca_file`` is the PEM CA of an https mirror (None: the system's); ``credential``
    its login (None: anonymous); ``pull_credential_config`` the docker config file
    the cluster config names for that login, if the operator keeps one.
    """

    mirror: Mirror
    ca_file: Path | None = None
    credential: Credential | None = field(default=None, repr=False)
    pull_credential_config: Path | None = None

    @property
    def url(self) -> str:
        """The endpoint URL nodes use: ``scheme://HOST:PORT[/v2/NS]``."""
        base = f"{self.mirror.scheme}://{self.mirror.host}"
        return f"{base}/v2/{self.mirror.namespace}" if self.mirror.namespace else base

    @property
    def location(self) -> str:
        """``HOST:PORT[/NS]``, the registries.conf form (no scheme)."""
        host = self.mirror.host
        return f"{host}/{self.mirror.namespace}" if self.mirror.namespace else host


@dataclass(frozen=True)
class MirrorSettings:
    """Everything the generated files say; valid by construction (see :func:`settings`).

    ``hosts`` are the mirrored hosts, ``gcr.io`` first. ``gcr_key`` is the gcr.io
    ``_json_key`` credential read from ``gcr_key_path``.
    """

    endpoints: tuple[MirrorEndpoint, ...]
    hosts: tuple[str, ...]
    gcr_key: Credential | None = field(default=None, repr=False)
    gcr_key_path: Path | None = None
    no_fallback: bool = False


@dataclass(frozen=True)
class GeneratedFile:
    """A file to write: ``path`` relative to the output directory, its bytes and mode.

    ``secret`` files hold credentials: mode 0600, and redacted when printed.
    """

    path: str
    data: bytes
    secret: bool = False

    @property
    def mode(self) -> int:
        return 0o600 if self.secret else 0o644


@dataclass(frozen=True)
class Change:
    """What :func:`write_config` did to one file: ``new``, ``changed`` or ``unchanged``.

    ``added`` and ``removed`` are the differing lines, secrets redacted.
    """

    path: Path
    status: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


# -- building and validating the settings ---------------------------------------------------


# A PEM certificate; the group is its base64 body.
PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----",
                             re.DOTALL)


def mirrored_host(text: str) -> str:
    """A host nodes pull through the mirrors (``quay.io``), as written in a config or on
    the command line: normalised; UsageError for a URL or a path."""
    name = text.strip()
    if "://" in name or "/" in name:
        raise UsageError(f"invalid mirrored host {text!r}", hint="write a host name: quay.io")
    return normalize_registry(name)


def read_ca(path: str | os.PathLike[str]) -> Path:
    """The absolute path of a CA file that exists and holds at least one PEM certificate.

    Raises :class:`UsageError` naming the file otherwise.
    """
    ca = Path(path).expanduser().absolute()
    try:
        text = ca.read_text(encoding="ascii")
    except FileNotFoundError:
        raise UsageError(f"CA file {ca} does not exist", hint="check --cacert") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a PEM text file"
        raise UsageError(f"cannot read CA file {ca}: {reason}", hint="check --cacert") from None
    bodies = PEM_CERTIFICATE.findall(text)
    if not bodies:
        raise UsageError(
            f"CA file {ca} holds no PEM certificate",
            hint="give the CA certificate in PEM form (-----BEGIN CERTIFICATE-----)",
        )
    for body in ("".join(b.split()) for b in bodies):
        try:
            der = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            der = b""
        # A DER certificate is an ASN.1 SEQUENCE (tag 0x30).
        if not der.startswith(b"\x30"):
            raise UsageError(f"CA file {ca} holds a PEM certificate that does not decode")
    return ca


def settings(
    endpoints: Sequence[MirrorEndpoint],
    *,
    hosts: Iterable[str] = (),
    gcr_key_path: str | os.PathLike[str] | None = None,
    no_fallback: bool = False,
) -> MirrorSettings:
    """Validated :class:`MirrorSettings` for ``endpoints`` (tried in order) and ``hosts``.

    ``gcr.io`` is always mirrored and comes first; naming it in ``hosts`` is allowed.
    Raises :class:`UsageError` for no mirror, a mirror or a host listed twice, a CA on a
    plain-http mirror, two CAs for one ``HOST:PORT``, a CA file that is missing or not
    PEM; :class:`CredentialError` for an unusable gcr key.
    """
    if not endpoints:
        raise UsageError("no mirror given", hint="pass --private-registry=https://HOST:PORT/NS")
    seen_urls: set[str] = set()
    cas: dict[str, Path | None] = {}
    checked: list[MirrorEndpoint] = []
    for endpoint in endpoints:
        if endpoint.url in seen_urls:
            raise UsageError(f"mirror {endpoint.url} is listed twice")
        seen_urls.add(endpoint.url)
        ca = endpoint.ca_file
        if ca is not None:
            if endpoint.mirror.scheme == "http":
                raise UsageError(
                    f"mirror {endpoint.url} is plain http: a CA file means nothing there",
                    hint="write https:// or drop the CA",
                )
            ca = read_ca(ca)
        host = endpoint.mirror.host
        if host in cas and cas[host] is not None and ca is not None and cas[host] != ca:
            raise UsageError(f"mirror host {host} is given two CA files: {cas[host]} and {ca}")
        cas[host] = cas.get(host) or ca
        checked.append(
            MirrorEndpoint(endpoint.mirror, ca, endpoint.credential,
                           endpoint.pull_credential_config)
        )

    named: list[str] = []
    for text in hosts:
        host = mirrored_host(text)
        if host in named:
            raise UsageError(f"host {host} is listed twice")
        named.append(host)
    # gcr.io is always mirrored; naming it too is redundant, not an error.
    mirrored = [UPSTREAM, *(h for h in named if h != UPSTREAM)]
    gcr_key = from_gcr_key(gcr_key_path) if gcr_key_path else None
    return MirrorSettings(
        endpoints=tuple(checked),
        hosts=tuple(mirrored),
        gcr_key=gcr_key,
        gcr_key_path=Path(gcr_key_path).expanduser().absolute() if gcr_key_path else None,
        no_fallback=no_fallback,
    )


def mirror_credentials(endpoints: Sequence[MirrorEndpoint]) -> dict[str, Credential]:
    """The login per mirror ``HOST:PORT``, the first given for a host winning."""
    found: dict[str, Credential] = {}
    for endpoint in endpoints:
        if endpoint.credential is not None and endpoint.mirror.host not in found:
            found[endpoint.mirror.host] = endpoint.credential
    return found


# -- TOML and the renderers -----------------------------------------------------------------


def _toml_string(value: str) -> str:
    """A TOML basic string (escapes per TOML 1.0 §String)."""
    out = ['"']
    for char in value:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def ca_file_name(host: str) -> str:
    """The name of a mirror's CA copy: ``127.0.0.1_5000.crt`` (no ``:`` in file names)."""
    return host.replace(":", "_").replace("[", "").replace("]", "") + ".crt"


def hosts_toml(settings: MirrorSettings, host: str, *, install_dir: Path) -> str:
    """``certs.d/<host>/hosts.toml`` for mirrored ``host``.

    ``ca`` paths point at ``install_dir/certs.d/<host>/<mirror>.crt``, where
    :func:`render` puts the copies.
    """
    host_dir = install_dir / CERTS_DIR / host
    lines = [f"# Generated by bmsync: {host} is pulled from its mirrors, in this order."]

    def entry(endpoint: MirrorEndpoint) -> list[str]:
        body = ['capabilities = ["pull", "resolve"]']
        if endpoint.mirror.namespace:
            # Without it containerd appends /v2 to the URL and the namespace is lost.
            body.append("override_path = true")
        if endpoint.ca_file is not None:
            ca = host_dir / ca_file_name(endpoint.mirror.host)
            body.append(f"ca = {_toml_string(str(ca))}")
        return body

    if settings.no_fallback:
        # containerd tries every [host] first and `server` last: the first mirror as the
        # server (tried again after the others) leaves no public host to fall back to.
        first = settings.endpoints[0]
        lines.append(f"server = {_toml_string(first.url)}")
        lines.extend(entry(first))
    else:
        upstream = upstream_url(host)
        lines.append(f"server = {_toml_string(upstream)}")
    # Every mirror is a [host], even the one that is also the server: containerd 1.6
    # rejects a hosts.toml without a host table ("invalid `host` tree").
    for endpoint in settings.endpoints:
        lines.append("")
        lines.append(f"[host.{_toml_string(endpoint.url)}]")
        lines.extend(f"  {line}" for line in entry(endpoint))
    return "\n".join(lines) + "\n"


def _auth_lines(settings: MirrorSettings, *, header: str) -> list[str]:
    lines: list[str] = []
    for host, credential in mirror_credentials(settings.endpoints).items():
        lines += ["", f"[{header}.{_toml_string(host)}.auth]"]
        lines += _credential_lines(credential)
    if settings.gcr_key is not None:
        lines += ["", f"[{header}.{_toml_string(UPSTREAM)}.auth]"]
        lines += _credential_lines(settings.gcr_key)
    return lines


def _credential_lines(credential: Credential) -> list[str]:
    if credential.identity_token:
        return [f"  identitytoken = {_toml_string(credential.identity_token)}"]
    return [
        f"  username = {_toml_string(credential.username)}",
        f"  password = {_toml_string(credential.password)}",
    ]


def config_toml(settings: MirrorSettings, *, install_dir: Path) -> str:
    """The containerd >= 1.5 ``config.toml`` part: ``config_path`` plus auth.

    Merge it into the node's ``/etc/containerd/config.toml`` (``version = 2``). It has
    no ``registry.mirrors``: containerd refuses those next to ``config_path``.
    """
    lines = [
        "# Generated by bmsync: merge into /etc/containerd/config.toml (containerd >= 1.5).",
        "version = 2",
        "",
        f"[{CRI}.registry]",
        f"  config_path = {_toml_string(str(install_dir / CERTS_DIR))}",
    ]
    lines += _auth_lines(settings, header=f"{CRI}.registry.configs")
    return "\n".join(lines) + "\n"


def config_toml_legacy(settings: MirrorSettings, *, install_dir: Path) -> str:
    """The legacy ``config.toml`` part (``registry.mirrors``), for containerd < 1.5.

    containerd always tries the public host after these endpoints: the legacy form
    cannot forbid the fallback. Never merge it into a file that sets ``config_path``.
    """
    lines = [
        "# Generated by bmsync: legacy mirror form; never together with config_path.",
        "version = 2",
    ]
    endpoints = _toml_list(e.url for e in settings.endpoints)
    for host in settings.hosts:
        lines += ["", f"[{CRI}.registry.mirrors.{_toml_string(host)}]", f"  endpoint = {endpoints}"]
    done: set[str] = set()
    for endpoint in settings.endpoints:
        if endpoint.ca_file is None or endpoint.mirror.host in done:
            continue
        done.add(endpoint.mirror.host)
        ca = install_dir / LEGACY_CA_DIR / ca_file_name(endpoint.mirror.host)
        lines += [
            "",
            f"[{CRI}.registry.configs.{_toml_string(endpoint.mirror.host)}.tls]",
            f"  ca_file = {_toml_string(str(ca))}",
        ]
    lines += _auth_lines(settings, header=f"{CRI}.registry.configs")
    return "\n".join(lines) + "\n"


def registries_conf(settings: MirrorSettings) -> str:
    """``registries.conf`` (v2) for CRI-O and podman: one ``[[registry]]`` per host.

    With ``no_fallback`` the first mirror is also the ``location`` (tried after the
    mirrors), so the public host is never contacted. CAs go in
    ``/etc/containers/certs.d/HOST:PORT/``, logins in the node's auth file:
    registries.conf holds neither.
    """
    lines = ["# Generated by bmsync: containers-registries.conf(5) version 2."]
    first = settings.endpoints[0]
    for host in settings.hosts:
        location = first.location if settings.no_fallback else host
        lines += ["", "[[registry]]", f"prefix = {_toml_string(host)}",
                  f"location = {_toml_string(location)}"]
        if settings.no_fallback and first.mirror.scheme == "http":
            lines.append("insecure = true")
        for endpoint in settings.endpoints:
            lines += ["", "[[registry.mirror]]", f"location = {_toml_string(endpoint.location)}"]
            if endpoint.mirror.scheme == "http":
                lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def pull_credential_config(settings: MirrorSettings) -> str | None:
    """A docker ``config.json`` with the mirrors' logins (None when there are none)."""
    auths: dict[str, dict[str, str]] = {}
    for host, credential in mirror_credentials(settings.endpoints).items():
        if credential.identity_token:
            auths[host] = {"identitytoken": credential.identity_token}
        else:
            pair = f"{credential.username}:{credential.password}".encode()
            auths[host] = {"auth": base64.b64encode(pair).decode("ascii")}
    if not auths:
        return None
    return json.dumps({"auths": auths}, indent=2) + "\n"


def cluster_config(settings: MirrorSettings, *, install_dir: Path) -> str:
    """The cluster config ``registryMirrors`` block (and ``gcrKeyPath`` when set).

    ``caCertPath`` is the CA file given; ``pullCredentialConfigPath`` the docker config
    given for the mirror or, for a login from flags, the one :func:`render` writes.
    ``hosts`` lists the mirrored hosts besides gcr.io.
    """
    generated = install_dir / PULL_CREDENTIAL_CONFIG
    entries: list[dict[str, Any]] = []
    for endpoint in settings.endpoints:
        entry: dict[str, Any] = {"endpoint": endpoint.url}
        if endpoint.ca_file is not None:
            entry["caCertPath"] = str(endpoint.ca_file)
        if endpoint.pull_credential_config is not None:
            entry["pullCredentialConfigPath"] = str(endpoint.pull_credential_config)
        elif endpoint.credential is not None:
            entry["pullCredentialConfigPath"] = str(generated)
        others = [h for h in settings.hosts if h != UPSTREAM]
        if others:
            entry["hosts"] = others
        entries.append(entry)
    doc: dict[str, Any] = {"registryMirrors": entries}
    if settings.gcr_key_path is not None:
        doc["gcrKeyPath"] = str(settings.gcr_key_path)
    import yaml  # here, not at the top: every bmsync command imports this module

    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return "# Generated by bmsync: the cluster config's registry mirrors.\n" + text


def render(
    settings: MirrorSettings,
    formats: Iterable[str] = FORMATS,
    *,
    install_dir: Path,
) -> list[GeneratedFile]:
    """Every file of ``formats`` (names of :data:`FORMATS`), paths relative to the output.

    Pure apart from reading the CA files (already checked by :func:`settings`).
    Raises :class:`UsageError` for an unknown format.
    """
    wanted = list(formats)
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown format {unknown[0]!r}", hint=f"one of {', '.join(FORMATS)}")
    secret = bool(mirror_credentials(settings.endpoints)) or settings.gcr_key is not None
    cas = _ca_copies(settings)
    files: list[GeneratedFile] = []
    if "hosts" in wanted:
        for host in settings.hosts:
            base = f"{CERTS_DIR}/{host}"
            files.append(GeneratedFile(
                f"{base}/hosts.toml",
                hosts_toml(settings, host, install_dir=install_dir).encode()))
            files.extend(GeneratedFile(f"{base}/{name}", data) for name, data in cas.items())
    if "config-toml" in wanted:
        files.append(GeneratedFile(
            CONFIG_TOML, config_toml(settings, install_dir=install_dir).encode(), secret))
    if "config-toml-legacy" in wanted:
        files.append(GeneratedFile(
            CONFIG_TOML_LEGACY, config_toml_legacy(settings, install_dir=install_dir).encode(),
            secret))
        files.extend(GeneratedFile(f"{LEGACY_CA_DIR}/{name}", data) for name, data in cas.items())
    if "cluster-config" in wanted:
        files.append(GeneratedFile(
            CLUSTER_CONFIG, cluster_config(settings, install_dir=install_dir).encode()))
        docker_config = pull_credential_config(settings)
        if docker_config is not None and any(
            e.credential is not None and e.pull_credential_config is None
            for e in settings.endpoints
        ):
            files.append(GeneratedFile(PULL_CREDENTIAL_CONFIG, docker_config.encode(), True))
    if "registries-conf" in wanted:
        files.append(GeneratedFile(REGISTRIES_CONF, registries_conf(settings).encode()))
    return files


def _ca_copies(settings: MirrorSettings) -> dict[str, bytes]:
    copies: dict[str, bytes] = {}
    for endpoint in settings.endpoints:
        if endpoint.ca_file is not None:
            name = ca_file_name(endpoint.mirror.host)
            if name not in copies:
                try:
                    copies[name] = endpoint.ca_file.read_bytes()
                except OSError as exc:
                    raise UsageError(f"cannot read CA file {endpoint.ca_file}: {exc.strerror}"
                                     ) from None
    return copies


# -- secrets in printed text ---------------------------------------------------------------

_SECRET_KEYS = re.compile(
    r'^(?P<key>\s*(?:"?(?:password|identitytoken|auth)"?)\s*[=:]\s*).+?(?P<end>,?)$',
    re.MULTILINE,
)


def redact(text: str) -> str:
    """``text`` with the value of every ``password``, ``identitytoken`` and ``auth`` key
    (TOML, JSON or YAML) replaced by ``<redacted>``, for printing."""
    return _SECRET_KEYS.sub(lambda m: f"{m['key']}{_quote(REDACTED)}{m['end']}", text)


def _quote(value: str) -> str:
    return f'"{value}"'


# -- writing --------------------------------------------------------------------------------


def write_config(
    settings: MirrorSettings,
    out: str | os.PathLike[str],
    formats: Iterable[str] = FORMATS,
    *,
    install_dir: str | os.PathLike[str] | None = None,
) -> list[Change]:
    """Render ``formats`` and write them under ``out``; returns what changed, per file.

    Everything is rendered before the first write, so invalid input writes nothing.
    Each file is replaced atomically (0600 when it holds credentials; an existing file
    is re-moded too). ``install_dir`` is where ``out`` will live on the node (default:
    ``out`` itself, absolute). Raises :class:`UsageError` for an unknown format and
    :class:`ConfigError` when a file cannot be written.
    """
    root = Path(out).expanduser().absolute()
    node_dir = Path(install_dir).absolute() if install_dir is not None else root
    files = render(settings, formats, install_dir=node_dir)
    changes: list[Change] = []
    for generated in files:
        target = root / generated.path
        try:
            old = target.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path=str(target)) from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if old != generated.data or (target.stat().st_mode & 0o777) != generated.mode:
                atomic_write(target, generated.data, mode=generated.mode)
        except OSError as exc:
            raise ConfigError(f"cannot write: {exc.strerror}", path=str(target)) from None
        changes.append(_change(target, old, generated))
    return changes


def _change(target: Path, old: bytes | None, generated: GeneratedFile) -> Change:
    if old is None:
        return Change(target, "new")
    if old == generated.data:
        return Change(target, "unchanged")
    before = redact(old.decode("utf-8", "replace")).splitlines()
    after = redact(generated.data.decode("utf-8", "replace")).splitlines()
    added: list[str] = []
    removed: list[str] = []
    for line in difflib.unified_diff(before, after, lineterm="", n=0):
        if line.startswith(("+++", "---", "@@")):
            continue
        if line.startswith("+"):
            added.append(line[1:])
        elif line.startswith("-"):
            removed.append(line[1:])
    return Change(target, "changed", tuple(added), tuple(removed))


# -- reading a cluster config ---------------------------------------------------------------


@dataclass(frozen=True)
class ClusterMirrors:
    """What a cluster config says about mirrors: the entries and the gcr key path."""

    endpoints: tuple[MirrorEndpoint, ...]
    hosts: tuple[str, ...]
    gcr_key_path: Path | None


def read_cluster_config(path: str | os.PathLike[str]) -> ClusterMirrors:
    """The ``registryMirrors`` of a (multi-document) cluster config YAML file.

    The first document holding ``registryMirrors`` (at its top or under ``spec``) is
    used; ``gcrKeyPath`` is read the same way from any document. Relative paths are
    relative to the file's directory. Logins are read from each entry's
    ``pullCredentialConfigPath`` (a docker config). Raises :class:`ConfigError` naming
    the file and key for anything malformed, :class:`CredentialError` for an unusable
    docker config.
    """
    import yaml

    source = Path(path).expanduser().absolute()
    try:
        docs = [d for d in yaml.safe_load_all(source.read_text(encoding="utf-8")) if d]
    except FileNotFoundError:
        raise ConfigError("file does not exist", path=str(source)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read: {reason}", path=str(source)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError("not valid YAML", path=str(source), line=line) from None

    def lookup(key: str) -> Any:
        for doc in docs:
            if not isinstance(doc, Mapping):
                continue
            if key in doc:
                return doc[key]
            spec = doc.get("spec")
            if isinstance(spec, Mapping) and key in spec:
                return spec[key]
        return None

    def resolve(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError("must be a path", path=str(source), key=key)
        p = Path(value).expanduser()
        return p if p.is_absolute() else source.parent / p

    entries = lookup("registryMirrors")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("no registryMirrors list in any document", path=str(source),
                          key="registryMirrors")
    endpoints: list[MirrorEndpoint] = []
    hosts: list[str] = []
    for i, entry in enumerate(entries):
        key = f"registryMirrors[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("endpoint"), str):
            raise ConfigError("needs an endpoint", path=str(source), key=key)
        try:
            mirror = parse_mirror(entry["endpoint"])
        except UsageError as exc:
            raise ConfigError(exc.message, path=str(source), key=f"{key}.endpoint") from None
        ca = resolve(entry["caCertPath"], f"{key}.caCertPath") if "caCertPath" in entry else None
        docker_config: Path | None = None
        credential: Credential | None = None
        if "pullCredentialConfigPath" in entry:
            docker_config = resolve(entry["pullCredentialConfigPath"],
                                    f"{key}.pullCredentialConfigPath")
            try:
                credential = from_docker_config(mirror.host, docker_config)
            except CredentialError as exc:
                raise CredentialError(f"{source}: {key}: {exc.message}") from None
        listed = entry.get("hosts") or []
        if not isinstance(listed, list) or not all(isinstance(h, str) for h in listed):
            raise ConfigError("must be a list of host names", path=str(source),
                              key=f"{key}.hosts")
        for host in listed:
            if host not in hosts:
                hosts.append(host)
        endpoints.append(MirrorEndpoint(mirror, ca, credential, docker_config))
    gcr = lookup("gcrKeyPath")
    return ClusterMirrors(
        tuple(endpoints), tuple(hosts), resolve(gcr, "gcrKeyPath") if gcr else None
    )
