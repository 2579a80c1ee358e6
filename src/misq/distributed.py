"""Several GPUs (or CPU processes) through ``torch.distributed``, launched with ``torchrun``.

    torchrun --standalone --nproc-per-node 4 -m misq compress MODEL c4 ...

Every rank holds the whole model on the host and moves one decoder layer at a time to its own
device, as the single-process driver does. What is split:

* the calibration windows: rank r keeps a contiguous slice of them (:meth:`Dist.shard`) and runs
  only its own forward passes (layer-0 capture, the passes up to each step's input, the final
  pass of the compressed layer);
* the Hessian: each rank accumulates H_r = 2/n_r Σ xxᵀ over its n_r windows (the running-mean
  form of :class:`~misq.algorithms.sparsegpt.HessianAccumulator`), and
  :meth:`Dist.reduce_hessian` all-reduces Σ n_r·H_r and Σ n_r, so every rank gets
  H = Σ n_r·H_r / N = 2/N Σ xxᵀ, the single-process H up to summation order;
* the solves: the layers of one step (q/k/v, gate/up) are independent given H, so
  :meth:`Dist.assign` gives each to one rank. A rank plans, grids and solves its layers as one
  stack (rows are independent and unstructured masks are chosen per layer, so this equals the
  single-process stacked solve), then :meth:`Dist.share_solved` broadcasts the weights from
  their owners and gathers the grids, plans and records everywhere. One-layer steps (o, down)
  are solved by one rank while the others wait; the owner rotates from step to step.

Everything else (the run folder, the results, the checkpoint, evaluation) is rank 0's job.
Without torchrun (or with one process) :data:`LOCAL` stands in: every method is the identity,
so the single-process path runs exactly as before.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from misq.errors import MisqError

log = logging.getLogger(__name__)

# torchrun sets these for every worker; init_process_group("env://") reads them.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 may download a model or build calibration windows while the others wait in a
# collective; NCCL's default 10 minutes is too short for that.
TIMEOUT = datetime.timedelta(minutes=60)


def launched() -> bool:
    """Whether torchrun started this process as one of several workers."""
    return all(v in os.environ for v in ENV_VARS) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class Dist:
    """Who this process is in the group, and the few collectives the driver needs.

    device: where this rank computes (``cuda:<LOCAL_RANK>`` with NCCL, ``cpu`` with gloo);
    None for :data:`LOCAL`, meaning "whatever the caller resolved".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    backend: str | None = None
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the calibration windows ------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items; the first ``n % world_size`` ranks get
        one more. Contiguous shares keep the single-process batches intact when each share is
        a multiple of the batch size (the forwards then round exactly as they do there)."""
        if n < self.world_size:
            raise MisqError(f"{n} calibration windows cannot be split over {self.world_size} processes: "
                            f"use --nsamples {self.world_size} or more, or fewer processes")
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def shard_windows(self, calib: Tensor) -> Tensor:
        """calib [n, seqlen] -> this rank's windows [n_r, seqlen] (all of them when not active)."""
        return calib[self.shard(calib.shape[0])] if self.active else calib

    # -- the Hessian ------------------------------------------------------------------------
    def reduce_hessian(self, H: Tensor, nsamples: int) -> Tensor:
        """H_r [C, C] = 2/n_r Σ_r xxᵀ over this rank's ``nsamples`` = n_r sequences -> the
        Hessian of all N sequences, 2/N Σ xxᵀ = Σ n_r·H_r / N, identical on every rank (in place)."""
        if not self.active:
            return H
        import torch.distributed as tdist

        H.mul_(nsamples)
        count = torch.tensor([nsamples], dtype=torch.int64, device=H.device)
        tdist.all_reduce(H)
        tdist.all_reduce(count)
        return H.div_(int(count.item()))

    # -- the solves -------------------------------------------------------------------------
    def assign(self, rows: Sequence[int], turn: int = 0) -> list[int]:
        """The owning rank of each layer of one step, from the layers' row counts.

        Largest first, each to the least-loaded rank; ties go to ranks in the order
        turn, turn+1, ..., so that one-layer steps rotate their owner from step to step.
        Deterministic: every rank computes the same answer without talking.
        """
        K = self.world_size
        order = sorted(range(len(rows)), key=lambda j: -rows[j])
        ranks = [(turn + k) % K for k in range(K)]
        load = [0] * K
        owners = [0] * len(rows)
        for j in order:
            r = min(ranks, key=lambda k: load[k])
            owners[j] = r
            load[r] += rows[j]
        return owners

    def share_solved(self, weights: dict[str, Tensor], owners: dict[str, int], mine: dict[str, Any]) -> dict[str, Any]:
        """After every rank solved its own layers of a step: make all ranks agree.

        weights: name -> the layer's weight tensor [R, C] on this rank's device, already
        written on its owner, overwritten in place elsewhere (broadcast from ``owners[name]``).
        mine: name -> whatever this rank computed for its layers (grid, plan, record: small,
        picklable). Returns the union of every rank's ``mine``.
        """
        if not self.active:
            return mine
        import torch.distributed as tdist

        for name, w in weights.items():  # the same order on every rank: the step's
            tdist.broadcast(w, src=owners[name])
        return self.gather_dicts(mine)

    def gather_dicts(self, mine: dict[str, Any]) -> dict[str, Any]:
        """The union of a small picklable dict from every rank (all ranks get it)."""
        if not self.active:
            return mine
        import torch.distributed as tdist

        parts: list[dict[str, Any] | None] = [None] * self.world_size
        tdist.all_gather_object(parts, mine)
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part or {})
        return merged

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable; tensors travel on the CPU)."""
        if not self.active:
            return obj
        import torch.distributed as tdist

        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()

    # -- bookkeeping ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the results file records about the processes that made it."""
        return {"world_size": self.world_size, "backend": self.backend, "device_of_rank0": self.device,
                "split": "calibration windows by rank; Hessians all-reduced; a step's layers solved by their owner ranks"}

    def close(self) -> None:
        """Wait for every rank, then tear the group down (when this object created it).

        Called once the collectives are over (after compression); rank 0 then evaluates and
        saves alone. Not called on errors: a barrier there could wait for a rank that died,
        and torchrun stops the other workers anyway.
        """
        if not (self.active and self.owns_group):
            return
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
        self.owns_group = False
        self.world_size = 1  # the group is gone: behave as LOCAL from here on (rank 0 saves, evaluates)


LOCAL = Dist()


def from_env(device: str) -> Dist:
    """The process group torchrun describes in the environment, or :data:`LOCAL`.

    ``device`` is the resolved single-process device ("cuda", "cuda:1", "cpu"): a CUDA device
    means NCCL with rank r on ``cuda:<LOCAL_RANK>`` (pinned as the current device before any
    CUDA work, so no rank touches another's GPU); anything else means gloo on the CPU.
    """
    if not launched():
        return LOCAL
    import torch.distributed as tdist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        n_gpus = torch.cuda.device_count()
        if local >= n_gpus:
            raise MisqError(f"torchrun started local rank {local} but only {n_gpus} GPU(s) are visible: "
                            f"use --nproc-per-node {n_gpus} or less")
        if torch.device(device).index not in (None, local):
            log.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", device, rank, local)
        torch.cuda.set_device(local)
        local_device, backend = f"cuda:{local}", "nccl"
    else:
        local_device, backend = "cpu", "gloo"
    owns = not tdist.is_initialized()
    if owns:
        kwargs: dict[str, Any] = {"device_id": torch.device(local_device)} if cuda else {}
        tdist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    else:
        backend = tdist.get_backend()
        rank, world = tdist.get_rank(), tdist.get_world_size()
    if rank == 0:
        log.info("distributed: %d processes, %s, rank 0 on %s", world, backend, local_device)
    return Dist(rank=rank, world_size=world, local_rank=local, device=local_device, backend=backend, owns_group=owns)
