"""Tables for the registry client's header parsing (no servers)."""

from __future__ import annotations

import email.utils
import time

import pytest

from pipeline.registry.auth import Challenge, parse_challenges
from pipeline.registry.client import RegistryClient
from pipeline.registry.transport import RetryPolicy, redact_url, retry_after


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:samalba/my-app:pull,push"',
            [Challenge("bearer", {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:samalba/my-app:pull,push",
            })],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ("basic realm=registry", [Challenge("basic", {"realm": "registry"})]),
        (
            'Bearer realm="https://gcr.io/v2/token", service="gcr.io"',
            [Challenge("bearer", {"realm": "https://gcr.io/v2/token", "service": "gcr.io"})],
        ),
        (
            'Basic realm="a", Bearer realm="https://t/x",service="s"',
            [Challenge("basic", {"realm": "a"}),
             Challenge("bearer", {"realm": "https://t/x", "service": "s"})],
        ),
        ('Bearer realm="quo\\"ted"', [Challenge("bearer", {"realm": 'quo"ted'})]),
        ("", []),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


POLICY = RetryPolicy(max_delay=30.0)


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2", 2.0, 2.0),
        ("0", 0.0, 0.0),
        ("3600", 30.0, 30.0),  # capped by the policy
        (5.0, 3.0, 5.0),  # an HTTP date 5 s ahead
        (-60.0, 0.0, 0.0),  # an HTTP date in the past
    ],
)
def test_retry_after(value: str | float, low: float, high: float) -> None:
    if isinstance(value, float):
        value = email.utils.formatdate(time.time() + value, usegmt=True)
    got = retry_after(value, POLICY)
    assert got is not None and low <= got <= high


@pytest.mark.parametrize("value", [None, "", "soon", "-1"])
def test_retry_after_unreadable(value: str | None) -> None:
    assert retry_after(value, POLICY) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:secret@reg.example:5000/v2/x?_state=abc&token=t",
         "https://reg.example:5000/v2/x"),
        ("http://127.0.0.1:5101/v2/a/blobs/sha256:00", "http://127.0.0.1:5101/v2/a/blobs/sha256:00"),
        ("https://[::1]:443/v2/?sig=1", "https://[::1]:443/v2/"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("header", "offset", "size", "ok"),
    [
        ("bytes 100-999/1000", 100, 1000, True),
        ("bytes 100-999/*", 100, 1000, True),
        ("bytes 100-999/1000", 100, None, True),
        ("bytes 0-999/1000", 100, 1000, False),   # starts elsewhere
        ("bytes 100-998/1000", 100, 1000, False),  # short
        ("bytes 100-999/2000", 100, 1000, False),  # another object
        ("bytes */1000", 100, 1000, False),
        (None, 100, 1000, False),
        ("items 100-999/1000", 100, 1000, False),
    ],
)
def test_content_range_validation(header: str | None, offset: int, size: int | None,
                                  ok: bool) -> None:
    assert RegistryClient._range_ok(header, offset, size) is ok
