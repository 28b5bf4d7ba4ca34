"""Choosing tags from a repository's tag list: globs, a regex, a semver range, newest N.

Used by ``pull`` and the nightly sync to turn a config entry such as
``{name: gcr.io/x/etcd, tags: ["v3.4.*"], latest: 3}`` into concrete tags.

Versions are read leniently, the way image tags are written in practice: a leading
``v``, missing minor/patch (``v3.4`` is 3.4.0), and anything after ``-`` is a
pre-release per semver, so ``v0.6.0-gke.0`` sorts just before ``v0.6.0``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.errors import ConfigError

_IDENTIFIERS = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_VERSION = re.compile(
    rf"[vV]?(?P<major>\d+)(?:\.(?P<minor>\d+))?(?:\.(?P<patch>\d+))?"
    rf"(?:-(?P<pre>{_IDENTIFIERS}))?(?:\+(?P<build>{_IDENTIFIERS}))?"
)
_OPERATOR = re.compile(r"\s*(>=|<=|!=|==|=|>|<|\^|~)?\s*")
_SEPARATOR = re.compile(r"\s*,\s*|\s+|\s*\Z")

_CONSTRAINT_HINT = "e.g. '>=3.4 <3.5', '>=1.2.0,<2', '^1.2', '~1.2.3', '=1.0.0'"


@dataclass(frozen=True)
class Version:
    """A version read from a tag. ``precedence`` orders versions per semver §11."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def precedence(self) -> tuple[object, ...]:
        """A sort key: release numbers, then a pre-release before the release itself,
        pre-release identifiers compared numerically when numeric, numeric before
        alphanumeric, fewer before more. Build metadata does not count."""
        identifiers = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in self.prerelease
        )
        return (self.release, 0 if self.prerelease else 1, identifiers)


def parse_version(text: str) -> Version | None:
    """The version a tag names, or None when the tag is not a version (``latest``)."""
    match = _VERSION.fullmatch(text)
    if match is None:
        return None
    return _version_from(match)


def _version_from(match: re.Match[str]) -> Version:
    pre = match["pre"]
    return Version(
        int(match["major"]),
        int(match["minor"] or 0),
        int(match["patch"] or 0),
        tuple(pre.split(".")) if pre else (),
        match["build"] or "",
    )


@dataclass(frozen=True)
class _Comparison:
    operator: str  # one of >=, >, <=, <, =, !=
    version: Version

    def allows(self, candidate: Version) -> bool:
        # A bound without a pre-release names a release line: it compares release
        # numbers only, so ">=3.4 <3.5" keeps v3.4.0-gke.0 and drops v3.5.0-rc.1.
        # A bound with a pre-release compares full semver precedence.
        mine: tuple[object, ...]
        theirs: tuple[object, ...]
        if self.version.prerelease:
            mine, theirs = self.version.precedence, candidate.precedence
        else:
            mine, theirs = self.version.release, candidate.release
        if self.operator == ">=":
            return theirs >= mine
        if self.operator == ">":
            return theirs > mine
        if self.operator == "<=":
            return theirs <= mine
        if self.operator == "<":
            return theirs < mine
        if self.operator == "!=":
            return theirs != mine
        return theirs == mine


@dataclass(frozen=True)
class Constraint:
    """A semver constraint: alternatives separated by ``||``, each a set of comparisons
    that must all hold. Build with :func:`parse_constraint`."""

    text: str
    alternatives: tuple[tuple[_Comparison, ...], ...]

    def allows(self, version: Version) -> bool:
        return any(all(c.allows(version) for c in alt) for alt in self.alternatives)


def _bump(parts: list[int], index: int) -> Version:
    bumped = parts[:index] + [parts[index] + 1] + [0] * (2 - index)
    return Version(bumped[0], bumped[1], bumped[2])


def _comparisons(operator: str, match: re.Match[str]) -> tuple[_Comparison, ...]:
    version = _version_from(match)
    given = [int(match[p]) for p in ("major", "minor", "patch") if match[p] is not None]
    if operator == "^":
        # Changes left of the first non-zero number given are breaking (npm/cargo caret).
        nonzero = [i for i, n in enumerate(given) if n != 0]
        upper = _bump(list(version.release), nonzero[0] if nonzero else len(given) - 1)
        return (_Comparison(">=", version), _Comparison("<", upper))
    if operator == "~":
        # ~1 allows 1.x; ~1.2 and ~1.2.3 allow 1.2.x.
        upper = _bump(list(version.release), 0 if len(given) == 1 else 1)
        return (_Comparison(">=", version), _Comparison("<", upper))
    if operator in ("", "=="):
        operator = "="
    return (_Comparison(operator, version),)


def parse_constraint(text: str) -> Constraint:
    """Parse a constraint such as ``>=3.4 <3.5``, ``>=1.2.0,<2``, ``^1.2``, ``~1.2.3``,
    ``=1.0.0`` or ``<1 || >=2``.

    Comparisons in a set are separated by whitespace or commas; a bare version means
    ``=``. Missing minor/patch are 0, except that ``^`` and ``~`` widen by the
    precision written. Raises :class:`ConfigError` quoting ``text``.
    """

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"invalid semver constraint {text!r}: {reason}", hint=_CONSTRAINT_HINT)

    alternatives: list[tuple[_Comparison, ...]] = []
    for alternative in text.split("||"):
        comparisons: list[_Comparison] = []
        pos = 0
        while True:
            op = _OPERATOR.match(alternative, pos)
            assert op is not None  # the pattern matches the empty string
            version = _VERSION.match(alternative, op.end())
            if version is None:
                rest = alternative[op.end() :].strip()
                raise fail(f"expected a version at {rest!r}" if rest else "missing version")
            comparisons.extend(_comparisons(op[1] or "", version))
            pos = version.end()
            separator = _SEPARATOR.match(alternative, pos)
            if separator is None:
                raise fail(
                    f"unexpected {alternative[pos:]!r} after a version "
                    "(separate comparisons with a space or ',')"
                )
            pos = separator.end()
            if pos == len(alternative):
                if "," in separator[0]:
                    raise fail("trailing ','")
                break
        alternatives.append(tuple(comparisons))
    return Constraint(text, tuple(alternatives))


def compile_regex(regex: str) -> re.Pattern[str]:
    """Compile a tag regex; raises :class:`ConfigError` quoting it when it is invalid."""
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ConfigError(f"invalid regex {regex!r}: {exc}") from None


@dataclass(frozen=True)
class TagFilter:
    """Which tags of a repository to take; a tag must pass every criterion given.

    ``globs``: fnmatch patterns, case-sensitive; the tag must match at least one.
    ``regex``: searched in the tag (``re.search``: anchor with ``^``/``$`` to match
    the whole tag). ``semver``: a :func:`parse_constraint` constraint; tags that are
    not versions never pass it. ``latest``: keep only the newest N tags that pass.
    No criterion at all passes every tag. Construction raises :class:`ConfigError`
    for an invalid regex, constraint, empty glob or ``latest`` below 1.
    """

    globs: tuple[str, ...] = ()
    regex: str | None = None
    semver: str | None = None
    latest: int | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _constraint: Constraint | None = field(default=None, init=False, repr=False, compare=False)

    def describe(self) -> str:
        """The criteria as a user wrote them, for messages."""
        parts = []
        if self.globs:
            parts.append(f"tags {list(self.globs)}")
        if self.regex is not None:
            parts.append(f"regex {self.regex!r}")
        if self.semver is not None:
            parts.append(f"semver {self.semver!r}")
        if self.latest is not None:
            parts.append(f"latest {self.latest}")
        return ", ".join(parts) or "the filter"

    def __post_init__(self) -> None:
        # A list passed by a caller would make the value unhashable and mutable.
        object.__setattr__(self, "globs", tuple(self.globs))
        if any(not glob for glob in self.globs):
            raise ConfigError("empty tag glob")
        if self.regex is not None:
            object.__setattr__(self, "_pattern", compile_regex(self.regex))
        if self.semver is not None:
            object.__setattr__(self, "_constraint", parse_constraint(self.semver))
        if self.latest is not None and (
            isinstance(self.latest, bool) or not isinstance(self.latest, int) or self.latest < 1
        ):
            raise ConfigError(f"latest must be a whole number of at least 1, got {self.latest!r}")

    def matches(self, tag: str) -> bool:
        """Whether ``tag`` passes the globs, regex and semver criteria (``latest`` is
        applied by :func:`select_tags`)."""
        if self.globs and not any(fnmatch.fnmatchcase(tag, glob) for glob in self.globs):
            return False
        if self._pattern is not None and self._pattern.search(tag) is None:
            return False
        if self._constraint is not None:
            version = parse_version(tag)
            if version is None or not self._constraint.allows(version):
                return False
        return True


def _order_key(tag: str) -> tuple[object, ...]:
    # Non-versions first in string order, then versions by precedence; the tag text
    # breaks ties (v1.0 and 1.0.0, build metadata) so the order is total.
    version = parse_version(tag)
    if version is None:
        return (0, (), tag)
    return (1, version.precedence, tag)


def select_tags(tags: Iterable[str], flt: TagFilter) -> list[str]:
    """The tags of ``tags`` that ``flt`` keeps, without duplicates.

    Newest first when ``latest`` or ``semver`` is set (``latest`` keeps the first N of
    that order), else oldest first; versions sort after tags that are not versions.
    """
    matched = [tag for tag in dict.fromkeys(tags) if flt.matches(tag)]
    newest_first = flt.latest is not None or flt.semver is not None
    ordered = sorted(matched, key=_order_key, reverse=newest_first)
    return ordered[: flt.latest] if flt.latest is not None else ordered
