"""Format rules that must also hold where torch is absent (the generator runs at build time).

No torch import here: the generator loads this file by path. ``formats`` re-exports both names.
"""

from __future__ import annotations


class FormatError(ValueError):
    """A tensor or setting does not match the packed format."""


def choose_outliers(k: int, group: int, requested: int) -> int:
    """The outlier count for a layer with K input channels.

    Rule: start from K mod group (the channels that do not fill a whole group must be
    outliers), then add whole groups while the total stays <= ``requested``. So with
    requested=128: K=576, g=128 -> 64; K=1536, g=128 -> 128; K=576, g=64 -> 128; and
    requested=0 gives 0 whenever K is a multiple of the group.
    """
    if group <= 0 or k <= 0 or requested < 0:
        raise FormatError(f"choose_outliers: bad arguments k={k}, group={group}, requested={requested}")
    count = k % group
    while count + group <= requested and k - (count + group) >= group:
        count += group
    if k - count < group:
        raise FormatError(f"K={k} leaves no whole group of {group} after {count} outliers")
    return count
