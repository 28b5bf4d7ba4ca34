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
            " image of a bundle repository is at a digest the bundle lacks. Exit code 6"
            " names every image that differs."
        ),
    )
    verbosity(verify, argparse.SUPPRESS)
    verify.add_argument("--source", required=True, metavar="PATH",
                        help="a bmpackages archive (or any part of a split one), or a layout"
                             " made by `bmsync bundle extract`")
    # --node may replace --private-registry: the command checks that one of them is given.
    connection_arguments(verify, required=False)
    node = verify.add_argument_group("node", "check this node's containerd instead")
    node.add_argument("--node", action="store_true",
                      help="compare the images of the local containerd with the bundle")
    node.add_argument("--address", metavar="SOCKET", default=None,
                      help="containerd's socket (default /run/containerd/containerd.sock)")
    node.add_argument("--namespace", metavar="NS", default=None,
                      help="containerd namespace (default k8s.io, kubelet's)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)


def _manifest(source: Path) -> BundleManifest:
    """The bundle's plan, from an archive's first member or a layout's bundle.json."""
    from pipeline.bundle.format import BUNDLE_JSON, parse_manifest
    from pipeline.bundle.reader import open_bundle

    if source.is_dir():
        manifest_file = source / BUNDLE_JSON
        if not manifest_file.is_file():
            raise UsageError(f"{source} holds no bundle.json: give the archive, or a layout"
                             " made by `bmsync bundle extract`")
        return parse_manifest(manifest_file.read_bytes(), source=str(manifest_file))
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

    if args.node == bool(args.mirrors):
        raise UsageError("give either --private-registry (one or more) or --node")
    if not args.node and (args.address or args.namespace):
        raise UsageError("--address and --namespace go with --node")
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
