"""``bmsync run``: build the job's top task and run it with Luigi, mapping the outcome
to the exit codes the README lists (the same values as ``configs/luigi.cfg``)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

import luigi
import luigi.configuration
from luigi.execution_summary import LuigiStatusCode

from pipeline.errors import UsageError
from pipeline.jobconfig import load_pipeline_config, load_site_config
from pipeline.release import check_version
from pipeline.site import check_arrived, latest_version
from tasks.release import NightlySync, ReleaseBundle
from tasks.site import ImportBundle

# Luigi's [retcode] defaults are all 0: a failed run would look green to a timer.
EXIT_MISSING_DATA = 10
EXIT_NOT_RUN = 11
EXIT_SCHEDULING = 12
EXIT_TASK_FAILED = 13

EXIT_CODES = {
    LuigiStatusCode.SUCCESS: 0,
    LuigiStatusCode.SUCCESS_WITH_RETRY: 0,
    LuigiStatusCode.FAILED: EXIT_TASK_FAILED,
    LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED: EXIT_TASK_FAILED,
    LuigiStatusCode.SCHEDULING_FAILED: EXIT_SCHEDULING,
    LuigiStatusCode.NOT_RUN: EXIT_NOT_RUN,
    LuigiStatusCode.MISSING_EXT: EXIT_MISSING_DATA,
}

_OUTCOMES = {
    0: "done",
    EXIT_TASK_FAILED: "failed: a task failed (its error is above); a re-run does only what is left",
    EXIT_MISSING_DATA: "failed: an input is missing",
    EXIT_NOT_RUN: "not finished: tasks were left pending (run with -v for Luigi's summary)",
    EXIT_SCHEDULING: "failed: the tasks could not be scheduled",
}


def _task(args: argparse.Namespace) -> luigi.Task:
    path = os.path.abspath(args.config)
    if args.job == "release":
        cfg = load_pipeline_config(path)  # a bad config fails here, before Luigi starts
        return ReleaseBundle(config=path, release=check_version(args.release or
                                                                cfg.images.release))
    if args.job == "nightly":
        load_pipeline_config(path)
        try:
            day = (datetime.date.fromisoformat(args.date) if args.date
                   else datetime.datetime.now(datetime.UTC).date())
        except ValueError:
            raise UsageError(f"--date {args.date!r} is not a date",
                             hint="write YYYY-MM-DD") from None
        return NightlySync(config=path, date=day)
    site = load_site_config(path)
    version = latest_version(site) if args.release == "latest" else check_version(args.release)
    check_arrived(site, version)  # exit 8 for the timer, before anything is scheduled
    return ImportBundle(site=path, release=version)


def run_job(args: argparse.Namespace) -> int:
    task = _task(args)
    verbose = getattr(args, "verbose", 0) or 0
    for name in ("luigi", "luigi-interface", "luigi.scheduler"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    params: dict[str, object] = {
        "workers": args.workers,
        "detailed_summary": True,
    }
    # Our logging (set up by the CLI) stays: Luigi's would print every scheduling step.
    luigi.configuration.get_config().set("core", "no_configure_logging", "true")
    if args.scheduler_url:
        # Workers of other processes (or machines) may take some of the tasks; this
        # process exits once nothing is left that it could run.
        params["scheduler_url"] = args.scheduler_url
    else:
        params["local_scheduler"] = True
    result = luigi.build([task], **params)
    code = EXIT_CODES.get(result.status, EXIT_TASK_FAILED)
    outcome = _OUTCOMES.get(code, "failed")
    print(f"bmsync run {args.job}: {outcome} ({task})", file=sys.stderr if code else sys.stdout)
    if verbose:
        print(result.summary_text, file=sys.stderr)
    return code
