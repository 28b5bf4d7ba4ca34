"""The configs of the scheduled jobs: ``pipeline.yaml`` (connected) and ``site.yaml``.

``pipeline.yaml`` is an images config (DESIGN.md §12, read by
:func:`pipeline.config.load_images_config`) with the keys the release and nightly jobs
need besides::

    workDir: /var/lib/bmsync/work      # lock files and archives, one folder per version
    store: /var/lib/bmsync/store       # the shared OCI store (default: <workDir>/store)
    objectStore: s3://bucket/prefix    # or file:///path: where bundles are published
    endpointUrl: https://s3.local:9000 # optional: an S3 server other than AWS
    versionScheme: "{yyyy}.{mm}.{dd}.{n}"  # nightly version names (the default)
    fullEvery: 7                       # a full nightly bundle every N runs (default 7)
    baseInventory: inventory.json      # optional: nightly deltas against this inventory

``site.yaml`` describes a disconnected site: where bundles arrive, which mirrors to
fill, and what the nodes pull through. It never leads to a prompt: a mirror that needs
a login names where the login comes from (``dockerConfig`` or
``usernameEnv``/``passwordEnv``).

Relative paths are resolved against the config file's folder. Errors are
:class:`~pipeline.errors.ConfigError` naming the file, line and key.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import (
    ImagesConfig,
    NodeReader,
    load_images_config,
    parse_endpoint,
    read_document,
    valid_release,
)
from pipeline.errors import ConfigError, UsageError
from pipeline.reference import Mirror, normalize_registry, parse_mirror

DEFAULT_VERSION_SCHEME = "{yyyy}.{mm}.{dd}.{n}"
DEFAULT_FULL_EVERY = 7
SCHEME_FIELDS = ("yyyy", "mm", "dd", "n", "release")
_PIPELINE_KEYS = ("workDir", "store", "objectStore", "endpointUrl", "versionScheme",
                  "fullEvery", "baseInventory")
_OBJECT_STORE_HINT = "write s3://BUCKET/PREFIX or file:///PATH"


@dataclass(frozen=True)
class PipelineConfig:
    """A validated ``pipeline.yaml``: the images config plus the job's settings."""

    path: str
    images: ImagesConfig
    work_dir: Path
    store: Path
    object_store: str
    endpoint_url: str | None
    version_scheme: str
    full_every: int
    base_inventory: Path | None

    def version_dir(self, version: str) -> Path:
        """Where the lock file and the archive of ``version`` live."""
        return self.work_dir / version


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate ``pipeline.yaml`` at ``path``; ConfigError on any problem."""
    try:
        images = load_images_config(path, extra_keys=_PIPELINE_KEYS)
    except ConfigError as e:
        if e.key in ("mirrors", "containerd"):
            raise ConfigError(e.detail, path=e.path, key=e.key, line=e.line,
                              hint="this looks like a site.yaml: give it to"
                                   " `bmsync run import`") from None
        raise
    text_path = os.fspath(path)
    base_dir = Path(text_path).absolute().parent
    extra, lines = images.extra, images.extra_lines

    def fail(key: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, path=text_path, key=key, line=lines.get(key), hint=hint)

    def text(key: str) -> str | None:
        value = extra.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def local(key: str) -> Path | None:
        value = text(key)
        if value is None:
            return None
        return Path(os.path.normpath(base_dir / os.path.expanduser(value)))

    work_dir = local("workDir")
    if work_dir is None:
        raise fail("workDir", "required key is missing",
                   hint="add workDir: DIR (lock files and archives go there)")
    object_store = text("objectStore")
    if object_store is None:
        raise fail("objectStore", "required key is missing", hint=_OBJECT_STORE_HINT)
    problem = object_store_problem(object_store)
    if problem:
        raise fail("objectStore", problem, hint=_OBJECT_STORE_HINT)
    endpoint = text("endpointUrl")
    if endpoint is not None:
        try:
            endpoint = parse_endpoint(endpoint, kind="s3")
        except UsageError as e:
            raise fail("endpointUrl", e.message, hint=e.hint) from None
    scheme = text("versionScheme") or DEFAULT_VERSION_SCHEME
    try:
        check_version_scheme(scheme)
    except UsageError as e:
        raise fail("versionScheme", e.message, hint=e.hint) from None
    full_every = extra.get("fullEvery", DEFAULT_FULL_EVERY)
    if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
        raise fail("fullEvery", f"must be a whole number of at least 1, got {full_every!r}")
    return PipelineConfig(
        path=str(Path(text_path).absolute()),
        images=images,
        work_dir=work_dir,
        store=local("store") or work_dir / "store",
        object_store=object_store,
        endpoint_url=endpoint,
        version_scheme=scheme,
        full_every=full_every,
        base_inventory=local("baseInventory"),
    )


def object_store_problem(url: str) -> str | None:
    """Why ``url`` is not an object store URL, or None."""
    if url.startswith("file://"):
        return None if url[len("file://"):].startswith("/") else (
            f"{url!r} must be an absolute file:///PATH")
    if url.startswith("s3://"):
        return None if url[len("s3://"):].split("/")[0] else f"{url!r} names no bucket"
    return f"{url!r} is not an object store URL"


def check_version_scheme(scheme: str) -> None:
    """A version scheme uses only :data:`SCHEME_FIELDS`, each once, without format
    specs; includes ``{n}`` (so two runs on one day get two versions); and makes names
    that can name a bundle. Raises UsageError otherwise."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(scheme)
                  if f is not None]
    except ValueError as e:
        raise UsageError(f"version scheme {scheme!r} is malformed: {e}") from None
    fields = [f for f, _, _ in parsed]
    unknown = [f for f in fields if f not in SCHEME_FIELDS]
    if unknown:
        raise UsageError(f"version scheme {scheme!r} uses unknown field {{{unknown[0]}}}",
                         hint="use {yyyy}, {mm}, {dd}, {n} and {release}")
    if any(spec or conv for _, spec, conv in parsed):
        raise UsageError(f"version scheme {scheme!r} has a format spec or conversion",
                         hint="write plain fields such as {yyyy}")
    if len(set(fields)) != len(fields):
        raise UsageError(f"version scheme {scheme!r} uses a field twice")
    if "n" not in fields:
        raise UsageError(f"version scheme {scheme!r} lacks {{n}}",
                         hint="add {n}: the run number of the day")
    sample = scheme.format(yyyy="2026", mm="01", dd="31", n=1, release="1.0")
    if not valid_release(sample):
        raise UsageError(f"version scheme {scheme!r} makes names such as {sample!r} that"
                         " cannot name a bundle",
                         hint="use letters, digits, '.', '_' and '-', starting with a letter"
                              " or digit")


# -- site.yaml ----------------------------------------------------------------------------

_SITE_KEYS = ("version", "objectStore", "endpointUrl", "workDir", "mirrors", "hosts",
              "containerd")
_MIRROR_KEYS = ("url", "cacert", "needCredential", "dockerConfig", "usernameEnv",
                "passwordEnv")
_CONTAINERD_KEYS = ("out", "installDir", "noFallback", "gcrKeyPath")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SiteMirror:
    """One mirror to fill. ``url`` is how the config wrote it (task parameters use it)."""

    url: str
    mirror: Mirror
    cacert: Path | None
    need_credential: bool
    docker_config: Path | None
    username_env: str | None
    password_env: str | None


@dataclass(frozen=True)
class ContainerdOutput:
    out: Path
    install_dir: Path | None
    no_fallback: bool
    gcr_key_path: Path | None


@dataclass(frozen=True)
class SiteConfig:
    path: str
    object_store: str
    endpoint_url: str | None
    work_dir: Path
    mirrors: tuple[SiteMirror, ...]
    hosts: tuple[str, ...]
    containerd: ContainerdOutput | None

    def mirror(self, url: str) -> SiteMirror:
        for m in self.mirrors:
            if m.url == url:
                return m
        raise UsageError(f"{self.path} has no mirror {url}",
                         hint=f"its mirrors: {', '.join(m.url for m in self.mirrors)}")

    def version_dir(self, version: str) -> Path:
        return self.work_dir / version


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate ``site.yaml`` at ``path``; ConfigError on any problem."""
    try:
        return read_document(path, _site, example="configs/site.yaml")
    except ConfigError as e:
        if e.key in ("images", "registries", "release"):
            raise ConfigError(e.detail, path=e.path, key=e.key, line=e.line,
                              hint="this looks like a pipeline.yaml: give it to"
                                   " `bmsync run release` or `bmsync run nightly`") from None
        raise


def _site(r: NodeReader, root: yaml.Node) -> SiteConfig:
    top = r.mapping(root, "", _SITE_KEYS, required=("version", "objectStore", "workDir",
                                                    "mirrors"))
    r.version(top["version"][1])
    store_node = top["objectStore"][1]
    object_store = r.string(store_node, "objectStore")
    problem = object_store_problem(object_store)
    if problem:
        raise r.error(store_node, "objectStore", problem, hint=_OBJECT_STORE_HINT)
    endpoint = None
    if "endpointUrl" in top:
        endpoint = r.endpoint(top["endpointUrl"][1], "endpointUrl", kind="s3")
    work_dir = Path(r.file_path(top["workDir"][1], "workDir"))
    items = r.sequence(top["mirrors"][1], "mirrors")
    if not items:
        raise r.error(top["mirrors"][1], "mirrors", "empty list", hint="list at least one mirror")
    mirrors: list[SiteMirror] = []
    for index, item in enumerate(items):
        mirror = _site_mirror(r, item, f"mirrors[{index}]")
        if any(m.mirror == mirror.mirror for m in mirrors):
            raise r.error(item, f"mirrors[{index}]", f"mirror {mirror.url} is listed twice")
        mirrors.append(mirror)
    hosts: list[str] = []
    if "hosts" in top and not r.is_null(top["hosts"][1]):
        for index, item in enumerate(r.sequence(top["hosts"][1], "hosts")):
            key = f"hosts[{index}]"
            try:
                hosts.append(normalize_registry(r.string(item, key)))
            except UsageError as e:
                raise r.error(item, key, e.message, hint="write a host name: quay.io") from None
    containerd = None
    if "containerd" in top:
        containerd = _containerd(r, top["containerd"][1])
    return SiteConfig(r.path, object_store, endpoint, work_dir, tuple(mirrors), tuple(hosts),
                      containerd)


def _site_mirror(r: NodeReader, node: yaml.Node, key: str) -> SiteMirror:
    fields = r.mapping(node, key, _MIRROR_KEYS, required=("url",))

    def child(name: str) -> str:
        return f"{key}.{name}"

    url_node = fields["url"][1]
    url = r.string(url_node, child("url"))
    try:
        mirror = parse_mirror(url)
    except UsageError as e:
        raise r.error(url_node, child("url"), e.message, hint=e.hint) from None
    need = True
    if "needCredential" in fields:
        need = r.boolean(fields["needCredential"][1], child("needCredential"))
    env: dict[str, str] = {}
    for name in ("usernameEnv", "passwordEnv"):
        if name in fields:
            value = r.string(fields[name][1], child(name))
            if not _ENV_NAME.fullmatch(value):
                raise r.error(fields[name][1], child(name),
                              f"{value!r} is not an environment variable name")
            env[name] = value
    if len(env) == 1:
        (given,) = env
        other = "passwordEnv" if given == "usernameEnv" else "usernameEnv"
        raise r.error(fields[given][0], child(given), f"needs {other} beside it")
    docker_config = (Path(r.file_path(fields["dockerConfig"][1], child("dockerConfig")))
                     if "dockerConfig" in fields else None)
    if docker_config and env:
        raise r.error(node, key, "give dockerConfig or usernameEnv/passwordEnv, not both")
    if need and not docker_config and not env:
        raise r.error(
            node, key, f"mirror {url} needs a login and none is configured (an unattended"
            " import never prompts)",
            hint="add dockerConfig: PATH or usernameEnv/passwordEnv, or needCredential: false",
        )
    cacert = (Path(r.file_path(fields["cacert"][1], child("cacert")))
              if "cacert" in fields else None)
    if cacert is not None and mirror.scheme == "http":
        raise r.error(fields["cacert"][0], child("cacert"),
                      f"mirror {url} is plain http: a CA file means nothing there")
    return SiteMirror(url, mirror, cacert, need, docker_config, env.get("usernameEnv"),
                      env.get("passwordEnv"))


def _containerd(r: NodeReader, node: yaml.Node) -> ContainerdOutput:
    fields = r.mapping(node, "containerd", _CONTAINERD_KEYS, required=("out",))

    def path(name: str) -> Path | None:
        if name not in fields:
            return None
        return Path(r.file_path(fields[name][1], f"containerd.{name}"))

    no_fallback = False
    if "noFallback" in fields:
        no_fallback = r.boolean(fields["noFallback"][1], "containerd.noFallback")
    out = path("out")
    assert out is not None
    return ContainerdOutput(out, path("installDir"), no_fallback, path("gcrKeyPath"))

