"""ResumableTrainLoader with several processes (each rank's share of the stream, and after resume
the batches of an uninterrupted multi-process run) and with a mapper that returns None (the
fallback sample, the error after the limit). The single-process resume is in test_robustness.py.

Ranks are simulated in one process (``comm.get_rank`` / ``get_world_size`` patched): the loader
reads them once, at construction, and communicates with no other process when it has a seed.
"""

import itertools
import logging

import numpy as np
import pytest
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from sparse_rcnn import resumable_loader
from sparse_rcnn.resumable_loader import MAX_FALLBACKS, ResumableTrainLoader

SEED, BATCH = 7, 3


def position_mapper(dataset_dict):
    """The sample and its augmentation randomness (numpy's RNG, seeded per stream position)."""
    return {**dataset_dict, "draw": float(np.random.rand())}


def sizes_dataset(n=11):
    # Landscape and portrait images mixed, so that aspect-ratio grouping holds samples back.
    return [{"file_name": f"{i}", "width": 40 if i % 3 else 20, "height": 30} for i in range(n)]


def batches(loader, count):
    return [
        [(d["file_name"], d["draw"]) for d in batch] for batch in itertools.islice(loader, count)
    ]


def as_rank(monkeypatch, rank, world_size):
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)


def make_loader(monkeypatch, rank, world_size, mapper=position_mapper, **kwargs):
    as_rank(monkeypatch, rank, world_size)
    kwargs = {"batch_size": BATCH, "aspect_ratio_grouping": False, "seed": SEED, **kwargs}
    return ResumableTrainLoader(sizes_dataset(), mapper, **kwargs)


def test_each_rank_reads_its_share_of_the_training_sampler_stream(monkeypatch):
    per_rank = {}
    for rank in range(2):
        per_rank[rank] = batches(make_loader(monkeypatch, rank, 2), 6)
        # Detectron2's TrainingSampler of that rank, from the same seed: the same indices.
        sampler = TrainingSampler(11, shuffle=True, seed=SEED)  # reads the patched rank
        indices = list(itertools.islice(iter(sampler), 6 * BATCH))
        assert [int(name) for batch in per_rank[rank] for name, _ in batch] == indices
    # Together the two ranks read what one process reads, sample for sample with the same
    # augmentation: rank r's k-th sample is the single process's sample 2k + r.
    single = [s for batch in batches(make_loader(monkeypatch, 0, 1), 12) for s in batch]
    rank0, rank1 = ([s for batch in per_rank[r] for s in batch] for r in range(2))
    assert [s for pair in zip(rank0, rank1) for s in pair] == single
    # 18 + 18 samples cover the 11 images of every epoch, each epoch in another order.
    epochs = [[int(name) for name, _ in single[11 * e : 11 * e + 11]] for e in range(3)]
    assert all(sorted(e) == list(range(11)) for e in epochs) and epochs[0] != epochs[1]


@pytest.mark.parametrize("grouping", [True, False])
def test_resumed_ranks_continue_the_uninterrupted_multi_process_run(monkeypatch, grouping):
    for rank in range(2):
        uninterrupted = batches(
            make_loader(monkeypatch, rank, 2, aspect_ratio_grouping=grouping), 10
        )
        if grouping:  # every batch is all landscape or all portrait
            assert all(len({int(n) % 3 == 0 for n, _ in batch}) == 1 for batch in uninterrupted)
        for start in (1, 4, 7):
            resumed = make_loader(monkeypatch, rank, 2, aspect_ratio_grouping=grouping)
            resumed.start_iter = start
            assert batches(resumed, 10 - start) == uninterrupted[start:], (rank, start)
        # Data-loader workers do not change a rank's stream either.
        workers = make_loader(monkeypatch, rank, 2, aspect_ratio_grouping=grouping, num_workers=2)
        assert batches(workers, 10) == uninterrupted


class SkippingMapper:
    """``position_mapper`` that returns None for the named files, counting its calls."""

    def __init__(self, unreadable):
        self.unreadable, self.calls = set(unreadable), 0

    def __call__(self, dataset_dict):
        self.calls += 1
        return (
            None if dataset_dict["file_name"] in self.unreadable else position_mapper(dataset_dict)
        )


def test_a_sample_the_mapper_skips_is_replaced_by_a_fallback_from_the_same_seed(
    monkeypatch, caplog
):
    reference = batches(make_loader(monkeypatch, 0, 1), 8)
    with caplog.at_level(logging.WARNING, logger=resumable_loader.__name__):
        skipped = batches(make_loader(monkeypatch, 0, 1, SkippingMapper({"4"})), 8)
    flat_ref = [s for batch in reference for s in batch]
    flat = [s for batch in skipped for s in batch]
    positions = [p for p, (name, _) in enumerate(flat_ref) if name == "4"]
    assert len(positions) == 2 and all(len(batch) == BATCH for batch in skipped)
    # Only the positions of image 4 change: each takes another image, with that attempt's draw.
    assert "4" not in [name for name, _ in flat]
    for p, (got, want) in enumerate(zip(flat, flat_ref)):
        assert (got != want) == (p in positions), p
    for p in positions:
        assert f"Sample 4 at stream position {p} skipped" in caplog.text
    # The fallback is part of the stream: a resumed run and data-loader workers get it too.
    resumed = make_loader(monkeypatch, 0, 1, SkippingMapper({"4"}))
    resumed.start_iter = 3
    assert batches(resumed, 5) == skipped[3:]
    workers = make_loader(monkeypatch, 0, 1, SkippingMapper({"4"}), num_workers=2)
    assert batches(workers, 8) == skipped


def test_a_mapper_that_always_returns_none_stops_after_the_limit(monkeypatch):
    mapper = SkippingMapper({d["file_name"] for d in sizes_dataset()})
    loader = make_loader(monkeypatch, 0, 1, mapper)
    with pytest.raises(RuntimeError, match=rf"returned None for {MAX_FALLBACKS} samples in a row"):
        next(iter(loader))
    assert mapper.calls == MAX_FALLBACKS
