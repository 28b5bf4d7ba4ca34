"""``bmsync push images`` and ``bmsync inventory``: the disconnected site's commands."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import (
    EXIT_PARTIAL,
    PASSWORD_ENV,
    count,
    given_password,
    positive_int,
    verbosity,
)
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.reference import Mirror
    from pipeline.registry.client import RegistryClient
    from pipeline.registry.credentials import Credential



def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def connection_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--private-registry", action="append", required=required,
                        metavar="HOST:PORT[/NAMESPACE]", dest="mirrors",
                        help="the mirror (repeatable; https unless written http://; the"
                             " https://HOST:PORT/v2/NS form is accepted)")
    parser.add_argument("--cacert", metavar="PATH",
                        help="CA certificate of the mirror, added to the system's")
    parser.add_argument("--need-credential", type=_bool, default=True, metavar="true|false",
                        help="whether the mirror needs a login (default true)")
    parser.add_argument("--username", metavar="USER")
    parser.add_argument("--password", metavar="PASSWORD",
                        help="visible in the process list and shell history: prefer"
                             f" --password-stdin or ${PASSWORD_ENV}")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input")
    parser.add_argument("--docker-config", metavar="PATH",
                        help="a docker config.json holding the mirror's credentials")
    parser.add_argument("--concurrency", type=positive_int, default=8,
                        help="blobs transferred at once (default 8)")


def add_parsers(sub: Any) -> None:
    push = sub.add_parser(
        "push",
        help="push a bundle into private mirrors",
        description="Push images from a bundle into private registry mirrors.",
    )
    verbosity(push, argparse.SUPPRESS)
    what = push.add_subparsers(dest="push_command", metavar="COMMAND")
    what.required = True
    images = what.add_parser(
        "images",
        help="push a bundle's images, moving only what the mirror lacks",
        description=(
            "Push every image of the bundle into each mirror (a namespace is prefixed to"
            " the repository; the source host is dropped). Only missing blobs move:"
            " present blobs are skipped, blobs in another repository are mounted, the rest"
            " is streamed from the archive and committed only once its digest checks out."
            " Blobs go first, then child manifests, then indexes; tags last."
        ),
    )
    verbosity(images, argparse.SUPPRESS)
    images.add_argument("--source", required=True, metavar="PATH",
                        help="a bmpackages archive (or any part of a split one), or a layout"
                             " made by `bmsync bundle extract`")
    connection_arguments(images)
    images.add_argument("--dry-run", action="store_true",
                        help="check the mirror and print what would be pushed")
    images.add_argument("--no-overwrite", action="store_true",
                        help="refuse to move a tag that points at another digest")
    images.add_argument("--json", action="store_true", help="print the report as JSON")
    images.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    images.set_defaults(func=cmd_push_images)

    inv = sub.add_parser(
        "inventory",
        help="list the digests a mirror holds (the base of a site-specific delta)",
        description=(
            "Read the mirror's tags and manifests and write every digest it holds, for"
            " `bmsync bundle build --base inventory.json` on the connected side."
        ),
    )
    verbosity(inv, argparse.SUPPRESS)
    connection_arguments(inv)
    inv.add_argument("--out", required=True, metavar="FILE", help="inventory JSON to write")
    inv.add_argument("--source", metavar="ARCHIVE",
                     help="only the repositories of this bundle (default: every repository"
                          " under the namespace, from the registry's catalog)")
    inv.set_defaults(func=cmd_inventory)


def _credential(args: argparse.Namespace, mirror: Mirror) -> Credential | None:
    """The mirror's credential from flags, environment, stdin, docker config, or a prompt."""
    from pipeline.registry.credentials import Credential, from_docker_config

    if not args.need_credential:
        return None
    password = given_password(args)
    if args.username:
        if not password:
            if not sys.stdin.isatty():
                raise UsageError(
                    f"a password for {args.username} at {mirror.host} is needed",
                    hint=f"use --password-stdin or ${PASSWORD_ENV}",
                )
            password = getpass.getpass(f"Password for {args.username} at {mirror.host}: ")
        return Credential(args.username, password, source="the command line")
    found = from_docker_config(mirror.host, args.docker_config) if args.docker_config else (
        from_docker_config(mirror.host)
    )
    if found is not None:
        return found
    if sys.stdin.isatty() and not args.password_stdin:
        username = input(f"Username for {mirror.host}: ").strip()
        password = getpass.getpass(f"Password for {username} at {mirror.host}: ")
        return Credential(username, password, source="the prompt")
    raise UsageError(
        f"{mirror.host} needs credentials and none were given",
        hint="pass --username with --password-stdin (or $BMSYNC_PASSWORD), or"
        " --docker-config PATH, or --need-credential=false for a mirror without login",
    )


def mirror_clients(args: argparse.Namespace) -> list[tuple[Mirror, RegistryClient]]:
    from pipeline.reference import parse_mirror
    from pipeline.registry.client import RegistryClient
    from pipeline.registry.transport import Transport

    mirrors = [parse_mirror(m) for m in args.mirrors]
    transport = Transport(cacert=args.cacert, pool_size=max(16, args.concurrency * 2))
    out = []
    credentials: dict[str, Credential | None] = {}
    for mirror in mirrors:
        if mirror.host not in credentials:
            credentials[mirror.host] = _credential(args, mirror)
        out.append((mirror, RegistryClient(mirror.host, endpoint=mirror.base_url,
                                           credential=credentials[mirror.host],
                                           transport=transport)))
    return out


def cmd_push_images(args: argparse.Namespace) -> int:
    from pipeline.bundle.reader import layout_manifest, open_bundle
    from pipeline.mirror import push_bundle
    from pipeline.progress import Progress
    from pipeline.store import atomic_write

    source = Path(args.source)
    targets = mirror_clients(args)
    progress = Progress("push", enabled=not args.json)
    if source.is_dir():
        reports = push_bundle(layout_manifest(source), targets, layout=source,
                              concurrency=args.concurrency, dry_run=args.dry_run,
                              no_overwrite=args.no_overwrite, progress=progress)
    else:
        with open_bundle(source) as reader:
            reports = push_bundle(reader.manifest, targets, reader=reader,
                                  concurrency=args.concurrency, dry_run=args.dry_run,
                                  no_overwrite=args.no_overwrite, progress=progress)
    data = {"source": str(source), "mirrors": [r.to_json() for r in reports]}
    if args.report:
        atomic_write(args.report, (json.dumps(data, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for r in reports:
            _print_report(r)
    codes = [i.exit_code for r in reports for i in r.failed]
    for r in reports:
        for image in r.failed:
            print(f"bmsync: error: {image.error}", file=sys.stderr)
    if not codes:
        return 0
    return codes[0] if len(set(codes)) == 1 else EXIT_PARTIAL


def _print_report(r: Any) -> None:
    from pipeline.progress import human_bytes

    s = r.to_json()["summary"]
    verb = "would push" if r.dry_run else "pushed"
    moved = s["planned"] if r.dry_run else s["pushed"]
    print(f"{r.mirror}: {count(len(r.images), 'image')}: {moved} {verb},"
          f" {s['present']} already present, {s['retagged']} retagged, {s['failed']} failed")
    if not r.dry_run:
        rate = r.bytes_uploaded / 1e6 / r.seconds if r.seconds else 0
        speed = f" ({rate:.0f} MB/s)" if r.bytes_uploaded else ""
        print(f"  blobs: {s['blobsUploaded']} uploaded, {s['blobsMounted']} mounted,"
              f" {s['blobsSkipped']} already there; {human_bytes(r.bytes_uploaded)} in"
              f" {r.seconds:.2f} s{speed}")
    width = max((len(i.target) for i in r.images), default=10)
    for i in r.images:
        status = "to push" if i.status == "planned" else i.status
        extra = f" (was {i.old_digest})" if i.old_digest else ""
        print(f"  {i.target:<{width}}  {i.digest}  {status}{extra}")


def cmd_inventory(args: argparse.Namespace) -> int:
    from pipeline.bundle.reader import open_bundle
    from pipeline.inventory import catalog, take_inventory
    from pipeline.reference import mirror_reference, parse_reference
    from pipeline.store import atomic_write

    if len(args.mirrors) != 1:
        raise UsageError("inventory takes one --private-registry")
    [(mirror, client)] = mirror_clients(args)
    if args.source:
        with open_bundle(args.source) as reader:
            repos = [mirror_reference(parse_reference(i.source), mirror).repository
                     for i in reader.manifest.images]
    else:
        repos = catalog(client, mirror)
    doc = take_inventory(client, mirror, repos, concurrency=args.concurrency)
    atomic_write(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    n = len(doc["repositories"])
    print(f"{args.out}: {count(len(doc['digests']), 'digest')} in {n}"
          f" {'repository' if n == 1 else 'repositories'} of {mirror}")
    return 0
