"""The ``push`` benchmark: ``bmsync push images`` against skopeo, into empty and full mirrors.

Setup (untimed): the lab's release is pulled and bundled (``bmsync bundle build``), and
skopeo copies each image from the upstream registry into an OCI layout of its own
(skopeo 1.9 reads only OCI-typed manifests from a layout, so it converts the Docker ones
there; the layer bytes are the same).

Timed, each run into a fresh ``docker-registry``:

- cold: ``bmsync push images --source=ARCHIVE`` (seekable ``.tar.zst``, no unpacking)
  against one ``skopeo copy --all oci:LAYOUT:REF docker://MIRROR/...`` per image;
- warm (every image present): the same bmsync command, skopeo's copy loop again, and
  ``skopeo sync`` (docker to docker, one per repository) run a second time.

Requests are counted from the mirror's access log (auth round trips included).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from typing import TYPE_CHECKING

from tests.harness.registry import RegistryServer, start_registry

if TYPE_CHECKING:
    from bench.run import Lab, Row

NS = "test-namespace"


def _skopeo(*args: str) -> None:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: skopeo {args[0]} failed: {done.stderr.strip()[-500:]}")


def bench_push(lab: Lab) -> list[Row]:
    from bench.run import BMSYNC, Row, _clear_skopeo_cache, _run

    work = lab.work
    config = lab.config(work / "images.yaml")
    store = work / "store"
    out = work / "bundle-push"
    shutil.rmtree(out, ignore_errors=True)
    _run([BMSYNC, "-q", "bundle", "build", "--config", str(config), "--store", str(store),
          "--out", str(out)])
    archive = next(out.glob("bmpackages_*.tar.zst"))
    layouts = work / "skopeo-layouts"
    shutil.rmtree(layouts, ignore_errors=True)
    layouts.mkdir()
    for img in lab.images:
        _skopeo("copy", "--all", "--quiet", "--src-tls-verify=false",
                f"docker://{lab.registry.host}/{img.reference}",
                f"oci:{layouts / img.tag}:{img.reference}")

    def bm_cmd(m: RegistryServer) -> list[str]:
        return [BMSYNC, "-q", "push", "images", f"--source={archive}",
                f"--private-registry=http://{m.host}/{NS}", "--need-credential=false"]

    def skopeo_loop(m: RegistryServer) -> None:
        for img in lab.images:
            _skopeo("copy", "--all", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layouts / img.tag}:{img.reference}",
                    f"docker://{m.host}/{NS}/{img.reference}")

    def skopeo_sync(m: RegistryServer) -> None:
        for repo in sorted({i.repository for i in lab.images}):
            _skopeo("sync", "--all", "--src", "docker", "--dest", "docker",
                    "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"{lab.registry.host}/{repo}", f"{m.host}/sync/{repo.rsplit('/', 1)[0]}")

    cold_bm: list[float] = []
    cold_sk: list[float] = []
    counts: dict[str, int] = {}
    warm: dict[str, list[float]] = {"bmsync": [], "skopeo copy": [], "skopeo sync": []}
    for n in range(lab.repeat):
        for who in ("bmsync", "skopeo"):
            mirror = start_registry(work / f"mirror-{who}-{n}")
            try:
                _clear_skopeo_cache()
                mark = mirror.mark()
                started = time.perf_counter()
                if who == "bmsync":
                    _run(bm_cmd(mirror))
                    cold_bm.append(time.perf_counter() - started)
                else:
                    skopeo_loop(mirror)
                    cold_sk.append(time.perf_counter() - started)
                counts[f"{who} cold"] = len(mirror.since(mark))
                if who == "bmsync":
                    mark = mirror.mark()
                    started = time.perf_counter()
                    _run(bm_cmd(mirror))
                    warm["bmsync"].append(time.perf_counter() - started)
                    counts["bmsync warm"] = len(mirror.since(mark))
                else:
                    _clear_skopeo_cache()
                    mark = mirror.mark()
                    started = time.perf_counter()
                    skopeo_loop(mirror)
                    warm["skopeo copy"].append(time.perf_counter() - started)
                    counts["skopeo copy warm"] = len(mirror.since(mark))
                    skopeo_sync(mirror)  # fills the sync namespace, untimed
                    _clear_skopeo_cache()
                    mark = mirror.mark()
                    started = time.perf_counter()
                    skopeo_sync(mirror)
                    warm["skopeo sync"].append(time.perf_counter() - started)
                    counts["skopeo sync warm"] = len(mirror.since(mark))
            finally:
                mirror.close()
                shutil.rmtree(mirror.directory, ignore_errors=True)

    def runs(ts: list[float]) -> str:
        return "runs " + " ".join(f"{t:.2f}" for t in ts)

    nbytes = lab.unique_bytes
    return [
        Row("bmsync push (cold)", statistics.median(cold_bm), nbytes, counts["bmsync cold"],
            runs(cold_bm)),
        Row("skopeo copy oci: loop (cold)", statistics.median(cold_sk), nbytes,
            counts["skopeo cold"], runs(cold_sk)),
        Row("bmsync push (warm)", statistics.median(warm["bmsync"]), 0, counts["bmsync warm"],
            runs(warm["bmsync"])),
        Row("skopeo copy oci: loop (warm)", statistics.median(warm["skopeo copy"]), 0,
            counts["skopeo copy warm"], runs(warm["skopeo copy"])),
        Row("skopeo sync (warm)", statistics.median(warm["skopeo sync"]), 0,
            counts["skopeo sync warm"], runs(warm["skopeo sync"])),
    ]


def summary(rows: list[Row], images: int) -> list[str]:
    cold_bm, cold_sk, warm_bm, warm_copy, warm_sync = rows
    ratio = cold_sk.seconds / cold_bm.seconds
    fast = warm_copy.seconds >= 4 * warm_bm.seconds
    return [
        f"cold push: bmsync is {ratio:.2f}x skopeo's copy loop ({cold_sk.seconds:.2f} s vs"
        f" {cold_bm.seconds:.2f} s; target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})",
        f"warm push: {warm_bm.requests} requests for {images} images"
        f" ({(warm_bm.requests or 0) / images:.1f} per image; skopeo copy"
        f" {(warm_copy.requests or 0) / images:.1f}, skopeo sync"
        f" {(warm_sync.requests or 0) / images:.1f})",
        f"warm push wall time: {warm_copy.seconds / warm_bm.seconds:.1f}x faster than skopeo's"
        f" copy loop (target >= 4x: {'met' if fast else 'MISSED'}),"
        f" {warm_sync.seconds / warm_bm.seconds:.1f}x faster than skopeo sync"
        f" ({'met' if warm_sync.seconds > warm_bm.seconds else 'MISSED'})",
    ]

