"""The disconnected site's tasks: fetch, verify, push per mirror, verify, node config."""

from __future__ import annotations

import luigi

from pipeline.site import (
    FETCHED,
    VERIFIED,
    containerd_current,
    fetch_version,
    latest_version,
    mirror_serves,
    push_version,
    verification_path,
    verify_fetched,
    verify_pushed,
    write_containerd,
)
from tasks.base import BmsyncTask, CheckTarget, VersionParameter, site_config


class FetchBundle(BmsyncTask):
    """The version's archive downloaded and checked against its sidecar and the catalog."""

    site = luigi.Parameter(description="site.yaml")
    version = VersionParameter(description="the bundle version")

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(site_config(self.site).version_dir(self.version) / FETCHED))

    def run(self) -> None:
        fetch_version(site_config(self.site), self.version)


class VerifyBundle(BmsyncTask):
    """Every member and blob of the fetched archive checked in one pass."""

    site = luigi.Parameter(description="site.yaml")
    version = VersionParameter(description="the bundle version")

    def requires(self) -> FetchBundle:
        return FetchBundle(site=self.site, version=self.version)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(site_config(self.site).version_dir(self.version) / VERIFIED))

    def run(self) -> None:
        verify_fetched(site_config(self.site), self.version)


class PushBundle(BmsyncTask):
    """The bundle in one mirror: complete when every tag there has the bundle's digest."""

    site = luigi.Parameter(description="site.yaml")
    version = VersionParameter(description="the bundle version")
    mirror = luigi.Parameter(description="a mirror url of site.yaml")

    def requires(self) -> VerifyBundle:
        return VerifyBundle(site=self.site, version=self.version)

    def output(self) -> CheckTarget:
        site = site_config(self.site)
        return CheckTarget(f"bundle {self.version} tags in {self.mirror}",
                           lambda: mirror_serves(site, self.version, self.mirror))

    def run(self) -> None:
        push_version(site_config(self.site), self.version, self.mirror)


class VerifyMirror(BmsyncTask):
    """Every image and blob of the bundle served by the mirror; the report on disk."""

    site = luigi.Parameter(description="site.yaml")
    version = VersionParameter(description="the bundle version")
    mirror = luigi.Parameter(description="a mirror url of site.yaml")

    def requires(self) -> PushBundle:
        return PushBundle(site=self.site, version=self.version, mirror=self.mirror)

    def output(self) -> luigi.LocalTarget:
        site = site_config(self.site)
        return luigi.LocalTarget(str(verification_path(site, self.version, self.mirror)))

    def complete(self) -> bool:
        # The report alone would hide a mirror that lost images since: ask the mirror
        # too (one HEAD per image), so a re-run pushes them again.
        def verified() -> bool:
            return bool(self.output().exists()
                        and mirror_serves(site_config(self.site), self.version, self.mirror))

        return self.checked(verified)

    def run(self) -> None:
        verify_pushed(site_config(self.site), self.version, self.mirror)


class WriteContainerdConfig(BmsyncTask):
    """The node config for the site's mirrors, written once they serve the bundle."""

    site = luigi.Parameter(description="site.yaml")
    version = VersionParameter(description="the bundle version")

    def requires(self) -> list[VerifyMirror]:
        return [VerifyMirror(site=self.site, version=self.version, mirror=m.url)
                for m in site_config(self.site).mirrors]

    def output(self) -> CheckTarget:
        site = site_config(self.site)
        return CheckTarget("containerd config", lambda: containerd_current(site))

    def run(self) -> None:
        write_containerd(site_config(self.site))


class ImportBundle(luigi.WrapperTask):
    """A version imported into every mirror of the site, verified, nodes configured.

    ``release`` may be ``latest`` (the catalog's latest version, read when scheduling).
    """

    site = luigi.Parameter(description="site.yaml")
    release = luigi.Parameter(description="the version to import, or latest")

    def requires(self) -> list[luigi.Task]:
        site = site_config(self.site)
        version = latest_version(site) if self.release == "latest" else self.release
        verified: list[luigi.Task] = [VerifyMirror(site=self.site, version=version, mirror=m.url)
                                      for m in site.mirrors]
        return [*verified, WriteContainerdConfig(site=self.site, version=version)]
