"""Does a node's containerd configuration pull the mirrored hosts from the mirrors?

The checker behind ``bmsync verify --containerd-config PATH`` (DESIGN.md §8): it reads
what containerd 1.6 reads and reports, for ``gcr.io`` and every other mirrored host,
which mirror endpoints are configured, whether each addresses the right API path
(namespace included), which CA it trusts, and whether a public upstream remains as a
fallback. It accepts what :mod:`pipeline.containerd` generates and hand-written files:

- a ``config.toml`` whose CRI plugin sets ``registry.config_path`` (one or more
  directories separated by ``:``): each host's ``<root>/<host>/hosts.toml`` is read, the
  first root holding a directory for the host winning, as containerd does;
- a ``config.toml`` with the legacy ``registry.mirrors."<host>".endpoint`` lists (and
  the ``"*"`` wildcard) and ``registry.configs."HOST:PORT".tls.ca_file``;
- a ``certs.d`` directory itself (what ``ctr --hosts-dir`` reads).

How containerd 1.6 reads these, and so what is checked (remotes/docker/config/hosts.go
and pkg/cri/server/image_pull.go):

- hosts.toml: every ``[host."URL"]`` is tried in file order, then ``server``; without
  ``server`` the public host (``https://<host>``, Docker Hub's API for docker.io) is
  tried last, which is the silent upstream fallback. A URL path is the API root:
  containerd appends ``/v2`` to it unless it already ends in ``/v2`` or the entry says
  ``override_path = true``, so a namespaced mirror needs ``https://HOST:PORT/v2/NS``
  with ``override_path = true``. A file containerd cannot parse (bad TOML, no ``host``
  table, an unknown capability, a ``ca`` of the wrong type) is logged and ignored:
  the host is then pulled from upstream. A ``ca`` file that cannot be read fails every
  pull of the host. Relative ``ca`` paths are relative to the host's directory.
- legacy ``mirrors``: the endpoints are tried in order and the public host is always
  appended; a URL without a path gets ``/v2``, any other path is used as is, so the
  namespaced form is again ``https://HOST:PORT/v2/NS``. An endpoint without a scheme
  is http for localhost, https otherwise. The CA is the ``tls.ca_file`` of the
  endpoint's ``HOST:PORT`` in ``registry.configs`` (relative paths are taken relative
  to the config file's directory here).
- ``config_path`` together with a non-empty ``mirrors`` makes containerd refuse the CRI
  plugin: kubelet then pulls nothing. That, and a CRI plugin in ``disabled_plugins``,
  is reported against the whole file.

Nothing here contacts a registry or changes a file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.containerd import (
    LOCALHOSTS,
    PEM_CERTIFICATE,
    UPSTREAM,
    hostname_of,
    mirrored_host,
    read_ca,
    upstream_url,
)
from pipeline.errors import ConfigError, UsageError
from pipeline.reference import Mirror, normalize_registry

HOSTS_TOML = "hosts.toml"
CRI_PLUGINS = ("io.containerd.grpc.v1.cri", "cri")

# The forms a checked file can take.
FORM_CONFIG_PATH = "config_path"
FORM_MIRRORS = "mirrors"
FORM_CERTS_DIR = "certs.d"
FORM_NONE = "none"

# A host's status, best first.
MIRRORED = "mirrored"  # pulled from a usable mirror (the expected one, when given)
MISCONFIGURED = "misconfigured"  # a usable mirror, but something else in its config is wrong
NOT_MIRRORED = "not mirrored"  # no usable mirror (or not the expected one)

_CAPABILITIES = ("pull", "resolve", "push")


@dataclass(frozen=True)
class Endpoint:
    """One mirror endpoint a host is pulled from, as containerd will use it.

    ``url`` is as written; ``api`` the API root containerd appends ``/<repo>/...`` to
    (None when the URL does not parse); ``mirror`` what that root addresses, None when
    it is not ``/v2`` or ``/v2/NAMESPACE``. ``override_path`` is None in the legacy form
    (which has no such key). ``ca_files`` are the CA files named, resolved;
    ``ca_missing`` those that cannot be read. ``server`` marks hosts.toml's ``server``,
    tried after every ``[host]``. ``problems`` say what keeps this endpoint from working.
    """

    url: str
    api: str | None
    mirror: Mirror | None
    override_path: bool | None
    capabilities: tuple[str, ...]
    ca_files: tuple[str, ...] = ()
    ca_missing: tuple[str, ...] = ()
    skip_verify: bool = False
    server: bool = False
    problems: tuple[str, ...] = ()

    @property
    def path_ok(self) -> bool:
        """The API root is ``/v2`` or ``/v2/NAMESPACE``: the namespace path is right."""
        return self.mirror is not None

    @property
    def usable(self) -> bool:
        """containerd can pull through it: right path, ``pull`` capability, no problem."""
        return self.path_ok and "pull" in self.capabilities and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "api": self.api,
            "mirror": str(self.mirror) if self.mirror is not None else None,
            "pathOk": self.path_ok,
            "overridePath": self.override_path,
            "capabilities": list(self.capabilities),
            "ca": list(self.ca_files),
            "caMissing": list(self.ca_missing),
            "skipVerify": self.skip_verify,
            "server": self.server,
            "usable": self.usable,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class HostCheck:
    """What the node does for one mirrored host.

    ``configured_by`` names the hosts.toml or the config.toml key that configures it
    (None: nothing does). ``fallback`` is the public URL tried after the mirrors (None:
    none remains). ``problems`` are every reason the host is not pulled from its mirror
    as it should be, its endpoints' included; ``expected_missing`` the expected mirrors
    that no endpoint addresses.
    """

    host: str
    configured_by: str | None
    endpoints: tuple[Endpoint, ...]
    fallback: str | None
    problems: tuple[str, ...] = ()
    expected_missing: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        if self.expected_missing or not any(e.usable for e in self.endpoints):
            return NOT_MIRRORED
        return MISCONFIGURED if self.problems else MIRRORED

    @property
    def ok(self) -> bool:
        return self.status == MIRRORED

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": self.status,
            "configuredBy": self.configured_by,
            "fallback": self.fallback,
            "endpoints": [e.to_json() for e in self.endpoints],
            "expectedMissing": list(self.expected_missing),
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class NodeConfigReport:
    """The check of one config file or certs.d directory.

    ``form`` is one of ``config_path``, ``mirrors``, ``certs.d`` or ``none``;
    ``certs_dirs`` the host directories' roots read (config_path form, certs.d form);
    ``problems`` concern the whole file (the CRI plugin will not run, a root is absent).
    """

    path: Path
    form: str
    certs_dirs: tuple[Path, ...]
    hosts: tuple[HostCheck, ...]
    problems: tuple[str, ...] = ()

    @property
    def differences(self) -> list[HostCheck]:
        return [h for h in self.hosts if not h.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "form": self.form,
            "certsDirs": [str(d) for d in self.certs_dirs],
            "ok": self.ok,
            "problems": list(self.problems),
            "hosts": [h.to_json() for h in self.hosts],
        }


@dataclass(frozen=True)
class _Expectation:
    """The mirrors that must be configured and the CA certificates they must trust."""

    mirrors: tuple[Mirror, ...]
    ca_file: Path | None
    ca_certs: frozenset[str]


class _Refused(Exception):
    """containerd would refuse this hosts.toml entry, and so ignore the whole file."""


# -- entry point --------------------------------------------------------------------------


def check_node_config(
    path: str | os.PathLike[str],
    hosts: Iterable[str] = (),
    *,
    expected: Sequence[Mirror] = (),
    expected_ca: str | os.PathLike[str] | None = None,
) -> NodeConfigReport:
    """Check ``path`` (a containerd ``config.toml`` or a ``certs.d`` directory).

    ``hosts`` are the mirrored hosts to check besides ``gcr.io`` (always checked, first).
    With ``expected``, every host must be pulled through each of those mirrors (exact
    scheme, ``HOST:PORT`` and namespace); with ``expected_ca``, those mirrors' ``ca``
    must hold the certificates of that PEM file. Reads files only.

    Raises :class:`ConfigError` when ``path`` does not exist or is not a readable TOML
    file or directory, :class:`UsageError` for an invalid host name or expected CA file.
    A broken hosts.toml is not raised: containerd ignores it, and the report says so.
    """
    source = Path(path).expanduser().absolute()
    names = _host_list(hosts)
    expectation = _expectation(expected, expected_ca)
    if source.is_dir():
        checks = tuple(_check_hosts_dir((source,), h, expectation) for h in names)
        problems: list[str] = []
        nested = source / "certs.d"
        if nested.is_dir() and all(h.configured_by is None for h in checks):
            # The directory `bmsync containerd config --out` wrote, not its certs.d.
            problems.append(f"holds no host directory but has {nested}: give that instead")
        return NodeConfigReport(source, FORM_CERTS_DIR, (source,), checks, tuple(problems))
    doc = _load_config(source)
    if "host" in doc or "server" in doc:
        raise ConfigError("is a hosts.toml, not a containerd config.toml", path=str(source),
                          hint="give the certs.d directory that holds <host>/hosts.toml")
    registry, problems = _cri_registry(doc, source)
    config_path = registry.get("config_path", "")
    mirrors = registry.get("mirrors") or {}
    if not isinstance(config_path, str):
        raise ConfigError("must be a string", path=str(source), key="registry.config_path")
    if not isinstance(mirrors, Mapping):
        raise ConfigError("must be a table", path=str(source), key="registry.mirrors")
    if config_path and mirrors:
        problems.append(
            "sets both registry.config_path and registry.mirrors: containerd refuses"
            " `mirrors` next to `config_path` and runs without its CRI plugin, so kubelet"
            " pulls nothing (remove the registry.mirrors tables)"
        )
    if config_path:
        roots = tuple(_root(p, source) for p in config_path.split(":") if p)
        for root in roots:
            if not root.is_dir():
                problems.append(f"registry.config_path names {root}, which is not a directory")
        checks = tuple(_check_hosts_dir(roots, h, expectation) for h in names)
        return NodeConfigReport(source, FORM_CONFIG_PATH, roots, checks, tuple(problems))
    if mirrors:
        configs = registry.get("configs") or {}
        if not isinstance(configs, Mapping):
            raise ConfigError("must be a table", path=str(source), key="registry.configs")
        checks = tuple(_check_legacy(h, mirrors, configs, source, expectation) for h in names)
        return NodeConfigReport(source, FORM_MIRRORS, (), checks, tuple(problems))
    problems.append(
        "sets neither registry.config_path nor registry.mirrors: every host is pulled from"
        " its public registry"
    )
    checks = tuple(
        HostCheck(h, None, (), upstream_url(h),
                  (f"nothing configures {h}: containerd pulls it from {upstream_url(h)}",))
        for h in names
    )
    return NodeConfigReport(source, FORM_NONE, (), checks, tuple(problems))


def _host_list(hosts: Iterable[str]) -> list[str]:
    names = [UPSTREAM]
    for text in hosts:
        if not text.strip():
            continue
        host = mirrored_host(text)
        if host not in names:
            names.append(host)
    return names


def _expectation(expected: Sequence[Mirror], ca: str | os.PathLike[str] | None) -> _Expectation:
    if ca is None:
        return _Expectation(tuple(expected), None, frozenset())
    ca_file = read_ca(ca)
    return _Expectation(tuple(expected), ca_file, _certificates(ca_file.read_text("ascii")))


def _certificates(text: str) -> frozenset[str]:
    """The PEM certificates of ``text``, whitespace removed, so copies compare equal."""
    return frozenset("".join(body.split()) for body in PEM_CERTIFICATE.findall(text))


def _load_config(source: Path) -> dict[str, Any]:
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("does not exist", path=str(source),
                          hint="give the node's config.toml or its certs.d directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read: {reason}", path=str(source)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})", path=str(source)) from None


def _cri_registry(doc: Mapping[str, Any], source: Path) -> tuple[Mapping[str, Any], list[str]]:
    """The CRI plugin's ``registry`` table (version 2 and version 1 names) and problems."""
    problems: list[str] = []
    disabled = doc.get("disabled_plugins") or []
    if isinstance(disabled, list) and any(p in CRI_PLUGINS for p in disabled):
        problems.append("disabled_plugins holds the CRI plugin: kubelet cannot pull through"
                        " containerd (remove it from disabled_plugins)")
    plugins = doc.get("plugins") or {}
    if not isinstance(plugins, Mapping):
        raise ConfigError("must be a table", path=str(source), key="plugins")
    for name in CRI_PLUGINS:
        cri = plugins.get(name)
        if cri is None:
            continue
        registry = cri.get("registry") if isinstance(cri, Mapping) else None
        if registry is None:
            return {}, problems
        if not isinstance(registry, Mapping):
            raise ConfigError("must be a table", path=str(source),
                              key=f'plugins."{name}".registry')
        return registry, problems
    return {}, problems


def _root(text: str, source: Path) -> Path:
    root = Path(text).expanduser()
    # containerd resolves a relative root against its working directory, which a
    # config file cannot know; the file's own directory is the likeliest intent.
    return root if root.is_absolute() else source.parent / root


def _is_upstream(netloc: str, host: str) -> bool:
    try:
        return normalize_registry(netloc) == host
    except UsageError:
        return False


def _addressed(scheme: str, netloc: str, api_path: str) -> Mirror | None:
    """The mirror an API root addresses, or None when its path is not /v2[/NS]."""
    if api_path == "/v2":
        namespace = None
    elif api_path.startswith("/v2/"):
        namespace = api_path[len("/v2/"):]
    else:
        return None
    try:
        return Mirror(scheme, normalize_registry(netloc), namespace)
    except UsageError:
        return None


# -- hosts.toml ---------------------------------------------------------------------------


def _host_dir(roots: Sequence[Path], host: str) -> Path | None:
    """The first ``<root>/<host>`` directory, trying ``name_port_`` before ``name:port``."""
    names = [host]
    name, sep, port = host.rpartition(":")
    if sep and not host.endswith("]"):
        names.insert(0, f"{name}_{port}_")
    for root in roots:
        for candidate in names:
            if (root / candidate).exists():
                return root / candidate
    return None


def _check_hosts_dir(roots: Sequence[Path], host: str, expectation: _Expectation) -> HostCheck:
    upstream = upstream_url(host)
    host_dir = _host_dir(roots, host)
    where = " or ".join(str(r / host / HOSTS_TOML) for r in roots)
    if host_dir is None:
        return _finish(host, None, (), upstream,
                       [f"no {where}: containerd pulls {host} from {upstream}"], expectation)
    file = host_dir / HOSTS_TOML
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        return _finish(host, str(file), (), None,
                       [f"{file} cannot be read ({exc.strerror}): every pull of {host} fails"],
                       expectation)
    if not data:
        # containerd treats an empty or absent hosts.toml as "certificates only".
        return _finish(host, None, (), upstream,
                       [f"no {file}: containerd pulls {host} from {upstream}"], expectation)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
        endpoints, fallback = _parse_hosts(doc, host, host_dir)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, _Refused) as exc:
        reason = f"not valid TOML ({exc})" if not isinstance(exc, _Refused) else str(exc)
        return _finish(
            host, str(file), (), upstream,
            [f"{file}: {reason}; containerd ignores the file and pulls {host} from {upstream}"],
            expectation,
        )
    return _finish(host, str(file), endpoints, fallback, [], expectation)


def _parse_hosts(doc: Mapping[str, Any], host: str,
                 host_dir: Path) -> tuple[tuple[Endpoint, ...], str | None]:
    """The mirror endpoints of a parsed hosts.toml, in the order tried, and the fallback.

    Raises :class:`_Refused` for what makes containerd ignore the file.
    """
    table = doc.get("host")
    if not isinstance(table, Mapping):
        # containerd 1.6: getSortedHosts fails with "invalid `host` tree".
        raise _Refused('no [host."URL"] table (containerd 1.6 reports "invalid `host` tree")')
    endpoints: list[Endpoint] = []
    fallback: str | None = None
    for url, entry in table.items():
        if not isinstance(entry, Mapping):
            raise _Refused(f'host."{url}" must be a table')
        endpoint = _hosts_endpoint(url, entry, host_dir, server=False)
        if _is_upstream(urlsplit(endpoint.api or "").netloc, host):
            # The public host listed as a [host]: a fallback in the middle of the list.
            fallback = fallback or _origin(endpoint)
            continue
        endpoints.append(endpoint)
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise _Refused("server must be a string")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    if not server:
        # Without `server` containerd appends the public host after the mirrors. Its
        # top-level keys are still parsed, and a bad one makes containerd ignore the file.
        _hosts_endpoint(upstream_url(host), top, host_dir, server=True)
        return tuple(endpoints), fallback or upstream_url(host)
    last = _hosts_endpoint(server, top, host_dir, server=True)
    if _is_upstream(urlsplit(last.api or "").netloc, host):
        return tuple(endpoints), fallback or _origin(last)
    endpoints.append(last)
    return tuple(endpoints), fallback


def _origin(endpoint: Endpoint) -> str:
    """``scheme://host[:port]`` of an endpoint, how a fallback is named."""
    parts = urlsplit(endpoint.api or endpoint.url)
    return f"{parts.scheme}://{parts.netloc}"


def _hosts_endpoint(url: str, entry: Mapping[str, Any], host_dir: Path, *,
                    server: bool) -> Endpoint:
    """One ``[host."URL"]`` (or the top-level ``server``) as containerd reads it."""
    capabilities = _capabilities(url, entry.get("capabilities"))
    ca_files = _ca_list(url, entry.get("ca"), host_dir)
    override = entry.get("override_path", False)
    if not isinstance(override, bool):
        raise _Refused(f"override_path of {url} must be true or false")
    skip = entry.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise _Refused(f"skip_verify of {url} must be true or false")
    full = url if url.startswith("http") else f"https://{url}"
    parts = urlsplit(full)
    if not parts.netloc or parts.scheme not in ("http", "https"):
        raise _Refused(f"{url} is not a registry URL")
    # A trailing "/" would make containerd send "//v2/..." which registries clean up
    # to "/v2/...": compare without it.
    raw_path = parts.path.rstrip("/")
    if raw_path:
        api_path = raw_path if raw_path.endswith("/v2") or override else raw_path + "/v2"
    else:
        api_path = "" if override else "/v2"
    api = f"{parts.scheme}://{parts.netloc}{api_path}"
    # Without override_path a namespace comes back as "NS/v2": a valid repository
    # prefix, but never the one meant.
    appended = bool(raw_path) and not override and raw_path != api_path
    mirror = None if appended else _addressed(parts.scheme, parts.netloc, api_path)
    problems: list[str] = []
    if mirror is None:
        problems.append(f"{url}: {_path_problem(raw_path, override, api)}")
    problems += _capability_problems(url, capabilities)
    missing = tuple(p for p in ca_files if not os.access(p, os.R_OK))
    problems += [f"{url}: CA file {p} cannot be read: every pull fails" for p in missing]
    return Endpoint(url, api, mirror, override, capabilities, ca_files, missing, skip, server,
                    tuple(problems))


def _path_problem(raw_path: str, override: bool, api: str) -> str:
    if not raw_path:
        return (f"override_path = true without a path sends requests to {api}/<repo>, not"
                " /v2/<repo> (drop override_path)")
    if raw_path.startswith("/v2/") and not override:
        return (f"containerd appends /v2 to the path: requests go to {api}/<repo>"
                " (add override_path = true)")
    return (f"requests go to {api}/<repo>; a namespaced mirror is"
            " https://HOST:PORT/v2/NAMESPACE with override_path = true")


def _capabilities(url: str, value: Any) -> tuple[str, ...]:
    if value is None or value == []:
        return _CAPABILITIES
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _Refused(f"capabilities of {url} must be a list of strings")
    found: list[str] = []
    for capability in value:
        name = capability.lower()
        if name not in _CAPABILITIES:
            raise _Refused(f"unknown capability {capability!r} for {url}")
        if name not in found:
            found.append(name)
    return tuple(found)


def _capability_problems(url: str, capabilities: tuple[str, ...]) -> list[str]:
    if "pull" not in capabilities:
        return [f"{url}: no pull capability: containerd never pulls from it"]
    if "resolve" not in capabilities:
        return [f"{url}: no resolve capability: tags are resolved by the next host"
                " (the public one, if it remains)"]
    return []


def _ca_list(url: str, value: Any, base: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise _Refused(f"ca of {url} must be a path or a list of paths")
    return tuple(str(p if (p := Path(v)).is_absolute() else base / p) for v in items)


# -- legacy registry.mirrors --------------------------------------------------------------


def _check_legacy(host: str, mirrors: Mapping[str, Any], configs: Mapping[str, Any],
                  source: Path, expectation: _Expectation) -> HostCheck:
    upstream = upstream_url(host)
    # containerd looks the host up exactly as references name it, then tries "*".
    key = host if host in mirrors else "*" if "*" in mirrors else None
    if key is None:
        return _finish(host, None, (), upstream,
                       [f'no registry.mirrors."{host}" in {source}: containerd pulls {host}'
                        f" from {upstream}"], expectation)
    where = f'{source}: registry.mirrors."{key}"'
    entry = mirrors[key]
    urls = entry.get("endpoint") if isinstance(entry, Mapping) else None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return _finish(host, where, (), upstream,
                       [f"{where}: endpoint must be a list of URLs"], expectation)
    endpoints: list[Endpoint] = []
    for url in urls:
        endpoint = _legacy_endpoint(url, configs, source)
        if endpoint.api is not None and _is_upstream(urlsplit(endpoint.api).netloc, host):
            continue
        endpoints.append(endpoint)
    # The CRI plugin appends the public host to every list: the legacy form keeps a
    # fallback whatever the file says.
    return _finish(host, where, tuple(endpoints), upstream, [], expectation)


def _legacy_endpoint(url: str, configs: Mapping[str, Any], source: Path) -> Endpoint:
    full = url
    if "://" not in url:
        netloc = urlsplit(f"dummy://{url}").netloc
        full = f"{'http' if hostname_of(netloc) in LOCALHOSTS else 'https'}://{url}"
    parts = urlsplit(full)
    capabilities = ("pull", "resolve")
    if not parts.netloc or parts.scheme not in ("http", "https"):
        return Endpoint(url, None, None, None, capabilities,
                        problems=(f"{url}: not a registry URL",))
    api_path = parts.path or "/v2"
    api = f"{parts.scheme}://{parts.netloc}{api_path}"
    mirror = _addressed(parts.scheme, parts.netloc, api_path)
    problems: list[str] = []
    if mirror is None:
        problems.append(f"{url}: requests go to {api}/<repo>; a namespaced mirror is"
                        " https://HOST:PORT/v2/NAMESPACE")
    tls = _legacy_tls(configs, parts.netloc)
    ca_files: tuple[str, ...] = ()
    ca = tls.get("ca_file")
    if isinstance(ca, str) and ca:
        ca_files = (str(_root(ca, source)),)
    missing = tuple(p for p in ca_files if not os.access(p, os.R_OK))
    problems += [f"{url}: CA file {p} cannot be read: every pull fails" for p in missing]
    skip = tls.get("insecure_skip_verify") is True
    return Endpoint(url, api, mirror, None, capabilities, ca_files, missing, skip, False,
                    tuple(problems))


def _legacy_tls(configs: Mapping[str, Any], netloc: str) -> Mapping[str, Any]:
    """``registry.configs."HOST:PORT".tls`` of an endpoint (containerd matches exactly)."""
    config = configs.get(netloc)
    tls = config.get("tls") if isinstance(config, Mapping) else None
    return tls if isinstance(tls, Mapping) else {}


# -- the verdict --------------------------------------------------------------------------


def _finish(host: str, configured_by: str | None, endpoints: tuple[Endpoint, ...],
            fallback: str | None, problems: list[str],
            expectation: _Expectation) -> HostCheck:
    """A host's row: its endpoints' problems, then what the expectation finds lacking."""
    found = [p for e in endpoints for p in e.problems]
    missing: list[str] = []
    for mirror in expectation.mirrors:
        matching = [e for e in endpoints if e.mirror == mirror]
        if not matching:
            missing.append(str(mirror))
            if endpoints:
                seen = ", ".join(e.api or e.url for e in endpoints)
                found.append(f"the mirror {mirror} is not configured (found: {seen})")
            continue
        if expectation.ca_file is not None and mirror.scheme == "https":
            found += _ca_problems(matching[0], expectation)
    if not endpoints and not problems:
        problems.append(f"no mirror endpoint: containerd pulls {host} from {fallback}")
    return HostCheck(host, configured_by, endpoints, fallback, tuple(problems + found),
                     tuple(missing))


def _ca_problems(endpoint: Endpoint, expectation: _Expectation) -> list[str]:
    if not endpoint.ca_files:
        return [f"{endpoint.url}: no CA configured, but {expectation.ca_file} is the"
                " mirror's CA"]
    trusted: set[str] = set()
    for name in endpoint.ca_files:
        try:
            trusted |= _certificates(Path(name).read_text(encoding="ascii", errors="replace"))
        except OSError:
            continue
    if not expectation.ca_certs <= trusted:
        return [f"{endpoint.url}: {', '.join(endpoint.ca_files)} does not hold the"
                f" certificate of {expectation.ca_file}"]
    return []
