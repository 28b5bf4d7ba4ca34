"""The ``transfer`` benchmark: ``bmsync publish|fetch`` against rclone and boto3 on S3.

Registered in ``bench.run.BENCHMARKS``; run it with ``python -m bench.run --only transfer``.

Setup (untimed): the lab's release is bundled (``bmsync bundle build``, about 500 MB at
scale 1), one SeaweedFS S3 server starts (``tests.harness.s3.S3Server``), and
``bmsync publish`` uploads the archive once to the prefix ``source``: that warms the
server up (SeaweedFS allocates its volumes on the first writes) and is what every
download variant reads.

Timed, ``lab.repeat`` rounds; in each round every variant runs once, the order rotating
from round to round so that no tool always runs first or last; medians are reported:

- upload, each into a fresh prefix, to the same key layout ``PREFIX/VERSION/ARCHIVE``:
  ``bmsync publish ARCHIVE --to s3://BUCKET/PREFIX --endpoint-url URL`` (which also
  uploads the two sidecars and the catalog) against ``rclone copy ARCHIVE
  :s3:BUCKET/PREFIX/VERSION`` and boto3's ``client.upload_file`` with its defaults, run
  in a fresh interpreter so that its start-up counts as the others' does;
- download of ``source``'s archive, each into an empty directory:
  ``bmsync fetch --from s3://BUCKET/source --release VERSION --to DIR`` (it fsyncs and
  sha256-verifies the file) against ``rclone copy :s3:BUCKET/KEY DIR`` and boto3's
  ``client.download_file``, each followed by ``sync FILE`` (neither fsyncs), so all three
  end with the file durable.

rclone keeps its own defaults (5 MiB chunks, 4 concurrent parts, an MD5 of the file
before a multipart upload; 4 streams for downloads over 250 MiB) and is configured
entirely by flags and environment: an empty config file of its own, the credentials in
``RCLONE_S3_*`` variables (not on the command line, where ``ps`` shows them), and no
``AWS_*`` variable (rclone 1.60 fails to start when ``AWS_CA_BUNDLE`` is set, even
for a plain-http endpoint). boto3 reads the server from the harness's ``AWS_*``
variables, the same ones bmsync gets.

After every run, untimed, the result is checked: an uploaded object must have the
archive's size, a downloaded file its sha256; a mismatch ends the benchmark. Between
runs the kernel writes back dirty pages (``sync``), so one tool's writes are not billed
to the next. Whichever download runs first after a round of uploads was seen to spend
up to a second more system time than the same tool later in the round; the rotation
gives each tool that slot equally often when ``lab.repeat`` is a multiple of three.
Beside the wall time are the CPU seconds (user + system, medians) of each tool's
processes and those the S3 server spent meanwhile: on a small machine the two share
the cores, so a tool's own CPU slows the server down.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tests.harness.s3 import S3Server

if TYPE_CHECKING:
    from bench.run import Lab, Row

UPLOAD = "upload"
DOWNLOAD = "download"
SOURCE_PREFIX = "source"

# argv: upload|download FILE BUCKET KEY. Endpoint, credentials and region come from the
# AWS_* environment; everything else is boto3's default (TransferConfig: 8 MiB parts,
# 10 threads, multipart from 8 MiB on).
_BOTO3 = r"""
import sys

import boto3

op, path, bucket, key = sys.argv[1:5]
client = boto3.client("s3")
if op == "upload":
    client.upload_file(path, bucket, key)
else:
    client.download_file(bucket, key, path)
"""


@dataclass(frozen=True)
class Timed:
    """One timed run: wall seconds, CPU seconds of the processes it waited for, and CPU
    seconds the S3 server spent meanwhile."""

    seconds: float
    cpu: float
    server_cpu: float


@dataclass(frozen=True)
class Variant:
    """A tool doing one direction: ``commands(run)`` gives the argv lists to run in
    order, ``landed(run)`` checks the result afterwards (untimed) and returns an error
    message, or None when the transfer is complete and intact."""

    name: str
    direction: str
    commands: Callable[[str], list[list[str]]]
    env: dict[str, str]
    landed: Callable[[str], str | None]


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process, from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name (which may hold spaces): state is the
    # first, utime and stime the 12th and 13th.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(commands: list[list[str]], env: dict[str, str], server_pid: int) -> Timed:
    """Run ``commands`` one after the other; exit the benchmark on the first failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = _process_cpu(server_pid)
    started = time.perf_counter()
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"bench: {' '.join(cmd[:3])} failed ({done.returncode}):\n"
                     f"{done.stderr[-2000:]}")
    elapsed = time.perf_counter() - started
    server = _process_cpu(server_pid) - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(elapsed, cpu, server)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _build_archive(lab: Lab) -> Path:
    from bench.run import BMSYNC, _run

    config = lab.config(lab.work / "images.yaml")
    out = lab.work / "bundle-transfer"
    shutil.rmtree(out, ignore_errors=True)
    _run([BMSYNC, "-q", "bundle", "build", "--config", str(config),
          "--store", str(lab.work / "store"), "--out", str(out)])
    return next(out.glob("bmpackages_*.tar.zst"))


def _clean_env(drop: tuple[str, ...]) -> dict[str, str]:
    """This process's environment without variables starting with any of ``drop``
    (the caller's own AWS profile or rclone settings must not reach the tools)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def bench_transfer(lab: Lab) -> list[Row]:
    from bench.run import BMSYNC, Row, _drop_store

    archive = _build_archive(lab)
    name = archive.name
    version = name.removeprefix("bmpackages_").removesuffix(".tar.zst")
    size = archive.stat().st_size
    digest = _sha256(archive)
    work = lab.work / "transfer"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rclone_conf = work / "rclone.conf"
    rclone_conf.touch()

    s3 = S3Server(work / "s3").start()
    try:
        bucket = s3.bucket
        aws_env = _clean_env(("AWS_",)) | s3.env()
        rclone_env = _clean_env(("AWS_", "RCLONE_")) | {
            "RCLONE_CONFIG": str(rclone_conf),
            "RCLONE_S3_ACCESS_KEY_ID": s3.access_key,
            "RCLONE_S3_SECRET_ACCESS_KEY": s3.secret_key,
        }
        rclone_flags = ["--s3-provider", "Other", "--s3-endpoint", s3.endpoint,
                        "--s3-region", s3.region, "--s3-force-path-style"]
        probe = s3.client()

        def prefix(run: str, tool: str) -> str:
            return f"up-{run}-{tool}"

        def key(pre: str) -> str:
            return f"{pre}/{version}/{name}"

        def publish(pre: str) -> list[str]:
            return [BMSYNC, "-q", "publish", str(archive), "--to", f"s3://{bucket}/{pre}",
                    "--endpoint-url", s3.endpoint]

        def uploaded(tool: str) -> Callable[[str], str | None]:
            def check(run: str) -> str | None:
                k = key(prefix(run, tool))
                try:
                    got = probe.head_object(Bucket=bucket, Key=k)["ContentLength"]
                except ClientError as e:
                    return f"s3://{bucket}/{k} cannot be read back: {e}"
                return None if got == size else f"s3://{bucket}/{k} has {got} bytes, not {size}"
            return check

        def dest(run: str, tool: str) -> Path:
            return work / f"down-{run}-{tool}"

        def downloaded(tool: str) -> Callable[[str], str | None]:
            def check(run: str) -> str | None:
                path = dest(run, tool) / name
                if not path.is_file():
                    return f"{path} was not written"
                got = _sha256(path)
                return None if got == digest else f"{path}: sha256 {got}, not {digest}"
            return check

        source = f"{SOURCE_PREFIX}/{version}/{name}"
        python = [sys.executable, "-I", "-c", _BOTO3]
        variants = [
            Variant("bmsync publish", UPLOAD,
                    lambda r: [publish(prefix(r, "bmsync"))], aws_env, uploaded("bmsync")),
            Variant("rclone copy (upload)", UPLOAD,
                    lambda r: [["rclone", "copy", str(archive),
                                f":s3:{bucket}/{prefix(r, 'rclone')}/{version}",
                                *rclone_flags]],
                    rclone_env, uploaded("rclone")),
            Variant("boto3 upload_file", UPLOAD,
                    lambda r: [[*python, UPLOAD, str(archive), bucket,
                                key(prefix(r, "boto3"))]],
                    aws_env, uploaded("boto3")),
            Variant("bmsync fetch", DOWNLOAD,
                    lambda r: [[BMSYNC, "-q", "fetch", "--from", f"s3://{bucket}/{SOURCE_PREFIX}",
                                "--release", version, "--to", str(dest(r, "bmsync")),
                                "--endpoint-url", s3.endpoint]],
                    aws_env, downloaded("bmsync")),
            Variant("rclone copy + sync (download)", DOWNLOAD,
                    lambda r: [["rclone", "copy", f":s3:{bucket}/{source}",
                                str(dest(r, "rclone")), *rclone_flags],
                               ["sync", str(dest(r, "rclone") / name)]],
                    rclone_env, downloaded("rclone")),
            Variant("boto3 download_file + sync", DOWNLOAD,
                    lambda r: [[*python, DOWNLOAD, str(dest(r, "boto3") / name), bucket,
                                source],
                               ["sync", str(dest(r, "boto3") / name)]],
                    aws_env, downloaded("boto3")),
        ]
        tools = {v.name: v.name.split()[0] for v in variants}

        server_pid = s3.pid
        assert server_pid is not None  # started above
        _timed([publish(SOURCE_PREFIX)], aws_env, server_pid)  # warm-up; downloads read it
        runs: dict[str, list[Timed]] = {v.name: [] for v in variants}
        for n in range(lab.repeat):
            run = str(n)
            for direction in (UPLOAD, DOWNLOAD):
                group = [v for v in variants if v.direction == direction]
                shift = n % len(group)
                for v in group[shift:] + group[:shift]:
                    target = dest(run, tools[v.name])
                    if direction == DOWNLOAD:
                        _drop_store(target)  # also syncs: earlier runs' writes are not billed
                        target.mkdir()
                    else:
                        os.sync()
                    runs[v.name].append(_timed(v.commands(run), v.env, server_pid))
                    problem = v.landed(run)
                    if problem is not None:
                        sys.exit(f"bench: {v.name}: {problem}")
                    if direction == DOWNLOAD:
                        shutil.rmtree(target, ignore_errors=True)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for v in variants:
        ts = runs[v.name]
        cpu = statistics.median(t.cpu for t in ts)
        server = statistics.median(t.server_cpu for t in ts)
        rows.append(Row(
            v.name, statistics.median(t.seconds for t in ts), size, None,
            f"cpu {cpu:.2f} s, server {server:.2f} s; runs "
            + " ".join(f"{t.seconds:.2f}" for t in ts),
            {"download": float(v.direction == DOWNLOAD), "cpu": cpu, "server_cpu": server},
        ))
    return rows


def summary(rows: list[Row]) -> list[str]:
    """One line per direction: bmsync against each other tool, and the target (bmsync at
    least as fast as the fastest of them). ``Nx`` is the other's time over bmsync's:
    above 1, bmsync is faster."""
    lines = []
    for direction, flag in ((UPLOAD, 0.0), (DOWNLOAD, 1.0)):
        group = [r for r in rows if r.facts.get("download") == flag]
        ours = next(r for r in group if r.name.startswith("bmsync"))
        others = [r for r in group if r is not ours]
        best = min(others, key=lambda r: r.seconds)
        ratio = best.seconds / ours.seconds
        vs = "; ".join(f"{r.name} {r.mbps:.0f} MB/s, bmsync {r.seconds / ours.seconds:.2f}x"
                       for r in others)
        lines.append(
            f"{direction}: bmsync {ours.mbps:.0f} MB/s; {vs}. Target bmsync >= 1.00x the"
            f" fastest other ({best.name}): {'met' if ratio >= 1 else 'MISSED'} ({ratio:.2f}x)"
        )
    return lines
