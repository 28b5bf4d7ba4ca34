"""The connected side's tasks: resolve, pull, build, publish; release and nightly."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from typing import Any

import luigi

from pipeline.nightly import plan_nightly
from pipeline.release import (
    PinnedImage,
    build_release,
    bundle_paths,
    check_version,
    is_published,
    is_pulled,
    lock_path,
    publish_release,
    pull_pinned,
    read_lock,
    resolve_release,
)
from pipeline.store import Store
from tasks.base import BmsyncTask, CheckTarget, VersionParameter, pipeline_config

log = logging.getLogger("bmsync.tasks")


class ResolveRelease(BmsyncTask):
    """Pin every image of the config to a digest: ``<workDir>/<version>/lock.json``."""

    config = luigi.Parameter(description="pipeline.yaml")
    version = VersionParameter(description="the bundle version")

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(lock_path(pipeline_config(self.config), self.version)))

    def run(self) -> None:
        resolve_release(pipeline_config(self.config), self.version)


class PullImage(BmsyncTask):
    """One locked image into the store, at its pinned digest."""

    config = luigi.Parameter(description="pipeline.yaml")
    source = luigi.Parameter(description="the image reference (tag form)")
    digest = luigi.Parameter(description="the upstream manifest digest pinned in the lock")
    platforms = luigi.Parameter(default="", description="comma-separated; empty: all")

    def _platforms(self) -> tuple[str, ...]:
        return tuple(p for p in self.platforms.split(",") if p)

    def complete(self) -> bool:
        def pulled() -> bool:
            cfg = pipeline_config(self.config)
            return is_pulled(Store(cfg.store), PinnedImage(self.source, self.digest),
                             self._platforms())

        return self.checked(pulled)

    def run(self) -> None:
        pull_pinned(pipeline_config(self.config), PinnedImage(self.source, self.digest),
                    self._platforms())


class BuildBundle(BmsyncTask):
    """The archive of a locked version; pulls its images first (dynamic dependencies)."""

    config = luigi.Parameter(description="pipeline.yaml")
    version = VersionParameter(description="the bundle version")

    def requires(self) -> ResolveRelease:
        return ResolveRelease(config=self.config, version=self.version)

    def output(self) -> luigi.LocalTarget:
        # The .sha256 sidecar is written last: it exists only beside a whole archive.
        _, sidecar = bundle_paths(pipeline_config(self.config), self.version)
        return luigi.LocalTarget(str(sidecar))

    def run(self) -> Iterator[list[PullImage]]:
        lock = read_lock(self.input().path)
        platforms = ",".join(lock.platforms)
        yield [PullImage(config=self.config, source=i.source, digest=i.digest,
                         platforms=platforms) for i in lock.images]
        build_release(pipeline_config(self.config), lock)


class PublishBundle(BmsyncTask):
    """The archive in the object store, listed in its catalog (the catalog goes last)."""

    config = luigi.Parameter(description="pipeline.yaml")
    version = VersionParameter(description="the bundle version")

    def requires(self) -> BuildBundle:
        return BuildBundle(config=self.config, version=self.version)

    def output(self) -> CheckTarget:
        cfg = pipeline_config(self.config)
        return CheckTarget(f"{self.version} in {cfg.object_store}/catalog.json",
                           lambda: is_published(cfg, self.version))

    def run(self) -> None:
        publish_release(pipeline_config(self.config), self.version)


class ReleaseBundle(luigi.WrapperTask):
    """A release cut and published: the config's ``release`` unless ``--release`` says."""

    config = luigi.Parameter(description="pipeline.yaml")
    release = luigi.Parameter(default="", description="the version (default: the config's)")

    def requires(self) -> PublishBundle:
        version = self.release or pipeline_config(self.config).images.release
        return PublishBundle(config=self.config, version=check_version(version))


class NightlySync(BmsyncTask):
    """Tonight's version: new tags and moved tags since the latest published version.

    Never complete: every run asks the registries what changed. When nothing did, it
    publishes nothing; otherwise it publishes the next ``versionScheme`` version, full
    or a delta (see :mod:`pipeline.nightly`). ``bmsync run nightly`` plans before Luigi
    starts and schedules the PublishBundle itself; this task is for Luigi's own command
    line, where with ``--workers`` > 1 Luigi runs ``run()`` again in a new process after
    the dynamic dependency, which plans again (and finds the version just published).
    """

    config = luigi.Parameter(description="pipeline.yaml")
    date = luigi.DateParameter(default=datetime.datetime.now(datetime.UTC).date(),
                               description="the day the version is named after (UTC)")

    def complete(self) -> bool:
        return bool(getattr(self, "_done", False))

    def run(self) -> Iterator[Any]:
        plan = getattr(self, "_plan", None)
        if plan is None:
            plan = plan_nightly(pipeline_config(self.config), self.date)
            self._plan = plan
            log.info("nightly %s: %s", self.date, plan.reason)
        if plan.changed:
            yield PublishBundle(config=self.config, version=plan.version)
        self._done = True
