"""Training samplers: the order of an epoch comes from (seed, epoch) alone, ranks split it,
and a resumed epoch starts after what was already trained on."""

from __future__ import annotations

import torch

from moelab.data.digits import DigitsDataModule
from moelab.data.sampling import RandomWindowSampler, ShuffleSampler


def test_shuffle_order_is_a_function_of_seed_and_epoch_only():
    sampler = ShuffleSampler(50, seed=3)
    torch.manual_seed(0)
    epoch0 = list(sampler)
    torch.manual_seed(1)  # the global RNG plays no part
    assert list(sampler) == epoch0 and sorted(epoch0) == list(range(50))
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(50))
    assert list(ShuffleSampler(50, seed=4)) != epoch0


def test_ranks_split_each_epoch_like_distributed_sampler():
    ranks = [ShuffleSampler(11, seed=0, num_replicas=3, rank=r) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [4, 4, 4]  # 11 padded to 12 by wrapping round
    assert set(sum(shares, [])) == set(range(11))
    windows = [list(RandomWindowSampler(100, 5, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    both = torch.randint(100, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    assert windows == [both[0::2], both[1::2]]


def test_resume_skips_the_trained_part_of_that_epoch_only():
    sampler = ShuffleSampler(20, seed=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume(2, 8)
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole  # one pass only
    sampler.resume(2, 8)
    sampler.set_epoch(3)  # Lightning moved on: the skip was for epoch 2
    assert len(list(sampler)) == 20


def test_loaders_never_draw_from_the_global_rng():
    data = DigitsDataModule(batch_size=100)
    data.setup()
    state = torch.get_rng_state()
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), state)


def test_a_restored_position_starts_the_training_loader_at_the_next_batch():
    """A datamodule given the checkpointed position (epoch 1, 3 batches done) builds a
    training loader whose first batch is batch 4 of epoch 1 of an uninterrupted run, and
    which then goes on as that epoch did."""
    data = DigitsDataModule(batch_size=32)
    data.setup()
    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)
    whole = list(loader)
    resumed = DigitsDataModule(batch_size=32)
    resumed.setup()
    resumed.load_state_dict({"epoch": 1, "batches_done": 3})
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)  # as Lightning does at the epoch's start
    rest = list(loader)
    assert len(rest) == len(whole) - 3
    for (images, labels), (want_images, want_labels) in zip(rest, whole[3:]):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)
