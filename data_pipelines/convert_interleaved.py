"""`kakehashi data convert obelics|mmc4`: interleaved image-text documents -> `task: interleaved` shards."""

from __future__ import annotations


def register(kinds) -> None:
    """Add `obelics` and `mmc4` to `data convert`'s kinds (filled in below as the converters land)."""
