"""Does a mirror (or a node) hold exactly what a bundle holds? (DESIGN.md §9)

Read-only: nothing here writes to a registry or to containerd.

:func:`verify_mirror` asks a namespaced mirror, for every image of the bundle, which
digest its tag points at (``HEAD``, ``Docker-Content-Digest``) and whether every blob
the image needs is in the image's repository: configs and layers as blobs, child
manifests as manifests (a registry links them apart from layers, so a manifest is never
asked for as a blob). The image paths are the ones ``bmsync push images`` uses
(:func:`pipeline.reference.mirror_reference`).

:func:`verify_node` lists the images of a containerd namespace (``ctr images ls``) and
compares them with the bundle: an image present on the node under its source name must
be at the bundle's digest, and any other image of a bundle repository must be at a
digest the bundle holds; anything else was pulled from elsewhere.

Both return a report whose rows say what differs; they raise only when the question
cannot be answered (the mirror refuses the credentials, ``ctr`` cannot reach
containerd), never for a difference.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.bundle.format import SHA256_DIGEST, BundleManifest, ImageEntry
from pipeline.errors import InvalidReference, NotFound, ProtocolError, TransportError, UsageError
from pipeline.manifest import IMAGE_TYPES, INDEX_TYPES
from pipeline.reference import (
    Mirror,
    Reference,
    check_mirror_collisions,
    mirror_target,
    parse_reference,
)
from pipeline.registry.client import RegistryClient

# Statuses of a mirror row, worst first: one image gets the first that applies.
MISSING_TAG = "missing tag"  # the tag (or, for an image by digest, the manifest) is absent
WRONG_DIGEST = "wrong digest"  # the tag points at another manifest
MISSING_BLOBS = "missing blobs"  # the tag is right, but blobs or child manifests are absent
OK = "ok"

# Statuses of a node row.
ABSENT = "absent"  # the bundle image is not on the node: not a difference
ELSEWHERE = "pulled from elsewhere"  # an image of a bundle repository at a digest it lacks

DEFAULT_NAMESPACE = "k8s.io"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
CTR_TIMEOUT = 60.0


# -- the mirror ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorImageCheck:
    """One bundle image in the mirror.

    ``found`` is the digest the target answered with (None when absent);
    ``missing`` the digests of blobs and child manifests absent from its repository
    (checked whatever the tag says, so a wrong tag also shows what else is lacking).
    """

    source: str
    target: str
    expected: str
    found: str | None
    missing: tuple[str, ...]
    status: str

    @property
    def ok(self) -> bool:
        return self.status == OK

    def problem(self) -> str:
        """One line naming the image and what differs ("" when it is ok)."""
        if self.status == MISSING_TAG:
            return f"{self.target}: not in the mirror (expected {self.expected})"
        if self.status == WRONG_DIGEST:
            return f"{self.target}: points at {self.found}, the bundle has {self.expected}"
        if self.status == MISSING_BLOBS:
            more = f" and {len(self.missing) - 1} more" if len(self.missing) > 1 else ""
            return f"{self.target}: lacks {self.missing[0]}{more} of {self.expected}"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "expected": self.expected,
            "found": self.found,
            "missing": list(self.missing),
            "status": self.status,
        }


class _Report:
    """What the mirror and the node reports share: rows, those that differ, JSON.

    Subclasses are frozen dataclasses with ``images`` and the field ``_where`` names
    (what was checked: the mirror, the containerd namespace).
    """

    _where: ClassVar[str]
    images: tuple[Any, ...]

    @property
    def differences(self) -> list[Any]:
        return [i for i in self.images if not i.ok]

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            self._where: getattr(self, self._where),
            "ok": self.ok,
            "images": [i.to_json() for i in self.images],
        }


@dataclass(frozen=True)
class MirrorReport(_Report):
    _where: ClassVar[str] = "mirror"
    mirror: str
    images: tuple[MirrorImageCheck, ...]


def verify_mirror(manifest: BundleManifest, mirror: Mirror, client: RegistryClient, *,
                  concurrency: int = 8) -> MirrorReport:
    """Check every image of ``manifest`` in ``mirror`` through ``client``; rows in bundle order.

    Requests: one ``HEAD`` per image on its tag, then one ``HEAD`` per distinct
    (repository, digest) of the images' blobs and child manifests, ``concurrency`` at a
    time; only pull access is asked for. A 404 is an absence recorded in the report;
    any other error (401, 403, 5xx after retries, a refused connection) raises, since
    the mirror's content is then unknown. Raises :class:`UsageError` when two sources
    would share a mirror path (the mirror cannot hold both).
    """
    refs = [parse_reference(i.source) for i in manifest.images]
    check_mirror_collisions(refs, mirror)
    targets = [mirror_target(e.source, e.digest, mirror) for e in manifest.images]

    def head_tag(target: Reference) -> str | None:
        try:
            return client.manifest_digest(target.repository, target.identifier)
        except NotFound:
            return None

    # A blob shared by several images of one repository is asked for once.
    pairs = sorted({(t.repository, d) for entry, t in zip(manifest.images, targets, strict=True)
                    for d in entry.blobs if d != entry.digest})
    present: dict[tuple[str, str], bool] = {}
    lock = threading.Lock()

    def head_blob(pair: tuple[str, str]) -> None:
        repo, digest = pair
        found = client.holds(repo, digest, manifest.blobs[digest].media_type)
        with lock:
            present[pair] = found

    workers = max(1, min(concurrency, len(pairs) + len(targets)))
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        tags = list(pool.map(head_tag, targets))
        list(pool.map(head_blob, pairs))

    rows = []
    for entry, target, found in zip(manifest.images, targets, tags, strict=True):
        missing = tuple(d for d in entry.blobs
                        if d != entry.digest and not present[(target.repository, d)])
        if found is None:
            status = MISSING_TAG
        elif found != entry.digest:
            status = WRONG_DIGEST
        elif missing:
            status = MISSING_BLOBS
        else:
            status = OK
        rows.append(MirrorImageCheck(entry.source, str(target), entry.digest, found, missing,
                                     status))
    return MirrorReport(str(mirror), tuple(rows))


# -- a node -------------------------------------------------------------------------------


CtrRunner = Callable[[Sequence[str]], str]
"""Runs ``ctr ARGS`` against one containerd and returns its standard output."""


def ctr_command(address: str = DEFAULT_ADDRESS, *, ctr: str = "ctr",
               timeout: float = CTR_TIMEOUT) -> CtrRunner:
    """A :data:`CtrRunner` for the containerd listening on socket ``address``.

    The runner raises :class:`UsageError` when ``ctr`` is not installed and
    :class:`TransportError` when ``address`` does not exist, or (with ctr's last line
    of complaint) when ctr exits non-zero, typically because containerd does not answer
    there or the socket is not usable by this user.
    """

    def run(args: Sequence[str]) -> str:
        # Without a socket, ctr would spend its whole connect timeout (10 s) finding out.
        if not os.path.exists(address):
            raise TransportError(f"no containerd socket at {address}",
                                 hint="is containerd running? give its socket with --address")
        command = [ctr, "-a", address, "--connect-timeout", "5s", *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise UsageError(f"{ctr} not found",
                             hint="install containerd's ctr, or run this on the node") from None
        except subprocess.TimeoutExpired:
            raise TransportError(f"`{' '.join(command)}` did not answer in {timeout:.0f} s",
                                 hint="is containerd running?") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise TransportError(f"`{' '.join(command)}` failed: {reason}",
                                 hint="check --address and that this user may use the socket")
        return done.stdout

    return run


@dataclass(frozen=True)
class NodeImage:
    """One line of ``ctr images ls``: an image name and the digest it points at."""

    name: str
    digest: str


def parse_ctr_images(output: str) -> list[NodeImage]:
    """Parse ``ctr images ls`` (containerd 1.6): a header, then one line per image.

    Columns are ``REF TYPE DIGEST SIZE PLATFORMS LABELS``, aligned with spaces; the
    size holds a space itself (``1.2 MiB``), so the digest is found as the first
    ``sha256:`` token after the name rather than by counting columns. Raises
    :class:`ProtocolError` on a line without a digest (another ctr, another format).
    """
    images = []
    for n, line in enumerate(output.splitlines(), 1):
        parts = line.split()
        if not parts or (n == 1 and parts[0] == "REF"):
            continue
        digest = next((p for p in parts[1:] if SHA256_DIGEST.match(p)), None)
        if digest is None:
            raise ProtocolError(f"ctr images ls, line {n}: no digest in {line.strip()!r}",
                                hint="bmsync reads the output of containerd 1.6's ctr")
        images.append(NodeImage(parts[0], digest))
    return images


@dataclass(frozen=True)
class NodeImageCheck:
    """One image name: a bundle image (``source`` set) or another name on the node.

    ``expected`` is the bundle's digest for a bundle image; for another name of a
    bundle repository it is None, and any digest of the bundle is accepted.
    """

    name: str
    source: str | None
    expected: str | None
    found: str | None
    status: str

    @property
    def ok(self) -> bool:
        return self.status in (OK, ABSENT)

    def problem(self) -> str:
        if self.status == WRONG_DIGEST:
            return f"{self.name}: node has {self.found}, the bundle has {self.expected}"
        if self.status == ELSEWHERE:
            return (f"{self.name}: node has {self.found}, which is not in the bundle"
                    " (pulled from elsewhere)")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "expected": self.expected,
            "found": self.found,
            "status": self.status,
        }


@dataclass(frozen=True)
class NodeReport(_Report):
    _where: ClassVar[str] = "namespace"
    namespace: str
    images: tuple[NodeImageCheck, ...]


def _manifest_digests(manifest: BundleManifest, entry: ImageEntry) -> set[str]:
    """Digests a node may hold for ``entry``: its own, its upstream one, its children."""
    out = {entry.digest, entry.upstream_digest}
    for d in entry.blobs:
        if manifest.blobs[d].media_type in IMAGE_TYPES | INDEX_TYPES:
            out.add(d)
    return out


def verify_node(manifest: BundleManifest, ctr_runner: CtrRunner, *,
                namespace: str = DEFAULT_NAMESPACE) -> NodeReport:
    """Compare the images of containerd namespace ``namespace`` with ``manifest``.

    One ``ctr -n NAMESPACE images ls`` through ``ctr_runner``. Rows: every bundle image,
    in bundle order (``absent`` when the node lacks it, which is no difference: a node
    pulls only what it runs), then every other name on the node in a repository of the
    bundle, sorted. A bundle image on the node must be at the bundle's digest (pulled
    through the mirror, a platform-filtered index has the filtered digest; the upstream
    index means it came from elsewhere). Another name of a bundle repository (another
    tag, the ``@sha256:`` names kubelet's CRI adds) must be at a manifest digest the
    bundle holds for that repository. Names that do not parse as references (the
    CRI's ``sha256:<image id>`` names) and other repositories are not reported.
    Errors of ``ctr_runner`` propagate.
    """
    node = parse_ctr_images(ctr_runner(["-n", namespace, "images", "ls"]))
    on_node: dict[Reference, str] = {}
    for image in node:
        try:
            ref = parse_reference(image.name)
        except InvalidReference:
            continue
        on_node[ref] = image.digest

    known: dict[str, set[str]] = {}  # registry/repository -> manifest digests of the bundle
    wanted: dict[Reference, ImageEntry] = {}
    for entry in manifest.images:
        ref = parse_reference(entry.source)
        known.setdefault(ref.name, set()).update(_manifest_digests(manifest, entry))
        wanted[ref] = entry

    rows = []
    for ref, entry in wanted.items():
        found = on_node.get(ref)
        if found is None:
            status = ABSENT
        elif found == entry.digest:
            status = OK
        else:
            status = WRONG_DIGEST
        rows.append(NodeImageCheck(str(ref), entry.source, entry.digest, found, status))
    others = sorted((r for r in on_node if r not in wanted and r.name in known), key=str)
    for ref in others:
        found = on_node[ref]
        status = OK if found in known[ref.name] else ELSEWHERE
        rows.append(NodeImageCheck(str(ref), None, None, found, status))
    return NodeReport(namespace, tuple(rows))
