"""Training batches read from a language model while it runs, through a mixing buffer: no activation is written.

:class:`LiveActivations` reads training contexts through the LM ``refill`` contexts at a time, into a buffer of at
most ``capacity`` rows (tokens). Each fill is shuffled with the rows left from before, and batches are served from
it until half of it is left; then it is refilled. So every batch mixes the tokens of many contexts (of many
documents), as SAELens's mixing buffer and dictionary_learning's ``ActivationBuffer`` do, and memory is bounded by
the buffer, whatever the token budget.

Several processes (DDP): each rank runs the LM on its own share of every refill's contexts (consecutive blocks, in
rank order), and the rows are gathered, so that every rank holds the buffer one process would hold and serves its
slice of every global batch. N ranks then see exactly the batches one process sees, for 1/N of the LM passes each.

Resuming: :meth:`LiveActivations.state_dict` is the data position after a number of served batches: the contexts
read so far, the rows still in the buffer and the shuffle's RNG state. A stream started from it serves exactly the
batches the uninterrupted stream would have served next, and reads no context it had read before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from ..distributed import gathered_rows
from .base import Pair

#: ``read(tokens (n, context_len))`` -> the rows of every side (inputs, and a pair's targets), scaled, outliers out
Reader = Callable[[Tensor], tuple[Tensor, ...]]


@dataclass
class StreamState:
    """Where a stream stands: ``contexts`` read from the start of the pass, ``rows`` (each side's) left in the
    buffer in the order they will be served, the shuffle's ``rng`` state, the ``pass_index`` over the training
    contexts and the ``served`` batches of this pass."""

    contexts: int
    rows: tuple[Tensor, ...]
    rng: Tensor
    pass_index: int = 0
    served: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"contexts": self.contexts, "rows": [r.to("cpu", copy=True) for r in self.rows], "rng": self.rng,
                "pass_index": self.pass_index, "served": self.served}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamState:
        return cls(int(state["contexts"]), tuple(state["rows"]), state["rng"], int(state["pass_index"]),
                   int(state["served"]))


class LiveActivations(IterableDataset):
    """Batches of ``batch_size`` rows (this rank's slice of each global batch) read from the LM while it runs.

    ``contexts(skip)``: the training contexts in order, the first ``skip`` passed over without the LM (a resumed
    stream reads only token ids for them). ``read``: see :data:`Reader` (the rows of one process's contexts;
    they are gathered over the ranks here). ``n_contexts``: the contexts one pass reads (the token budget).
    ``capacity``: the buffer's rows; ``refill``: contexts read per refill (a multiple of the world size).
    ``pack``: a batch from the rows of every side (default: the inputs, or a :class:`Pair` when ``paired``).
    ``prefetch``: the LM reads the next refill's contexts in a thread while the current buffer is served (SAELens's
    prefetch); the batches are the same either way.
    """

    def __init__(self, contexts: Callable[[int], Iterator[Tensor]], read: Reader, *, n_contexts: int,
                 batch_size: int, capacity: int, refill: int, paired: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pack: Callable[[tuple[Tensor, ...]], Any] | None = None,
                 prefetch: bool = False) -> None:
        if batch_size % world_size:
            raise ValueError(f"data.batch_size {batch_size} must divide evenly across {world_size} devices")
        if capacity < 2 * batch_size:
            raise ValueError(f"data.buffer_contexts: the buffer holds {capacity} tokens, fewer than two batches of "
                             f"{batch_size}: it serves until half is left, so it must hold at least two")
        self.contexts, self.read, self.n_contexts = contexts, read, n_contexts
        self.batch_size, self.capacity, self.refill = batch_size, capacity, refill
        self.seed, self.rank, self.world_size, self.prefetch = seed, rank, world_size, prefetch
        self.pack = pack or ((lambda sides: Pair(*sides)) if paired else (lambda sides: sides[0]))
        self.resume_from: StreamState | None = None
        self.lm_contexts = 0  # contexts this process has run through the LM (its share), for the benchmarks and tests
        self._stream: _Stream | None = None
        self._first_batch: StreamState | None = None  # the start of this pass, once a stream has filled it

    def fresh_state(self, pass_index: int = 0) -> StreamState:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return StreamState(0, (), rng.get_state(), pass_index)

    def __iter__(self) -> Iterator[Tensor | Pair]:
        """A stream from where the last one ended its pass (or from :attr:`resume_from`): the newest stream is the
        one :meth:`state_dict` describes."""
        if self.resume_from is not None:
            state, self.resume_from = self.resume_from, None
        else:
            state = self.fresh_state(self._stream.next_pass if self._stream is not None else 0)
        self._stream = _Stream(self, state)
        return iter(self._stream)

    def sample(self) -> Iterator[Tensor | Pair]:
        """The first batches of this pass from a stream of their own: the newest stream (the trainer's) keeps its
        place, and the buffer fill they start from is read through the LM once for both."""
        return iter(_Stream(self, self.fresh_state(self._stream.start.pass_index if self._stream is not None else 0)))

    def state_dict(self, served: int) -> dict[str, Any]:
        """The data position after ``served`` batches of the current pass (the trainer may have fetched a batch
        more than it trained on)."""
        if self._stream is None:
            return self.fresh_state().to_dict()
        return self._stream.state_after(served).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_from = StreamState.from_dict(state)

    def read_mine(self, tokens: Tensor) -> tuple[Tensor, ...] | None:
        """The rows of this rank's block of ``tokens`` (one refill's contexts), read through the LM."""
        block = tokens.tensor_split(self.world_size)[self.rank]
        self.lm_contexts += len(block)
        return self.read(block) if len(block) else None

    def gathered(self, mine: tuple[Tensor, ...] | None, refill: int) -> tuple[Tensor, ...]:
        """Every rank's rows of a refill, in rank order (a collective: the main thread calls it)."""
        if self.world_size == 1:
            return mine
        if mine is None:
            raise ValueError(f"data.buffer_contexts: a refill of {refill} contexts leaves rank {self.rank} none")
        return tuple(gathered_rows(side) for side in mine)


class _Stream:
    """One pass over the training contexts through the buffer (see :class:`LiveActivations`)."""

    def __init__(self, source: LiveActivations, state: StreamState) -> None:
        self.source, self.start = source, state
        self.next_pass = state.pass_index
        self.pool = ThreadPoolExecutor(max_workers=1) if source.prefetch else None
        self.pending: Future | None = None
        #: (served, state) of the last few batches yielded, for :meth:`state_after`
        self.history: deque[tuple[int, StreamState]] = deque(maxlen=4)

    def _read_refill(self, stream: Iterator[Tensor], contexts: int, wanted: int) -> tuple[Tensor, ...] | None:
        """This rank's rows of the next ``wanted`` contexts of ``stream`` (``contexts`` read before them)."""
        tokens = [next(stream, None) for _ in range(wanted)]
        if tokens[-1] is None:
            raise ValueError(f"data: the dataset ran out after {contexts + tokens.index(None)} training contexts; "
                             "lower n_train_tokens or add text")
        return self.source.read_mine(torch.stack(tokens))

    def _next_refill(self, stream: Iterator[Tensor], contexts: int, wanted: int) -> tuple[Tensor, ...] | None:
        """The next refill's rows on this rank: the one read ahead, or read now."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            return pending.result()
        return self._read_refill(stream, contexts, wanted)

    def state_after(self, served: int) -> StreamState:
        for count, state in self.history:
            if count == served:
                return state
        if served == self.start.served:
            return self.start
        raise ValueError(f"the data position after {served} batches is no longer known (the stream has served "
                         f"{self.history[-1][0] if self.history else self.start.served})")

    def __iter__(self) -> Iterator[Tensor | Pair]:
        source, state = self.source, self.start
        first = source._first_batch
        if state.served == 0 and state.contexts == 0 and first is not None and first.pass_index == state.pass_index:
            state = first  # another stream of this pass (a sample of training rows) already filled the buffer
        rng = torch.Generator()
        rng.set_state(state.rng)
        rows, contexts, served, cursor = state.rows, state.contexts, state.served, 0
        stream = source.contexts(contexts)
        b = source.batch_size
        per_rank = b // source.world_size
        lo = source.rank * per_rank
        while True:
            left = len(rows[0]) - cursor if rows else 0
            ended = contexts >= source.n_contexts
            keep = 0 if ended else source.capacity // 2
            while left >= b + keep:
                snapshot = StreamState(contexts, tuple(r[cursor:] for r in rows), rng.get_state(), state.pass_index,
                                       served)
                self.history.append((served, snapshot))
                if served == 0:
                    source._first_batch = snapshot
                batch = tuple(r[cursor + lo:cursor + lo + per_rank] for r in rows)
                cursor, left, served = cursor + b, left - b, served + 1
                yield source.pack(batch)
            if ended:  # what is left is less than a batch: the next pass starts afresh
                if self.pool is not None:
                    self.pool.shutdown(wait=False)
                self.history.append((served, StreamState(contexts, tuple(r[cursor:] for r in rows), rng.get_state(),
                                                         state.pass_index, served)))
                self.next_pass = state.pass_index + 1
                return
            if served:
                source._first_batch = None  # only the start of a pass is read twice
            wanted = min(source.refill, source.n_contexts - contexts)
            new = source.gathered(self._next_refill(stream, contexts, wanted), wanted)
            if source.prefetch and contexts + wanted < source.n_contexts:  # the LM reads on while training goes on
                ahead = min(source.refill, source.n_contexts - contexts - wanted)
                self.pending = self.pool.submit(self._read_refill, stream, contexts + wanted, ahead)
            merged = tuple(torch.cat([r[cursor:], n]) for r, n in zip(rows, new)) if rows else new
            order = torch.randperm(len(merged[0]), generator=rng).to(merged[0].device)
            rows, contexts, cursor = tuple(m.index_select(0, order) for m in merged), contexts + wanted, 0
