"""Which base tonight's version gets: full every ``fullEvery`` runs, else the last full
bundle (pipeline.nightly._choose_base), read from a file:// object store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.jobconfig import PipelineConfig, load_pipeline_config
from pipeline.manifest import compute_digest
from pipeline.nightly import _choose_base
from pipeline.objstore import FileStore
from pipeline.publish import Catalog

FULL_MANIFEST = b'{"the": "bundle.json of the full one"}\n'


def catalog(deltas: int) -> Catalog:
    """One full version, then ``deltas`` deltas on it, one a day."""
    versions: dict[str, dict[str, Any]] = {
        "2026.01.01.1": {"created": "2026-01-01T00:00:00Z", "base": None}}
    for n in range(deltas):
        versions[f"2026.01.{n + 2:02d}.1"] = {
            "created": f"2026-01-{n + 2:02d}T00:00:00Z",
            "base": {"kind": "bundle", "version": "2026.01.01.1"}}
    return Catalog(versions, max(versions))


def setup(tmp_path: Path, full_every: int) -> tuple[PipelineConfig, FileStore]:
    objects = FileStore(tmp_path / "objects")
    (tmp_path / "objects" / "2026.01.01.1").mkdir(parents=True)
    (tmp_path / "objects" / "2026.01.01.1" / "bmpackages_2026.01.01.1.bundle.json"
     ).write_bytes(FULL_MANIFEST)
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({
        "version": 1, "release": "1.0", "images": ["gcr.io/a/b:1"], "workDir": "work",
        "objectStore": f"file://{tmp_path / 'objects'}", "fullEvery": full_every}))
    return load_pipeline_config(path), objects


@pytest.mark.parametrize(("deltas", "full_every", "full"), [
    (0, 1, True),    # fullEvery 1: every version is full
    (0, 2, False),   # the run after a full one is a delta
    (1, 2, True),    # ...and the one after that is full again
    (5, 7, False),
    (6, 7, True),    # the 7th run since the last full one
    (9, 7, True),    # overdue
])
def test_full_every_n_runs_else_a_delta_on_the_last_full(
        tmp_path: Path, deltas: int, full_every: int, full: bool) -> None:
    cfg, objects = setup(tmp_path, full_every)
    base, reason = _choose_base(cfg, objects, catalog(deltas), "2026.02.01.1")
    if full:
        assert base is None
        assert reason.startswith("a full bundle")
        return
    assert base == {"kind": "bundle", "file": "base.bundle.json", "version": "2026.01.01.1",
                    "digest": compute_digest(FULL_MANIFEST)}
    copied = cfg.version_dir("2026.02.01.1") / "base.bundle.json"
    assert copied.read_bytes() == FULL_MANIFEST


def test_no_full_version_published_yet_means_full(tmp_path: Path) -> None:
    cfg, objects = setup(tmp_path, 7)
    base, reason = _choose_base(cfg, objects, Catalog(), "2026.02.01.1")
    assert base is None and "none is published yet" in reason
