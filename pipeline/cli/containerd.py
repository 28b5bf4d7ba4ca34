"""``bmsync containerd config``: the node and cluster configuration that uses the mirrors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import PASSWORD_ENV, count, given_password, verbosity
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.containerd import Change, MirrorEndpoint
    from pipeline.reference import Mirror
    from pipeline.registry.credentials import Credential



def add_parsers(sub: Any) -> None:
    """Register ``containerd config`` on the ``bmsync`` subcommand parsers ``sub``."""
    from pipeline.containerd import FORMATS

    containerd = sub.add_parser(
        "containerd",
        help="generate containerd, CRI-O and cluster config for the mirrors",
        description="Generate the configuration that makes nodes pull from the mirrors.",
    )
    verbosity(containerd, argparse.SUPPRESS)
    what = containerd.add_subparsers(dest="containerd_command", metavar="COMMAND")
    what.required = True
    config = what.add_parser(
        "config",
        help="write certs.d/hosts.toml, config.toml, registries.conf, cluster config",
        description=(
            "Write, under --out: certs.d/<host>/hosts.toml for gcr.io and every --hosts"
            " entry (containerd >= 1.5), config.toml (config_path plus mirror logins),"
            " config-legacy.toml (registry.mirrors, for containerd < 1.5; never merge it"
            " with config_path), cluster-config.yaml (registryMirrors) and registries.conf"
            " (CRI-O, podman). Mirrors are tried in the order given. Files with credentials"
            " are mode 0600; nothing secret is printed. Invalid input writes nothing."
        ),
    )
    verbosity(config, argparse.SUPPRESS)
    source = config.add_mutually_exclusive_group(required=True)
    source.add_argument("--private-registry", action="append", metavar="URL", dest="mirrors",
                        help="a mirror, https://HOST:PORT[/NAMESPACE] (repeatable; https unless"
                             " written http://; the https://HOST:PORT/v2/NS form is accepted)")
    source.add_argument("--from-cluster-config", metavar="FILE",
                        help="read registryMirrors (endpoints, CAs, credential files, hosts)"
                             " from this cluster config and print what changed")
    config.add_argument("--hosts", action="append", default=[], metavar="HOST[,HOST...]",
                        help="hosts mirrored besides gcr.io (comma-separated, repeatable)")
    config.add_argument("--cacert", metavar="PATH", help="CA certificate (PEM) of the mirrors")
    config.add_argument("--pull-credential-config", metavar="PATH",
                        help="a docker config.json holding the mirrors' login, named in the"
                             " cluster config and read for the login when none is given")
    config.add_argument("--username", metavar="USER", help="the mirrors' login (optional)")
    config.add_argument("--password", metavar="PASSWORD",
                        help="visible in the process list and shell history: prefer"
                             f" --password-stdin or ${PASSWORD_ENV}")
    config.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input")
    config.add_argument("--docker-config", metavar="PATH",
                        help="a docker config.json holding the mirrors' credentials")
    config.add_argument("--gcr-key", metavar="PATH",
                        help="a gcr.io service-account key: its _json_key login goes into"
                             " config.toml (the cluster config's gcrKeyPath)")
    config.add_argument("--no-fallback", action="store_true",
                        help="make the first mirror the server in hosts.toml and the location"
                             " in registries.conf, so nodes never pull from the public host")
    config.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    config.add_argument("--install-dir", metavar="DIR",
                        help="where DIR will live on the nodes, for the paths written into the"
                             " files (default: DIR itself); e.g. /etc/containerd")
    config.add_argument("--format", choices=[*FORMATS, "all"], default="all",
                        help="what to write (default all)")
    config.add_argument("--print", action="store_true", dest="print_files",
                        help="also print the files written, credentials redacted")
    config.set_defaults(func=cmd_containerd_config)


def _split_hosts(values: list[str]) -> list[str]:
    return [h.strip() for v in values for h in v.split(",") if h.strip()]


def _credential(args: argparse.Namespace, mirror: Mirror) -> Credential | None:
    """The mirror's login from the flags, or None: a login is optional here, never prompted."""
    from pipeline.registry.credentials import Credential, from_docker_config

    password = given_password(args)
    if args.username:
        if not password:
            raise UsageError(
                f"a password for {args.username} at {mirror.host} is needed",
                hint=f"use --password-stdin or ${PASSWORD_ENV}",
            )
        return Credential(args.username, password, source="the command line")
    if password:
        raise UsageError("a password without --username", hint="add --username")
    config = args.docker_config or args.pull_credential_config
    return from_docker_config(mirror.host, config) if config else None


def _endpoints_from_flags(args: argparse.Namespace) -> list[MirrorEndpoint]:
    from pipeline.containerd import MirrorEndpoint
    from pipeline.reference import parse_mirror

    mirrors = [parse_mirror(m) for m in args.mirrors]
    credentials: dict[str, Credential | None] = {}
    pull_config = (Path(args.pull_credential_config).expanduser().absolute()
                   if args.pull_credential_config else None)
    endpoints = []
    for mirror in mirrors:
        if mirror.host not in credentials:
            credentials[mirror.host] = _credential(args, mirror)
        ca = Path(args.cacert) if args.cacert and mirror.scheme == "https" else None
        endpoints.append(MirrorEndpoint(mirror, ca, credentials[mirror.host], pull_config))
    return endpoints


def cmd_containerd_config(args: argparse.Namespace) -> int:
    from pipeline.containerd import FORMATS, read_cluster_config, render, settings, write_config

    hosts = _split_hosts(args.hosts)
    gcr_key = args.gcr_key
    if args.from_cluster_config:
        given = [flag for flag, value in (
            ("--cacert", args.cacert), ("--hosts", hosts), ("--username", args.username),
            ("--docker-config", args.docker_config),
            ("--pull-credential-config", args.pull_credential_config)) if value]
        if given:
            raise UsageError(f"{given[0]} cannot be combined with --from-cluster-config",
                             hint="change the cluster config file instead")
        cluster = read_cluster_config(args.from_cluster_config)
        endpoints = list(cluster.endpoints)
        hosts = list(cluster.hosts)
        gcr_key = gcr_key or cluster.gcr_key_path
    else:
        endpoints = _endpoints_from_flags(args)
    mirror_settings = settings(endpoints, hosts=hosts, gcr_key_path=gcr_key,
                               no_fallback=args.no_fallback)
    formats = list(FORMATS) if args.format == "all" else [args.format]
    changes = write_config(mirror_settings, args.out, formats, install_dir=args.install_dir)
    if args.print_files:
        from pipeline.containerd import redact

        node_dir = Path(args.install_dir or args.out).absolute()
        for generated in render(mirror_settings, formats, install_dir=node_dir):
            if generated.path.endswith(".crt"):
                continue
            print(f"==> {generated.path}")
            print(redact(generated.data.decode("utf-8", "replace")), end="")
    _print_changes(changes, show_diff=bool(args.from_cluster_config))
    return 0


def _print_changes(changes: list[Change], *, show_diff: bool) -> None:
    written = [c for c in changes if c.status != "unchanged"]
    for change in changes:
        print(f"{change.status:<9} {change.path}")
        if show_diff:
            for line in change.removed:
                print(f"    - {line}")
            for line in change.added:
                print(f"    + {line}")
    print(f"{count(len(written), 'file')} written, {len(changes) - len(written)} unchanged")
