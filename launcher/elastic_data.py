"""The training data of an elastic run: one order per epoch, cut by the worker count.

Every worker group, whatever its size, reads the same sequence of examples in an epoch: the
rows of the training split ordered by row_id, permuted with (train.seed, epoch). Micro-step m of
the epoch takes the next world_size x batch_size examples of that sequence, worker r the r-th
batch_size of them. The data position is then one number, the examples of the epoch consumed,
and a group of another size goes on from exactly there: no example is skipped, and only those
read since the newest checkpoint are read again.

The price: each worker holds the whole tokenized training split (a fixed-size run streams its
own shard instead), and an epoch uses whole micro-steps only (fewer than world_size x
batch_size examples, different ones each epoch, wait for the next).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from launcher.collate import collate


def micro_steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Whole micro-steps of world_size x batch_size examples in an epoch."""
    return num_rows // (batch_size * world_size)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Positions of the rows (ordered by row_id) in the order the epoch reads them."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def worker_batches(
    num_rows: int, batch_size: int, world_size: int, rank: int, start: int
) -> Iterator[tuple[int, int]]:
    """(start, stop) in the epoch order of this worker's micro-batches, from micro-step `start`
    to the last whole one."""
    for step in range(start, micro_steps_per_epoch(num_rows, batch_size, world_size)):
        first = (step * world_size + rank) * batch_size
        yield first, first + batch_size


def rows_by_id(shard) -> pa.Table:
    """The whole training split from a Ray Train dataset iterator, ordered by row_id (the
    order Ray Data hands blocks over in is not fixed)."""
    blocks = [b for b in shard.iter_batches(batch_format="pyarrow", batch_size=None) if len(b)]
    table = pa.concat_tables(blocks) if blocks else pa.table({"row_id": pa.array([], pa.int64())})
    return table.sort_by("row_id")


def epoch_batches(
    table: pa.Table,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    world_size: int,
    rank: int,
    start: int,
    pad_token_id: int,
    device: Any,
) -> Iterator[dict[str, Any]]:
    """This worker's collated batches of the epoch from micro-step `start` on, on `device`."""
    from ray.data.block import BlockAccessor

    order = epoch_order(len(table), seed, epoch)
    for first, stop in worker_batches(len(table), batch_size, world_size, rank, start):
        rows = table.take(pa.array(order[first:stop]))
        batch = collate(BlockAccessor.for_block(rows).to_batch_format("numpy"), pad_token_id)
        yield {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
