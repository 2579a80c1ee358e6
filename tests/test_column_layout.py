"""Column layouts (solve/storage order, segments, scale groups) and the honest size model."""

import math

import pytest
import torch

from misq.algorithms.column_layout import ColumnLayout, identity_layout, layout_for, nm_metadata_bits, segment_bits

# llama-9m's linear shapes (rows, cols) per decoder layer: q, k, v, o, gate, up, down.
LLAMA9M = [(256, 256)] * 4 + [(704, 256)] * 2 + [(256, 704)]


def test_act_order_of_one_group_is_gptq_permutation():
    diag = torch.rand(300, generator=torch.Generator().manual_seed(0))
    lay = layout_for(torch.zeros(300, dtype=torch.long), torch.tensor([3]), hessian_diag=diag, act_order=True, groupsize=128)
    assert torch.equal(lay.perm, torch.argsort(diag, descending=True, stable=True))
    assert lay.scale_groups() == [(0, 128, 3), (128, 256, 3), (256, 300, 3)]
    # groups are consecutive in perm order: group of original column perm[j] is j // 128
    assert torch.equal(lay.group_of_column()[lay.perm], torch.arange(300) // 128)


def test_segments_descend_in_width_and_cover_every_column_once():
    groups = torch.tensor([0, 1, 0, 2, 1, 2, 2])
    lay = layout_for(groups, torch.tensor([3, 4, 2]), groupsize=2)
    assert lay.seg_bits.tolist() == [4, 3, 2]
    assert sorted(lay.perm.tolist()) == list(range(7))
    # each segment holds exactly its group's columns, in natural order without act-order
    assert lay.perm.tolist() == [1, 4, 0, 2, 3, 5, 6]
    assert lay.group_bits().tolist() == [4, 3, 2, 2]
    assert lay.permuted


def test_identity_layout_is_not_permuted():
    lay = identity_layout(10, 4, groupsize=4)
    assert not lay.permuted and lay.scale_groups() == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


def test_bad_segments_are_refused():
    with pytest.raises(ValueError):
        ColumnLayout(torch.arange(5), torch.tensor([3]), torch.tensor([4]))


def _model_size(width, groupsize, permuted=False, density=1.0, mask=0.0):
    bits = sum(segment_bits(r, c, width, groupsize=groupsize, permuted=permuted, density=density, mask_bits_per_weight=mask)
               for r, c in LLAMA9M)
    return bits / sum(r * c for r, c in LLAMA9M)


@pytest.mark.parametrize("width,groupsize,permuted,density,mask,reference", [
    (3, 128, True, 1.0, 0.0, 3.196),   # GPTQ 3-bit g128 act-order (shared/models/README.md)
    (3, 128, False, 1.0, 0.0, 3.151),  # GPTQ 3-bit g128
    (4, 128, False, 1.0, 0.0, 4.159),  # GPTQ 4-bit g128
    (4, 0, False, 1.0, 0.0, 4.067),    # GPTQ 4-bit per row
    (4, 0, False, 0.5, 1.0, 3.067),    # SparseGPT 50% + 4-bit
    (4, 0, False, 0.5, 0.75, 2.817),   # SparseGPT 2:4 + 4-bit
])
def test_size_model_matches_the_reference_sizes(width, groupsize, permuted, density, mask, reference):
    # misq also stores each scale group's width and length (40 bits a run): under 0.002 bits here
    assert _model_size(width, groupsize, permuted, density, mask) == pytest.approx(reference, abs=2e-3)


def test_nm_metadata():
    assert nm_metadata_bits(2, 4) == 3 and nm_metadata_bits(4, 8) == math.ceil(math.log2(70))
