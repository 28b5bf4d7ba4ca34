"""Luigi tasks over :mod:`pipeline` (DESIGN.md §10): they schedule, the library works.

Connected side (``tasks.release``): ``ReleaseBundle`` and ``NightlySync`` over
``ResolveRelease`` -> ``PullImage`` (one per locked digest, dynamic) -> ``BuildBundle``
-> ``PublishBundle``. Disconnected side (``tasks.site``): ``ImportBundle`` over
``FetchBundle`` -> ``VerifyBundle`` -> ``PushBundle`` (per mirror) -> ``VerifyMirror``
-> ``WriteContainerdConfig``.

Luigi's own command line finds them with ``--module tasks``::

    LUIGI_CONFIG_PATH=configs/luigi.cfg luigi --module tasks ReleaseBundle \\
        --config configs/pipeline.yaml --release 1.30.0 --local-scheduler

``bmsync run release|nightly|import`` starts the same tasks without it.
"""

from tasks.release import (
    BuildBundle,
    NightlySync,
    PublishBundle,
    PullImage,
    ReleaseBundle,
    ResolveRelease,
)
from tasks.site import (
    FetchBundle,
    ImportBundle,
    PushBundle,
    VerifyBundle,
    VerifyMirror,
    WriteContainerdConfig,
)

__all__ = [
    "BuildBundle",
    "FetchBundle",
    "ImportBundle",
    "NightlySync",
    "PublishBundle",
    "PullImage",
    "PushBundle",
    "ReleaseBundle",
    "ResolveRelease",
    "VerifyBundle",
    "VerifyMirror",
    "WriteContainerdConfig",
]
