"""``bmsync publish|fetch|catalog|prune``: bundles through object storage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.cli import count, positive_int, verbosity


def _store_arguments(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    parser.add_argument(flag, required=True, metavar="URL", dest="url", help=help_text)
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint for an on-premises server (else AWS_ENDPOINT_URL,"
                             " else AWS)")


def add_parsers(sub: Any) -> None:
    pub = sub.add_parser(
        "publish",
        help="upload an archive and its sidecars to object storage, then list it",
        description=(
            "Upload ARCHIVE (or all its parts), its .sha256 and .bundle.json under"
            " <prefix>/<version>/, then add the version to <prefix>/catalog.json. Data first,"
            " catalog last: a half-published version is never listed. Re-publishing the same"
            " archive uploads nothing; another archive under a published version is refused."
        ),
    )
    verbosity(pub, argparse.SUPPRESS)
    pub.add_argument("archive", metavar="ARCHIVE", type=Path)
    _store_arguments(pub, "--to", "s3://BUCKET/PREFIX or file:///PATH")
    pub.add_argument("--json", action="store_true", help="print the result as JSON")
    pub.set_defaults(func=cmd_publish)

    fetch = sub.add_parser(
        "fetch",
        help="download a published version, verified, resuming an interrupted download",
        description=(
            "Download a version listed in the catalog into DIR, resuming what an earlier"
            " run left, and give each file its final name only once its sha256 matches the"
            " sidecar and the catalog. Exit code 8: the catalog lists the version but its"
            " objects have not all arrived yet (try again later)."
        ),
    )
    verbosity(fetch, argparse.SUPPRESS)
    _store_arguments(fetch, "--from", "s3://BUCKET/PREFIX or file:///PATH")
    fetch.add_argument("--release", required=True, metavar="VERSION|latest")
    fetch.add_argument("--to", required=True, metavar="DIR", type=Path)
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(func=cmd_fetch)

    cat = sub.add_parser("catalog", help="list the published versions",
                         description="List the versions in <prefix>/catalog.json.")
    verbosity(cat, argparse.SUPPRESS)
    _store_arguments(cat, "--from", "s3://BUCKET/PREFIX or file:///PATH")
    cat.add_argument("--json", action="store_true", help="print catalog.json")
    cat.set_defaults(func=cmd_catalog)

    prune = sub.add_parser(
        "prune",
        help="remove old versions",
        description=("Remove all but the newest N versions; never the latest, nor a version"
                     " that a kept delta is built on."),
    )
    verbosity(prune, argparse.SUPPRESS)
    _store_arguments(prune, "--from", "s3://BUCKET/PREFIX or file:///PATH")
    prune.add_argument("--keep", required=True, type=positive_int, metavar="N")
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    prune.set_defaults(func=cmd_prune)


def cmd_publish(args: argparse.Namespace) -> int:
    from pipeline.objstore import open_store
    from pipeline.progress import Progress, human_bytes
    from pipeline.publish import publish

    store = open_store(args.url, endpoint_url=args.endpoint_url)
    progress = Progress("publish", enabled=not args.json)
    try:
        report = publish(args.archive, store, on_bytes=progress.advance)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif report.already:
        print(f"{store.url}: {report.version} is already published; nothing uploaded")
    else:
        rate = report.bytes / 1e6 / report.seconds if report.seconds else 0
        print(f"{store.url}: published {report.version} ({len(report.uploaded)} objects,"
              f" {human_bytes(report.bytes)} in {report.seconds:.2f} s, {rate:.0f} MB/s);"
              " listed in catalog.json")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.objstore import open_store
    from pipeline.progress import Progress, human_bytes
    from pipeline.publish import fetch

    store = open_store(args.url, endpoint_url=args.endpoint_url)
    progress = Progress("fetch", enabled=not args.json)
    try:
        report = fetch(store, args.release, args.to, on_total=progress.add_total,
                       on_bytes=progress.advance)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"{report.archive}: version {report.version}, sha256 {report.digest[7:]} verified"
          f" ({human_bytes(report.bytes)} downloaded in {report.seconds:.2f} s)")
    base = report.base
    if base:
        needs = f"bundle {base.get('version')}" if base.get("kind") == "bundle" else (
            f"the site inventory {base.get('digest')}")
        print(f"  a delta: importing it needs {needs} in the mirror first")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from pipeline.objstore import open_store
    from pipeline.progress import human_bytes
    from pipeline.publish import read_catalog

    store = open_store(args.url, endpoint_url=args.endpoint_url)
    catalog = read_catalog(store)
    if args.json:
        print(catalog.to_json().decode(), end="")
        return 0
    if not catalog.versions:
        print(f"{store.url}: no published version")
        return 0
    print(f"{store.url}: {count(len(catalog.versions), 'version')}, latest {catalog.latest}")
    for v in sorted(catalog.versions, key=lambda v: catalog.versions[v].get("created", "")):
        e = catalog.versions[v]
        base = e.get("base") or {}
        on = (f"delta of {base.get('version')}" if base.get("kind") == "bundle" else
              "delta of an inventory" if base else "full")
        mark = " (latest)" if v == catalog.latest else ""
        print(f"  {v:<16} {e.get('created', ''):<20} {human_bytes(e.get('size', 0)):>9}"
              f"  {on:<24} {e.get('digest', '')}{mark}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pipeline.objstore import open_store
    from pipeline.publish import prune

    store = open_store(args.url, endpoint_url=args.endpoint_url)
    gone = prune(store, args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{store.url}: {verb} {count(len(gone), 'version')}"
          + (f": {', '.join(gone)}" if gone else ""))
    return 0
