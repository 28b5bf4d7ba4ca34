"""The ``bmsync`` command line.

Each subcommand parses its flags and calls one pipeline function; modules are imported
inside the command that needs them, so a warm ``bmsync pull`` starts quickly.

Errors from :mod:`pipeline.errors` become one line on stderr (``bmsync: error: ...``)
and the exit code of their class; see the README's table of exit codes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence

from pipeline import __version__
from pipeline.errors import BmsyncError

EXIT_PARTIAL = 1
EXIT_INTERRUPTED = 130
PASSWORD_ENV = "BMSYNC_PASSWORD"


def given_password(args: argparse.Namespace) -> str | None:
    """The password of ``--password-stdin`` (standard input is read once, whatever the
    number of mirrors), else ``--password``, else ``$BMSYNC_PASSWORD``."""
    if getattr(args, "password_stdin", False):
        if not hasattr(args, "_stdin_password"):
            args._stdin_password = sys.stdin.readline().rstrip("\r\n")
        return str(args._stdin_password)
    return args.password or os.environ.get(PASSWORD_ENV)


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


def count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def verbosity(parser: argparse.ArgumentParser, default: object) -> None:
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
    parser.add_argument("--version", action="version", version=f"bmsync {__version__}")
    verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from pipeline.cli import bundle, containerd, pull, push, run, transfer, verify

    pull.add_parser(sub)
    bundle.add_parser(sub)
    transfer.add_parsers(sub)
    push.add_parsers(sub)
    verify.add_parsers(sub)
    containerd.add_parsers(sub)
    run.add_parsers(sub)
    return parser


# The cyclic garbage collector's first generation runs every GC_THRESHOLD container
# allocations instead of 700: starting up (imports, botocore's service model) allocates
# hundreds of thousands of dicts and lists that all live to the end, and the default
# traversed them again and again, 0.05-0.09 s of a 0.45 s `bmsync fetch` here. Cycles
# are still collected, a little later; the older generations keep their defaults.
GC_THRESHOLD = 50_000


def main(argv: Sequence[str] | None = None) -> int:
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
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
