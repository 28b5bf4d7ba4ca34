from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.tagfilter import TagFilter, Version, parse_constraint, parse_version, select_tags

# A tag list shaped like gcr.io/anthos-baremetal-release/etcd's, plus non-versions.
ETCD_TAGS = [
    "latest",
    "v3.3.17-0",
    "v3.4.3-0",
    "v3.4.13-0",
    "v3.4.13-1",
    "v3.4.9-1",
    "v3.5.0-rc.1",
    "v3.5.0-0",
    "v3.5.0",
    "v3.5.6-gke.0",
    "v3.5.6-gke.1",
    "sha256-0a1b.sig",
]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (
            TagFilter(globs=("v3.4.*",)),
            ["v3.4.3-0", "v3.4.9-1", "v3.4.13-0", "v3.4.13-1"],
        ),
        (
            TagFilter(globs=("v3.4.*", "v3.3.*")),
            ["v3.3.17-0", "v3.4.3-0", "v3.4.9-1", "v3.4.13-0", "v3.4.13-1"],
        ),
        # Globs are case-sensitive.
        (TagFilter(globs=("V3.4.*",)), []),
        (TagFilter(globs=("v3.4.*",), latest=2), ["v3.4.13-1", "v3.4.13-0"]),
        # regex uses re.search: unanchored, it matches anywhere in the tag.
        (TagFilter(regex=r"gke\.\d+$"), ["v3.5.6-gke.0", "v3.5.6-gke.1"]),
        (
            TagFilter(regex=r"^v3\.4\."),
            ["v3.4.3-0", "v3.4.9-1", "v3.4.13-0", "v3.4.13-1"],
        ),
        # semver: release-line bounds keep 3.4.x pre-releases and drop 3.5.0-rc.1.
        (
            TagFilter(semver=">=3.4 <3.5"),
            ["v3.4.13-1", "v3.4.13-0", "v3.4.9-1", "v3.4.3-0"],
        ),
        (
            TagFilter(semver=">=3.4.0,<3.5.0", latest=1),
            ["v3.4.13-1"],
        ),
        (
            TagFilter(semver="^3.5"),
            ["v3.5.6-gke.1", "v3.5.6-gke.0", "v3.5.0", "v3.5.0-rc.1", "v3.5.0-0"],
        ),
        (TagFilter(semver="~3.5.6"), ["v3.5.6-gke.1", "v3.5.6-gke.0"]),
        (TagFilter(semver="=3.5.0-rc.1"), ["v3.5.0-rc.1"]),
        (TagFilter(semver=">3.5.0-rc.1 <3.5.1"), ["v3.5.0"]),
        (TagFilter(semver="<3.4 || >=3.5.6"), ["v3.5.6-gke.1", "v3.5.6-gke.0", "v3.3.17-0"]),
        # Every criterion must hold.
        (TagFilter(globs=("v3.5.*",), regex="gke", semver="<4", latest=1), ["v3.5.6-gke.1"]),
        # latest alone: the newest N tags, versions before non-versions.
        (TagFilter(latest=3), ["v3.5.6-gke.1", "v3.5.6-gke.0", "v3.5.0"]),
        (TagFilter(globs=("latest", "sha256-*")), ["latest", "sha256-0a1b.sig"]),
        (TagFilter(globs=("nothing*",), latest=5), []),
    ],
)
def test_select_tags(flt: TagFilter, expected: list[str]) -> None:
    assert select_tags(ETCD_TAGS, flt) == expected


def test_select_tags_natural_order_without_latest_or_semver() -> None:
    tags = ["v1.10.0", "v1.9.0", "main", "v1.10.0-rc.1", "v1.2", "1.2.1", "edge", "v1.10.0"]
    assert select_tags(tags, TagFilter()) == [
        "edge",
        "main",
        "v1.2",
        "1.2.1",
        "v1.9.0",
        "v1.10.0-rc.1",
        "v1.10.0",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3", Version(1, 2, 3)),
        ("v1.2.3", Version(1, 2, 3)),
        ("v3.4", Version(3, 4, 0)),
        ("7", Version(7, 0, 0)),
        ("v0.6.0-gke.0", Version(0, 6, 0, ("gke", "0"))),
        ("3.4.13-0", Version(3, 4, 13, ("0",))),
        ("1.0.0-alpha-1+build.5", Version(1, 0, 0, ("alpha-1",), "build.5")),
        ("latest", None),
        ("v1.2.3.4", None),
        ("1.2.3-", None),
        ("1.2.3_1", None),
        ("sha256-abc.sig", None),
    ],
)
def test_parse_version(text: str, expected: Version | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    "ascending",
    [
        # semver §11's example, plus a gke suffix before its release.
        [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ],
        ["v0.6.0-gke.0", "v0.6.0-gke.1", "v0.6.0-gke.10", "v0.6.0", "v0.6.1-gke.0"],
        ["1.9.9", "1.10.0", "2.0.0"],
    ],
)
def test_version_precedence(ascending: list[str]) -> None:
    versions = [parse_version(tag) for tag in ascending]
    keys = [v.precedence for v in versions if v is not None]
    assert len(keys) == len(ascending)
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def test_build_metadata_does_not_change_precedence() -> None:
    plain, built = parse_version("1.0.0"), parse_version("1.0.0+20240101")
    assert plain is not None and built is not None
    assert plain.precedence == built.precedence


@pytest.mark.parametrize(
    ("constraint", "allowed", "refused"),
    [
        (">=1.2.0,<2", ["1.2.0", "1.9.9", "v1.2.0-gke.1"], ["1.1.9", "2.0.0", "2.0.0-rc.1"]),
        (">= 1.2 , < 2", ["1.2.0", "1.9.9"], ["2.0.0"]),
        ("^1.2", ["1.2.0", "1.99.0"], ["1.1.0", "2.0.0"]),
        ("^0.2.3", ["0.2.3", "0.2.9"], ["0.2.2", "0.3.0"]),
        ("^0.0.3", ["0.0.3"], ["0.0.4", "0.1.0"]),
        ("^0", ["0.0.1", "0.9.0"], ["1.0.0"]),
        ("~1.2.3", ["1.2.3", "1.2.9"], ["1.2.2", "1.3.0"]),
        ("~1.2", ["1.2.0", "1.2.9"], ["1.3.0"]),
        ("~1", ["1.0.0", "1.9.0"], ["2.0.0"]),
        ("=1.0.0", ["1.0.0", "v1.0.0", "1.0"], ["1.0.1"]),
        ("1.0.0", ["1.0.0"], ["1.0.1"]),
        ("==1.0.0", ["1.0.0"], ["1.0.1"]),
        ("!=1.0.0", ["1.0.1"], ["1.0.0"]),
        (">1.0.0", ["1.0.1"], ["1.0.0", "1.0.0-gke.1"]),
        ("<=1.0", ["1.0.0", "0.9.0"], ["1.0.1"]),
        (">=1.0.0-rc.2", ["1.0.0-rc.10", "1.0.0"], ["1.0.0-rc.1"]),
        ("<1 || >=3", ["0.5.0", "3.0.0"], ["1.0.0", "2.9.9"]),
    ],
)
def test_constraint(constraint: str, allowed: list[str], refused: list[str]) -> None:
    parsed = parse_constraint(constraint)

    def allows(tag: str) -> bool:
        version = parse_version(tag)
        assert version is not None
        return parsed.allows(version)

    assert [tag for tag in allowed if not allows(tag)] == []
    assert [tag for tag in refused if allows(tag)] == []


@pytest.mark.parametrize(
    "constraint",
    ["", "   ", ">=", "3.4.x", "*", ">=3.4,", ">=3.4<3.5", "abc", "1.0 ||", ">=1,,<2", "=>1.0"],
)
def test_invalid_constraint(constraint: str) -> None:
    with pytest.raises(ConfigError) as info:
        TagFilter(semver=constraint)
    assert f"invalid semver constraint {constraint!r}" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regex": "v(3"}, "invalid regex 'v(3'"),
        ({"regex": "*x"}, "invalid regex '*x'"),
        ({"latest": 0}, "latest must be a whole number of at least 1, got 0"),
        ({"latest": True}, "latest must be a whole number of at least 1, got True"),
        ({"globs": ("v1.*", "")}, "empty tag glob"),
    ],
)
def test_invalid_filter(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TagFilter(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_filter_is_a_hashable_value() -> None:
    flt = TagFilter(globs=["v1.*"], semver=">=1")  # type: ignore[arg-type]
    assert flt.globs == ("v1.*",)
    assert flt == TagFilter(globs=("v1.*",), semver=">=1")
    assert len({flt, TagFilter(globs=("v1.*",), semver=">=1")}) == 1
