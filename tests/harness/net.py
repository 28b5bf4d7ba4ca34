"""Loopback networking helpers shared by every harness server.

Everything here binds 127.0.0.1 only: the test machine has no other network and the
servers the harness starts must never listen anywhere else.
"""

from __future__ import annotations

import random
import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(*, below: int | None = None) -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is found by binding port 0 and closing the socket, so another process can
    take it before the caller binds it (``RegistryServer`` moves to another port when
    that happens on its first start). With ``below`` the port is smaller than that
    bound (SeaweedFS opens gRPC ports at port+10000, so its ports must stay < 55535).
    Raises ``OSError`` when no such port is found.
    """
    if below is None:
        return _kernel_port()
    for _ in range(64):
        port = _kernel_port()
        if port < below:
            return port
    # The kernel kept handing out ports above the bound (its ephemeral range can sit
    # high): probe random ports under the bound instead.
    rng = random.Random()
    for _ in range(256):
        port = rng.randrange(1024, below)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port below {below} on 127.0.0.1")


def _kernel_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def port_open(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 15.0, *, interval: float = 0.02) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Polls every ``interval`` seconds; raises ``TimeoutError`` naming the address when
    nothing listens there after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.1f}s")
        time.sleep(interval)
