"""A training data loader that a resumed run continues where the killed run stopped.

Detectron2's ``TrainingSampler`` restarts its index stream when a run is resumed, and the random
augmentations depend on how far the global RNG has advanced, so a resumed run sees other images
than an uninterrupted one would have. Here:

- the index stream is ``TrainingSampler``'s (the same shuffled epochs from the same seed, rank r
  taking every world-size-th index), and the seed is saved in the checkpoint;
- the augmentation RNG (``numpy.random`` and ``random``, which Detectron2's transforms use) is
  seeded for every sample from (seed, position of the sample in the global stream), so a sample's
  augmentation does not depend on the number of data-loader workers or on what came before;
- aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``) happens in the main process in
  stream order; on resume, the positions the first ``start_iter`` batches consumed are worked out
  from the images' sizes, and the samples that were waiting in the groups are loaded again.

So iteration i of a resumed run gets the batch iteration i of an uninterrupted run gets, with the
same augmentation. (One exception: an image the mapper cannot read is replaced by another one
drawn from the same seed; grouping on resume assumes the recorded size of the unreadable one.)
"""

import itertools
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "ResumableLoaderHook"]

logger = logging.getLogger(__name__)

MAX_FALLBACKS = 10


def _identity(x):
    return x


def _landscape(record: Dict) -> bool:
    # AspectRatioGroupedDataset's two groups: w > h, and the rest.
    return record["width"] > record["height"]


class _SampleLoader:
    """Maps (global position, index) to the mapper's output with a position-seeded RNG."""

    def __init__(self, dataset: DatasetFromList, mapper: Callable, seed: int):
        self.dataset, self.mapper, self.seed = dataset, mapper, seed

    def __call__(self, position: int, index: int) -> Dict:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            for attempt in range(MAX_FALLBACKS):
                seeds = np.random.SeedSequence([self.seed, position, attempt]).generate_state(2)
                np.random.seed(int(seeds[0]))
                random.seed(int(seeds[1]))
                if attempt > 0:  # the mapper could not use the sample: take another
                    index = random.randrange(len(self.dataset))
                data = self.mapper(self.dataset[index])
                if data is not None:
                    return data
                logger.warning(f"Sample {index} at stream position {position} skipped")
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        raise RuntimeError(
            f"The data mapper returned None for {MAX_FALLBACKS} samples in a row (stream position "
            f"{position}): check the dataset's files (the warnings above name them)."
        )


class _MappedStream(torchdata.IterableDataset):
    """The mapped samples of a stream of (position, index), split among data-loader workers."""

    def __init__(self, load: _SampleLoader, positions: Callable[[], Iterator[Tuple[int, int]]]):
        self.load, self.positions = load, positions

    def __iter__(self):
        info = torchdata.get_worker_info()
        stream = self.positions()
        if info is not None:
            stream = itertools.islice(stream, info.id, None, info.num_workers)
        for position, index in stream:
            yield self.load(position, index)


class ResumableTrainLoader:
    """An infinite iterable of batches (lists of mapped dicts) for ``SimpleTrainer``.

    Args:
        dataset_dicts: the training records (Detectron2's format, with "width" and "height").
        mapper: record -> model input dict (or None to skip the record).
        batch_size: images per batch of this process.
        aspect_ratio_grouping: batch landscape and portrait images separately (as Detectron2).
        num_workers: data-loader worker processes (0: load in this process).
        shuffle: shuffle every epoch (TrainingSampler's shuffle).
        seed: seed of the shuffle and the augmentations; default a random seed shared by all
            processes (as TrainingSampler). Saved in the checkpoint by :class:`ResumableLoaderHook`.

    Attributes:
        start_iter: the iteration the next ``iter()`` starts at (set on resume).
    """

    def __init__(
        self,
        dataset_dicts: List[Dict],
        mapper: Callable,
        *,
        batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: Optional[int] = None,
    ):
        if len(dataset_dicts) == 0:
            raise ValueError("ResumableTrainLoader got an empty dataset")
        self.landscape = [_landscape(d) for d in dataset_dicts]
        self.dataset = DatasetFromList(dataset_dicts, copy=False)
        self.mapper = mapper
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.start_iter = 0

    def state_dict(self) -> Dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: Dict) -> None:
        self.seed = int(state["seed"])

    def _global_indices(self) -> Iterator[int]:
        # TrainingSampler._infinite_indices.
        g = torch.Generator()
        g.manual_seed(self.seed)
        size = len(self.dataset)
        while True:
            if self.shuffle:
                yield from torch.randperm(size, generator=g).tolist()
            else:
                yield from range(size)

    def _rank_stream(self) -> Iterator[Tuple[int, int]]:
        """(global position, index) of this process's samples, in order."""
        stream = itertools.islice(self._global_indices(), self.rank, None, self.world_size)
        for local, index in enumerate(stream):
            yield local * self.world_size + self.rank, index

    def _resume_plan(self, start_iter: int) -> Tuple[int, Set[int]]:
        """After ``start_iter`` batches: (first local position not read yet, local positions read
        but still waiting in a group)."""
        if not self.aspect_ratio_grouping:
            return start_iter * self.batch_size, set()
        groups: List[List[int]] = [[], []]
        emitted, local = 0, 0
        stream = self._rank_stream()
        while emitted < start_iter:
            _, index = next(stream)
            group = groups[0 if self.landscape[index] else 1]
            group.append(local)
            local += 1
            if len(group) == self.batch_size:
                group.clear()
                emitted += 1
        return local, set(groups[0] + groups[1])

    def _positions(self, start_iter: int) -> Callable[[], Iterator[Tuple[int, int]]]:
        next_local, waiting = self._resume_plan(start_iter)

        def positions():
            for local, item in enumerate(self._rank_stream()):
                if local >= next_local or local in waiting:
                    yield item

        return positions

    def __iter__(self) -> Iterator[List[Dict]]:
        if self.start_iter:
            logger.info(
                f"Data order: continuing the training stream at iteration {self.start_iter}"
            )
        stream = _MappedStream(
            _SampleLoader(self.dataset, self.mapper, self.seed), self._positions(self.start_iter)
        )
        if self.num_workers > 0:
            stream = torchdata.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                worker_init_fn=worker_init_reset_seed,
            )
        groups: List[List[Dict]] = [[], []]
        for data in stream:
            group = groups[0 if (self.aspect_ratio_grouping and _landscape(data)) else 1]
            group.append(data)
            if len(group) == self.batch_size:
                batch = group[:]
                group.clear()
                yield batch


class ResumableLoaderHook(HookBase):
    """Saves the loader's seed in the checkpoint and starts its stream at the trainer's
    iteration (the resumed one) when training starts."""

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader

    def before_train(self):
        self.loader.start_iter = self.trainer.iter

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state_dict):
        self.loader.load_state_dict(state_dict)
