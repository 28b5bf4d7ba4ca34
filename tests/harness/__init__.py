"""Test harness: real servers on loopback, generated images, a fault proxy.

Shared by the tests, ``make bench`` and ``make demo``. It never imports ``pipeline``:
it is the independent witness that pushes, reads and counts with its own code.

- ``net``: ``free_port``, ``wait_for_port``
- ``pki``: ``create_pki`` -> ``TestPKI`` (CA, server cert, ``issue()`` more)
- ``registry``: ``RegistryServer`` (docker-registry 2.8), ``start_registry``
- ``tokens``: ``TokenIssuer`` (docker token flow, JWTs with ``x5c``)
- ``images``: ``ImageFactory``, ``Pusher``, ``push``, ``seed_image_set``
- ``faultproxy``: ``FaultProxy`` and its actions
- ``forwardproxy``: ``ForwardProxy`` (HTTP forward proxy with CONNECT), ``ProxyRecord``
- ``skopeo``: ``inspect_raw`` and friends
- ``s3``: ``S3Server`` (SeaweedFS ``weed mini`` with SigV4), ``start_s3``
"""

from tests.harness.errors import HarnessError, PushError, ServerStartError, ToolError
from tests.harness.faultproxy import (
    Corrupt,
    CutBody,
    Delay,
    FaultProxy,
    IgnoreRange,
    ProxyRequest,
    Redirect,
    Reset,
    Respond,
    Rule,
    fail,
    http_date,
    rate_limit,
    respond,
)
from tests.harness.forwardproxy import ForwardProxy, ProxyRecord
from tests.harness.images import (
    Image,
    ImageFactory,
    Index,
    Layer,
    Platform,
    Pusher,
    SeededImage,
    push,
    seed_image_set,
    sha256_digest,
)
from tests.harness.net import free_port, wait_for_port
from tests.harness.pki import CertPair, TestPKI, create_pki
from tests.harness.registry import AccessEntry, RegistryServer, start_registry
from tests.harness.s3 import S3Server, start_s3
from tests.harness.skopeo import inspect_raw, manifest_digest, run_skopeo
from tests.harness.tokens import Access, TokenIssuer, TokenRequest

__all__ = [
    "Access",
    "AccessEntry",
    "CertPair",
    "Corrupt",
    "CutBody",
    "Delay",
    "FaultProxy",
    "ForwardProxy",
    "HarnessError",
    "IgnoreRange",
    "Image",
    "ImageFactory",
    "Index",
    "Layer",
    "Platform",
    "ProxyRecord",
    "ProxyRequest",
    "PushError",
    "Pusher",
    "Redirect",
    "RegistryServer",
    "Reset",
    "Respond",
    "Rule",
    "S3Server",
    "SeededImage",
    "ServerStartError",
    "TestPKI",
    "TokenIssuer",
    "TokenRequest",
    "ToolError",
    "create_pki",
    "fail",
    "free_port",
    "http_date",
    "inspect_raw",
    "manifest_digest",
    "push",
    "rate_limit",
    "respond",
    "run_skopeo",
    "seed_image_set",
    "sha256_digest",
    "start_registry",
    "start_s3",
    "wait_for_port",
]
