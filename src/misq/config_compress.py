"""The compression config: :class:`CompressConfig` and the choices its fields take.

Everything that decides the compressed weights (calibration sample, sparsity and its allocation
over the layers, widths and their budget, scale groups, the solver's settings) is one typed
config that validates itself in ``__post_init__``, as the others in :mod:`misq.config` do.
Split from :mod:`misq.config`, which re-exports every name here, so ``from misq.config import
CompressConfig`` stays the import path. No torch at import time (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from misq.config_fields import SparsityArg, option, parse_bits, sparsity_pattern
from misq.errors import MisqError

# The one definition of each set of choices: validation below and the CLI's choices both use it.
DEFAULT_BITS = (2, 3, 4, 6, 8)
GROUPINGS = ("mi", "hessian", "uniform")
BUDGETS = ("layer", "model")
MI_ESTIMATORS = ("gaussian", "binned")
# How sparsity is spread over the layers (misq.compress.sparsity_plan): uniform (SparseGPT's own),
# loss (one allocation of sparsity and widths against the size budget), owl (Yin et al. 2023),
# auto (loss with the average freed too; what `--sparsity auto` sets).
SPARSITY_ALLOCATIONS = ("uniform", "loss", "owl", "auto")
# The nominal sparsity of `--sparsity auto`: it only names the pattern (unstructured: the packed
# format stores one mask per layer) and the results' target; the average is chosen by the allocation.
AUTO_SPARSITY_NOMINAL = 0.5


@dataclass
class CompressConfig:
    """Everything that decides the compressed weights. Two equal configs give equal weights."""

    # given=True: the CLI also takes the dataset as a positional argument and must see a conflict.
    dataset: str = option("c4", "calibration data: c4, wikitext2, ptb or a text file", given=True)
    nsamples: int = option(128, "calibration windows")
    seed: int = option(0, "seed of the calibration sample")
    # Defaults: dense, uniform 4-bit, groups of 128, act-order, MSE grids: the point of misq's
    # measured frontier at ~4.2 bits (BENCHMARKS.md, "The frontier"); README says why.
    # The annotation is the CLI's parser (a float or auto); the value is a float (RUF009: the
    # option() call builds a dataclass field, it is not a mutable default).
    sparsity: SparsityArg = option(0.0, "unstructured sparsity in [0, 1), e.g. 0.5 (the average over the layers "  # noqa: RUF009
                                        "with --sparsity-allocation), or auto: misq picks each layer's sparsity and "
                                        "width for --target-size; ignored with --prunen/--prunem")
    # BENCHMARKS.md ("Sparsity allocated") has the measured comparison; uniform stays the default.
    sparsity_allocation: str = option("uniform", "how --sparsity is spread over the layers: uniform (every layer the "
                                                 "same); loss (per layer, chosen with the widths by the loss estimates "
                                                 "against --target-size, same average); owl (outlier-weighted, Yin et "
                                                 "al. 2023); auto (loss with a free average; what --sparsity auto sets). "
                                                 "All but uniform need --budget model and mixed widths",
                                      choices=SPARSITY_ALLOCATIONS)
    prunen: int = option(0, "N of an N:M pattern (with --prunem)")
    prunem: int = option(0, "M of an N:M pattern")
    # given=True: --use_mi_grouping implies a grouping and must see a contradicting --grouping.
    # hessian: as good as mi on llama-9m, see BENCHMARKS.md.
    grouping: str = option("uniform", "channel grouping: mi or hessian mix widths per channel group; uniform: --wbits "
                                      "everywhere (see BENCHMARKS.md)", choices=GROUPINGS, given=True)
    wbits: int = option(4, "uniform width when not mixing precisions (16 = no quantization)")
    n_groups: int = option(10, "channel groups per layer (with --groupsize G: ceil(channels / G), one width per scale group)")
    target_avg_bits: float = option(4.0, "average channel bits to meet (codes only; the prototype's budget)")
    # The honest budget: bits per parameter of the quantized layers as the packed file holds them
    # (codes, mask or N:M metadata, scales, zeros, column order); replaces --target_avg_bits.
    target_size: float | None = option(None, "honest size to meet, in bits per parameter of the quantized layers "
                                             "(everything the packed file stores for them); chooses the widths")
    bits: tuple[int, ...] = option(DEFAULT_BITS, "candidate widths, comma-separated")
    budget: str = option("layer", "meet the target per layer or over the model", choices=BUDGETS)
    # GPTQ's group-wise grids: within each channel group, a scale and zero per `groupsize`
    # consecutive columns of the solve order, found when the solver reaches the group's first
    # column (on the weights already updated for the earlier columns' errors, as GPTQ does).
    groupsize: int = option(128, "columns per scale group in the solve order (GPTQ's groupsize; "
                                 "0: one grid per row and channel group)")
    act_order: bool = option(True, "solve columns in descending Hessian-diagonal order (GPTQ's act-order; "
                                   "the packed file then stores one column permutation per layer)",
                             switch={"act-order": (True, "solve columns in descending Hessian-diagonal order, GPTQ's "
                                                           "act-order (default); the file stores one column order per layer"),
                                     "no-act-order": (False, "solve columns in their natural order")})
    # GPTQ's static_groups: the scale groups are G consecutive *original* columns with grids fixed
    # from the unquantized weights before solving; act-order then only changes the solve order, so
    # the file stores no column order. Measured (BENCHMARKS.md, "Static groups"): smaller and
    # better than groups formed along the act-order, so it is the default for uniform widths.
    static_groups: bool | None = option(
        None, "scale groups of consecutive original columns, grids fixed before solving",
        switch={"static-groups": (True, "scale groups of --groupsize consecutive original columns with grids fixed "
                                        "before solving (GPTQ's static_groups): act-order costs no stored column order "
                                        "(default with --groupsize and uniform widths)"),
                "dynamic-groups": (False, "scale groups of --groupsize columns along the solve order, each grid found "
                                          "when the solver reaches it (GPTQ's default; act-order stores a column order)")})
    blocksize: int = option(128, "columns pruned and quantized together")
    percdamp: float = option(0.01, "Hessian dampening, a fraction of its mean diagonal")
    # MSE grids clip outliers, which pays for dense weights but hurts the survivors of pruning,
    # which the solver makes larger: 50% + 3-bit, wikitext2 on the CPU: llama-9m 131.35 min-max
    # against 133.45 MSE, stories260K 196.75 against 203.85 (BENCHMARKS.md, "MSE grids and pruning").
    mse: bool | None = option(None, "search each grid's clipping range for the least error",
                              switch={"mse": (True, "search each grid's clipping range for the least error "
                                                    "(default without pruning)"),
                                      "no-mse": (False, "plain min-max grids, as the GPTQ/SparseGPT reference code "
                                                        "(default with --sparsity or N:M)")})
    # Least-squares scales for the codes the sweep chose (misq.algorithms.scale_refit), rows with one grid per row.
    refit_scales: bool = option(True, "refit each per-row grid's scale to the codes the solver chose (least squares)",
                                switch={"refit-scales": (True, "refit each per-row grid's scale to the codes the solver "
                                                               "chose, where that lowers the row's output error (default)"),
                                        "no-refit-scales": (False, "keep the grids found before the solve, as the "
                                                                   "GPTQ/SparseGPT reference code does")})
    # Coordinate descent on the kept weights after the sweep (misq.algorithms.coordinate_descent).
    # With pruning it pays on every recipe measured (llama-9m 50% + 4-bit: 128.50 / 156.33 ->
    # 125.16 / 154.30 wikitext2 / c4, below the unquantized 50% row; stories260K 50% + 3-bit
    # -6% wikitext2); on dense grids it lowers c4 (the calibration set) everywhere and wikitext2
    # in 3 of 4 llama-9m recipes, at about 0.7 of a solve's time per pass on a GPU
    # (BENCHMARKS.md, "Coordinate descent after the solve").
    refine_passes: int = option(4, "passes of coordinate descent over the kept weights after the solve, mask and grids "
                                   "fixed: each lowers every layer's output error (0: the GPTQ/SparseGPT sweep alone)")
    mi_estimator: str = option("gaussian", "mutual-information estimator of --grouping mi", choices=MI_ESTIMATORS)
    offload_activations: bool = option(False, "keep calibration activations on the CPU")
    # 1 is the reference's own scheme: same rounding, so parity with the public SparseGPT/GPTQ
    # figures holds (BENCHMARKS.md); 8 is 7% faster on 13B.
    batch_size: int = option(1, "calibration windows per forward pass (1: the reference's scheme; "
                                "8 is ~7% faster on a GPU)")

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        self._resolve_sparsity()
        if self.nsamples < 1:
            raise MisqError(f"--nsamples {self.nsamples} must be at least 1 (the protocol uses 128)")
        if not 0.0 <= self.sparsity < 1.0:
            raise MisqError(f"--sparsity {self.sparsity} is outside [0, 1): use e.g. 0.5 for 50% (or 0 for none)")
        if (self.prunen or self.prunem) and (self.prunen < 1 or self.prunem < 2 or self.prunen >= self.prunem):
            raise MisqError(
                f"N:M pattern {self.prunen}:{self.prunem} is invalid: N must be at least 1 and smaller than M, e.g. --prunen 2 --prunem 4"
            )
        if self.grouping not in GROUPINGS:
            raise MisqError(f"--grouping {self.grouping!r} is unknown: use one of {', '.join(GROUPINGS)}")
        if self.budget not in BUDGETS:
            raise MisqError(f"--budget {self.budget!r} is unknown: use one of {', '.join(BUDGETS)}")
        if not 2 <= self.wbits <= 16:
            raise MisqError(f"--wbits {self.wbits} is outside 2..16: use e.g. --wbits 4 (16 keeps fp16)")
        if self.grouping != "uniform":
            if self.n_groups < 1:
                raise MisqError(f"--n_groups {self.n_groups} must be at least 1")
            lo, hi = min(self.bits), max(self.bits)
            if not (lo <= self.target_avg_bits <= hi) or math.isnan(self.target_avg_bits):
                raise MisqError(
                    f"--target_avg_bits {self.target_avg_bits} is outside the widths in --bits ({lo}..{hi}): "
                    f"choose a target between {lo} and {hi}, or widen --bits"
                )
        if self.target_size is not None:
            if self.grouping == "uniform":
                raise MisqError("--target-size chooses a width per channel group: use --grouping hessian or mi "
                                "(or drop --target-size and give --wbits)")
            if not 0.5 <= self.target_size <= 16 or math.isnan(self.target_size):
                raise MisqError(f"--target-size {self.target_size} is outside 0.5..16 bits per parameter: "
                                "use e.g. --target-size 3.2")
        if self.groupsize < 0:
            raise MisqError(f"--groupsize {self.groupsize} must be 0 (one grid per row) or a column count such as 128")
        if self.structured:
            # N:M hardware formats group the *original* columns, so the solve order stays natural
            # (act-order is on by default; under N:M it is simply not used), and scale groups
            # must not cut across the M-column runs.
            self.act_order = False
            if self.groupsize % self.prunem:
                raise MisqError(f"--groupsize {self.groupsize} must be a multiple of --prunem {self.prunem} "
                                "(or 0), so that no scale group cuts an N:M run")
            if self.groupsize and self.mixed_precision:
                raise MisqError("mixed widths with --groupsize reorder the columns, which N:M pruning cannot: "
                                "use --groupsize 0 with --grouping mi/hessian, or --grouping uniform")
        if self.mse is None:  # the default: MSE grids for dense weights, min-max with pruning
            self.mse = not (self.structured or self.sparsity > 0)
        if self.refine_passes < 0:
            raise MisqError(f"--refine-passes {self.refine_passes} must be 0 (off) or more, e.g. 4")
        if self.static_groups is None:  # the default: static wherever it applies
            self.static_groups = not self.mixed_precision and self.groupsize > 0
        if self.static_groups and (self.mixed_precision or not self.groupsize):
            raise MisqError("--static-groups fixes one grid per --groupsize columns of a uniform width: give "
                            "--groupsize (e.g. 128) and --grouping uniform, or drop --static-groups")
        if self.blocksize < 1:
            raise MisqError(f"--blocksize {self.blocksize} must be positive (128 is standard)")
        if self.prunem and self.blocksize % self.prunem:
            raise MisqError(f"--blocksize {self.blocksize} must be a multiple of --prunem {self.prunem}")
        if not 0.0 < self.percdamp < 1.0:
            raise MisqError(f"--percdamp {self.percdamp} must be in (0, 1); 0.01 is standard")
        if self.mi_estimator not in MI_ESTIMATORS:
            raise MisqError(f"--mi-estimator {self.mi_estimator!r} is unknown: use one of {', '.join(MI_ESTIMATORS)}")
        if self.batch_size < 1:
            raise MisqError(f"--batch-size {self.batch_size} must be at least 1")

    def _resolve_sparsity(self) -> None:
        """``--sparsity auto`` -> ``sparsity_allocation="auto"`` with the nominal sparsity (one
        float field, so results and checkpoints read it as before); check the allocation fits."""
        if isinstance(self.sparsity, str):
            try:
                value = SparsityArg(self.sparsity)
            except argparse.ArgumentTypeError as err:
                raise MisqError(str(err)) from None
            if value == "auto":
                if self.sparsity_allocation not in ("uniform", "auto"):
                    raise MisqError(f"--sparsity auto chooses the sparsity itself: drop --sparsity-allocation "
                                    f"{self.sparsity_allocation}, or give --sparsity a number")
                self.sparsity_allocation, value = "auto", AUTO_SPARSITY_NOMINAL
            self.sparsity = value
        self.sparsity = float(self.sparsity)
        if self.sparsity_allocation not in SPARSITY_ALLOCATIONS:
            raise MisqError(f"--sparsity-allocation {self.sparsity_allocation!r} is unknown: "
                            f"use one of {', '.join(SPARSITY_ALLOCATIONS)}")
        if self.sparsity_allocation == "uniform":
            return
        what = f"--sparsity-allocation {self.sparsity_allocation}"
        if self.prunen or self.prunem:
            raise MisqError(f"N:M pruning keeps N of every M weights in every layer: drop {what} (or --sparsity auto), "
                            "or use unstructured --sparsity")
        if not 0.0 < self.sparsity < 1.0:
            raise MisqError(f"{what} spreads an average sparsity over the layers: give --sparsity in (0, 1), e.g. 0.5")
        if self.grouping == "uniform" or self.budget != "model":
            raise MisqError(f"{what} plans every layer in a first pass: use --budget model with --grouping hessian or mi")
        if self.sparsity_allocation in ("loss", "auto") and self.target_size is None:
            raise MisqError(f"{what} trades sparsity against bits within a size: give --target-size, e.g. 3.06")

    @property
    def structured(self) -> bool:
        """Whether the run prunes to an N:M pattern (``--prunen``/``--prunem``)."""
        return bool(self.prunen and self.prunem)

    @property
    def pattern(self) -> str:
        """``"N:M"``, ``"unstructured"`` or ``"dense"``: see :func:`sparsity_pattern`."""
        return sparsity_pattern(self.sparsity, self.prunen, self.prunem)

    @property
    def mixed_precision(self) -> bool:
        """Whether widths differ between channel groups (``--grouping`` mi or hessian)."""
        return self.grouping != "uniform"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``bits`` as a list), as results and checkpoints store them."""
        d = dataclasses.asdict(self)
        d["bits"] = list(self.bits)
        return d


__all__ = [
    "AUTO_SPARSITY_NOMINAL",
    "BUDGETS",
    "DEFAULT_BITS",
    "GROUPINGS",
    "MI_ESTIMATORS",
    "SPARSITY_ALLOCATIONS",
    "CompressConfig",
]
