"""Several processes through torch.distributed (gloo on the CPU) give the single-process result.

* the pieces: window shards, row slices, plan ownership, that planning and solving a step's
  layers in subsets equals the stacked solve, and that the row-split mask hook
  (:class:`misq.algorithms.pruning_mask.RowSplitKeep`) equals the single-process mask;
* the collectives, in two spawned gloo processes: the Hessian all-reduce reproduces the
  single-process H from unequal shards, and uneven row shares are gathered in order;
* the row-split solves, in two spawned gloo processes given the one-process Hessian: every
  weight, grid and plan equals one process's bit for bit (unstructured, N:M, mixed widths,
  act-order with groups), the records up to the last bits of their sums;
* end to end: ``torchrun --nproc-per-node 2 -m misq compress`` against the same command in one
  process: same bit plans and masks, weights equal up to summation order, PPL within 0.1%.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from misq import distributed
from misq.algorithms.hessian import HessianAccumulator
from misq.algorithms.pruning_mask import RowSplitKeep, split_segments, unstructured_keep
from misq.compress import driver
from misq.config import CompressConfig
from misq.errors import MisqError
from misq.models import layout

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("n", [2, 7, 8, 128])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_the_windows(n, world):
    if n < world:
        return
    shards = [distributed.Dist(rank=r, world_size=world).shard(n) for r in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == n
    assert all(a.stop == b.start for a, b in itertools.pairwise(shards))
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


def test_too_few_windows_for_the_processes_is_refused():
    with pytest.raises(MisqError, match="--nsamples 4"):
        distributed.Dist(rank=0, world_size=4).shard(3)


def test_assign_balances_rows_and_rotates_single_layers():
    d = distributed.Dist(rank=0, world_size=4)
    # q/k/v of a GQA model: q alone, k and v on two other ranks
    owners = d.assign([4096, 1024, 1024])
    assert len(set(owners)) == 3
    # a one-layer step: the owner moves with the turn
    assert [d.assign([5120], turn=t)[0] for t in range(6)] == [0, 1, 2, 3, 0, 1]
    # more layers than ranks: loads differ by at most one layer
    two = distributed.Dist(rank=0, world_size=2)
    owners = two.assign([100, 100, 100])
    assert sorted(owners.count(r) for r in range(2)) == [1, 2]
    assert distributed.LOCAL.assign([3, 2, 1]) == [0, 0, 0]


@pytest.mark.parametrize("n", [3, 7, 64, 129])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_slices_partition_the_rows(n, world):
    slices = distributed.Dist(rank=0, world_size=world).row_slices(n)
    assert len(slices) == world and slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
    assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
    with pytest.raises(MisqError, match="rows cannot be split"):
        distributed.Dist(rank=0, world_size=4).row_slices(3)


def test_split_segments_cuts_layers_at_the_slice_bounds():
    assert split_segments([64, 16, 16], slice(0, 48)) == [(0, slice(0, 48))]
    assert split_segments([64, 16, 16], slice(48, 96)) == [(0, slice(48, 64)), (1, slice(0, 16)), (2, slice(0, 16))]
    assert split_segments([64, 16, 16], slice(70, 75)) == [(1, slice(6, 11))]


@pytest.mark.parametrize("sparsity", [0.5, [0.5, 0.0, 0.3], [0.25, 0.25, 0.6], 0.0])
@pytest.mark.parametrize("bounds", [[0, 128], [0, 64, 128], [0, 50, 100, 128], [0, 70, 71, 128], [0, 64, 96, 128]])
def test_row_split_mask_equals_the_single_process_mask(sparsity, bounds):
    """Each rank's RowSplitKeep, its rows of a block in, gives its rows of the one-process mask,
    whether a slice cuts a layer (then the block is gathered) or not (then it is not)."""
    g = torch.Generator().manual_seed(3)
    segments = [64, 32, 32]
    W1 = torch.randn(128, 24, generator=g) * torch.linspace(0.2, 3.0, 128).unsqueeze(1)
    W1[70] = W1[69]  # equal saliencies on both sides of a slice bound (70): pruned or kept together
    hdiag = torch.rand(24, generator=g) + 0.5
    ref = unstructured_keep(W1, hdiag, sparsity, segments)
    slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    fracs = [sparsity] * 3 if isinstance(sparsity, float) else sparsity
    # gathered only when a slice bound falls inside a layer that is pruned
    cut = any(lo < b < hi and f > 0 for b in bounds[1:-1] for lo, hi, f in ((0, 64, fracs[0]), (64, 96, fracs[1]), (96, 128, fracs[2])))
    got, gathers = [], []
    for rank, rows in enumerate(slices):
        def gather(x, rows=rows, rank=rank):
            assert torch.equal(x, W1[rows])
            gathers.append(rank)
            return W1.clone()
        hook = RowSplitKeep(sparsity, segments, slices, rank, gather)
        got.append(hook(W1[rows].clone(), hdiag))
    assert torch.equal(torch.cat(got), ref)
    assert gathers == (list(range(len(slices))) if cut else [])


def _step_linears(seed: int = 0) -> tuple[dict[str, nn.Linear], torch.Tensor]:
    """q/k/v of a small GQA attention (q 64 rows, k/v 32 rows, 96 inputs) and their shared H."""
    g = torch.Generator().manual_seed(seed)
    C = 96
    linears = {}
    for name, rows in (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32)):
        lin = nn.Linear(C, rows, bias=False)
        lin.weight.data = torch.randn(rows, C, generator=g)
        linears[name] = lin
    X = torch.randn(2048, C, generator=g) @ (torch.randn(C, C, generator=g) / C**0.5)
    X[:, :3] *= 6.0  # a few outlier channels, so that groups and widths differ
    acc = HessianAccumulator(C, "cpu")
    acc.add(X.reshape(8, -1, C))
    return linears, acc.free()


@pytest.mark.parametrize("kw", [dict(grouping="hessian", n_groups=3, target_avg_bits=3.5, sparsity=0.5),
                                dict(grouping="uniform", wbits=3, prunen=2, prunem=4)])
def test_solving_a_step_in_subsets_equals_the_stacked_solve(kw):
    cfg = CompressConfig(blocksize=32, **kw)
    step = layout.SEQUENTIAL_STEPS[0]
    whole, H = _step_linears()
    ref = driver._solve_layers(0, step, whole, H.clone(), cfg, None, None, torch.float32)
    parts, _ = _step_linears()
    got = {}
    for subset in (("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.k_proj",)):  # two ranks' shares
        got |= driver._solve_layers(0, subset, parts, H.clone(), cfg, None, None, torch.float32)
    for name in step:
        assert torch.equal(whole[name].weight, parts[name].weight), name
        (g_ref, p_ref, r_ref), (g, p, r) = ref[name], got[name]
        assert torch.equal(p_ref.groups, p.groups) and torch.equal(p_ref.bits, p.bits)
        assert torch.equal(g_ref.scale, g.scale) and torch.equal(g_ref.zero, g.zero)
        assert (r_ref["rel_error"], r_ref["sparsity"]) == (r["rel_error"], r["sparsity"])


# --------------------------------------------------------------------------- the collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, world: int, port: int, X: torch.Tensor, batch: int) -> None:
    """One gloo rank: check reduce_hessian and gather_rows against what one process computes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = distributed.from_env("cpu")
    assert (dist.rank, dist.world_size, dist.backend, dist.device) == (rank, world, "gloo", "cpu")
    n, _, C = X.shape
    mine = X[dist.shard(n)]
    acc = HessianAccumulator(C, "cpu", dtype=torch.float64)
    for start in range(0, mine.shape[0], batch):
        acc.add(mine[start : start + batch])
    H = acc.free()
    H_rank = H.clone()
    H = dist.reduce_hessian(H, acc.nsamples)
    flat = X.reshape(-1, C)
    exact = 2 / n * flat.T @ flat
    torch.testing.assert_close(H, exact, rtol=1e-12, atol=1e-12)
    # The shards are unequal (n = 5 over 2 ranks): a plain mean of the H_r would be wrong.
    means = [None] * world
    torch.distributed.all_gather_object(means, H_rank)
    assert not torch.allclose(sum(means) / world, exact, rtol=1e-6)

    # Uneven row shares come back whole, in rank order, on every rank (a rank may have none).
    for counts in ([3, 2], [0, 4], [5, 5]):
        whole = torch.arange(sum(counts) * 4, dtype=torch.float32).reshape(-1, 4)
        mine = whole[sum(counts[:rank]) : sum(counts[: rank + 1])]
        assert torch.equal(dist.gather_rows(mine, counts), whole)
    assert dist.gather_dicts({rank: rank * 10}) == {0: 0, 1: 10}
    assert dist.broadcast_object({"from": rank}) == {"from": 0}
    dist.close()
    assert not torch.distributed.is_initialized()


def test_hessian_reduce_and_sharing_across_two_gloo_processes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 16, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 5, dtype=torch.float64)[:, None, None]
    mp.spawn(_collectives_worker, args=(2, _free_port(), X, 2), nprocs=2, join=True)


# --------------------------------------------------------------------------- row-split solves


class _EveryWindow(distributed.Dist):
    """Every rank runs every calibration window and keeps its own Hessian (no all-reduce): each
    rank then has the one-process H, so what differs from one process is the row split alone."""

    def shard_windows(self, calib: torch.Tensor) -> torch.Tensor:
        return calib

    def reduce_hessian(self, H: torch.Tensor, nsamples: int) -> torch.Tensor:
        return H


ROW_SPLIT_CASES = {
    "unstructured 50% + 4-bit": dict(sparsity=0.5, wbits=4, groupsize=0, act_order=False),
    "2:4 + 4-bit, static groups": dict(prunen=2, prunem=4, wbits=4, groupsize=16),
    "mixed widths, 50%, model budget": dict(grouping="hessian", n_groups=4, target_avg_bits=3.5, sparsity=0.5,
                                            groupsize=0, budget="model"),
    "act-order, dynamic groups, 50%": dict(sparsity=0.5, wbits=3, groupsize=16, act_order=True, static_groups=False,
                                           mse=False),
    "act-order, mixed widths, groups": dict(grouping="hessian", target_avg_bits=3.5, sparsity=0.4, groupsize=16,
                                            blocksize=32, mse=False),
}


def _tiny_llama():
    """q 64 rows, k/v 16 (one KV head): the q/k/v stack of 96 rows is cut inside q_proj by 2 ranks."""
    from misq.demo.toy import build_model

    return build_model(200, hidden=64, layers=2, heads=4, kv_heads=1, ffn=96, seed=0).eval()


def _compress(model, cfg, dist):
    calib = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    plans = driver.measure_model_plan(model, calib, cfg, "cpu", dist) if cfg.budget == "model" else None
    return driver.compress_model(model, calib, cfg, "cpu", plans=plans, dist=dist)


def _row_split_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    group = distributed.from_env("cpu")
    dist = _EveryWindow(rank=group.rank, world_size=group.world_size, local_rank=rank, device="cpu", backend="gloo")
    for case, kw in ROW_SPLIT_CASES.items():
        cfg = CompressConfig(nsamples=4, batch_size=2, **kw)
        one, split = _tiny_llama(), _tiny_llama()
        ref = _compress(one, cfg, distributed.LOCAL)
        got = _compress(split, cfg, dist)
        for (name, a), b in zip(one.named_parameters(), split.parameters()):
            assert torch.equal(a, b), f"{case}: {name} differs from one process"
        assert ref.grids.keys() == got.grids.keys()
        for name, g in ref.grids.items():
            h = got.grids[name]
            assert torch.equal(g.scale, h.scale) and torch.equal(g.zero, h.zero), f"{case}: grid of {name}"
            assert torch.equal(g.groups, h.groups) and torch.equal(g.bits, h.bits)
            assert (g.order is None) == (h.order is None) and (g.order is None or torch.equal(g.order, h.order))
            assert torch.equal(ref.plans[name].bits, got.plans[name].bits)
        for r, q in zip(ref.records, got.records):  # sums over row slices: the last bits may differ
            assert r["name"] == q["name"] and r["group_bits"] == q["group_bits"]
            assert q["rel_error"] == pytest.approx(r["rel_error"], rel=1e-5, abs=1e-12), f"{case}: {r['name']}"
            assert q["sparsity"] == pytest.approx(r["sparsity"], abs=1e-6), f"{case}: {r['name']}"
        # every rank holds the same model and records
        mine = {rank: ([p.clone() for p in split.parameters()], [(q["rel_error"], q["sparsity"], q["solve_s"]) for q in got.records])}
        both = dist.gather_dicts(mine)
        assert all(torch.equal(a, b) for a, b in zip(both[0][0], both[1][0])) and both[0][1] == both[1][1], case
    group.close()


def test_row_split_solves_match_one_process_bit_for_bit():
    mp.spawn(_row_split_worker, args=(2, _free_port()), nprocs=2, join=True)


# --------------------------------------------------------------------------- end to end


def _linear_weights(path: Path) -> dict[str, torch.Tensor]:
    import misq

    model = misq.load(str(path))
    return {n: p.detach().float() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}


def test_torchrun_two_processes_match_one(tiny_checkpoint, tmp_path):
    from misq import jobs
    from misq.config import DataConfig, EvalConfig, ModelConfig
    from misq.demo.toy import synthetic_corpus

    calib = tmp_path / "calib.txt"
    calib.write_text(synthetic_corpus(2000, seed=1))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(synthetic_corpus(150, seed=2))
    # --budget model exercises the measuring pass (plans gathered, rank 0's allocation
    # broadcast); batches of 4 over 8 windows keep each rank's forwards the one-process ones.
    flags = dict(nsamples=8, batch_size=4, grouping="hessian", budget="model", n_groups=4, target_avg_bits=3.5, sparsity=0.5)
    cache = str(tmp_path / "cache")
    one = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=cache),
                                CompressConfig(dataset=str(calib), **flags), EvalConfig(datasets=(str(heldout),)),
                                str(tmp_path / "run1"), save_dir=str(tmp_path / "packed1"))

    cli = [str(tiny_checkpoint), str(calib), "--device", "cpu", "--seqlen", "64", "--cache-dir", cache,
           "--eval", str(heldout), "--out", str(tmp_path / "run2"), "--save", str(tmp_path / "packed2")]
    for key, value in flags.items():
        cli += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "misq", "compress", *cli],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports
    two = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"

    # Same plans (groups and widths) and records for every layer.
    assert [r["name"] for r in two["layers"]] == [r["name"] for r in one["layers"]]
    for a, b in zip(one["layers"], two["layers"]):
        assert a["group_bits"] == b["group_bits"], a["name"]
        assert a["sparsity"] == pytest.approx(b["sparsity"], abs=1e-3), a["name"]
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-3), a["name"]
    assert two["bits"]["actual_avg_bits"] == one["bits"]["actual_avg_bits"]
    name = str(heldout)
    assert abs(two["ppl"][name] / one["ppl"][name] - 1) < 1e-3

    # Weights: equal up to the Hessian's summation order. A few weights may sit on a rounding
    # boundary of their grid and land one step apart; everything else is bit for bit the same.
    w1, w2 = _linear_weights(tmp_path / "packed1"), _linear_weights(tmp_path / "packed2")
    assert w1.keys() == w2.keys() and w1
    total = sum(w.numel() for w in w1.values())
    differ = sum(int((w1[k] != w2[k]).sum()) for k in w1)
    masks = sum(int(((w1[k] == 0) != (w2[k] == 0)).sum()) for k in w1)
    assert differ <= 0.001 * total, f"{differ} of {total} weights differ"
    assert masks <= 0.0005 * total, f"{masks} of {total} pruning decisions differ"
