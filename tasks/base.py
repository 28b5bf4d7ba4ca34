"""What every bmsync task shares: failure reporting, configs read once, check targets."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import lru_cache

import luigi

from pipeline.errors import BmsyncError
from pipeline.jobconfig import PipelineConfig, SiteConfig, load_pipeline_config, load_site_config


class BmsyncTask(luigi.Task):
    """A task whose failures read like the command line's: one ``bmsync: error:`` line.

    The line goes to stderr from the process that ran the task (a worker process
    when ``--workers`` > 1) and is the explanation the scheduler shows.
    """

    def on_failure(self, exception: BaseException) -> str:
        if isinstance(exception, BmsyncError):
            line = f"bmsync: error: {self}: {exception}"
            print(line, file=sys.stderr, flush=True)
            return line
        text: str = super().on_failure(exception)
        return text


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


class _QuietBmsyncErrors(logging.Filter):
    """Luigi logs a failed task with its traceback; for a BmsyncError the one-line
    message says everything (and BmsyncTask.on_failure prints it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BmsyncError):
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("luigi-interface").addFilter(_QuietBmsyncErrors())
