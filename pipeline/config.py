"""Loading and validating the images config (``configs/images.yaml``, DESIGN.md §12).

The file is composed (not just loaded) with PyYAML so every node keeps its position:
each problem becomes one :class:`~pipeline.errors.ConfigError` naming the file, the
line and the key path (``images[1].semver``, ``registries.gcr.io.endpoint``). Unknown
keys are errors everywhere, because a misspelt key silently ignored would pull the
wrong images.

A later loader (``pipeline.yaml``) reuses :func:`load_images_config` with
``extra_keys`` and validates those keys itself from :attr:`ImagesConfig.extra`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from pipeline.errors import ConfigError, InvalidReference, UsageError
from pipeline.platform import Platform, parse_platform
from pipeline.reference import Reference, normalize_registry, parse_reference, parse_repository
from pipeline.tagfilter import TagFilter, compile_regex, parse_constraint

SUPPORTED_VERSIONS = (1,)

_T = TypeVar("_T")

_TOP_KEYS = ("version", "release", "platforms", "registries", "images")
_REGISTRY_KEYS = (
    "endpoint",
    "cacert",
    "gcrKeyPath",
    "dockerConfig",
    "usernameEnv",
    "passwordEnv",
)
_IMAGE_KEYS = ("name", "tags", "regex", "semver", "latest")

# The release names files (bmpackages_<release>.tar.zst) and object-store folders
# (<prefix>/<release>/): starting with a letter or digit rules out "." and "..".
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_RELEASE_LENGTH = 128
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_YAML_TAG = "tag:yaml.org,2002:"
_SCALAR_KINDS = {
    f"{_YAML_TAG}str": "a string",
    f"{_YAML_TAG}int": "an integer",
    f"{_YAML_TAG}float": "a number",
    f"{_YAML_TAG}bool": "a boolean",
    f"{_YAML_TAG}null": "nothing (null)",
    f"{_YAML_TAG}timestamp": "a date",
}


@dataclass(frozen=True)
class RegistrySettings:
    """How to reach one source registry. Paths are absolute (resolved against the
    config file's folder); ``username_env``/``password_env`` name environment
    variables whose values are read only when credentials are needed."""

    host: str
    endpoint: str | None = None
    cacert: str | None = None
    gcr_key_path: str | None = None
    docker_config: str | None = None
    username_env: str | None = None
    password_env: str | None = None


@dataclass(frozen=True)
class ImageSpec:
    """One entry of ``images``: a reference (``filter`` None), or a bare repository
    (tag and digest None) whose tags ``filter`` selects. ``line`` is its line in the
    file, for messages."""

    reference: Reference
    filter: TagFilter | None
    line: int


@dataclass(frozen=True)
class ImagesConfig:
    """A validated images config.

    ``platforms`` empty means keep every platform. ``registries`` is keyed by
    normalised host. ``extra`` holds the plain values of the ``extra_keys`` the file
    set, ``extra_lines`` the line of each such key.
    """

    path: str
    version: int
    release: str
    platforms: tuple[Platform, ...]
    registries: Mapping[str, RegistrySettings]
    images: tuple[ImageSpec, ...]
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    extra_lines: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def registry(self, host: str) -> RegistrySettings:
        """Settings for ``host`` (normalised first), or defaults when the file has none.

        Raises :class:`UsageError` when ``host`` is not a registry host.
        """
        normalised = normalize_registry(host)
        return self.registries.get(normalised) or RegistrySettings(host=normalised)


def valid_release(name: str) -> bool:
    """Whether ``name`` can name a bundle: a file name and an object-store folder."""
    return len(name) <= _MAX_RELEASE_LENGTH and _RELEASE.fullmatch(name) is not None


def load_images_config(
    path: str | os.PathLike[str], *, extra_keys: Collection[str] = ()
) -> ImagesConfig:
    """Read and validate the images config at ``path``.

    ``extra_keys`` are further top-level keys a caller accepts; their values land in
    :attr:`ImagesConfig.extra` unvalidated. Raises :class:`ConfigError` (file, key,
    line) for anything wrong: missing or unreadable file, YAML syntax, unknown keys,
    wrong types, unsupported version, invalid references, platforms, filters or
    endpoints, an empty or duplicated image list.
    """
    clash = set(extra_keys) & set(_TOP_KEYS)
    if clash:
        raise ValueError(f"extra_keys {sorted(clash)} are keys of the images config itself")
    return read_document(
        path,
        lambda reader, root: reader.images_config(root, tuple(extra_keys)),
        example="configs/images.yaml",
    )


def read_document(
    path: str | os.PathLike[str],
    build: Callable[[NodeReader, yaml.Node], _T],
    *,
    example: str,
) -> _T:
    """Compose the YAML file at ``path`` and turn its root node into a value with ``build``.

    Every config file of bmsync goes through here, so each reports problems the same
    way: one :class:`ConfigError` naming the file, the line and the key. ``example`` is
    the sample config an empty file is pointed to.
    """
    text_path = os.fspath(path)
    try:
        with open(text_path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError("no such file", path=text_path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=text_path) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read: {exc.strerror or type(exc).__name__}", path=text_path
        ) from None

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError("empty file", path=text_path, hint=f"see {example} for an example")
        return build(NodeReader(text_path, loader), root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "syntax error"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        raise ConfigError(
            f"invalid YAML: {problem}",
            path=text_path,
            line=None if mark is None else mark.line + 1,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=text_path) from None
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = _SCALAR_KINDS.get(node.tag, f"a {node.tag} value")
    return f"{kind} ({node.value})" if node.value else kind


def _child(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


# What parse_endpoint says, for the two kinds of endpoint configs take.
_ENDPOINT_ADVICE = {
    "registry": ("http://127.0.0.1:5101 or https://mirror.example:443",
                 "use gcrKeyPath, dockerConfig or usernameEnv/passwordEnv",
                 "the API is always under /v2/"),
    "s3": ("https://s3.site.local:9000",
           "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile",
           "the bucket and prefix go in the object store URL"),
}


def parse_endpoint(text: str, *, kind: str = "registry") -> str:
    """An endpoint URL as configs take it (``kind``: a registry's or an S3 server's):
    ``scheme://host[:port]``, lowercased, without a trailing ``/``. UsageError says what
    is wrong: another scheme, credentials (they belong in the credential settings, and
    an endpoint is printed in logs and errors), a query, fragment or path."""
    examples, credentials, no_path = _ENDPOINT_ADVICE[kind]
    example = f"write e.g. {examples}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"{text!r} must start with http:// or https://", hint=example)
    if parts.username is not None or parts.password is not None:
        raise UsageError("credentials do not belong in the endpoint", hint=credentials)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise UsageError(f"{text!r} must not have a query or fragment", hint=example)
    if parts.path not in ("", "/"):
        raise UsageError(f"{text!r} must not have a path ({no_path})", hint=example)
    try:
        normalize_registry(parts.netloc)
    except UsageError as exc:
        raise UsageError(exc.message, hint=example) from None
    return f"{scheme}://{parts.netloc.lower()}"


class NodeReader:
    """Turns composed nodes into values, raising ConfigError at the offending node."""

    def __init__(self, path: str, loader: yaml.SafeLoader) -> None:
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.loader = loader

    def error(
        self, node: yaml.Node, key: str | None, message: str, hint: str | None = None
    ) -> ConfigError:
        return ConfigError(message, path=self.path, key=key or None, line=_line(node), hint=hint)

    # -- generic shapes ---------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node,
        key: str,
        allowed: Collection[str] | None,
        required: Collection[str] = (),
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """``{name: (key node, value node)}``; unknown (when ``allowed`` is given),
        duplicate, non-string and missing required keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, f"must be a mapping, got {_kind(node)}")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != f"{_YAML_TAG}str":
                raise self.error(key_node, key, f"keys must be strings, got {_kind(key_node)}")
            name = key_node.value
            if allowed is not None and name not in allowed:
                close = difflib.get_close_matches(name, list(allowed), n=1)
                raise self.error(
                    key_node,
                    _child(key, name),
                    f"unknown key (allowed: {', '.join(allowed)})",
                    hint=f"did you mean {close[0]!r}?" if close else None,
                )
            if name in entries:
                raise self.error(
                    key_node,
                    _child(key, name),
                    f"duplicate key (first at line {_line(entries[name][0])})",
                )
            entries[name] = (key_node, value_node)
        for name in required:
            if name not in entries:
                raise self.error(node, _child(key, name), "required key is missing")
        return entries

    def sequence(self, node: yaml.Node, key: str, hint: str | None = None) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, key, f"must be a list, got {_kind(node)}", hint=hint)
        return list(node.value)

    def string(self, node: yaml.Node, key: str, hint: str | None = None) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != f"{_YAML_TAG}str":
            raise self.error(node, key, f"must be a string, got {_kind(node)}", hint=hint)
        value = str(node.value)
        if not value:
            raise self.error(node, key, "must not be empty")
        return value

    def integer(self, node: yaml.Node, key: str) -> int:
        if not isinstance(node, yaml.ScalarNode) or node.tag != f"{_YAML_TAG}int":
            raise self.error(node, key, f"must be an integer, got {_kind(node)}")
        value = self.loader.construct_object(node)
        assert isinstance(value, int)
        return value

    def boolean(self, node: yaml.Node, key: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != f"{_YAML_TAG}bool":
            raise self.error(node, key, f"must be true or false, got {_kind(node)}")
        value = self.loader.construct_object(node)
        assert isinstance(value, bool)
        return value

    @staticmethod
    def is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == f"{_YAML_TAG}null"

    def file_path(self, node: yaml.Node, key: str) -> str:
        value = os.path.expanduser(self.string(node, key))
        return os.path.normpath(os.path.join(self.base_dir, value))

    # -- the document -----------------------------------------------------------

    def images_config(self, root: yaml.Node, extra_keys: tuple[str, ...]) -> ImagesConfig:
        top = self.mapping(
            root, "", (*_TOP_KEYS, *extra_keys), required=("version", "release", "images")
        )
        version = self.version(top["version"][1])
        release = self.release(top["release"][1])
        platforms: tuple[Platform, ...] = ()
        if "platforms" in top and not self.is_null(top["platforms"][1]):
            platforms = self.platforms(top["platforms"][1])
        registries: dict[str, RegistrySettings] = {}
        if "registries" in top and not self.is_null(top["registries"][1]):
            registries = self.registries(top["registries"][1])
        images = self.images(top["images"][1])
        extra = {
            name: self.loader.construct_object(top[name][1], deep=True)
            for name in extra_keys
            if name in top
        }
        extra_lines = {name: _line(top[name][0]) for name in extra_keys if name in top}
        return ImagesConfig(
            path=self.path,
            version=version,
            release=release,
            platforms=platforms,
            registries=MappingProxyType(registries),
            images=images,
            extra=MappingProxyType(extra),
            extra_lines=MappingProxyType(extra_lines),
        )

    def version(self, node: yaml.Node) -> int:
        version = self.integer(node, "version")
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise self.error(
                node, "version", f"unsupported version {version} (supported: {supported})"
            )
        return version

    def release(self, node: yaml.Node) -> str:
        quoted = f'quote it: release: "{node.value}"' if isinstance(node, yaml.ScalarNode) else None
        release = self.string(node, "release", hint=quoted)
        if not valid_release(release):
            raise self.error(
                node,
                "release",
                f"{release!r} cannot name a bundle file",
                hint=f"use letters, digits, '.', '_' and '-', starting with a letter or digit, "
                f"at most {_MAX_RELEASE_LENGTH} characters",
            )
        return release

    def platforms(self, node: yaml.Node) -> tuple[Platform, ...]:
        items = self.sequence(node, "platforms", hint="write platforms: [linux/amd64]")
        seen: dict[Platform, int] = {}
        for index, item in enumerate(items):
            key = f"platforms[{index}]"
            try:
                platform = parse_platform(self.string(item, key))
            except UsageError as exc:
                raise self.error(item, key, exc.message, hint=exc.hint) from None
            if platform in seen:
                raise self.error(
                    item, key, f"duplicate platform {platform} (first at line {seen[platform]})"
                )
            seen[platform] = _line(item)
        return tuple(seen)

    def registries(self, node: yaml.Node) -> dict[str, RegistrySettings]:
        result: dict[str, RegistrySettings] = {}
        lines: dict[str, int] = {}
        for name, (key_node, value_node) in self.mapping(node, "registries", None).items():
            key = _child("registries", name)
            try:
                host = normalize_registry(name)
            except UsageError as exc:
                raise self.error(key_node, key, exc.message) from None
            if host in result:
                raise self.error(key_node, key, f"same registry as {host!r} at line {lines[host]}")
            result[host] = self.registry_settings(host, value_node, key)
            lines[host] = _line(key_node)
        return result

    def registry_settings(self, host: str, node: yaml.Node, key: str) -> RegistrySettings:
        if self.is_null(node):
            return RegistrySettings(host=host)
        fields = self.mapping(node, key, _REGISTRY_KEYS)

        def value(name: str) -> yaml.Node | None:
            return fields[name][1] if name in fields else None

        credential_keys: list[str] = [
            name for name in ("gcrKeyPath", "dockerConfig", "usernameEnv") if name in fields
        ]
        if "passwordEnv" in fields and "usernameEnv" not in fields:
            credential_keys.append("passwordEnv")
        if len(credential_keys) > 1:
            second = credential_keys[1]
            raise self.error(
                fields[second][0],
                _child(key, second),
                f"{credential_keys[0]} already gives the credentials for {host}",
                hint="keep one of gcrKeyPath, dockerConfig or usernameEnv/passwordEnv",
            )
        env_names: dict[str, str] = {}
        for name in ("usernameEnv", "passwordEnv"):
            env_node = value(name)
            if env_node is not None:
                env = self.string(env_node, _child(key, name))
                if _ENV_NAME.fullmatch(env) is None:
                    raise self.error(
                        env_node, _child(key, name), f"{env!r} is not an environment variable name"
                    )
                env_names[name] = env
        if len(env_names) == 1:
            (given,) = env_names
            missing = "passwordEnv" if given == "usernameEnv" else "usernameEnv"
            raise self.error(fields[given][0], _child(key, given), f"needs {missing} beside it")
        endpoint_node = value("endpoint")
        paths = {
            name: self.file_path(fields[name][1], _child(key, name))
            for name in ("cacert", "gcrKeyPath", "dockerConfig")
            if name in fields
        }
        return RegistrySettings(
            host=host,
            endpoint=(
                None
                if endpoint_node is None
                else self.endpoint(endpoint_node, _child(key, "endpoint"))
            ),
            cacert=paths.get("cacert"),
            gcr_key_path=paths.get("gcrKeyPath"),
            docker_config=paths.get("dockerConfig"),
            username_env=env_names.get("usernameEnv"),
            password_env=env_names.get("passwordEnv"),
        )

    def endpoint(self, node: yaml.Node, key: str, *, kind: str = "registry") -> str:
        """``scheme://host[:port]``, lowercased, without a trailing ``/``
        (:func:`parse_endpoint`)."""
        try:
            return parse_endpoint(self.string(node, key), kind=kind)
        except UsageError as exc:
            raise self.error(node, key, exc.message, exc.hint) from None

    def images(self, node: yaml.Node) -> tuple[ImageSpec, ...]:
        items = self.sequence(node, "images")
        if not items:
            raise self.error(node, "images", "empty list", hint="list at least one image")
        specs: list[ImageSpec] = []
        first_line: dict[tuple[object, ...], int] = {}
        for index, item in enumerate(items):
            key = f"images[{index}]"
            spec = self.image(item, key)
            identity: tuple[object, ...] = (str(spec.reference), spec.filter)
            if identity in first_line:
                raise self.error(
                    item,
                    key,
                    f"duplicate image {spec.reference} (first at line {first_line[identity]})",
                )
            first_line[identity] = spec.line
            specs.append(spec)
        return tuple(specs)

    def image(self, node: yaml.Node, key: str) -> ImageSpec:
        if isinstance(node, yaml.MappingNode):
            if len(node.value) == 1:
                key_node, value_node = node.value[0]
                if self.is_null(value_node) and key_node.value not in _IMAGE_KEYS:
                    # "- gcr.io/a/b:" is YAML for {"gcr.io/a/b": null}.
                    raise self.error(
                        node,
                        key,
                        f"'{key_node.value}:' is not an image reference: the tag after ':' "
                        "is missing (YAML reads it as a mapping)",
                    )
            return self.filtered_image(node, key)
        text = self.string(
            node,
            key,
            hint="write a reference such as gcr.io/repo/image:tag, or a mapping with name",
        )
        try:
            reference = parse_reference(text)
        except InvalidReference as exc:
            raise self.error(node, key, exc.message) from None
        return ImageSpec(reference=reference, filter=None, line=_line(node))

    def filtered_image(self, node: yaml.Node, key: str) -> ImageSpec:
        fields = self.mapping(node, key, _IMAGE_KEYS, required=("name",))
        name_node = fields["name"][1]
        name_key = _child(key, "name")
        try:
            reference = parse_repository(self.string(name_node, name_key))
        except InvalidReference as exc:
            raise self.error(
                name_node,
                name_key,
                exc.message,
                hint="name is a repository such as gcr.io/repo/image; list tags under tags:, "
                "or write a pinned reference as a plain list item",
            ) from None
        if not any(name in fields for name in ("tags", "regex", "semver", "latest")):
            raise self.error(
                node,
                key,
                "says which repository but not which tags",
                hint="add tags, regex, semver or latest, or write image:tag as a plain list item",
            )

        globs: list[str] = []
        if "tags" in fields:
            tags_key = _child(key, "tags")
            items = self.sequence(fields["tags"][1], tags_key, hint='write tags: ["v3.4.*"]')
            if not items:
                raise self.error(fields["tags"][1], tags_key, "empty list")
            globs = [self.string(item, f"{tags_key}[{i}]") for i, item in enumerate(items)]
        regex = semver = None
        latest: int | None = None
        if "regex" in fields:
            regex_node, regex_key = fields["regex"][1], _child(key, "regex")
            regex = self.string(regex_node, regex_key)
            try:
                compile_regex(regex)
            except ConfigError as exc:
                raise self.error(regex_node, regex_key, exc.message, exc.hint) from None
        if "semver" in fields:
            semver_node, semver_key = fields["semver"][1], _child(key, "semver")
            quoted = f"quote it: semver: '{semver_node.value}'"
            semver = self.string(semver_node, semver_key, hint=quoted)
            try:
                parse_constraint(semver)
            except ConfigError as exc:
                raise self.error(semver_node, semver_key, exc.message, exc.hint) from None
        if "latest" in fields:
            latest_node = fields["latest"][1]
            latest = self.integer(latest_node, _child(key, "latest"))
            if latest < 1:
                raise self.error(latest_node, _child(key, "latest"), "must be at least 1")
        return ImageSpec(
            reference=reference,
            filter=TagFilter(globs=tuple(globs), regex=regex, semver=semver, latest=latest),
            line=_line(node),
        )
