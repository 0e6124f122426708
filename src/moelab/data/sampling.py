"""Training samplers that resume exactly: the order of every epoch comes from (seed, epoch)
through `set_epoch`, never from the global RNG, and a run stopped mid-epoch continues with
the batch it would have seen next.

Lightning calls `set_epoch` on a training sampler at the start of every epoch. The
samplers here subclass `DistributedSampler`, so Lightning does not wrap them in one of its
own under DDP/FSDP: each rank takes its share itself (`num_replicas`, `rank`). A
datamodule that uses them inherits `ResumableDataModule`, whose `state_dict` (saved in
every checkpoint) records where training stands in the epoch, and whose `load_state_dict`
makes the next training sampler skip what was already trained on.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit hook registered before ours: see end_loader_workers
import os
import signal
from functools import partial
from typing import Callable, Iterator

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from moelab.moe.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer per (seed, epoch) pair, for torch generators."""
    return (seed * 1_000_003 + epoch) % (2**63)


class ResumableSampler(DistributedSampler):
    """Base: this rank's indices for an epoch (`epoch_indices`), from (seed, epoch) only.

    `resume(epoch, skip)` makes the next pass over `epoch` start after its first `skip`
    indices; passes over other epochs are whole. `generator` is reseeded from (seed, epoch)
    by `set_epoch`: give it to the DataLoader (`generator=sampler.generator`) so the
    loader's worker seeds follow the epoch too instead of drawing from the global RNG.
    """

    def __init__(self, num_items: int, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ wants a process group or a dataset; set its fields directly.
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in a world of {num_replicas}")
        self.num_items, self.num_samples, self.seed = num_items, num_samples, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.total_size = num_samples * num_replicas
        self.shuffle, self.drop_last = True, False
        self.generator = torch.Generator().manual_seed(epoch_seed(seed, 0))
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def resume(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self._resume = (epoch, skip) if skip > 0 else None

    def epoch_indices(self) -> list[int]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
        self._resume = None
        return iter(indices)


class ShuffleSampler(ResumableSampler):
    """A permutation of all items per epoch, seeded by (seed, epoch); rank r takes every
    world-th item from r, the list first padded by wrapping round so ranks get equal shares
    (DistributedSampler's rule)."""

    def __init__(self, num_items: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(num_items, -(-num_items // num_replicas), seed, num_replicas, rank)

    def epoch_indices(self) -> list[int]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        order = order.tolist()
        order += order[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]


class RandomWindowSampler(ResumableSampler):
    """`num_samples` window indices per epoch for this rank, drawn uniformly with
    replacement: world × num_samples draws from a generator seeded by (seed, epoch), rank r
    taking every world-th from r. One process draws what rank 0 of a one-rank world would,
    so a run's windows do not depend on anything but (seed, epoch, rank, world)."""

    def epoch_indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.randint(self.num_items, (self.total_size,), generator=generator)
        return draws[self.rank :: self.num_replicas].tolist()


def world_of(trainer: L.Trainer | None) -> tuple[int, int]:
    """(world size, global rank) of the trainer's run; (1, 0) outside a trainer."""
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def training_position(trainer: L.Trainer) -> tuple[int, int]:
    """(epoch, training batches of that epoch already done) at this moment of a fit.

    Read from Lightning's progress counters, which its own checkpoints restore: the epoch
    Lightning passes to `set_epoch`, and the batches whose optimizer step has run. Once an
    epoch's batches are all done, or Lightning has closed the epoch (max_steps, should_stop),
    the position is the start of the next epoch, which is where Lightning resumes.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    batches_done = fit_loop.epoch_loop.batch_progress.current.processed
    epoch_closed = epochs.processed == epochs.started
    if epoch_closed or batches_done >= trainer.num_training_batches:
        return epochs.started, 0
    return epochs.processed, batches_done


class ResumableDataModule(L.LightningDataModule):
    """A datamodule whose training loader is built with `training_loader(...)`: its
    checkpointed state is the training position, and a resumed fit's first training
    pass skips the batches the checkpointed run had already trained on."""

    def __init__(self) -> None:
        super().__init__()
        self._resume_position: tuple[int, int] | None = None
        self._training_loader_built = False

    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.num_training_batches == float("inf"):
            return {}
        epoch, batches = training_position(trainer)
        return {"epoch": epoch, "batches_done": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "epoch" not in state_dict:
            return
        self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
        if self._training_loader_built and self.trainer is not None:
            # Sharded strategies restore after setup, when the training loader was already
            # built (to count the steps the LR schedule needs) and maybe already iterated by
            # workers: drop it, so the fit builds it anew at the resumed position.
            self.trainer.fit_loop._combined_loader = None

    def training_loader(
        self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, num_workers: int, drop_last: bool = False,
        collate_fn: Callable | None = None,
    ) -> DataLoader:
        """The training DataLoader over `sampler`, placed at the resumed position if any."""
        self._training_loader_built = True
        if self._resume_position is not None:
            epoch, batches_done = self._resume_position
            sampler.resume(epoch, batches_done * batch_size)
            self._resume_position = None
        return TrainingLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
            generator=sampler.generator, worker_init_fn=partial(init_worker, rank=sampler.rank), collate_fn=collate_fn,
        )


class TrainingLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch. Its position is kept by the datamodule
    (`ResumableDataModule`), restored before any loader is iterated; these two methods let
    Lightning see that the loader resumes (it warns about loaders that do not)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def end_loader_workers() -> None:
    """End the workers of every DataLoader iterator still alive, at once. Called when a run
    ends with an exception (its loaders are done with, but their iterators live on in the
    exception's frames), and at exit. Workers ignore SIGTERM (init_worker), and both torch's
    shutdown of an iterator and multiprocessing's exit hook fall back on SIGTERM and then
    join: a run that stops while a loader's workers wait (an unreadable image found in
    validation, say) would hang there. So each worker is killed, after its pid is taken out
    of torch's SIGCHLD watch (which would otherwise report the kill as a crash), and the
    iterator marked as shut down. Registered after multiprocessing's own exit hook, so it
    runs first: that hook is registered when `multiprocessing.util` is first imported, which
    the first Process does lazily, after this module, unless it is imported above."""
    import gc

    from torch.utils.data._utils import signal_handling
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for iterator in [o for o in gc.get_objects() if issubclass(type(o), _MultiProcessingDataLoaderIter)]:
        if getattr(iterator, "_shutdown", True):
            continue
        if getattr(iterator, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
            worker.join()
        iterator._shutdown = True


atexit.register(end_loader_workers)


def init_worker(worker_id: int, rank: int = 0) -> None:
    """Loader workers ignore SIGINT and SIGTERM: Ctrl+C or a scheduler's SIGTERM reaches the
    whole process group, and a worker that died of it would break the clean stop of the main
    process (which shuts its workers down itself). Then Lightning's worker seeding, if on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id, rank)


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, trainer: L.Trainer | None) -> DataLoader:
    """A sequential DataLoader that never draws from the global RNG (its worker seeds come
    from its own generator), so evaluating does not shift the training run's random streams.
    Lightning splits it over the ranks."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=partial(init_worker, rank=world_of(trainer)[1]),
    )


def check_loader_args(batch_size: object, num_workers: object, batch_size_key: str = "data.batch_size") -> None:
    """One-line errors for batch sizes and worker counts a DataLoader would reject deep inside."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"{batch_size_key}={batch_size} must be a positive integer")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be an integer >= 0 (0: load in the main process)")
