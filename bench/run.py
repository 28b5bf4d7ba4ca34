"""Side-by-side benchmarks of bmsync against skopeo on the same generated images.

    python -m bench.run [--scale 1.0] [--only pull] [--keep]

Generates an image set (about 500 MB unique at scale 1: 20 images over 6 repositories
sharing base layers, some multi-arch, OCI and Docker media types), serves it from a
local ``docker-registry`` standing in for gcr.io, and times, in the same run:

- ``pull``: ``bmsync pull`` cold (empty store) and warm (same release again), against
  skopeo copying the same images into an OCI layout, serially (one ``skopeo copy --all``
  per image, one layout) and with one loop per repository in parallel (one layout per
  repository: parallel skopeo processes corrupt a shared index.json); the faster skopeo
  variant is the peer. skopeo's blob-info cache is cleared before each
  skopeo run (it changes skopeo's request counts between runs). Both fsync blobs.
- ``bundle`` (bench/bundle.py): ``bmsync bundle build`` of the release against
  ``tar -I 'zstd -T0 -3'`` of the same store plus ``sync`` (both fsync their archive),
  the ``.tar.xz`` form (on a subset of the images when the whole would take over 90 s),
  peak RSS of build and verify, and ``bundle inspect``'s time and bytes read.
  Its targets are stated for a bundle of 1 GB or more: run ``--only bundle --scale 2``
  (about 1.0 GB of tar, 0.93 GiB; ``--scale 2.2`` for a full GiB). The sizes print
  beside the RSS and inspect figures.

Every benchmark runs the real commands as separate processes and reads request
counts from the registry's access log. Later benchmarks (push, transfer) register in
``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.images import SeededImage, seed_image_set
from tests.harness.registry import RegistryServer, start_registry

ROOT = Path(__file__).resolve().parent.parent
_VENV_BMSYNC = ROOT / ".venv" / "bin" / "bmsync"
BMSYNC = str(_VENV_BMSYNC) if _VENV_BMSYNC.exists() else "bmsync"
SKOPEO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")


@dataclass
class Lab:
    work: Path
    registry: RegistryServer
    images: list[SeededImage]
    unique_bytes: int
    repeat: int = 3

    def config(self, path: Path, images: Sequence[SeededImage] | None = None) -> Path:
        """Write an images config for ``images`` (default: every image) and return it."""
        lines = [
            "version: 1",
            'release: "bench"',
            "registries:",
            "  gcr.io:",
            f"    endpoint: {self.registry.url}",
            "images:",
        ]
        lines += [f"  - gcr.io/{img.reference}" for img in (self.images if images is None
                                                            else images)]
        path.write_text("\n".join(lines) + "\n")
        return path


@dataclass
class Row:
    name: str
    seconds: float
    nbytes: int
    requests: int | None = None
    note: str = ""
    facts: dict[str, float] = field(default_factory=dict)  # for a benchmark's summary lines

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _run(cmd: list[str], **kw: object) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def _clear_skopeo_cache() -> None:
    try:
        SKOPEO_CACHE.unlink()
    except FileNotFoundError:
        pass


def _drop_store(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    # Let the kernel write back the previous run's dirty pages before the next timing.
    os.sync()


def bench_pull(lab: Lab) -> list[Row]:
    """Cold and warm pulls; each cold variant runs ``lab.repeat`` times, interleaved."""
    config = lab.config(lab.work / "images.yaml")
    store = lab.work / "store"
    src = lab.registry.host
    by_repo: dict[str, list[SeededImage]] = {}
    for img in lab.images:
        by_repo.setdefault(img.repository, []).append(img)

    def bmsync_cold() -> None:
        _run([BMSYNC, "-q", "pull", "--config", str(config), "--store", str(store)])

    def skopeo_serial() -> None:
        for img in lab.images:
            _skopeo_copy(src, img, lab.work / "skopeo-serial")

    def skopeo_parallel() -> None:
        # One layout per repository: concurrent skopeo processes writing one layout race
        # on its index.json (seen here: "initializing destination ...: EOF").
        root = lab.work / "skopeo-parallel"
        root.mkdir(parents=True, exist_ok=True)

        def loop(imgs: list[SeededImage]) -> None:
            for img in imgs:
                _skopeo_copy(src, img, root / img.repository.replace("/", "_"))

        with ThreadPoolExecutor(len(by_repo)) as pool:
            list(pool.map(loop, by_repo.values()))

    variants: list[tuple[str, Callable[[], None], Path]] = [
        ("bmsync pull (cold)", bmsync_cold, store),
        ("skopeo copy, serial", skopeo_serial, lab.work / "skopeo-serial"),
        ("skopeo copy, per-repo parallel", skopeo_parallel, lab.work / "skopeo-parallel"),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    requests: dict[str, int] = {}
    for _ in range(lab.repeat):
        for name, fn, target in variants:
            _drop_store(target)
            _clear_skopeo_cache()
            mark = lab.registry.mark()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
            requests[name] = len(lab.registry.since(mark))
    rows = [
        Row(name, statistics.median(times[name]), lab.unique_bytes, requests[name],
            "runs " + " ".join(f"{t:.2f}" for t in times[name]))
        for name, _, _ in variants
    ]
    warm_times = []
    warm = []
    for _ in range(lab.repeat):
        mark = lab.registry.mark()
        warm_times.append(
            _run([BMSYNC, "-q", "pull", "--config", str(config), "--store", str(store)])
        )
        warm = lab.registry.since(mark)
    blob_gets = sum(1 for e in warm if "/blobs/" in e.path and e.method == "GET")
    rows.insert(1, Row("bmsync pull (warm)", statistics.median(warm_times), 0, len(warm),
                       f"{blob_gets} blob GETs; runs " + " ".join(f"{t:.2f}" for t in warm_times)))
    return rows


def _skopeo_copy(src: str, img: SeededImage, layout: Path) -> None:
    _run([
        "skopeo", "copy", "--all", "--quiet", "--src-tls-verify=false",
        f"docker://{src}/{img.repository}:{img.tag}",
        f"oci:{layout}:gcr.io/{img.reference}",
    ])


def bench_bundle(lab: Lab) -> list[Row]:
    """Bundle build/verify/inspect against tar + zstd; see bench/bundle.py."""
    # bench.bundle imports this module, so it is imported when used, not at the top.
    from bench.bundle import bench_bundle as run_bundle

    return run_bundle(lab)


def bench_push(lab: Lab) -> list[Row]:
    from bench.push import bench_push as run

    return run(lab)


def bench_transfer(lab: Lab) -> list[Row]:
    from bench.transfer import bench_transfer as run

    return run(lab)


def bench_dag(lab: Lab) -> list[Row]:
    from bench.dag import bench_dag as run

    return run(lab)


BENCHMARKS: dict[str, Callable[[Lab], list[Row]]] = {
    "pull": bench_pull, "bundle": bench_bundle, "push": bench_push,
    "transfer": bench_transfer, "dag": bench_dag,
}


def _report(name: str, rows: list[Row]) -> None:
    print(f"\n== {name} ==")
    print(f"{'run':34} {'seconds':>8} {'MB/s':>8} {'requests':>9}  note")
    for r in rows:
        reqs = "" if r.requests is None else str(r.requests)
        mbps = f"{r.mbps:8.1f}" if r.nbytes else f"{'-':>8}"
        print(f"{r.name:34} {r.seconds:8.2f} {mbps} {reqs:>9}  {r.note}")
    if name == "pull":
        cold = rows[0].seconds
        peers = [r for r in rows if r.name.startswith("skopeo")]
        best = min(peers, key=lambda r: r.seconds)
        print(f"cold pull: bmsync is {best.seconds / cold:.2f}x the faster skopeo variant"
              f" ({best.name}: {best.seconds:.2f} s vs {cold:.2f} s)")
        for p in peers:
            print(f"  vs {p.name}: {p.seconds / cold:.2f}x")
        warm = rows[1]
        print(f"warm pull: {warm.seconds:.2f} s, {warm.requests} requests for"
              f" {len(_LAB_IMAGES)} images, {warm.note}")
    if name == "bundle":
        from bench.bundle import summary

        for line in summary(rows):
            print(line)
    if name == "push":
        from bench.push import summary as push_summary

        for line in push_summary(rows, len(_LAB_IMAGES)):
            print(line)
    if name == "transfer":
        from bench.transfer import summary as transfer_summary

        for line in transfer_summary(rows):
            print(line)
    if name == "dag":
        from bench.dag import summary as dag_summary

        for line in dag_summary(rows):
            print(line)


_LAB_IMAGES: list[SeededImage] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="size of the image set: 1.0 = 20 images, about 500 MB unique")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only these benchmarks (repeatable)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each timed variant; the median is reported (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to put registries and stores (default: a temp dir)")
    args = parser.parse_args(argv)
    _compile_bmsync()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bmsync-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    images = max(2, round(20 * min(args.scale, 1.0))) if args.scale < 1 else 20
    total_mb = 500 * args.scale
    registry = start_registry(work / "upstream")
    try:
        print(f"seeding {images} images, about {total_mb:.0f} MB unique, into {registry.url} ...",
              flush=True)
        seeded = seed_image_set(registry.url, images=images, total_mb=total_mb, seed=1)
        _LAB_IMAGES[:] = seeded
        unique = _unique_bytes(registry)
        lab = Lab(work, registry, seeded, unique, max(1, args.repeat))
        print(f"{len(seeded)} images, {unique / 1e6:.1f} MB of unique blobs; "
              f"{os.cpu_count()} CPUs", flush=True)
        for name in args.only or list(BENCHMARKS):
            _report(name, BENCHMARKS[name](lab))
    finally:
        registry.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _compile_bmsync() -> None:
    """Byte-compile bmsync's own modules first. With PYTHONDONTWRITEBYTECODE set (it is
    on the development machines) a module changed since the last ``make install`` would
    otherwise be compiled again by every timed bmsync process, 30 ms for objstore alone,
    while the peers pay nothing of the kind."""
    for package in ("pipeline", "tasks"):
        compileall.compile_dir(ROOT / package, quiet=2)


def _unique_bytes(registry: RegistryServer) -> int:
    blobs = registry.root / "docker" / "registry" / "v2" / "blobs"
    return sum(p.stat().st_size for p in blobs.rglob("data"))


if __name__ == "__main__":
    # `python -m bench.run` runs this file as __main__; run the importable bench.run
    # instead, so bench.bundle (which imports it) shares its classes and state.
    from bench.run import main as _main

    sys.exit(_main())
