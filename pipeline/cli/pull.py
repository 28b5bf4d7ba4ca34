"""``bmsync pull``: a release's images into the shared store."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.cli import EXIT_PARTIAL, count, positive_int, verbosity

if TYPE_CHECKING:
    from pipeline.config import ImagesConfig
    from pipeline.pull import PullReport, ResolveFailure
    from pipeline.reference import Reference
    from pipeline.store import Store


def add_parser(sub: Any) -> None:
    pull = sub.add_parser(
        "pull",
        help="pull a release's images into the shared OCI store",
        description=(
            "Resolve every image of the config to a digest and pull what the store lacks. "
            "An index is filtered to the requested platforms (all platforms by default). "
            "Images that fail are named and the others are kept."
        ),
    )
    verbosity(pull, argparse.SUPPRESS)
    add_pull_arguments(pull)
    pull.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    pull.set_defaults(func=cmd_pull)


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that pulls a config's images first."""
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="images config (YAML: version, release, registries, images;"
                             " see the README)")
    parser.add_argument("--store", required=True, metavar="DIR",
                        help="OCI layout directory shared by every release (created if absent)")
    parser.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                        help="keep only this platform of multi-arch images (repeatable;"
                             " overrides the config's platforms)")
    parser.add_argument("--concurrency", type=positive_int, default=8,
                        help="blobs transferred at once (default 8)")


@dataclass
class PullOutcome:
    config: ImagesConfig
    store: Store
    refs: list[Reference]
    report: PullReport
    failures: list[ResolveFailure]
    platforms: tuple[str, ...]

    @property
    def exit_codes(self) -> list[int]:
        return [f.error.exit_code for f in self.failures] + [
            i.exit_code for i in self.report.failed
        ]

    @property
    def exit_code(self) -> int:
        codes = self.exit_codes
        if not codes:
            return 0
        return codes[0] if len(set(codes)) == 1 else EXIT_PARTIAL


def run_pull(args: argparse.Namespace, *, quiet: bool) -> PullOutcome:
    """Load the config, resolve it and pull into the store (no output but progress)."""
    from pipeline.config import load_images_config
    from pipeline.platform import parse_platform
    from pipeline.progress import Progress
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
    progress = Progress("pull", enabled=not quiet)
    hint = "change --platform" if args.platform else f"change platforms: in {args.config}"
    report = pull_images(
        refs, store, clients, platforms=platforms, concurrency=args.concurrency,
        progress=progress, platform_hint=hint,
    )
    return PullOutcome(config, store, refs, report, failures, tuple(str(p) for p in platforms))


def print_failures(outcome: PullOutcome) -> None:
    for f in outcome.failures:
        print(f"bmsync: error: {f.error}", file=sys.stderr)
    for image in outcome.report.failed:
        print(f"bmsync: error: {image.error}", file=sys.stderr)


def print_summary(outcome: PullOutcome, store_dir: str) -> None:
    from pipeline.progress import human_bytes

    report = outcome.report
    s = report.to_json()["summary"]
    print(
        f"{count(s['images'], 'image')} in {store_dir}: {s['pulled']} pulled,"
        f" {s['present']} already present, {s['failed'] + len(outcome.failures)} failed"
    )
    rate = f" ({report.mb_per_s:.1f} MB/s)" if report.bytes_fetched else ""
    print(
        f"blobs: {s['blobsFetched']} fetched, {s['blobsPresent']} already present;"
        f" {human_bytes(report.bytes_fetched)} in {report.seconds:.2f} s{rate}"
    )
    for f in outcome.failures:
        print(f"  failed: {f.spec}")
    for image in report.failed:
        print(f"  failed: {image.source}")


def cmd_pull(args: argparse.Namespace) -> int:
    outcome = run_pull(args, quiet=args.json)
    if args.json:
        data = outcome.report.to_json()
        data["resolveFailures"] = [
            {"image": f.spec, "error": str(f.error)} for f in outcome.failures
        ]
        print(json.dumps(data, indent=2))
    else:
        print_summary(outcome, args.store)
    print_failures(outcome)
    return outcome.exit_code
