"""Hybrid masking: [MASK] exactly on the top-k important tokens and their neighbours, random codes elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

from common.vqgan_transformer.masking import HybridMasking, important_region

K = 32


def constructed_scores() -> torch.Tensor:
    """8^3 score map with two known hot spots: 3 top tokens at (2,2,2), (2,2,3) and (6,6,6)."""
    scores = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    scores[0, 2, 2, 2], scores[0, 2, 2, 3], scores[0, 6, 6, 6] = 5.0, 4.0, 3.0
    return scores


def expected_region() -> torch.Tensor:
    region = torch.zeros(8, 8, 8, dtype=torch.bool)
    region[1:4, 1:4, 1:5] = True  # 3x3x3 cubes around (2,2,2) and (2,2,3)
    region[5:8, 5:8, 5:8] = True  # around (6,6,6)
    return region


def test_important_region_is_topk_plus_neighbours():
    scores = constructed_scores()
    region = important_region(scores, topk_ratio=3 / 512, radius=1)
    assert torch.equal(region[0], expected_region())
    assert not important_region(scores, 0.0).any()
    assert int(important_region(scores, 3 / 512, radius=0).sum()) == 3
    with pytest.raises(ValueError):
        important_region(scores, 1.5)


def test_hybrid_masking_mask_exactly_on_region_random_codes_elsewhere():
    tokens = torch.randint(0, K, (1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    masking = HybridMasking(K, topk_ratio=3 / 512, mask_ratio=None, random_ratio=1.0)
    out = masking(tokens, constructed_scores(), generator=torch.Generator().manual_seed(2))
    region = expected_region().reshape(1, -1)
    flat = tokens.reshape(1, -1)
    assert torch.equal(out.is_mask, region)
    assert masking.mask_token_id == K and torch.all(out.inputs[region] == K)
    elsewhere = ~region
    assert torch.equal(out.is_replaced, elsewhere)
    assert torch.all(out.inputs[elsewhere] != flat[elsewhere])  # a different code ...
    assert torch.all((out.inputs[elsewhere] >= 0) & (out.inputs[elsewhere] < K))  # ... from the codebook
    assert len(set(out.inputs[elsewhere].tolist())) > K // 2  # random, not one fixed substitute
    assert torch.equal(out.targets, torch.ones_like(region))


def test_hybrid_masking_fractions_and_schedule():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, K, (64, 8, 8, 8), generator=g)
    scores = torch.rand(64, 8, 8, 8, generator=g)
    # random replacement of a fraction of the visible tokens
    out = HybridMasking(K, topk_ratio=0.02, mask_ratio=None, random_ratio=0.25)(tokens, scores, generator=g)
    visible = ~out.is_mask
    frac = float(out.is_replaced[visible].float().mean())
    assert abs(frac - 0.25) < 0.02
    assert torch.equal(out.inputs[visible & ~out.is_replaced], tokens.reshape(64, -1)[visible & ~out.is_replaced])
    # a fixed masking ratio tops the important set up with random [MASK] tokens
    out = HybridMasking(K, topk_ratio=0.02, mask_ratio=0.5, random_ratio=0.0)(tokens, scores, generator=g)
    region = important_region(scores, 0.02).reshape(64, -1)
    assert torch.all(out.is_mask[region])  # the important set is always masked
    counts = out.is_mask.sum(1)
    assert torch.all(counts == torch.clamp(region.sum(1), min=256))
    # top-k 0 % is MaskGIT's random masking with the cosine schedule (the paper's baseline)
    out = HybridMasking(K, topk_ratio=0.0, mask_ratio="cosine", random_ratio=0.0)(tokens, None, generator=g)
    ratios = out.is_mask.float().mean(1)
    assert 0 < float(ratios.min()) and float(ratios.max()) <= 1.0
    assert abs(float(ratios.mean()) - 2 / math.pi) < 0.1  # E[cos(pi u / 2)] = 2 / pi
    assert not out.is_replaced.any()


def test_plain_share_masks_as_maskgit_does():
    """plain_ratio: that share of samples ignores the importance map (cosine ratio, random tokens), so the
    transformer also sees mostly revealed grids; the rest still mask the whole important region."""
    b = 600
    tokens = torch.randint(0, K, (b, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    scores = constructed_scores().expand(b, -1, -1, -1)
    region = expected_region().reshape(-1)
    out = HybridMasking(K, topk_ratio=3 / 512, mask_ratio="cosine", random_ratio=0.0, plain_ratio=0.5)(
        tokens, scores, generator=torch.Generator().manual_seed(2))
    covers = out.is_mask[:, region].all(1)
    ratios = out.is_mask.float().mean(1)
    # a random mask covers all 63 region tokens almost never; hybrid samples always do
    assert 0.4 < float((~covers).float().mean()) < 0.6
    assert abs(float(ratios[~covers].mean()) - 2 / math.pi) < 0.08  # MaskGIT's mean ratio
    assert float(ratios[covers].min()) >= float(region.sum()) / 512
    hybrid_only = HybridMasking(K, topk_ratio=3 / 512, mask_ratio="cosine", random_ratio=0.0)(
        tokens, scores, generator=torch.Generator().manual_seed(2))
    assert hybrid_only.is_mask[:, region].all()
    # plain_ratio 1: the score map no longer matters, the masking ratio is MaskGIT's (mean 2 / pi)
    plain = HybridMasking(K, topk_ratio=0.25, mask_ratio=None, random_ratio=0.0, plain_ratio=1.0)
    a = plain(tokens, scores, generator=torch.Generator().manual_seed(3))
    c = plain(tokens, torch.rand(b, 8, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.is_mask, c.is_mask)
    assert abs(float(a.is_mask.float().mean()) - 2 / math.pi) < 0.05
    with pytest.raises(ValueError, match="plain_ratio"):
        HybridMasking(K, plain_ratio=1.5)


def test_hybrid_masking_bad_settings():
    with pytest.raises(ValueError, match="needs the importance scores"):
        HybridMasking(K, topk_ratio=0.25)(torch.zeros(1, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="masks nothing"):
        HybridMasking(K, topk_ratio=0.0, mask_ratio=None)
    with pytest.raises(ValueError):
        HybridMasking(K, topk_ratio=0.25, mask_ratio=1.5)
    with pytest.raises(ValueError):
        HybridMasking(K, random_ratio=-0.1)
