"""Several processes through torch.distributed (gloo on the CPU) give the single-process result.

* the pieces: window shards, solve ownership, and that solving a step's layers in subsets (as
  the ranks do) equals the single-process stacked solve bit for bit;
* the collectives, in two spawned gloo processes: the Hessian all-reduce reproduces the
  single-process H from unequal shards, and owners' weights/records reach every rank;
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
from misq.algorithms.sparsegpt import HessianAccumulator
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
    """One gloo rank: check reduce_hessian and share_solved against what one process computes."""
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

    # Owners' weights overwrite everyone's; every rank gets every owner's small results.
    weights = {f"w{j}": torch.full((3, 4), float(-1 - rank)) for j in range(3)}
    owners = dict(zip(weights, dist.assign([3, 3, 3], turn=1)))
    ours = {}
    for name, r in owners.items():
        if r == rank:
            weights[name].fill_(10.0 * r + int(name[1]))
            ours[name] = {"owner": rank}
    merged = dist.share_solved(weights, owners, ours)
    for name, r in owners.items():
        assert torch.all(weights[name] == 10.0 * r + int(name[1])), name
        assert merged[name] == {"owner": r}
    assert dist.broadcast_object({"from": rank}) == {"from": 0}
    dist.close()
    assert not torch.distributed.is_initialized()


def test_hessian_reduce_and_sharing_across_two_gloo_processes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 16, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 5, dtype=torch.float64)[:, None, None]
    mp.spawn(_collectives_worker, args=(2, _free_port(), X, 2), nprocs=2, join=True)


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
