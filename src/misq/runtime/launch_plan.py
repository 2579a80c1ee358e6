"""What the packed runtime's kernels will be asked to do, decided in plain Python (no Triton
needed): which path takes a layer's rows (:class:`Config`, from the tuned table or
:func:`default_config`), which widths share a launch, and how deep each launch splits along K
(:func:`plan_launches`). :mod:`misq.runtime.kernels` launches what this plans.

Paths: ``h2`` (M = 1, 3 and 4 bits, groups of multiples of 128 columns: the packed fp16 pipes),
``fma`` (M = 1, CUDA cores, float32), ``mma`` (tensor cores: M = 2..16, and M = 1 for other widths
of several pieces; prefill's fused tiles) and ``dot`` (per-tile dots, widths over 10 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from misq.runtime.half2_kernel import GROUP_COLS as H2_GROUP_COLS
from misq.runtime.layout import Segment, block_cols, pieces


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


DECODE_MAX_ROWS = 16  # above this, prefill: prefill_matmul or dequantize + cuBLAS
# prefill_matmul (tiles dequantized on the fly) up to this many rows, dequantize + cuBLAS above;
# benchmarks/decode_speed.py's prefill section measures both: on an H200 the fused kernel was the
# slower at 512 and 2048 rows on every 13B shape, so it is off by default
PREFILL_FUSED_MAX_ROWS = 0
# the batch-1 h2 kernel launched as its x gather's programmatic dependent (Config.pdl; Hopper and
# later, elsewhere ignored): 2-5% faster on every 13B shape and format on an H200, 2-3% end to end
# (BENCHMARKS.md, session 13). Layers keep the launches they planned; after changing this, a
# ``TUNED.update()`` makes them plan again (benchmarks/decode_speed.py --pdl does). Under PDL each
# program also reads its first block before it waits for the gather (half2_kernel._segment_sum)
H2_PDL = True
# the h2 path's x gather launched as a programmatic dependent of whatever kernel ran before it
# (it waits for that kernel's writes before it reads x), so that its launch overlaps that
# kernel's end; with H2_PDL only, and read when a layer plans its launches, as H2_PDL is. On an
# H200 the step's idle time fell from 23 to 18 us in a 4-layer 13B-shaped model: 0.6-0.9% more
# tokens/s, 0.6% at 40 layers (BENCHMARKS.md, session 20)
GATHER_PDL = True


@dataclass(frozen=True)
class Config:
    """One launch's settings: the path (module docstring), BLOCK_N output features a program, about
    how many programs split-K should make, warps and software-pipelining stages a program."""

    path: str
    block_n: int
    target_programs: int  # split-K deep enough for about this many programs
    num_warps: int
    num_stages: int = 1
    block_m: int = 16  # mma: rows of x a program (prefill: 64 to 256)
    # gather x first (one small kernel): mma, into the kernel's column order; fma (one-piece widths), as
    # float32 times each slot's 2**-q (gather_kernel._gather_scaled), which saves the kernel a
    # convert, a multiply and the index arithmetic per x value
    pregather: bool = False
    # h2 with pregather: the kernel launched as the gather's programmatic dependent (Hopper's
    # programmatic dependent launch): its programs start while the gather finishes and wait for it
    pdl: bool = False
    # h2: registers a thread the compiler may use (Triton's maxnreg; 0: its own choice): fewer
    # registers let more programs stay on an SM at once
    maxnreg: int = 0


class _Settings(dict):
    """A dict that counts its changes (``version``): layers keep their launches bound to the
    settings they were planned with (decode_plan) and plan again when the version moves."""

    version = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()


# Launch settings: (bucket "m1" (M = 1) / "m16" (M = 2..16) / "pf" (prefill), bits, N, K) ->
# Config, filled by benchmarks/decode_speed.py --tune results; anything else uses default_config.
TUNED: _Settings = _Settings()


def bucket(M: int) -> str:
    """TUNED's row bucket of M rows of x."""
    return "m1" if M == 1 else ("m16" if M <= DECODE_MAX_ROWS else "pf")


def default_config(M: int, bits: int, N: int, K: int, mma: bool = True, h2: bool = True) -> Config:
    """Settings benchmarks/decode_speed.py --tune picked (or came close to) on every 13B shape on an
    H200 (BENCHMARKS.md). Many small programs: the loads of a block are one round trip, so the
    memory system needs many warps per SM in flight. ``h2``: whether the segment can take the fp16
    pairs kernel (:func:`h2_ok`; 3 and 4 bits at M = 1)."""
    single = len(pieces(bits)) == 1
    # fp16 pairs, x gathered first (gathering in each program was 4-8% slower on the 13B MLP shapes,
    # 2-10% faster on 5120 x 5120); narrow programs (BLOCK_N 64): within 3% of the best of 15
    # settings on every 13B shape at 4 bits; at 3 bits (and for a mixed 3/4 pair, which takes the
    # 3-bit's), two blocks a program, pipelined: 14-17% faster than one on the MLP shapes, equal on
    # 5120 x 5120 (BENCHMARKS.md, session 12)
    if M == 1 and bits == 4 and h2:
        # large layers (the 13B MLP shapes, merged q/k/v and gate/up): 14 programs an SM, which fit
        # at once in its registers only at 72 a thread (the compiler's choice is 80): 0.4-4.6% faster
        # than 10 an SM; 9% slower on 5120 x 5120 (BENCHMARKS.md, session 23)
        if N * K >= 50_000_000:
            return Config("h2", 64, 14 * 132, 2, 2, pregather=True, pdl=H2_PDL, maxnreg=72)
        return Config("h2", 64, 10 * 132, 2, 2, pregather=True, pdl=H2_PDL)
    if M == 1 and bits == 3 and h2:
        return Config("h2", 64, 16 * 132, 4, 2, pregather=True, pdl=H2_PDL)
    if M == 1 and (single or not mma):  # one piece a code (4-bit): CUDA cores, x gathered first (1.1-1.15x faster)
        return Config("fma", 64, 16 * 132, 4, pregather=single)
    if not mma:  # over 10 bits
        return Config("dot", 128, 16 * 132, 4)
    if M <= DECODE_MAX_ROWS:  # x gathered in the kernel cost 2-3x at M = 16 (scattered 2-byte loads)
        return Config("mma", 64, 16 * 132, 4, pregather=True)
    # prefill: 256 rows of x a program; 128 for widths of several pieces (their words take shared memory)
    return Config("mma", 128, 1, 8, 3, block_m=256 if single else 128)


def config_for(M: int, bits: int, N: int, K: int) -> Config:
    """The settings for M rows of a width of ``bits`` in an N x K layer: tuned, else the default."""
    cfg = TUNED.get((bucket(M), bits, N, K))
    if cfg is None or (cfg.path in ("fma", "h2") and M > 1) or (cfg.path != "mma" and M > DECODE_MAX_ROWS):
        cfg = default_config(M, bits, N, K)
    return cfg


@dataclass
class Launch:
    """One planned launch: its segments, settings and grid (n_nblk x split programs)."""

    segs: list  # one segment, or two for the mma and h2 paths
    cfg: Config
    n_nblk: int  # BLOCK_N slices of the output
    split: int  # programs along K (grid axis 1)
    bps: list[int]  # layout blocks per split program, per segment
    # two segments: split programs of segment 1 (0, mma only: every program takes both)
    off2: int = 0


def plan(segs: list, cfg: Config, rows: int, M: int) -> Launch:
    """Split-K so that about cfg.target_programs programs run (one tile of rows only). Two
    segments split disjointly, each program taking about the same number of columns."""
    n_nblk = _cdiv(rows, cfg.block_n)
    nblks = [_cdiv(s.n, block_cols(s.bits)) for s in segs]
    target = max(1, cfg.target_programs // n_nblk) if cfg.block_m >= M else 1
    if target == 1:  # h2 programs take one segment each: two runs along K
        two_h2 = cfg.path == "h2" and len(segs) == 2
        return Launch(segs, cfg, n_nblk, 1 + two_h2, nblks, int(two_h2))
    if len(segs) == 1:
        split = min(nblks[0], target)
        bps = _cdiv(nblks[0], split)
        return Launch(segs, cfg, n_nblk, _cdiv(nblks[0], bps), [bps])
    cols = _cdiv(sum(s.n for s in segs), target)  # per program
    bps = [max(1, cols // block_cols(s.bits)) for s in segs]
    splits = [_cdiv(nb, b) for nb, b in zip(nblks, bps, strict=True)]
    return Launch(segs, cfg, n_nblk, sum(splits), bps, splits[0])


def h2_ok(seg: Segment) -> bool:
    """The fp16 pairs kernel (half2_kernel) takes 3- and 4-bit segments whose scale groups are
    multiples of 128 columns, or one group."""
    g = seg.group_len
    return seg.bits in (3, 4) and (seg.scales.shape[0] == 1 or (g > 0 and g % H2_GROUP_COLS == 0))


def mma_ok(seg: Segment) -> bool:
    """The tensor-core kernel's fp16 trick (0x6400 | code is 1024 + code) needs codes < 1024."""
    return seg.bits <= 10


def prefill_ok(segments: list, has_fp: bool) -> bool:
    """Whether decode_plan.prefill_matmul takes the layer: one or two widths of at most 10 bits, no
    16-bit columns."""
    return not has_fp and 1 <= len(segments) <= 2 and all(mma_ok(s) for s in segments)


def plan_launches(segments: list, cfgs: list[Config], rows: int, M: int, pair_h2: bool = True) -> list[Launch]:
    """The launches of a layer's decode, in order: each segment's config (a path its width cannot
    take replaced by the default that it can), with neighbours paired into one launch where the
    path takes two: mma with a width of at most 10 bits, h2 with another h2 segment (unless
    ``pair_h2`` is false). Changes ``cfgs`` in place."""
    for i, s in enumerate(segments):
        if cfgs[i].path == "mma" and not mma_ok(s):
            cfgs[i] = default_config(M, s.bits, rows, s.n, mma=False)
        if cfgs[i].path == "h2" and (M > 1 or not h2_ok(s)):
            cfgs[i] = default_config(M, s.bits, rows, s.n, mma=mma_ok(s), h2=False)
    launches, i = [], 0
    while i < len(segments):
        nxt = i + 1 < len(segments)
        h2_pair = pair_h2 and nxt and cfgs[i].path == "h2" and cfgs[i + 1].path == "h2"
        two = h2_pair or (nxt and cfgs[i].path == "mma" and mma_ok(segments[i + 1]))
        # an h2 pair runs the settings with more warps (the 3-bit's): with two, a 3-bit program needs 255 registers
        cfg = max(cfgs[i], cfgs[i + 1], key=lambda c: c.num_warps) if h2_pair else cfgs[i]
        launches.append(plan(segments[i:i + 1 + two], cfg, rows, M))
        i += 1 + two
    return launches
