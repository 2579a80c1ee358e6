"""Several GPUs (or CPU processes) through ``torch.distributed``, launched with ``torchrun``.

    torchrun --standalone --nproc-per-node 4 -m misq compress MODEL c4 ...

Every rank holds the whole model on the host and moves one decoder layer at a time to its own
device, as the single-process driver does. What is split:

* the calibration windows: rank r keeps a contiguous slice of them (:meth:`Dist.shard`) and runs
  only its own forward passes (layer-0 capture, the passes up to each step's input, the final
  pass of the compressed layer);
* the Hessian: each rank accumulates H_r = 2/n_r Σ xxᵀ over its n_r windows (the running-mean
  form of :class:`~misq.algorithms.hessian.HessianAccumulator`), and
  :meth:`Dist.reduce_hessian` all-reduces Σ n_r·H_r and Σ n_r, so every rank gets the same
  H = Σ n_r·H_r / N = 2/N Σ xxᵀ, the single-process H up to summation order;
* the plans (``--budget layer``, and the measuring pass of ``--budget model``): they need a
  layer's whole weight, so :meth:`Dist.assign` gives each layer of a step (q/k/v, gate/up) to
  one rank, which plans it; :meth:`Dist.gather_dicts` hands every plan to every rank (one-layer
  steps are planned by one rank, rotating; planning is cheap next to solving);
* the solves, by rows: every step's stacked matrix, o_proj and down_proj included, is cut into
  even contiguous row slices (:meth:`Dist.row_slices`; a slice may cut a layer in two), and rank
  r solves slice r against the full H (every rank factors the same all-reduced H itself, with
  the same deterministic kernels). Rows are independent given H⁻¹ and their masks; the couplings are made global:
  the unstructured mask's threshold of each block and layer comes from all of the layer's rows
  (:class:`misq.algorithms.pruning_mask.RowSplitKeep` gathers the block when a layer is cut),
  grids are found on the whole weights and sliced (their MSE search counts an estimated mask
  chosen layer-wide), and the reported errors add up their numerators and denominators over
  the ranks. :meth:`Dist.gather_rows` then gives every rank the whole solved weights (in the
  model's dtype) and the group grids, so all ranks hold the same model and records: the
  single-process ones, but for the Hessian's summation order and the last bits of the
  reported error and sparsity (sums over row slices).

Everything else (the run folder, the results, the checkpoint, evaluation) is rank 0's job.
Without torchrun (or with one process) :data:`LOCAL` stands in: every method is the identity,
so the single-process path runs exactly as before.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from misq.algorithms.pruning_mask import RowSplitKeep, split_segments
from misq.algorithms.quantizer import QuantGrid
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

    def row_slices(self, n: int) -> list[slice]:
        """Every rank's contiguous share of ``n`` rows, in rank order (the first
        ``n % world_size`` ranks get one more)."""
        if n < self.world_size:
            raise MisqError(f"a solve of {n} rows cannot be split over {self.world_size} processes: use fewer processes")
        base, extra = divmod(n, self.world_size)
        starts = [r * base + min(r, extra) for r in range(self.world_size + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(starts)]

    def row_share(self, segments: Sequence[int]) -> RowShare | None:
        """This rank's share of a stacked solve whose layers have ``segments`` rows; None
        without torchrun (the caller then solves every row, as one process always did)."""
        return RowShare(self, [int(n) for n in segments], self.row_slices(sum(segments))) if self.active else None

    def gather_rows(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """x [counts[rank], ...] -> every rank's rows stacked in rank order [Σ counts, ...], on
        every rank (an all-gather; the shares are padded to the largest). Identity when not active."""
        if not self.active:
            return x
        import torch.distributed as tdist

        assert x.shape[0] == counts[self.rank], "this rank's rows do not match its count"
        most = max(counts)
        if x.shape[0] < most:
            x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in counts]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat([part[:c] for part, c in zip(parts, counts)])

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
                "split": "calibration windows by rank; Hessians all-reduced; layers planned by owner ranks; "
                         "every solve split by rows over all ranks"}

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


@dataclass
class RowShare:
    """One rank's rows of one stacked solve, and the collectives that make its results everyone's.

    segments: row counts of the stacked layers (W [R, C], R = Σ segments); slices: every rank's
    rows of W (:meth:`Dist.row_slices`). All ranks build the same RowShare and call its
    collectives in the same order.
    """

    dist: Dist
    segments: list[int]
    slices: list[slice]

    @property
    def rows(self) -> slice:
        """This rank's rows of W."""
        return self.slices[self.dist.rank]

    @property
    def pieces(self) -> list[tuple[int, slice]]:
        """(layer index, its rows in this rank's share, in the layer's own numbering), in order."""
        return split_segments(self.segments, self.rows)

    def keep_fn(self, sparsity: float | Sequence[float]) -> RowSplitKeep:
        """``solve``'s unstructured mask for this rank's rows, with every layer's thresholds
        taken over all of its rows (``sparsity``: one, or one per layer)."""
        return RowSplitKeep(sparsity, self.segments, self.slices, self.dist.rank, self.gather)

    def gather(self, x: Tensor) -> Tensor:
        """x [rows of this rank, ...] -> [R, ...]: the rows of W from every rank."""
        return self.dist.gather_rows(x, [s.stop - s.start for s in self.slices])

    def gather_layer(self, k: int, x: Tensor) -> Tensor:
        """x [this rank's rows of layer k (maybe none), ...] -> [segments[k], ...]: the layer's rows."""
        start = sum(self.segments[:k])
        counts = [max(0, min(s.stop, start + self.segments[k]) - max(s.start, start)) for s in self.slices]
        return self.dist.gather_rows(x, counts)

    def grid_rows(self, grids: Sequence[QuantGrid]) -> list[QuantGrid]:
        """The grids of this rank's pieces of the layers, from the layers' whole grids."""
        return [QuantGrid(scale=grids[k].scale[sl], zero=grids[k].zero[sl], groups=grids[k].groups, bits=grids[k].bits,
                          order=grids[k].order) for k, sl in self.pieces]

    def gather_grid(self, k: int, grid: QuantGrid) -> QuantGrid:
        """Layer k's grid whose rows come from the ranks that solved them (each used its own)."""
        mine = next((sl for j, sl in self.pieces if j == k), slice(0, 0))
        both = self.gather_layer(k, torch.cat([grid.scale[mine], grid.zero[mine]], dim=1))
        K = grid.scale.shape[1]
        return QuantGrid(scale=both[:, :K], zero=both[:, K:], groups=grid.groups, bits=grid.bits, order=grid.order)

    def totals(self, error_terms: Sequence[tuple[float, float]], keep: Tensor, seconds: float) -> tuple[list[float], list[float], float]:
        """Per layer, over all ranks: relative error (Σ numerators / Σ denominators), sparsity
        (pruned share of its [rows, C] weights), and the slowest rank's solve seconds.
        ``error_terms`` and ``keep`` [rows of this rank, C] are this rank's, piece by piece."""
        n = len(self.segments)
        stats = torch.zeros(3 * n + 1, dtype=torch.float64)
        start = 0
        for (k, sl), (num, den) in zip(self.pieces, error_terms):
            rows = sl.stop - sl.start
            stats[3 * k : 3 * k + 3] += torch.tensor([num, den, float(keep[start : start + rows].sum())], dtype=torch.float64)
            start += rows
        stats[-1] = seconds
        every = self.dist.gather_rows(stats.to(keep.device).unsqueeze(0), [1] * self.dist.world_size).cpu()
        sums = every[:, :-1].sum(0).reshape(n, 3).tolist()
        cols = keep.shape[1]
        rel = [num / den if den > 0 else 0.0 for num, den, _ in sums]
        sparsity = [1.0 - kept / (rows * cols) for (_, _, kept), rows in zip(sums, self.segments)]
        return rel, sparsity, float(every[:, -1].max())


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
