"""A resumable, sync-group-aware, infinite distributed batch sampler.

Why a batch sampler of our own:

* **Resumable.** Every batch has a global position ``g`` (0, 1, 2, ... counted per data replica). The batches of an
  epoch are a pure function of ``(seed, epoch)``, so a checkpoint only stores ``g`` and a resumed run continues with
  exactly the batches the uninterrupted run would have read, with no RNG state to carry.
* **Sync groups.** With ``video_sync_group = k`` the ranks of one group must read the same clip (autoregressive
  training spreads the temporal units of one clip over the group). The sampler is built with
  ``num_replicas = world // k`` and ``replica = rank // k``, so the ranks of a group get identical index lists.
* **Equal-shape batches.** Optional ``group_keys`` (e.g. the latent frame count of each clip, or an image's
  aspect-ratio bucket) make every batch come from one key, so samples can be stacked without resizing. Incomplete
  batches are dropped per key, and every replica gets the same number of batches per epoch (otherwise ranks would
  wait on each other forever in the collective ops of a sharded step).
* **Epoch-keyed items** (``with_epoch=True``): each index comes as ``(epoch, index)``, so a dataset whose item has
  a random part (the t2i random crop) can draw it from ``(seed, epoch, index)``: a new draw every epoch, the same in
  a resumed run, and the same whichever DataLoader worker reads it.
* **Infinite.** Training is counted in optimizer steps (the reference's ``epochs * iters_per_epoch``), so the
  sampler walks epoch after epoch (position ``g`` is batch ``g % batches_per_epoch`` of epoch
  ``g // batches_per_epoch``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler:
    """Yields lists of dataset indices forever, starting at global batch position ``start_batch``.

    Args:
        num_samples: dataset length.
        batch_size: samples per batch (per rank).
        num_replicas: number of distinct data streams (``world_size // video_sync_group``).
        replica: this rank's stream (``rank // video_sync_group``).
        seed: base seed; epoch ``e`` is shuffled with ``numpy.random.default_rng([seed, e])``.
        shuffle: shuffle samples and batch order each epoch (False: natural order, handy for tests).
        group_keys: optional per-sample key; a batch only mixes samples with equal keys.
        start_batch: first global position to yield (the data position restored from a checkpoint).
        with_epoch: yield ``(epoch, index)`` pairs instead of indices (see the module docstring).
    """

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int = 1, replica: int = 0,
                 seed: int = 0, shuffle: bool = True, group_keys: Optional[Sequence[Hashable]] = None,
                 start_batch: int = 0, with_epoch: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica {replica} outside [0, {num_replicas})")
        if group_keys is not None and len(group_keys) != num_samples:
            raise ValueError(f"group_keys has {len(group_keys)} entries but the dataset has {num_samples} samples")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.replica = replica
        self.seed = seed
        self.shuffle = shuffle
        self.group_keys = list(group_keys) if group_keys is not None else None
        self.start_batch = start_batch
        self.with_epoch = with_epoch

        if self.group_keys is None:
            total = num_samples // batch_size
        else:
            counts: dict[Hashable, int] = {}
            for key in self.group_keys:
                counts[key] = counts.get(key, 0) + 1
            total = sum(c // batch_size for c in counts.values())
        self.batches_per_epoch = total // num_replicas
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"not enough data for one batch per data stream: {num_samples} samples, batch_size {batch_size}, "
                f"{num_replicas} data streams (world_size // video_sync_group)"
                + ("" if self.group_keys is None else ", counting only full batches of equal group key")
                + "; add samples, lower the batch size or use fewer processes")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This replica's batches of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        if self.group_keys is None:
            buckets = [order]
        else:
            by_key: OrderedDict[Hashable, list[int]] = OrderedDict()
            for idx in order.tolist():
                by_key.setdefault(self.group_keys[idx], []).append(idx)
            buckets = [np.asarray(v) for v in by_key.values()]
        batches = []
        for bucket in buckets:
            full = len(bucket) // self.batch_size * self.batch_size
            batches.extend(bucket[i:i + self.batch_size].tolist() for i in range(0, full, self.batch_size))
        if self.shuffle and self.group_keys is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        mine = batches[self.replica::self.num_replicas]
        return mine[:self.batches_per_epoch]

    def __iter__(self) -> Iterator[list]:
        position = self.start_batch
        while True:
            epoch, offset = divmod(position, self.batches_per_epoch)
            for batch in self.epoch_batches(epoch)[offset:]:
                yield [(epoch, i) for i in batch] if self.with_epoch else batch
            position = (epoch + 1) * self.batches_per_epoch

    def state_dict(self) -> dict:
        """What a resume must agree on (the position itself is stored by the trainer)."""
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "num_replicas": self.num_replicas,
                "seed": self.seed, "shuffle": self.shuffle, "batches_per_epoch": self.batches_per_epoch}
