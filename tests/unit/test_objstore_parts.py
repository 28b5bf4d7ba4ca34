"""The part size of a multipart upload: PART_SIZE, grown in whole MiB past S3's limit of
MAX_PARTS parts."""

from __future__ import annotations

import pytest

from pipeline.objstore import MAX_PARTS, PART_SIZE, part_size_for

MIB = 1024 * 1024


@pytest.mark.parametrize(("size", "expected"), [
    (PART_SIZE + 1, PART_SIZE),
    (500 * 1000 * 1000, PART_SIZE),
    (PART_SIZE * MAX_PARTS, PART_SIZE),  # exactly MAX_PARTS parts
    (PART_SIZE * MAX_PARTS + 1, PART_SIZE + MIB),
    (200 * 1024 * MIB, 21 * MIB),  # 200 GiB: 20.48 MiB needed, rounded up
    (5 * 1024 * 1024 * MIB, 525 * MIB),  # S3's largest object, 5 TiB
])
def test_part_size(size: int, expected: int) -> None:
    got = part_size_for(size)
    assert got == expected
    assert got % MIB == 0
    assert -(-size // got) <= MAX_PARTS
