"""Batches from memory-mapped token shards, built ahead in a background thread, with a resumable position.

The unit is the optimizer step, not the process: each step draws one *global* batch of
`accum x world_size x batch_size` windows of `block_size + 1` tokens, and rank r takes, for micro-step m,
the windows [(m * world_size + r) * batch_size, ... + batch_size). The loader's state (a random generator's
state, or a cursor in the token stream) therefore does not depend on the number of processes: a run saved by
N processes resumes on M with the same token stream, nothing repeated or skipped, as long as the global
batch is the same. A step may ask for fewer micro-steps than `accum` (batch-size warmup): it then draws only
those windows, so no data is skipped, and is built inline, since the background thread builds full steps.

    random      windows start anywhere (uniform over every valid start in every shard)
    sequential  consecutive windows sweep the concatenated shards; an epoch ends when a step no longer fits

Data with a loss mask (chat data) is read in packed windows instead (data/packing.py): whole conversations
placed best fit, so "anywhere" becomes any packed window and the sweep goes window by window. Targets the
mask leaves out are -1, which the loss ignores.

With `streams` (recurrent models, whose hidden state is carried from one window to the next), sequential
cuts the stream into one lane per global row instead: row j of every step reads the window that follows
row j's window of the step before, and an epoch ends at the end of a lane.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from gptforge.data.packing import Packed, document_bounds, pack
from gptforge.data.shards import ShardInfo, open_shard, read_header
from gptforge.errors import DataError


@dataclass(frozen=True)
class Layout:
    block_size: int
    batch_size: int  # sequences per process per micro-step
    accum: int  # micro-steps per optimizer step
    rank: int = 0
    world_size: int = 1

    @property
    def global_windows(self) -> int:
        return self.accum * self.world_size * self.batch_size


class TokenStream:
    """The shards as one stream of tokens; windows may cross shard boundaries in sequential mode."""

    def __init__(self, shards: list[ShardInfo]):
        if not shards:
            raise DataError("no token shards to read")
        self.arrays = [open_shard(s.path) for s in shards]
        self.names = [str(s.path) for s in shards]
        self.sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.total = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated stream."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right") - 1)
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, int(self.sizes[shard]) - offset)
            out[filled : filled + take] = self.arrays[shard][offset : offset + take]
            filled += take
            shard += 1
        return out


def masked_stream(shards: list[ShardInfo]) -> TokenStream | None:
    """The loss masks of `shards` as one stream, or None when they have none (text data)."""
    if not any(s.mask for s in shards):
        return None
    if not all(s.mask for s in shards):
        raise DataError("some shards have a loss mask and some do not; prepare the data again")
    return TokenStream([read_header(s.mask) for s in shards])


def pack_stream(stream: TokenStream, eot_id: int, window: int) -> Packed:
    """The packed windows of a stream whose documents each begin with eot_id."""
    boundaries = np.concatenate([np.flatnonzero(np.asarray(a) == eot_id) + int(o)
                                 for a, o in zip(stream.arrays, stream.starts[:-1])])
    return pack(*document_bounds(boundaries, stream.total), window)


def packed_rows(stream: TokenStream, masks: TokenStream, packed: Packed, indices, eot_id: int) -> np.ndarray:
    """(len(indices), window) token rows of packed windows, with -1 - token where the mask is 0 and
    padding after the documents (decode with `split_rows`)."""
    rows = np.full((len(indices), packed.window), -1 - eot_id, dtype=np.int64)
    for r, i in enumerate(indices):
        at = 0
        for start, n in packed.pieces(int(i)):
            tokens, mask = stream.read(start, n), masks.read(start, n)
            rows[r, at:at + n] = np.where(mask > 0, tokens, -1 - tokens)
            at += n
    return rows


def split_rows(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of rows (B, T + 1) from packed_rows or plain reads: inputs are the tokens, targets the next
    tokens with -1 where a target is masked out."""
    tokens = torch.where(data < 0, -1 - data, data)  # (B, T + 1)
    y = torch.where(data[:, 1:] < 0, -1, data[:, 1:])
    return tokens[:, :-1], y


class TokenLoader:
    """Training batches for one process. `next_step()` returns its `accum` micro-batches (x, y) on device."""

    def __init__(
        self,
        shards: list[ShardInfo],
        layout: Layout,
        *,
        mode: str = "random",
        seed: int = 0,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        state: dict | None = None,
        eot_id: int | None = None,
        streams: bool = False,
    ):
        self.stream = TokenStream(shards)
        self.masks = masked_stream(shards)
        self.streams = streams and mode == "sequential"
        self.layout = layout
        self.mode = mode
        self.device = torch.device(device)
        self.prefetch = prefetch
        self._pin = self.device.type == "cuda"
        T = layout.block_size
        self.packed = None
        if self.masks is not None:
            if eot_id is None:
                raise ValueError("data with a loss mask is packed by document: the loader needs eot_id")
            self.eot_id = eot_id
            self.packed = pack_stream(self.stream, eot_id, T + 1)
            if mode == "sequential" and self.packed.windows < layout.global_windows:
                raise DataError(f"the conversations fill {self.packed.windows} windows of {T + 1} tokens, fewer "
                                f"than one optimizer step needs ({layout.global_windows}); use a smaller batch")
            self._rng = np.random.Generator(np.random.PCG64(seed))
            self._cursor, self._epoch = 0, 0
        elif mode == "random":
            # A window of T+1 tokens starting at s lies inside its shard when s <= size - (T+1).
            self._valid = np.maximum(self.stream.sizes - T, 0)
            self._valid_starts = np.concatenate([[0], np.cumsum(self._valid)])
            if self._valid_starts[-1] == 0:
                raise DataError(
                    f"training shards are too short: no shard holds {T + 1} tokens (model.block_size + 1); "
                    f"largest has {int(self.stream.sizes.max())}. Use more data or a smaller model.block_size"
                )
            self._rng = np.random.Generator(np.random.PCG64(seed))
        elif mode == "sequential":
            need = layout.global_windows * T + 1
            if self.stream.total < need:
                raise DataError(
                    f"training data holds {self.stream.total} tokens, fewer than one optimizer step needs "
                    f"({layout.global_windows} windows x {T} + 1 = {need}); use more data or a smaller batch"
                )
            self._cursor, self._epoch = 0, 0
        else:
            raise ValueError(f"unknown loader mode {mode!r}")
        if state is not None:
            self._load(state)
        self._state = self._snapshot()  # position after the last step handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- position --------------------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        if self.mode == "random":
            return {"mode": "random", "rng": self._rng.bit_generator.state}
        return {"mode": "sequential", "cursor": self._cursor, "epoch": self._epoch}

    def _load(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise DataError(f"saved loader position is for data.loader={state.get('mode')}, this run uses {self.mode}")
        if self.mode == "random":
            self._rng.bit_generator.state = state["rng"]
        else:
            self._cursor, self._epoch = int(state["cursor"]), int(state["epoch"])

    def state_dict(self) -> dict:
        """Position after the last step returned by next_step() (batches built ahead are not counted)."""
        return dict(self._state)

    @property
    def epoch(self) -> int:
        return self._epoch if self.mode == "sequential" else 0

    # -- building batches ------------------------------------------------------------------------------

    def _global_starts(self, accum: int) -> np.ndarray:
        """Start positions (in the concatenated stream) of a step's global windows; advances the position."""
        n, T = accum * self.layout.world_size * self.layout.batch_size, self.layout.block_size
        if self.packed is not None:  # window indices
            if self.mode == "random":
                return self._rng.integers(0, self.packed.windows, size=n)
            if self._cursor + n > self.packed.windows:
                self._cursor, self._epoch = 0, self._epoch + 1
            self._cursor += n
            return np.arange(self._cursor - n, self._cursor, dtype=np.int64)
        if self.mode == "random":
            picks = self._rng.integers(0, self._valid_starts[-1], size=n)
            shard = np.searchsorted(self._valid_starts, picks, side="right") - 1
            return self.stream.starts[shard] + (picks - self._valid_starts[shard])
        if self.streams:  # lane j is [j * lane, (j + 1) * lane) of the stream; the cursor runs along every lane
            lane = (self.stream.total - 1) // n // T * T
            if self._cursor + T > lane:
                self._cursor, self._epoch = 0, self._epoch + 1
            starts = self._cursor + np.arange(n, dtype=np.int64) * lane
            self._cursor += T
            return starts
        if self._cursor + n * T + 1 > self.stream.total:
            self._cursor, self._epoch = 0, self._epoch + 1
        starts = self._cursor + np.arange(n, dtype=np.int64) * T
        self._cursor += n * T
        return starts

    def _build_step(self, accum: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
        L = self.layout
        starts = self._global_starts(accum)
        batches = []
        for m in range(accum):
            first = (m * L.world_size + L.rank) * L.batch_size
            picked = starts[first : first + L.batch_size]
            if self.packed is not None:
                rows = packed_rows(self.stream, self.masks, self.packed, picked, self.eot_id)
            else:
                rows = np.stack([self.stream.read(int(s), L.block_size + 1) for s in picked])
            data = torch.from_numpy(rows)
            if self._pin:
                data = data.pin_memory()
            batches.append(split_rows(data) if self.packed is not None else (data[:, :-1], data[:, 1:]))
        return batches, self._snapshot()

    def _worker(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._build_step(self.layout.accum)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._queue.put(e)

    def next_step(self, micro_steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches: layout.accum of them, or `micro_steps` (1..accum) for a smaller step,
        which is built inline; the background thread starts with the first full step and must not have
        started before any smaller one (batch-size warmup only shrinks the first steps)."""
        accum = self.layout.accum if micro_steps is None else micro_steps
        if not 1 <= accum <= self.layout.accum:
            raise ValueError(f"micro_steps={micro_steps}: expected 1..{self.layout.accum}")
        if self.prefetch == 0 or accum < self.layout.accum:
            if self._thread is not None:
                raise ValueError("a step of fewer micro-batches after full steps were built ahead")
            batches, self._state = self._build_step(accum)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._worker, name="gptforge-loader", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batches, self._state = item
        nb = self._pin
        return [(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)) for x, y in batches]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def val_batches(
    shards: list[ShardInfo], block_size: int, batch_size: int, eval_tokens: int, rank: int = 0, world_size: int = 1,
    eot_id: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation subset: the first eval_tokens of the val stream in windows, strided over ranks
    (packed windows of whole conversations for chat data, whose loss counts only the masked-in targets).

    Every rank gets the same number of windows (sharded models need every process in every forward).
    """
    stream = TokenStream(shards)
    masks = masked_stream(shards)
    if masks is not None:
        return _packed_val(stream, masks, block_size, batch_size, eval_tokens, rank, world_size, eot_id)
    fits = (stream.total - 1) // block_size // world_size * world_size
    if fits < world_size:
        raise DataError(
            f"validation split holds {stream.total} tokens, fewer than one sequence (model.block_size + 1 = "
            f"{block_size + 1}) per process; prepare with a larger --val-fraction or use a smaller model.block_size"
        )
    n = max(world_size, min(eval_tokens // block_size // world_size * world_size, fits))
    rows = [stream.read(i * block_size, block_size + 1) for i in range(rank, n, world_size)]
    batches = []
    for i in range(0, len(rows), batch_size):
        data = torch.from_numpy(np.stack(rows[i : i + batch_size]))
        batches.append((data[:, :-1], data[:, 1:]))
    return batches


def _packed_val(stream: TokenStream, masks: TokenStream, block_size: int, batch_size: int, eval_tokens: int,
                rank: int, world_size: int, eot_id: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if eot_id is None:
        raise ValueError("data with a loss mask is packed by document: val_batches needs eot_id")
    packed = pack_stream(stream, eot_id, block_size + 1)
    fits = packed.windows // world_size * world_size
    if fits < world_size:
        raise DataError(f"the validation conversations fill {packed.windows} windows, fewer than one per process")
    n = max(world_size, min(eval_tokens // block_size // world_size * world_size, fits))
    indices = list(range(rank, n, world_size))
    return [split_rows(torch.from_numpy(packed_rows(stream, masks, packed, indices[i:i + batch_size], eot_id)))
            for i in range(0, len(indices), batch_size)]
