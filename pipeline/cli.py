"""The ``bmsync`` command line.

Each subcommand parses its flags and calls one pipeline function; modules are imported
inside the command that needs them, so a warm ``bmsync pull`` starts quickly.

Errors from :mod:`pipeline.errors` become one line on stderr (``bmsync: error: ...``)
and the exit code of their class; see the README's table of exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from pipeline.errors import BmsyncError

EXIT_PARTIAL = 1
EXIT_INTERRUPTED = 130


def _setup_logging(verbosity: int) -> None:
    """-q: warnings; default: one line per finished item; -v: debug; -vv: every request."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                "%Y-%m-%dT%H:%M:%S")
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("bmsync").setLevel(level)
    logging.getLogger("bmsync.registry").setLevel(
        logging.DEBUG if verbosity >= 2 else max(level, logging.INFO)
    )
    # urllib3 logs full URLs (with query strings) at DEBUG: keep it quiet.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_pull(args: argparse.Namespace) -> int:
    from pipeline.config import load_images_config
    from pipeline.platform import parse_platform
    from pipeline.progress import Progress, human_bytes
    from pipeline.pull import pull_images, resolve_images
    from pipeline.registry.connect import ClientPool
    from pipeline.store import Store

    config = load_images_config(args.config)
    platforms = (
        tuple(parse_platform(p) for p in args.platform) if args.platform else config.platforms
    )
    store = Store(args.store)
    clients = ClientPool(dict(config.registries), pool_size=max(16, args.concurrency * 2))
    refs, failures = resolve_images(config, clients)
    progress = Progress("pull", enabled=not args.json)
    hint = (
        "change --platform" if args.platform else f"change platforms: in {args.config}"
    )
    report = pull_images(
        refs, store, clients, platforms=platforms, concurrency=args.concurrency,
        progress=progress, platform_hint=hint,
    )
    exit_codes = [f.error.exit_code for f in failures] + [i.exit_code for i in report.failed]
    if args.json:
        data = report.to_json()
        data["resolveFailures"] = [{"image": f.spec, "error": str(f.error)} for f in failures]
        print(json.dumps(data, indent=2))
    else:
        s = report.to_json()["summary"]
        print(
            f"{_count(s['images'], 'image')} in {args.store}: {s['pulled']} pulled,"
            f" {s['present']} already present, {s['failed'] + len(failures)} failed"
        )
        rate = f" ({report.mb_per_s:.1f} MB/s)" if report.bytes_fetched else ""
        print(
            f"blobs: {s['blobsFetched']} fetched, {s['blobsPresent']} already present;"
            f" {human_bytes(report.bytes_fetched)} in {report.seconds:.2f} s{rate}"
        )
        for f in failures:
            print(f"  failed: {f.spec}")
        for image in report.failed:
            print(f"  failed: {image.source}")
    for f in failures:
        print(f"bmsync: error: {f.error}", file=sys.stderr)
    for image in report.failed:
        print(f"bmsync: error: {image.error}", file=sys.stderr)
    if not exit_codes:
        return 0
    return exit_codes[0] if len(set(exit_codes)) == 1 else EXIT_PARTIAL


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bmsync")
    except PackageNotFoundError:
        return "unknown"


def _verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """-v/-q on the main parser and on every subcommand (``bmsync pull -v`` works too).

    Subcommands default to SUPPRESS so they do not reset what the main parser set.
    """
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more log output (-v: debug; -vv: also every request)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmsync",
        description=(
            "Air-gapped container image bundles and mirror sync. The README has the"
            " workflows, the config format and the exit codes."
        ),
    )
    parser.add_argument("--version", action="version", version=f"bmsync {_version()}")
    _verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pull = sub.add_parser(
        "pull",
        help="pull a release's images into the shared OCI store",
        description=(
            "Resolve every image of the config to a digest and pull what the store lacks. "
            "An index is filtered to the requested platforms (all platforms by default). "
            "Images that fail are named and the others are kept."
        ),
    )
    _verbosity(pull, argparse.SUPPRESS)
    pull.add_argument("--config", required=True, metavar="FILE",
                      help="images config (YAML: version, release, registries, images;"
                           " see the README)")
    pull.add_argument("--store", required=True, metavar="DIR",
                      help="OCI layout directory shared by every release (created if absent)")
    pull.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                      help="keep only this platform of multi-arch images (repeatable; overrides"
                           " the config's platforms)")
    pull.add_argument("--concurrency", type=_positive_int,
                      default=8,
                      help="blobs transferred at once (default 8)")
    pull.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    pull.set_defaults(func=cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        code: int = args.func(args)
        return code
    except BmsyncError as e:
        print(f"bmsync: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bmsync: interrupted; a re-run resumes where this one stopped", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Worker threads may be mid-transfer; their partial files are resumable, so do
        # not wait for them (a normal exit would join every pool thread).
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
