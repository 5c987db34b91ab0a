"""A counter-based hash: the same integers give the same 64 bits on any rank, after any resume.

AdaMix's routes and every method's per-step dropout seed derive from it, so no generator state has to be
saved, broadcast or replayed.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def counter_hash(*words: int) -> int:
    """A 64-bit hash of a sequence of integers (a splitmix64 chain); same input, same output, anywhere."""
    h = 0
    for word in words:
        h = _splitmix64(h ^ (word & _MASK))
    return h
