"""Hybrid masking for the stage-2 transformer (Zhou & Khalvati, MIDL 2024).

The poster's strategy: the top-k most important tokens (by the stage-1 importance score map) *and their
neighbours* become ``[MASK]``; unimportant tokens are replaced by other, random codebook tokens. The
transformer learns to fill in the decisive tumour region from context and to correct wrong tokens elsewhere.

Choices where the poster is silent (stated in the bundle docs):

* neighbours = the ``(2*radius+1)^d`` cube around each top-k token (26-neighbourhood for radius 1 in 3-D);
* parallel decoding starts from an all-``[MASK]`` grid, so with ``mask_ratio="cosine"`` each sample also
  draws MaskGIT's masking ratio ``cos(pi/2 * u)``: if the important set is smaller than that many tokens, random
  unimportant tokens are masked too. ``mask_ratio=None`` masks exactly the important set; a float fixes the ratio
  (the public code's 0.5). With ``topk_ratio=0`` this is MaskGIT's random masking: the paper's baseline;
* of the tokens left visible, a fraction ``random_ratio`` is replaced by a random *different* code;
* a share ``plain_ratio`` of the samples is masked as MaskGIT masks (random tokens at the cosine ratio, no
  importance). With top-k 25 % the important set and its neighbours cover about 85 % of the 8^3 grid, so
  hybrid masking alone never shows the transformer a grid that is more than 15 % revealed, while iterative
  decoding (parallel or raster) spends most of its passes on such grids.

The loss is taken on every ``[MASK]`` and every replaced position (``targets`` mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["important_region", "HybridMasking", "MaskedBatch"]


def important_region(scores: torch.Tensor, topk_ratio: float, radius: int = 1) -> torch.Tensor:
    """Boolean map of the ``round(topk_ratio * N)`` highest-scoring tokens of each sample and their neighbours.

    ``scores``: [B, *grid] (2-D or 3-D grid). Ties are broken by ``torch.topk``.
    """
    if not 0.0 <= topk_ratio <= 1.0:
        raise ValueError(f"topk_ratio must be in [0, 1], got {topk_ratio}")
    b, grid = scores.shape[0], tuple(scores.shape[1:])
    n = math.prod(grid)
    k = int(round(topk_ratio * n))
    flat = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return flat.view(b, *grid)
    top = scores.reshape(b, n).float().topk(k, dim=1).indices
    flat.scatter_(1, top, True)
    region = flat.view(b, 1, *grid).float()
    if radius > 0:
        pool = F.max_pool3d if len(grid) == 3 else F.max_pool2d
        region = pool(region, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return region[:, 0] > 0


@dataclass
class MaskedBatch:
    """Transformer input and where the loss is taken (all [B, N] over the flattened grid)."""

    inputs: torch.Tensor  # long: code indices, mask_token_id at [MASK]
    is_mask: torch.Tensor  # bool: [MASK] positions
    is_replaced: torch.Tensor  # bool: positions holding a random wrong code

    @property
    def targets(self) -> torch.Tensor:
        return self.is_mask | self.is_replaced


class HybridMasking:
    """Importance-guided ``[MASK]`` + random-token corruption of code grids (see the module docstring).

    Args:
        num_embeddings: codebook size K; ``[MASK]`` is token K.
        topk_ratio: fraction of tokens taken as the important seeds (paper settings 0, 0.25, 0.5).
        mask_ratio: ``"cosine"`` (MaskGIT schedule, default), a float in (0, 1], or ``None`` (important set only).
        random_ratio: fraction of the remaining visible tokens replaced by random different codes.
        radius: neighbourhood radius around each important token.
        plain_ratio: share of samples masked as MaskGIT does (cosine ratio, random tokens, importance ignored).
    """

    def __init__(self, num_embeddings: int, topk_ratio: float = 0.25, mask_ratio: str | float | None = "cosine",
                 random_ratio: float = 0.1, radius: int = 1, plain_ratio: float = 0.0):
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2, got {num_embeddings}")
        if not 0.0 <= topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in [0, 1], got {topk_ratio}")
        if not 0.0 <= random_ratio <= 1.0:
            raise ValueError(f"random_ratio must be in [0, 1], got {random_ratio}")
        if not 0.0 <= plain_ratio <= 1.0:
            raise ValueError(f"plain_ratio must be in [0, 1], got {plain_ratio}")
        if mask_ratio is not None and mask_ratio != "cosine" and not 0.0 < float(mask_ratio) <= 1.0:
            raise ValueError(f"mask_ratio must be 'cosine', a number in (0, 1] or None, got {mask_ratio!r}")
        if mask_ratio is None and topk_ratio == 0:
            raise ValueError("topk_ratio 0 with mask_ratio None masks nothing: set mask_ratio ('cosine' or a float)")
        self.num_embeddings = int(num_embeddings)
        self.mask_token_id = int(num_embeddings)
        self.topk_ratio = float(topk_ratio)
        self.mask_ratio = mask_ratio if mask_ratio in (None, "cosine") else float(mask_ratio)
        self.random_ratio = float(random_ratio)
        self.radius = int(radius)
        self.plain_ratio = float(plain_ratio)

    def _target_counts(self, b: int, n: int, device, generator, mask_ratio) -> torch.Tensor:
        if mask_ratio is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        if mask_ratio == "cosine":
            u = torch.rand(b, generator=generator, device=device)
            ratio = torch.cos(u * math.pi / 2)
        else:
            ratio = torch.full((b,), mask_ratio, device=device)
        return (ratio * n).ceil().clamp(1, n).long()

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> MaskedBatch:
        b = tokens.shape[0]
        flat = tokens.reshape(b, -1).long()
        n = flat.shape[1]
        device = flat.device
        if self.topk_ratio > 0:
            if scores is None:
                raise ValueError("hybrid masking with topk_ratio > 0 needs the importance scores")
            if scores.reshape(b, -1).shape[1] != n:
                raise ValueError(f"scores of shape {tuple(scores.shape)} do not match tokens {tuple(tokens.shape)}")
            is_mask = important_region(scores.reshape(tokens.shape), self.topk_ratio, self.radius).reshape(b, n)
        else:
            is_mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        counts = self._target_counts(b, n, device, generator, self.mask_ratio)
        if self.plain_ratio > 0:
            plain = torch.rand(b, generator=generator, device=device) < self.plain_ratio
            is_mask &= ~plain[:, None]
            if self.mask_ratio is None:
                counts = torch.where(plain, self._target_counts(b, n, device, generator, "cosine"), counts)
        # top up with random unimportant tokens to the drawn masking ratio
        extra = counts - is_mask.sum(1)
        if bool((extra > 0).any()):
            priority = torch.rand(b, n, generator=generator, device=device).masked_fill(is_mask, -1.0)
            order = priority.argsort(dim=1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(b, n))
            is_mask |= rank < extra.clamp_min(0)[:, None]
        visible = ~is_mask
        is_replaced = visible & (torch.rand(b, n, generator=generator, device=device) < self.random_ratio)
        if self.random_ratio >= 1.0:
            is_replaced = visible.clone()
        offset = torch.randint(1, self.num_embeddings, (b, n), generator=generator, device=device)
        random_codes = (flat + offset) % self.num_embeddings  # always a different code
        inputs = torch.where(is_replaced, random_codes, flat)
        inputs = inputs.masked_fill(is_mask, self.mask_token_id)
        return MaskedBatch(inputs=inputs, is_mask=is_mask, is_replaced=is_replaced)
