"""What every bmsync task shares: failure reporting, configs read once, check targets."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import lru_cache

import luigi
from luigi.rpc import RPCError

from pipeline.errors import BmsyncError
from pipeline.jobconfig import PipelineConfig, SiteConfig, load_pipeline_config, load_site_config

BROKEN: list[BmsyncError] = []
"""Errors raised while Luigi decided what to run (in ``complete()`` or ``requires()``),
in this process; ``bmsync run`` exits with the first one's code."""


class ReportedError(Exception):
    """Raised in place of a BmsyncError already reported in one line (see ``complete``)."""


def report_broken(task: object, error: BmsyncError) -> None:
    BROKEN.append(error)
    print(f"bmsync: error: {task}: {error}", file=sys.stderr, flush=True)


class BmsyncTask(luigi.Task):
    """A task whose failures read like the command line's: one ``bmsync: error:`` line.

    The line goes to stderr from the process that ran the task (a worker process
    when ``--workers`` > 1) and is the explanation the scheduler shows. A
    BmsyncError while checking whether the task is complete (a mirror refusing the
    credentials, an object store out of reach) is reported the same way, instead of
    Luigi's traceback.
    """

    def complete(self) -> bool:
        return self.checked(super().complete)

    def checked(self, check: Callable[[], bool]) -> bool:
        """``check()``, with a BmsyncError reported in one line (see the class doc)."""
        try:
            return check()
        except BmsyncError as e:
            report_broken(self, e)
            raise ReportedError(str(e)) from None

    def on_failure(self, exception: BaseException) -> str:
        if isinstance(exception, BmsyncError):
            line = f"bmsync: error: {self}: {exception}"
            print(line, file=sys.stderr, flush=True)
            return line
        text: str = super().on_failure(exception)
        return text


class VersionParameter(luigi.Parameter):
    """A bundle version: it names a folder and files, so it is checked on the way in
    (Luigi's command line too): ``../x`` never leaves the work folder."""

    def normalize(self, x: object) -> str:
        from pipeline.release import check_version

        return check_version(str(x))


class CheckTarget(luigi.Target):
    """A target whose existence a pipeline function decides: a catalog entry in the
    object store, tags in a mirror, files whose content is what the config generates."""

    def __init__(self, what: str, check: Callable[[], bool]) -> None:
        self.what = what
        self._check = check

    def exists(self) -> bool:
        return self._check()

    def __repr__(self) -> str:
        return f"CheckTarget({self.what})"


@lru_cache(maxsize=8)
def _pipeline_config(path: str, _mtime: int) -> PipelineConfig:
    return load_pipeline_config(path)


@lru_cache(maxsize=8)
def _site_config(path: str, _mtime: int) -> SiteConfig:
    return load_site_config(path)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0  # the loader reports the missing file


def pipeline_config(path: str) -> PipelineConfig:
    """``pipeline.yaml`` at ``path``, parsed once per process (again if it changes)."""
    return _pipeline_config(path, _mtime(path))


def site_config(path: str) -> SiteConfig:
    return _site_config(path, _mtime(path))


@luigi.Task.event_handler(luigi.Event.BROKEN_TASK)
def _broken(task: luigi.Task, exception: BaseException) -> None:
    """``requires()`` raised (e.g. no published version to import)."""
    if isinstance(exception, BmsyncError):
        report_broken(task, exception)


class _QuietBmsyncErrors(logging.Filter):
    """Luigi logs a failed task, or one whose ``complete()``/``requires()`` raised,
    with a traceback; for a BmsyncError the ``bmsync: error:`` line printed already
    says everything, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (BmsyncError, RPCError)):
            return False  # reported in one line (RPCError: by `bmsync run`)
        text = record.getMessage()
        if text.startswith("Failed connecting to remote scheduler"):
            return False  # retried, then `bmsync run` says it in one line
        if text.startswith("Will not run") and (
                "ReportedError" in text or "pipeline.errors." in text):
            return False
        return True


logging.getLogger("luigi-interface").addFilter(_QuietBmsyncErrors())
