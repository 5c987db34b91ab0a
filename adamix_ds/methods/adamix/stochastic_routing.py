"""Stochastic routing (AdaMix, Sec. 3.1): every mixed projection picks one expert uniformly at random.

Routes come from a counter-based generator: an expert index is a hash of
(seed, step, pass, slot, side), so the route of any step can be recomputed anywhere without
communication or generator state. Ranks that share the seed (broadcast once at start) take identical
routes; a resumed run takes the routes it would have taken; activation recomputation sees the same
route as the first forward.

The route is a function of the optimizer step, not of the micro-batch: all micro-batches of one
accumulated step, on every rank, use the same experts, so the global batch is the unit that one
expert sees, exactly as a single large batch would be.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Sequence, Union

from ...config import EVAL_MODES
from ...hashing import counter_hash

_TRAIN_DOMAIN = 0x7472
_EVAL_DOMAIN = 0x6576
_EXAMPLE_DOMAIN = 0x6578

DOWN, UP = 0, 1
Choice = Union[list, str]


def draw_expert(num_experts: int, *key: int) -> int:
    """An expert index in [0, num_experts), uniform over keys, from the 64-bit hash of `key`."""
    return (counter_hash(*key) * num_experts) >> 64


@dataclass(frozen=True)
class Slot:
    """One mixed module: its position in injection order and its experts per side."""

    index: int
    experts_down: int
    experts_up: int

    def experts(self, side: int) -> int:
        return self.experts_down if side == DOWN else self.experts_up


def train_expert(seed: int, step: int, pass_index: int, slot: int, side: int, num_experts: int) -> int:
    """The expert a training forward takes: one draw per (step, pass, slot, side)."""
    if num_experts == 1:
        return 0
    return draw_expert(num_experts, seed, _TRAIN_DOMAIN, step, pass_index, slot, side)


@dataclass
class RoutePlan:
    """Every training route of one step: `experts[pass][slot] = (down, up)`, with a digest for cross-rank checks."""

    step: int
    experts: list

    @classmethod
    def for_step(cls, seed: int, step: int, slots: Sequence[Slot], passes: Sequence[int] = (0,)) -> "RoutePlan":
        return cls(
            step,
            [
                [tuple(train_expert(seed, step, p, s.index, side, s.experts(side)) for side in (DOWN, UP)) for s in slots]
                for p in passes
            ],
        )

    def digest(self) -> int:
        """A 63-bit integer that differs, with overwhelming probability, between different plans."""
        text = repr((self.step, self.experts)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@dataclass
class StochasticRouter:
    """The routing state all mixtures of one model read.

    In training, group g of the batch (rows split into `len(passes)` equal groups) takes the route of
    pass `passes[g]` at `step`; the consistency loss runs the batch twice in one forward with
    `passes = (0, 1)`. Outside training, `eval_mode` decides: `merged` averages the experts (always
    from the current weights), `ensemble` averages the experts' outputs, `random` draws an expert
    per example: from the example's identity when the caller names the rows (`keyed_rows`, as the
    trainer's evaluation does), so that the result does not depend on batching, ranks or the forwards
    before; otherwise afresh on every forward (a new draw per generated token).
    """

    seed: int
    eval_mode: str = "merged"
    step: int = 0
    passes: tuple = (0,)
    forwards: int = 0
    record: list | None = field(default=None, repr=False)
    row_keys: list | None = field(default=None, repr=False)
    keyed_choices: dict = field(default_factory=dict, repr=False)
    """(slot, side) -> the keyed rows' experts, within one keyed_rows block."""
    counts: collections.Counter = field(default_factory=collections.Counter, repr=False)
    """Training choices per (slot, side, expert), for diagnostics; whoever reads them resets them."""
    noted: dict = field(default_factory=dict, repr=False)
    """(slot, side) -> ((forward, step), choice) of the last training forward. A layer recomputed by
    activation checkpointing (in the backward, after `use_passes` has ended) gets that choice back, and is
    not counted or recorded twice."""

    def choose(self, slot: int, side: int, num_experts: int, training: bool, batch_size: int) -> Choice:
        """The experts for one module call: a list of indices, one per row group, or 'merged'/'ensemble'."""
        if training:
            when, choice = self.noted.get((slot, side), (None, None))
            if when == (self.forwards, self.step):
                return choice
            if len(self.passes) > 1 and batch_size % len(self.passes):
                raise ValueError(
                    f"batch of {batch_size} rows cannot be split into {len(self.passes)} routing groups"
                )
            choice = [train_expert(self.seed, self.step, p, slot, side, num_experts) for p in self.passes]
            self.noted[(slot, side)] = ((self.forwards, self.step), choice)
            if num_experts > 1:
                self.counts.update((slot, side, e) for e in choice)
            if self.record is not None:
                self.record.extend((self.step, p, slot, side, e) for p, e in zip(self.passes, choice))
            return choice
        if num_experts == 1:
            return [0]
        if self.eval_mode == "random":
            if self.row_keys is not None:
                if len(self.row_keys) != batch_size:
                    raise ValueError(f"{len(self.row_keys)} row keys for a batch of {batch_size} rows")
                known = self.keyed_choices.get((slot, side))
                if known is None:  # the same on every forward of the block: drawn once, not once per token
                    known = [draw_expert(num_experts, self.seed, _EXAMPLE_DOMAIN, key, slot, side)
                             for key in self.row_keys]
                    self.keyed_choices[(slot, side)] = known
                return known
            return [
                draw_expert(num_experts, self.seed, _EVAL_DOMAIN, self.forwards, row, slot, side)
                for row in range(batch_size)
            ]
        return self.eval_mode

    @contextlib.contextmanager
    def use_passes(self, *passes: int):
        """Within the block, split each batch into len(passes) groups routed as those passes."""
        saved, self.passes = self.passes, tuple(passes)
        try:
            yield self
        finally:
            self.passes = saved

    @contextlib.contextmanager
    def keyed_rows(self, keys: Sequence[int]):
        """Within the block, random-mode row r routes by keys[r] (e.g. its index in the evaluation set)."""
        saved = self.row_keys, self.keyed_choices
        self.row_keys, self.keyed_choices = list(keys), {}
        try:
            yield self
        finally:
            self.row_keys, self.keyed_choices = saved

    def set_eval_mode(self, mode: str) -> None:
        if mode not in EVAL_MODES:
            raise ValueError(f"eval mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
        self.eval_mode = mode

    def count_forward(self, *_args) -> None:
        """Forward pre-hook of the whole model: a fresh random-mode draw on every forward."""
        self.forwards += 1
