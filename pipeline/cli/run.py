"""``bmsync run release|nightly|import``: the scheduled jobs, without Luigi's command line.

The jobs are Luigi tasks (``tasks/``); this module only parses flags: the library
itself never imports Luigi.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli import positive_int, verbosity


def _scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="tasks run at once, each in its own process (default 1)")
    parser.add_argument("--scheduler-url", metavar="URL",
                        help="a central luigid (http://HOST:8082/); default: a local scheduler"
                             " in this process")


def add_parsers(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a whole job: cut a release, the nightly sync, or a site import",
        description=(
            "Run a job as a Luigi DAG. Every step's result is a target (lock file, archive,"
            " catalog entry, mirror tags, report), so a re-run after a failure does only"
            " what is left. Exit codes: 0 done; 13 a task failed (its error is printed);"
            " 11 tasks left pending; 12 scheduling failed; 15 another run is in progress;"
            " 8 (import) not yet arrived; 2-7 as for the other commands, when a check"
            " before a task runs fails (see the README's table)."
        ),
    )
    verbosity(run, argparse.SUPPRESS)
    jobs = run.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True

    release = jobs.add_parser(
        "release",
        help="resolve, pull, build and publish a release (ReleaseBundle)",
        description=("Pin the config's images in a lock file, pull each, build"
                     " bmpackages_<release>.tar.zst and publish it to the config's objectStore."),
    )
    verbosity(release, argparse.SUPPRESS)
    release.add_argument("--config", required=True, metavar="FILE", help="pipeline.yaml")
    release.add_argument("--release", metavar="VERSION",
                         help="the version to cut (default: release: in the config)")
    _scheduler_arguments(release)
    release.set_defaults(func=cmd_run, job="release")

    nightly = jobs.add_parser(
        "nightly",
        help="publish what changed upstream since the latest version (NightlySync)",
        description=("Resolve the config's tags now; if any image is new or moved, build the"
                     " next version (versionScheme, default YYYY.MM.DD.N) as a delta against"
                     " the last full bundle (a full one every fullEvery runs) and publish it."
                     " Nothing changed: nothing is published."),
    )
    verbosity(nightly, argparse.SUPPRESS)
    nightly.add_argument("--config", required=True, metavar="FILE", help="pipeline.yaml")
    nightly.add_argument("--date", metavar="YYYY-MM-DD", help="the day (default: today, UTC)")
    _scheduler_arguments(nightly)
    nightly.set_defaults(func=cmd_run, job="nightly")

    imp = jobs.add_parser(
        "import",
        help="fetch, verify, push to every mirror, verify, write node config (ImportBundle)",
        description=("Import a published version at a disconnected site: fetch it from the"
                     " site's objectStore, verify it, push it into each mirror of site.yaml,"
                     " verify each mirror, then write the containerd config. A delta needs"
                     " its base imported first. Exit code 8: the version has not fully"
                     " arrived yet (run again later)."),
    )
    verbosity(imp, argparse.SUPPRESS)
    imp.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    imp.add_argument("--release", default="latest", metavar="VERSION|latest",
                     help="the version to import (default: the catalog's latest)")
    _scheduler_arguments(imp)
    imp.set_defaults(func=cmd_run, job="import")


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.run import run_job

    return run_job(args)
