"""Platforms (`os/architecture[/variant]`) as written on command lines and in indexes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UsageError

_PART = re.compile(r"^[a-z0-9_.-]+$")

# Variants an index may omit: arm64 is v8 unless it says otherwise (OCI image-index spec,
# "platform" notes; containerd normalises the same way).
_DEFAULT_VARIANT = {"arm64": "v8"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def matches(self, other: Platform) -> bool:
        """Whether ``other`` (from an index) satisfies this wanted platform.

        A wanted platform without a variant accepts any variant; with one, the
        variant must be equal, an index entry without a variant counting as the
        architecture's default variant.
        """
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if self.variant is None:
            return True
        theirs = other.variant or _DEFAULT_VARIANT.get(other.architecture)
        return theirs == self.variant

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Platform:
        """From the ``platform`` object of an index entry."""
        return cls(
            os=str(value.get("os", "")),
            architecture=str(value.get("architecture", "")),
            variant=value.get("variant") or None,
        )


def parse_platform(text: str) -> Platform:
    """Parse ``linux/amd64`` or ``linux/arm64/v8``; raises UsageError naming the text."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(_PART.match(p) for p in parts):
        raise UsageError(
            f"invalid platform {text!r}", hint="write OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64"
        )
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
