"""Multi-GPU and multi-node training with ``torchrun`` and DistributedDataParallel.

``torchrun --nproc_per_node N -m cxr train ...`` starts N copies of the command; torchrun tells each its
place in the job through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`setup` joins that job: NCCL with one GPU per process (``cuda:LOCAL_RANK``) on
CUDA, gloo on the CPU. Outside torchrun every function here is a no-op, so the same code path trains
one process.

How the job divides the work, and why its numbers equal a single-process run's:

- Data: every rank draws the same seeded per-epoch permutation and takes ``perm[rank::world]``
  (``torch.utils.data.DistributedSampler``; single-process loaders use the same sampler with one
  replica). With ``batch_size / world`` samples per rank, the ranks' batch ``i`` together hold
  exactly the single-process batch ``i``.
- Gradients: DDP averages them over the ranks, so one step equals the single-process step on the
  global batch (as long as every rank's loss is a plain mean over the same number of samples).
- Metrics: each rank predicts its shard; :func:`gather_in_order` puts the shards back in dataset order
  and drops the padding, so every rank holds the whole split's predictions and takes the same
  early-stopping decision.
- Files: only rank 0 (:func:`is_main`) writes checkpoints, history, figures, metrics and logs.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_distributed() -> bool:
    """True once this process has joined a torchrun job (even a job of one process)."""
    return dist.is_available() and dist.is_initialized()


def setup(device: torch.device) -> torch.device:
    """Join the torchrun job this process belongs to, if any, and return the device this rank uses:
    ``cuda:LOCAL_RANK`` (NCCL) on GPUs, the CPU (gloo) otherwise. Idempotent; outside torchrun it
    returns ``device`` unchanged."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"Distributed training runs on CUDA GPUs (NCCL) or the CPU (gloo), not on {device.type}.")
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Ranks wait at a barrier while one process per node fills the image cache on the first run and
        # rank 0 audits the data or writes the report: give that an hour, not the 10 minutes NCCL allows.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown() -> None:
    """Leave the job (a no-op outside one)."""
    if is_distributed():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank: from the process group once joined, before that from torchrun's ``RANK``
    (so other ranks can stay quiet from the first line), 0 outside torchrun."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its node: the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of processes in the job (1 outside torchrun)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on each node's first process, then on the others: what the first writes (the
    decoded-image cache, one folder per node or a shared one) the others then only read. Every rank
    must enter the block."""
    first = local_rank() == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def per_rank_batch(batch_size: int) -> int:
    """The share of the global ``batch_size`` each rank trains on."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch; it must divide evenly over the "
                         f"{world} processes (for example {max(1, batch_size // world) * world}).")
    return batch_size // world


def rank_seed(seed: int, of_rank: int | None = None) -> int:
    """A seed for one rank's own random draws (augmentation, dropout; default: this process's rank):
    ranks must not draw the same crops for different images. Rank 0 keeps ``seed``, so a job of one
    process draws what the plain run draws."""
    return seed + 1_000_003 * (rank() if of_rank is None else of_rank)


def sum_across_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over every rank (unchanged in a single process)."""
    if not is_distributed():
        return list(tensors)
    summed = []
    for tensor in tensors:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        summed.append(tensor)
    return summed


def gather_in_order(shard: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a split from the ranks' shards. Rank ``r`` holds samples ``r, r + world, ...`` of
    the split padded to a multiple of ``world`` (``DistributedSampler`` without shuffling), so
    interleaving the shards restores the order and cutting at ``total`` drops the padding."""
    if not is_distributed():
        return shard
    shards = [torch.empty_like(shard) for _ in range(world_size())]
    dist.all_gather(shards, shard.contiguous())
    return torch.stack(shards, dim=1).flatten(0, 1)[:total]


def wrap(module: nn.Module, device: torch.device, trainable_blocks: int | str = "all") -> nn.Module:
    """``module`` in DistributedDataParallel (unchanged in a single process).

    The whole module is wrapped, not just the head: DDP buckets and all-reduces only parameters that
    require gradients, so for a frozen-backbone Classifier only the head is synchronised, while the
    forward pass stays the Classifier's own. With a wholly frozen backbone (``trainable_blocks=0``) DDP
    also stops re-sending the backbone's BatchNorm statistics from rank 0 before every step (a frozen
    backbone stays in eval mode, so its buffers never change; DDP makes them equal once, when it starts). When the head
    trains on cached features, ``module`` is the head alone. Checkpoints always take the unwrapped
    module's state dict (same keys as a single process), so they load into any number of processes.
    """
    if not is_distributed():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # newer torch spells broadcast_buffers forward_sync_buffers (and still synchronises buffers once, at start)
    sync_option = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=device_ids, **{sync_option: trainable_blocks != 0})
