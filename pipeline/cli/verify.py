"""``bmsync verify``: does a mirror (or this node's containerd) hold exactly the bundle?

Not to be confused with ``bmsync bundle verify``, which checks an archive's own bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import count, verbosity
from pipeline.cli.push import connection_arguments, mirror_clients
from pipeline.errors import IntegrityError, UsageError

if TYPE_CHECKING:
    from pipeline.bundle.format import BundleManifest
    from pipeline.nodeconfig import NodeConfigReport
    from pipeline.verify import MirrorReport, NodeReport


def add_parsers(sub: Any) -> None:
    verify = sub.add_parser(
        "verify",
        help="check that mirrors (or a node) hold exactly a bundle's images",
        description=(
            "With --private-registry: for every image of the bundle, the mirror's tag"
            " points at the bundle's digest and every blob and child manifest is in the"
            " image's repository (read-only; pull access suffices). With --node: every"
            " bundle image on this node's containerd is at the bundle's digest, and no"
            " image of a bundle repository is at a digest the bundle lacks. With"
            " --containerd-config: for gcr.io and every mirrored host (the bundle's source"
            " registries with --source, or --hosts), the node's containerd config pulls it"
            " from a mirror (the --private-registry one, when given) with the right"
            " namespace path and CA; the table says whether an upstream fallback remains."
            " Exit code 6 names every image or host that differs."
        ),
    )
    verbosity(verify, argparse.SUPPRESS)
    verify.add_argument("--source", metavar="PATH",
                        help="a bmpackages archive (or any part of a split one), or a layout"
                             " made by `bmsync bundle extract` (optional with"
                             " --containerd-config)")
    # --node or --containerd-config may replace --private-registry: the command checks
    # that one mode is given.
    connection_arguments(verify, required=False)
    node = verify.add_argument_group("node", "check this node's containerd instead")
    node.add_argument("--node", action="store_true",
                      help="compare the images of the local containerd with the bundle")
    node.add_argument("--address", metavar="SOCKET", default=None,
                      help="containerd's socket (default /run/containerd/containerd.sock)")
    node.add_argument("--namespace", metavar="NS", default=None,
                      help="containerd namespace (default k8s.io, kubelet's)")
    config = verify.add_argument_group(
        "node config", "check a node's containerd registry configuration instead")
    config.add_argument("--containerd-config", metavar="PATH",
                        help="the node's config.toml (config_path or legacy registry.mirrors"
                             " form) or its certs.d directory; --private-registry then names"
                             " the mirror that must be configured")
    config.add_argument("--hosts", action="append", default=[], metavar="HOST[,HOST...]",
                        help="hosts that must be mirrored besides gcr.io (comma-separated,"
                             " repeatable; with --containerd-config)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)


def _manifest(source: Path) -> BundleManifest:
    """The bundle's plan, from an archive's first member or a layout's bundle.json."""
    from pipeline.bundle.reader import layout_manifest, open_bundle

    if source.is_dir():
        return layout_manifest(source)
    with open_bundle(source) as reader:
        return reader.manifest


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import (
        DEFAULT_ADDRESS,
        DEFAULT_NAMESPACE,
        ctr_command,
        verify_mirror,
        verify_node,
    )

    if args.containerd_config is not None:
        return _verify_node_config(args)
    if args.hosts:
        raise UsageError("--hosts goes with --containerd-config")
    if args.node == bool(args.mirrors):
        raise UsageError("give either --private-registry (one or more), --node or"
                         " --containerd-config")
    if not args.node and (args.address or args.namespace):
        raise UsageError("--address and --namespace go with --node")
    if args.source is None:
        raise UsageError("--source is needed to compare a mirror or a node with a bundle")
    source = Path(args.source)
    manifest = _manifest(source)
    problems: list[str] = []
    data: dict[str, Any] = {"source": str(source), "version": manifest.version}
    if args.node:
        report = verify_node(manifest, ctr_command(args.address or DEFAULT_ADDRESS),
                             namespace=args.namespace or DEFAULT_NAMESPACE)
        data["node"] = report.to_json()
        problems = [i.problem() for i in report.differences]
        if not args.json:
            _print_node(report)
    else:
        reports = [verify_mirror(manifest, mirror, client, concurrency=args.concurrency)
                   for mirror, client in mirror_clients(args)]
        data["mirrors"] = [r.to_json() for r in reports]
        problems = [i.problem() for r in reports for i in r.differences]
        if not args.json:
            for r in reports:
                _print_mirror(r)
    data["ok"] = not problems
    if args.json:
        print(json.dumps(data, indent=2))
    for problem in problems:
        print(f"bmsync: error: {problem}", file=sys.stderr)
    return IntegrityError.exit_code if problems else 0


def _print_mirror(r: MirrorReport) -> None:
    bad = len(r.differences)
    print(f"{r.mirror}: {count(len(r.images), 'image')}: {len(r.images) - bad} ok,"
          f" {bad} differ")
    width = max((len(i.target) for i in r.images), default=10)
    for i in r.images:
        detail = ""
        if i.found and i.found != i.expected:
            detail = f" (found {i.found})"
        elif i.missing:
            detail = f" ({count(len(i.missing), 'missing blob')})"
        print(f"  {i.target:<{width}}  {i.expected}  {i.status}{detail}")


def _print_node(r: NodeReport) -> None:
    bad = len(r.differences)
    on_node = sum(1 for i in r.images if i.found)
    print(f"namespace {r.namespace}: {count(on_node, 'image')} of the bundle's repositories"
          f" on the node, {bad} differ")
    width = max((len(i.name) for i in r.images), default=10)
    for i in r.images:
        digest = i.found or i.expected or ""
        differs = i.found and i.expected and i.found != i.expected
        detail = f" (bundle: {i.expected})" if differs else ""
        print(f"  {i.name:<{width}}  {digest}  {i.status}{detail}")


def _verify_node_config(args: argparse.Namespace) -> int:
    """``--containerd-config``: is every mirrored host pulled from the (expected) mirror?"""
    from pipeline.nodeconfig import check_node_config
    from pipeline.reference import parse_mirror

    if args.node:
        raise UsageError("--containerd-config and --node are two checks: give one")
    if args.address or args.namespace:
        raise UsageError("--address and --namespace go with --node")
    login = [flag for flag, value in (
        ("--username", args.username), ("--password", args.password),
        ("--password-stdin", args.password_stdin), ("--docker-config", args.docker_config),
    ) if value]
    if login:
        raise UsageError(f"{login[0]} has no use with --containerd-config",
                         hint="it reads files only and contacts no registry")
    hosts = [h.strip() for v in args.hosts for h in v.split(",") if h.strip()]
    data: dict[str, Any] = {}
    if args.source is not None:
        from pipeline.reference import parse_reference

        source = Path(args.source)
        manifest = _manifest(source)
        data.update(source=str(source), version=manifest.version)
        # Bundle hosts first, in bundle order, so the table follows the bundle.
        hosts = [*(parse_reference(i.source).registry for i in manifest.images), *hosts]
    expected = [parse_mirror(m) for m in args.mirrors or ()]
    report = check_node_config(args.containerd_config, hosts, expected=expected,
                               expected_ca=args.cacert)
    data["containerd"] = report.to_json()
    data["ok"] = report.ok
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_node_config(report)
    for problem in report.problems:
        print(f"bmsync: error: {report.path}: {problem}", file=sys.stderr)
    for host in report.differences:
        for problem in host.problems:
            print(f"bmsync: error: {host.host}: {problem}", file=sys.stderr)
    return 0 if report.ok else IntegrityError.exit_code


def _print_node_config(r: NodeConfigReport) -> None:
    roots = ":".join(str(d) for d in r.certs_dirs)
    form = f"{r.form} {roots}" if roots and r.form != "certs.d" else r.form
    good = sum(1 for h in r.hosts if h.ok)
    print(f"{r.path} ({form}): {count(len(r.hosts), 'host')}: {good} mirrored,"
          f" {len(r.hosts) - good} not")
    width = max(len(h.host) for h in r.hosts)
    for h in r.hosts:
        fallback = f"falls back to {h.fallback}" if h.fallback else "no fallback"
        where = f"  ({h.configured_by})" if h.configured_by else ""
        print(f"  {h.host:<{width}}  {h.status:<13}  {fallback}{where}")
        for e in h.endpoints:
            path = "path ok" if e.path_ok else "WRONG PATH"
            if e.ca_files:
                ca = "ca " + ", ".join(
                    f"{c} (missing)" if c in e.ca_missing else c for c in e.ca_files)
            else:
                ca = "ca: system" if (e.api or e.url).startswith("https") else "plain http"
            extra = (", skip_verify" if e.skip_verify else "") + (
                ", server (tried last)" if e.server else "")
            print(f"      {e.api or e.url}  {path}  {ca}{extra}")
