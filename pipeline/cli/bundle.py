"""``bmsync bundle build|inspect|verify|extract``: versioned bmpackages archives."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import count, verbosity
from pipeline.cli.pull import add_pull_arguments, print_failures, print_summary, run_pull


def add_parser(sub: Any) -> None:
    bundle = sub.add_parser(
        "bundle",
        help="build, inspect, verify and extract bmpackages archives",
        description="Versioned bmpackages_<VERSION>.tar.zst archives (see the README).",
    )
    verbosity(bundle, argparse.SUPPRESS)
    cmds = bundle.add_subparsers(dest="bundle_command", metavar="COMMAND")
    cmds.required = True

    build = cmds.add_parser(
        "build",
        help="pull what the store lacks, then write the release's archive",
        description=(
            "Pull the config's images into the store (as `bmsync pull` does), then write"
            " bmpackages_<release>.tar.zst into --out with its .sha256 and .bundle.json"
            " sidecars. With --base, a delta carrying only the blobs the base lacks."
        ),
    )
    verbosity(build, argparse.SUPPRESS)
    add_pull_arguments(build)
    build.add_argument("--out", required=True, metavar="DIR", help="where to write the archive")
    build.add_argument("--base", metavar="PATH",
                       help="build a delta against an earlier archive, its .bundle.json, or a"
                            " site inventory JSON")
    build.add_argument("--compression", choices=("zstd", "xz", "none"), default="zstd",
                       help="zstd (default: seekable, multithreaded), xz (the .tar.xz form"
                            " sites already use; slow) or none")
    build.add_argument("--split-size", metavar="SIZE",
                       help="split the archive into parts of this size (e.g. 4G) for removable"
                            " media")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(func=cmd_build)

    inspect = cmds.add_parser(
        "inspect",
        help="show an archive's version, base, platforms and images",
        description="Read bundle.json, the archive's first member, and nothing more.",
    )
    verbosity(inspect, argparse.SUPPRESS)
    inspect.add_argument("archive", metavar="ARCHIVE",
                         help="a .tar.zst/.tar.xz/.tar archive, a part of a split one, or a"
                              " .bundle.json sidecar")
    inspect.add_argument("--json", action="store_true", help="print bundle.json itself")
    inspect.set_defaults(func=cmd_inspect)

    verify = cmds.add_parser(
        "verify",
        help="check an archive completely in one streaming pass",
        description=(
            "Check the archive's sha256 against its .sha256 sidecar, every member's name,"
            " every blob's size and digest against bundle.json, and that every image is"
            " complete. Exits non-zero naming the first problem."
        ),
    )
    verbosity(verify, argparse.SUPPRESS)
    verify.add_argument("archive", metavar="ARCHIVE")
    verify.add_argument("--base", metavar="PATH",
                        help="for a delta: its base (archive, .bundle.json or inventory), to"
                             " check that it holds every blob the delta leaves out")
    verify.add_argument("--no-checksum", action="store_true",
                        help="do not require the .sha256 sidecar")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=cmd_verify)

    extract = cmds.add_parser(
        "extract",
        help="unpack an archive into an OCI layout",
        description=(
            "Unpack into a new directory (--to), written aside and renamed into place when"
            " complete; or merge into an existing OCI layout (--onto), which a delta needs:"
            " the layout must already hold the delta's base."
        ),
    )
    verbosity(extract, argparse.SUPPRESS)
    extract.add_argument("archive", metavar="ARCHIVE")
    where = extract.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", type=Path, help="a new directory")
    where.add_argument("--onto", metavar="DIR", type=Path, help="an existing OCI layout")
    extract.set_defaults(func=cmd_extract)


def cmd_build(args: argparse.Namespace) -> int:
    from pipeline.bundle.delta import load_base
    from pipeline.bundle.split import parse_size
    from pipeline.bundle.writer import build_bundle
    from pipeline.progress import Progress, human_bytes
    from pipeline.pull import store_name

    split = parse_size(args.split_size) if args.split_size else None
    base = load_base(args.base) if args.base else None
    outcome = run_pull(args, quiet=args.json)
    if outcome.exit_code:
        if not args.json:
            print_summary(outcome, args.store)
        print_failures(outcome)
        print("bmsync: error: no archive written: every image must pull first",
              file=sys.stderr)
        return outcome.exit_code
    result = build_bundle(
        outcome.store, [store_name(r) for r in outcome.refs], args.out,
        version=outcome.config.release, platforms=outcome.platforms, base=base,
        compression=args.compression, split_size=split,
        progress=Progress("write", enabled=not args.json),
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    m = result.manifest
    carried = len(m.archive_blobs())
    kind = f"delta of {m.base.describe()}" if m.base else "full bundle"
    print(f"{result.archive}: {human_bytes(result.size)}, {kind}")
    print(f"  {count(len(m.images), 'image')}, {count(len(m.blobs), 'blob')}"
          f" ({carried} in the archive, {human_bytes(result.tar_size)} of tar)")
    for part in result.parts if len(result.parts) > 1 else []:
        print(f"  part {part.name}: {human_bytes(part.stat().st_size)}")
    print(f"  sha256 {result.sha256}")
    print(f"  sidecars {result.sidecar_sha256.name}, {result.sidecar_manifest.name}")
    rate = result.tar_size / 1e6 / result.seconds if result.seconds else 0
    print(f"  written in {result.seconds:.2f} s ({rate:.0f} MB/s of tar)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.bundle.format import parse_manifest
    from pipeline.bundle.reader import open_bundle
    from pipeline.progress import human_bytes

    path = Path(args.archive)
    compression = "-"
    if path.name.endswith(".bundle.json"):
        try:
            raw = path.read_bytes()
        except OSError as e:
            from pipeline.errors import UsageError

            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        manifest = parse_manifest(raw, source=str(path))
    else:
        with open_bundle(path) as reader:
            raw, manifest = reader.manifest_raw, reader.manifest
            compression = reader.compression
    if args.json:
        sys.stdout.write(raw.decode())
        return 0
    m = manifest
    carried = m.archive_blobs()
    print(f"bundle      {m.version} (created {m.created})")
    print(f"archive     {path} ({compression})")
    print(f"base        {m.base.describe() if m.base else 'none: a full bundle'}")
    print(f"platforms   {', '.join(m.platforms) if m.platforms else 'all (upstream digests)'}")
    print(f"blobs       {len(m.blobs)}, {len(carried)} in the archive"
          f" ({human_bytes(sum(b.size for _, b in carried))})")
    print(f"images      {len(m.images)}")
    width = max((len(i.source) for i in m.images), default=10)
    for i in m.images:
        same = "" if i.digest == i.upstream_digest else f"  (upstream {i.upstream_digest})"
        print(f"  {i.source:<{width}}  {i.digest}  {human_bytes(i.size):>9}{same}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.bundle.delta import load_base
    from pipeline.bundle.verify import verify_bundle
    from pipeline.progress import human_bytes

    base = load_base(args.base) if args.base else None
    report = verify_bundle(args.archive, base=base, require_sidecar=not args.no_checksum)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    m = report.manifest
    print(f"{report.archive}: OK, bundle {m.version}")
    print(f"  {count(report.blobs, 'blob')} ({human_bytes(report.bytes)}) match their digests;"
          f" {count(len(m.images), 'image')} complete")
    if report.checked_sidecar:
        print(f"  sha256 {report.sha256} matches the sidecar")
    if report.checked_base and m.base:
        print(f"  base {m.base.describe()} holds the {len(m.missing_blobs())} blobs left out")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.bundle.extract import extract_bundle
    from pipeline.progress import human_bytes

    result = extract_bundle(args.archive, to=args.to, onto=args.onto)
    print(f"{result.target}: bundle {result.version}, {count(result.images, 'image')};"
          f" {count(result.blobs_written, 'blob')} written ({human_bytes(result.bytes_written)})")
    return 0
