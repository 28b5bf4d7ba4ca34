"""``bmsync run``: build the job's top task and run it with Luigi, mapping the outcome
to the exit codes the README lists (the same values as ``configs/luigi.cfg``)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import luigi
import luigi.configuration
from luigi.execution_summary import LuigiStatusCode
from luigi.parameter import UnconsumedParameterWarning
from luigi.rpc import RPCError

from pipeline.errors import BmsyncError, TransportError, UsageError
from pipeline.jobconfig import load_pipeline_config, load_site_config
from pipeline.nightly import plan_nightly
from pipeline.release import check_version
from pipeline.site import check_arrived, latest_version
from tasks.base import BROKEN
from tasks.release import PublishBundle, ReleaseBundle
from tasks.site import ImportBundle

log = logging.getLogger("bmsync.tasks")

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


class AlreadyRunning(BmsyncError):
    exit_code = 15


def _task(args: argparse.Namespace) -> tuple[luigi.Task | None, Path]:
    """The job's top task (None: nothing to do) and its work folder."""
    path = os.path.abspath(args.config)
    if args.job == "release":
        cfg = load_pipeline_config(path)  # a bad config fails here, before Luigi starts
        version = cfg.images.release if args.release is None else args.release
        return ReleaseBundle(config=path, release=check_version(version)), cfg.work_dir
    if args.job == "nightly":
        cfg = load_pipeline_config(path)
        try:
            day = (datetime.date.fromisoformat(args.date) if args.date
                   else datetime.datetime.now(datetime.UTC).date())
        except ValueError:
            raise UsageError(f"--date {args.date!r} is not a date",
                             hint="write YYYY-MM-DD") from None
        # Planned here, once: Luigi would run NightlySync.run() again in a new worker
        # process after its dynamic dependency, resolving every tag a second time.
        plan = plan_nightly(cfg, day)
        log.info("nightly %s: %s", day, plan.reason)
        if not plan.changed:
            return None, cfg.work_dir
        return PublishBundle(config=path, version=plan.version), cfg.work_dir
    site = load_site_config(path)
    version = latest_version(site) if args.release == "latest" else check_version(args.release)
    check_arrived(site, version)  # exit 8 for the timer, before anything is scheduled
    return ImportBundle(site=path, release=version), site.work_dir


@contextlib.contextmanager
def _exclusive(work_dir: Path) -> Iterator[None]:
    """One ``bmsync run`` at a time per work folder with the local scheduler (a central
    scheduler hands each task to one worker itself)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".bmsync-run.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another bmsync run is in progress in {work_dir}",
                                 hint="wait for it, or use a central scheduler"
                                      " (--scheduler-url) to share the work") from None
        yield


def _check_scheduler(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--scheduler-url {url!r} must start with http:// or https://",
                         hint="e.g. http://scheduler:8082/")
    config = luigi.configuration.get_config()
    # Luigi's defaults retry an unreachable scheduler 3 times, 30 s apart. Its client
    # reads these from [core] itself, so the core task warns that it does not use them.
    config.set("core", "rpc-retry-attempts", "2")
    config.set("core", "rpc-retry-wait", "2")
    warnings.filterwarnings("ignore", message=r".*'rpc_retry_", category=UnconsumedParameterWarning)


def run_job(args: argparse.Namespace) -> int:
    if args.scheduler_url:
        _check_scheduler(args.scheduler_url)
    task, work_dir = _task(args)
    if task is None:
        print(f"bmsync run {args.job}: done (nothing to do)")
        return 0
    if args.scheduler_url:
        return _build(task, args)
    with _exclusive(work_dir):
        return _build(task, args)


def _build(task: luigi.Task, args: argparse.Namespace) -> int:
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
    BROKEN.clear()
    try:
        result = luigi.build([task], **params)
    except RPCError as e:
        raise TransportError(f"cannot reach the scheduler at {args.scheduler_url}: {e}",
                             hint="check --scheduler-url and that luigid is running") from None
    if BROKEN:
        # Already reported in one line each; the first one's code says what to do.
        return BROKEN[0].exit_code
    code = EXIT_CODES.get(result.status, EXIT_TASK_FAILED)
    if code == EXIT_NOT_RUN and args.scheduler_url:
        # The scheduler gave the remaining tasks to other workers: this one is done.
        # A task that fails there fails the process that ran it.
        print(f"bmsync run {args.job}: nothing left for this worker; other workers of"
              f" {args.scheduler_url} are running the rest ({task})")
        return 0
    outcome = _OUTCOMES.get(code, "failed")
    print(f"bmsync run {args.job}: {outcome} ({task})", file=sys.stderr if code else sys.stdout)
    if verbose:
        print(result.summary_text, file=sys.stderr)
    return code
