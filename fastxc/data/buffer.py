"""Training straight from the models: a harvest's activation stream feeding an in-memory
shuffle buffer, no store on disk.

    src = OnTheFlySource(plan_harvest(models, datasets, tokens, ...), device, buffer_rows=65536)
    it = src.stream(batch_size=512, seed=0)   # first fill: the normalisation scales
    x = next(it)                               # [B, n, d] (equal widths) or [B, D], normalised

The buffer mixes like SAELens's activation store. It holds ``buffer_rows`` rows (R). Round r
shuffles it with a permutation keyed by (seed, r), serves the first half of that order as
the rows of the next batches (a batch may span two rounds) and refills exactly those slots
with the next R/2 rows of the stream. So every harvested row is served once, after waiting
a geometric number of rounds (half leave in the round they arrive, a quarter in the next,
...), and each batch is a uniform sample of the buffer. When the stream ends (``tokens`` rows
taken, or the data ran out) the buffer drains: unfilled slots are dropped and later rounds
serve half of what is left, down to the last row.

Normalisation: ``scale_i = sqrt(d_i) / E||x_i||`` over the rows of the first fill (a store uses
all of its rows), applied to every batch; the trainer keeps the scales in
``Crosscoder.input_scale``.

Determinism: the stream is a pure function of the harvest settings, and which buffer slot
holds which stream row after batch i is a function of (seed, i) and that stream. ``state()``
records it compactly: (model batch, row) of every slot, the round, the offset into its order
and the stream position, never the activations; ``stream(..., state=...)`` rebuilds the buffer
by replaying the datasets' tokenization and running the models only on the batches still held,
so a resumed run draws bit-identical batches.

The models run on a producer thread (``_Producer``) that fills a bounded queue while the
consumer trains, so forwards and training overlap; it also feeds ``--save-store``'s
``StoreSink``, which writes the store ``fastxc.data.harvest`` would write for the same tokens.
"""
from __future__ import annotations

import copy
import hashlib
import math
import queue
import threading
from typing import Any, Sequence

import numpy as np
import torch

from fastxc.data.harvest import ActivationBatch, HarvestError, HarvestPlan, StoreSink, iter_activations

_END = object()  # the producer's last item: the data ran out (or its share is done)


def round_seed(seed: int, rnd: int, rank: int = 0) -> int:
    """The 63-bit key of round ``rnd``'s permutation (hashing: nearby seeds give unrelated orders)."""
    h = hashlib.sha256(f"fastxc-buffer:{int(seed)}:{int(rank)}:{int(rnd)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _Producer:
    """The thread that runs the models over the stream's batches and queues their rows.

    It forwards batch i when ``want(i)`` (a consumer's share, and the rows a resumed buffer
    must rebuild), hands every item from ``sink.next_batch`` on to ``sink`` (the store), and
    stops when the consumer is satisfied and the sink done, when the data runs out (queueing
    _END), or when closed. An exception is queued for the consumer to raise."""

    def __init__(self, plan: HarvestPlan, caps, device: str, skip: int, want, sink: StoreSink | None,
                 max_items: int, lock: threading.Lock):
        self.q: queue.Queue = queue.Queue(maxsize=max_items)
        self.stop = threading.Event()
        self.satisfied = threading.Event()  # the consumer needs no more rows
        self.sink = sink
        self.harvested = 0  # rows the models gave (after the outlier filter), for the progress bar

        def forward(i: int) -> bool:
            return want(i) or (sink is not None and not sink.done and i >= sink.next_batch)

        self._args = (plan, caps, device, skip, forward, lock)
        self.thread = threading.Thread(target=self._run, daemon=True, name="fastxc-harvest-producer")
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            if self.satisfied.is_set() and item is not _END and not isinstance(item, BaseException):
                return True  # nobody reads it: drop it (the sink already has it)
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        plan, caps, device, skip, forward, lock = self._args
        try:
            with lock:  # the models' capture hooks serve one stream at a time
                seen = self.sink.seen if self.sink is not None else None
                for item in iter_activations(plan, caps, device, skip=skip, seen=seen, forward=forward):
                    if self.stop.is_set():
                        return
                    if item.x is None:  # nobody needs this batch: tokenized only
                        continue
                    self.harvested += int(item.x.shape[0])
                    if self.sink is not None and not self.sink.done:
                        self.sink.take(item)
                    if self.satisfied.is_set() and (self.sink is None or self.sink.done):
                        return
                    if not self._put(item):
                        return
                self._put(_END)
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put(e)

    def get(self) -> ActivationBatch | None:
        """The next item (None: the data ran out); re-raises the producer's error."""
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def close(self, wait_for_sink: bool = False) -> None:
        """Stop the thread; with ``wait_for_sink`` first let it finish the store's rows."""
        self.satisfied.set()
        if wait_for_sink and self.sink is not None:
            while self.thread.is_alive():
                try:  # drain, so that a producer blocked on a full queue sees it is not needed
                    item = self.q.get(timeout=0.1)
                    if isinstance(item, BaseException):
                        self.stop.set()
                        self.thread.join()
                        raise item
                except queue.Empty:
                    pass
        self.stop.set()
        self.thread.join(timeout=60)


class BufferedBatches:
    """Iterator of normalised float32 batches [B, n, d] (equal widths) or [B, D] from the
    shuffle buffer (see the module docstring). ``position`` is the number of batches drawn,
    ``state()`` what a checkpoint needs to resume at it, ``harvested`` the rows the models gave.
    """

    def __init__(self, src: "OnTheFlySource", batch_size: int, seed: int, buffer_rows: int, tokens: int,
                 scales: Sequence[float] | None = None, state: dict | None = None,
                 sink: StoreSink | None = None):
        if buffer_rows < batch_size:
            raise HarvestError(f"--buffer-rows {buffer_rows} is smaller than the batch ({batch_size} rows)")
        self.src, self.batch_size, self.seed = src, int(batch_size), int(seed)
        self.capacity, self.tokens = int(buffer_rows), int(tokens)
        self.widths, self.offsets = list(src.plan.widths), src.plan.offsets
        D = self.offsets[-1]
        self.buf = torch.empty(0, D, dtype=torch.float32)
        self.ids = torch.empty(0, 2, dtype=torch.int64)  # (model batch, row in its rows) of every slot
        self.round, self.offset, self.order = 0, 0, torch.empty(0, dtype=torch.int64)
        self.consumed = 0  # model batches taken from the stream (rows of the last may be in carry)
        self.carry: tuple[ActivationBatch, int] | None = None  # (item, first row not yet placed)
        self.taken = 0  # rows taken into the buffer in all (<= tokens)
        self.ended = False  # the stream gives no more rows
        self.position = 0
        self.scales = None if scales is None else [float(s) for s in scales]
        self.first_fill_sums: list[float] | None = None
        self._col: torch.Tensor | None = None
        rebuild: dict[int, list] = {}
        if state is not None:
            rebuild = self._load_state(state)
        share = src.share
        # the stream starts at the first batch this buffer or the store still needs
        skip = min([self.consumed, *rebuild, *([sink.next_batch] if sink is not None else [])])
        self._producer = _Producer(
            src.plan, src.caps, src.device, skip=skip,
            want=lambda i: share(i) and (i >= self.consumed or i in rebuild), sink=sink,
            max_items=src.queue_items(buffer_rows), lock=src.lock)
        if rebuild:
            self._rebuild(rebuild)
        elif state is None:
            self._first_fill()
        if self.scales is not None:
            self.set_scales(self.scales)

    # -- the stream ------------------------------------------------------------------------
    @property
    def harvested(self) -> int:
        return self._producer.harvested

    def _next_item(self) -> ActivationBatch | None:
        """The next model batch of this consumer's share (None: the data ran out)."""
        while True:
            item = self._producer.get()
            if item is None:
                return None
            if item.index < self.consumed or not self.src.share(item.index):
                continue  # a batch only the store needed, or another rank's
            self.consumed = item.index + 1
            return item

    def _take_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` further rows of the stream -> (rows [m, D], ids [m, 2]); m < n when it ends."""
        xs, ids, have = [], [], 0
        while have < n and not self.ended:
            n_left = self.tokens - self.taken
            if n_left <= 0:
                self.ended = True
                self._producer.satisfied.set()
                break
            if self.carry is None:
                item = self._next_item()
                if item is None:
                    self.ended = True
                    break
                self.carry = (item, 0)
            item, start = self.carry
            k = min(n - have, n_left, item.x.shape[0] - start)
            xs.append(item.x[start:start + k])
            ids.append(torch.stack([torch.full((k,), item.index, dtype=torch.int64),
                                    torch.arange(start, start + k, dtype=torch.int64)], 1))
            have += k
            self.taken += k
            self.carry = (item, start + k) if start + k < item.x.shape[0] else None
        if self.taken >= self.tokens:
            self._producer.satisfied.set()
        D = self.offsets[-1]
        if not xs:
            return torch.empty(0, D), torch.empty(0, 2, dtype=torch.int64)
        return torch.cat(xs), torch.cat(ids)

    def _first_fill(self) -> None:
        self.buf, self.ids = self._take_rows(self.capacity)
        if self.buf.shape[0] == 0:
            raise HarvestError("no activations harvested: the datasets gave no tokens")
        x64 = self.buf.double()
        self.first_fill_sums = [float(x64[:, a:b].norm(dim=1).sum()) for a, b in zip(self.offsets, self.offsets[1:])]
        self.first_fill_rows = int(self.buf.shape[0])
        self._start_round()

    def set_scales(self, scales: Sequence[float]) -> None:
        self.scales = [float(s) for s in scales]
        self._col = torch.repeat_interleave(torch.tensor(self.scales, dtype=torch.float32),
                                            torch.tensor(self.widths))

    # -- rounds ----------------------------------------------------------------------------
    def _order(self) -> torch.Tensor:
        """Round ``self.round``'s served slots: half the buffer in a keyed random order (all of
        it once fewer than 2 rows are left)."""
        n = self.buf.shape[0]
        g = torch.Generator().manual_seed(round_seed(self.seed, self.round, self.src.rank))
        perm = torch.randperm(n, generator=g)
        return perm[: n // 2 if n >= 2 else n]

    def _start_round(self) -> None:
        self.order, self.offset = self._order(), 0

    def _end_round(self) -> None:
        """Refill the slots this round served with the next rows; drop those left empty."""
        slots = self.order
        x, ids = self._take_rows(len(slots))
        m = x.shape[0]
        self.buf[slots[:m]] = x
        self.ids[slots[:m]] = ids
        if m < len(slots):  # the stream ended: the buffer drains
            keep = torch.ones(self.buf.shape[0], dtype=torch.bool)
            keep[slots[m:]] = False
            self.buf, self.ids = self.buf[keep], self.ids[keep]
        self.round += 1
        self._start_round()

    def __iter__(self) -> "BufferedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._col is None:
            raise RuntimeError("the normalisation scales are not set (set_scales after the first fill)")
        parts, ids, need = [], [], self.batch_size
        while need:
            if self.offset == len(self.order):
                if self.buf.shape[0] == 0:
                    raise HarvestError(f"the activation stream ran out after {self.taken} rows ({self.position} "
                                       f"batches of {self.batch_size}): give more data or fewer --steps")
                self._end_round()
                continue
            k = min(need, len(self.order) - self.offset)
            parts.append(self.buf[self.order[self.offset:self.offset + k]])  # a copy: refills cannot touch it
            ids.append(self.ids[self.order[self.offset:self.offset + k]])
            self.offset += k
            need -= k
        self.position += 1
        self.last_ids = torch.cat(ids)  # (model batch, row) of each row of this batch, for diagnostics
        x = torch.cat(parts) * self._col
        if len(set(self.widths)) == 1:
            return x.view(x.shape[0], len(self.widths), self.widths[0])
        return x

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors) that ``stream(..., state=)`` resumes from at ``position``."""
        st = {"position": self.position, "round": self.round, "offset": self.offset, "consumed": self.consumed,
              "carry": None if self.carry is None else [self.carry[0].index, self.carry[1]],
              "taken": self.taken, "ended": self.ended, "scales": self.scales, "buffer_rows": self.capacity,
              "tokens": self.tokens, "seed": self.seed, "batch_size": self.batch_size}
        return st, {"slots": self.ids.clone()}

    def _load_state(self, state: dict) -> dict[int, list]:
        st, tensors = state
        for key, have in (("buffer_rows", self.capacity), ("tokens", self.tokens), ("seed", self.seed),
                          ("batch_size", self.batch_size)):
            if st[key] != have:
                raise HarvestError(f"the checkpoint's buffer was made with {key} {st[key]}, this run has {have}")
        self.position, self.round, self.offset = st["position"], st["round"], st["offset"]
        self.consumed, self.taken, self.ended = st["consumed"], st["taken"], st["ended"]
        self.scales = st["scales"]
        self.ids = tensors["slots"].to(torch.int64).clone()
        self.buf = torch.empty(self.ids.shape[0], self.offsets[-1], dtype=torch.float32)
        self._carry_at = st["carry"]
        need: dict[int, list] = {}
        for b in torch.unique(self.ids[:, 0]).tolist():
            need[int(b)] = []
        if st["carry"] is not None:
            need.setdefault(int(st["carry"][0]), [])
        return need

    def _rebuild(self, need: dict[int, list]) -> None:
        """Rerun the models on the batches the buffer (and the carry) hold rows of, in order,
        and put their rows back in their slots."""
        batch_of, row_of = self.ids[:, 0], self.ids[:, 1]
        remaining = set(need)
        while remaining:  # every needed batch precedes ``consumed``: no training batch is read here
            item = self._producer.get()
            if item is None:
                raise HarvestError("the data changed since the checkpoint: the stream ended before "
                                   "the batches the buffer held")
            if item.index not in remaining:
                continue
            remaining.discard(item.index)
            slots = (batch_of == item.index).nonzero().flatten()
            self.buf[slots] = item.x[row_of[slots]]
            if self._carry_at is not None and self._carry_at[0] == item.index:
                self.carry = (item, int(self._carry_at[1]))
        self.order = self._order()

    def close(self, wait_for_sink: bool = False) -> None:
        self._producer.close(wait_for_sink)


class OnTheFlySource:
    """The models of a HarvestPlan, loaded once, and the streams drawn from them.

    ``rank`` / ``world``: under data parallelism each rank takes model batches
    ``rank, rank + world, ...`` (its own rows) and keeps its own buffer."""

    def __init__(self, plan: HarvestPlan, device: str, buffer_rows: int, tokens: int, rank: int = 0, world: int = 1):
        self.plan, self.device = plan, device
        self.buffer_rows, self.tokens = int(buffer_rows), int(tokens)
        self.rank, self.world = int(rank), int(world)
        self.lock = threading.Lock()
        self.caps = plan.load_models(device)

    def share(self, i: int) -> bool:
        return i % self.world == self.rank

    def whole(self) -> "OnTheFlySource":
        """A view of the same loaded models (and lock) as a world of one: its streams hold every
        model batch, so a data-parallel rank's evaluation reads what one process would. Close
        the source, not the view."""
        view = copy.copy(self)
        view.rank, view.world = 0, 1
        return view

    def queue_items(self, rows: int) -> int:
        """Model batches queued ahead: enough for half a buffer of rows (a refill) plus two."""
        per_item = max(1, self.plan.config["batch_size"] * (self.plan.config["context_length"] - 1))
        return max(4, math.ceil(rows / 2 / per_item) + 2)

    def stream(self, batch_size: int, seed: int, *, buffer_rows: int | None = None, tokens: int | None = None,
               scales: Sequence[float] | None = None, state=None, sink: StoreSink | None = None) -> BufferedBatches:
        """A buffered stream from the start of the data (or resumed from ``state``)."""
        return BufferedBatches(self, batch_size, seed, self.buffer_rows if buffer_rows is None else buffer_rows,
                               self.tokens if tokens is None else tokens, scales, state, sink)

    def close(self) -> None:
        for c in self.caps:
            c.remove()
        self.caps = []


def scales_from_sums(sums: Sequence[float], rows: int, widths: Sequence[int]) -> list[float]:
    """scale_i = sqrt(d_i) / (sums_i / rows), as a store's (1 for a source of norm 0)."""
    means = np.asarray(sums, dtype=np.float64) / max(int(rows), 1)
    return [float(math.sqrt(w) / m) if m > 0 else 1.0 for w, m in zip(widths, means)]
