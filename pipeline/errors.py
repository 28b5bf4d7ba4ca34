"""The one exception tree of bmsync.

Every failure that a user can cause or meet raises one of these; the CLI maps the
tree to an exit code and a one-line message that says what to do::

    BmsyncError                      exit 1 unless a subclass says otherwise
    ├── UsageError                   2  bad command line
    ├── ConfigError                  2  malformed or invalid config file (file, key, line)
    ├── InvalidReference             2  image reference that does not parse
    ├── CredentialError              3  credentials that cannot be read or used
    ├── TransportError               4  connection refused/reset, timeout, proxy failure
    │   ├── ConnectionLost           4  a body cut off mid-transfer (what arrived is kept)
    │   └── TLSError                 4  certificate not trusted (use --cacert)
    ├── RegistryError                5  the registry answered with an error status
    │   ├── NotFound                    404: the only status that means "absent"
    │   ├── Unauthorized             3  401 after authenticating (wrong or missing credentials)
    │   ├── Forbidden                3  403 (the credentials lack a permission)
    │   ├── TooManyRequests             429 after the retry budget
    │   └── ServerError                 5xx after the retry budget
    ├── ProtocolError                5  a response that breaks the protocol (size, headers)
    ├── IntegrityError               6  bytes that do not match their digest or size
    ├── StoreError                   7  the on-disk store cannot be used
    ├── NotYetArrived                8  a listed version whose objects are not all there yet
    ├── Conflict                     5  a conditional write lost (the object changed)
    └── ItemsFailed                     some of many images failed: the first one's code

No message ever holds a secret: registry errors carry the method and the URL with
its query string stripped, never headers or bodies of requests.
"""

from __future__ import annotations

from collections.abc import Sequence


class BmsyncError(Exception):
    """Base of every error bmsync raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(BmsyncError):
    exit_code = 2


class ConfigError(BmsyncError):
    """A config file that cannot be used; names the file, the key and the line."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = ""
        if path:
            where = path if line is None else f"{path}:{line}"
        if key:
            where = f"{where}: {key}" if where else key
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.detail = message  # without the file, line and key
        self.path = path
        self.key = key
        self.line = line


class InvalidReference(BmsyncError):
    exit_code = 2

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {reason}")
        self.reference = reference
        self.reason = reason


class CredentialError(BmsyncError):
    exit_code = 3


class TransportError(BmsyncError):
    exit_code = 4


class ConnectionLost(TransportError):
    """A response body ended early; the bytes received so far are kept for resuming."""


class TLSError(TransportError):
    pass


class RegistryError(BmsyncError):
    """The registry answered with an error status.

    ``codes`` are the distribution spec error codes from the body
    (``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``, ``DENIED``...), when it had any.
    """

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[str] = (),
        method: str | None = None,
        url: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.codes = tuple(codes)
        self.method = method
        self.url = url
        self.retry_after: float | None = None


class NotFound(RegistryError):
    pass


class Unauthorized(RegistryError):
    exit_code = 3


class Forbidden(RegistryError):
    exit_code = 3


class TooManyRequests(RegistryError):
    pass


class ServerError(RegistryError):
    pass


class ProtocolError(BmsyncError):
    exit_code = 5


class IntegrityError(BmsyncError):
    """Bytes that do not match the digest or size they were promised under."""

    exit_code = 6

    def __init__(
        self,
        message: str,
        *,
        expected: str | None = None,
        actual: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.expected = expected
        self.actual = actual


class StoreError(BmsyncError):
    exit_code = 7


class NotYetArrived(BmsyncError):
    """The catalog names a version whose objects are not all there yet: try again later.

    Transfer systems (data diodes, removable media) deliver objects in any order; a
    timer that sees this exit code simply runs again later.
    """

    exit_code = 8


class Conflict(BmsyncError):
    """A conditional write lost: the object changed (or appeared) since it was read."""

    exit_code = 5


class ItemsFailed(BmsyncError):
    """Some of several images (or mirrors) failed. The message names each; the exit
    code is the first failure's, so a scheduled run exits as the command would."""

    def __init__(self, message: str, exit_code: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code
