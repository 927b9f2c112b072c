"""Codebook health of the VQGAN: usage and perplexity, and restart of dead codes.

An EMA codebook collapses when few codes win every lookup: the others stop moving and the transformer then
models a handful of tokens. :class:`CodebookHealth` (an ignite handler) counts which codes the encoder picks,
writes ``codebook_usage`` (fraction of codes used in the last ``interval`` iterations), ``codebook_perplexity``
(exp of the entropy of the code histogram; K when all K codes are equally used) and ``codebook_restarts`` to
``engine.state.metrics`` (so MONAI's stats/TensorBoard handlers log them), and re-initialises codes unused for
``dead_after`` iterations from the last batch's encoder outputs (the usual fix, e.g. Dhariwal et al. 2020,
Jukebox). Counts are summed over processes and the replacement vectors come from rank 0, so every rank keeps
the same codebook.

Which encoder outputs: k-means++ seeding (Arthur & Vassilvitskii 2007), one code at a time, each drawn with
probability proportional to its squared distance to the nearest live (or just restarted) code. Drawn
uniformly, about 80 % of the draws land on the ROI's constant background (80 % of the tokens), next to codes
that already represent it, while the tumour's variety stays short of codes.
"""

from __future__ import annotations

import logging

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from common.engines.distributed import unwrap

__all__ = ["codebook_stats", "farthest_first", "restart_codes", "CodebookHealth"]

logger = logging.getLogger(__name__)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """``counts[k]`` = how often code k was picked -> usage fraction, codes used, perplexity."""
    counts = counts.double()
    total = float(counts.sum())
    if total <= 0:
        return {"usage": 0.0, "used": 0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "used": int((counts > 0).sum()),
            "perplexity": float(entropy.exp())}


@torch.no_grad()
def farthest_first(encodings: torch.Tensor, codes: torch.Tensor, count: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` rows of ``encodings`` [N, D], k-means++ style: each drawn with probability proportional to its
    squared distance to the nearest of ``codes`` [M, D] and the rows drawn before it (uniform when every row
    sits on a code)."""
    x = encodings.float()
    if codes.numel():
        nearest = torch.cdist(x, codes.to(x).float()).pow(2).min(dim=1).values
    else:
        nearest = torch.full((x.shape[0],), float("inf"), device=x.device)
    picks = []
    for _ in range(int(count)):
        weights = nearest.clamp_min(0).cpu().double()
        finite = torch.isfinite(weights)
        if not bool(finite.all()):
            weights = (~finite).double()
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        i = int(torch.multinomial(weights, 1, generator=generator))
        picks.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).pow(2).sum(1))
    return x[torch.as_tensor(picks, device=x.device)]


@torch.no_grad()
def restart_codes(quantizer, codes: torch.Tensor, vectors: torch.Tensor, noise: float = 0.01,
                  generator: torch.Generator | None = None) -> None:
    """Set the codes ``codes`` of a MONAI ``EMAQuantizer`` to ``vectors`` (one per code, plus a little noise).

    The EMA state is set consistently: cluster size 1 and ``ema_w`` = the vector, so the next EMA update
    moves the code from there instead of pulling it back to its dead position.
    """
    codes = codes.to(quantizer.embedding.weight.device).long()
    vectors = vectors.to(quantizer.embedding.weight).clone()
    if noise > 0:
        scale = vectors.std().clamp_min(1e-6) * noise
        vectors += torch.randn(vectors.shape, generator=generator).to(vectors.device) * scale
    quantizer.embedding.weight.data[codes] = vectors
    quantizer.ema_w.data[codes] = vectors
    quantizer.ema_cluster_size.data[codes] = 1.0


class CodebookHealth:
    """Ignite handler: codebook usage/perplexity metrics and dead-code restart (see the module docstring).

    Args:
        network: the :class:`~common.vqgan_transformer.networks.ImportanceVQGAN` (DDP-wrapped is fine), or a
            callable returning it (e.g. from a bundle config where the trainer builds the wrapper).
        interval: iterations per usage/perplexity window (also the logging interval).
        dead_after: a code unused for this many iterations is restarted; ``None`` disables restarts.
        seed: seed of the choice of replacement vectors.
        noise: relative noise added to each replacement vector (two codes restarted from one vector separate).
    """

    def __init__(self, network, interval: int = 50, dead_after: int | None = 200, seed: int = 0,
                 noise: float = 0.01, prefix: str = "codebook_"):
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if dead_after is not None and int(dead_after) < 1:
            raise ValueError(f"dead_after must be >= 1 or None, got {dead_after}")
        self._network = network
        self.interval = int(interval)
        self.dead_after = None if dead_after is None else int(dead_after)
        self.prefix = prefix
        self.noise = float(noise)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.window: torch.Tensor | None = None
        self.restarts = 0
        self.history: list[dict] = []

    def network(self):
        net = self._network() if callable(self._network) and not isinstance(self._network, torch.nn.Module) \
            else self._network
        return unwrap(net)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        net = self.network()
        indices = net.last_indices
        if indices is None:
            return
        k = net.num_embeddings
        counts = torch.bincount(indices.reshape(-1).long(), minlength=k)
        counts = idist.all_reduce(counts) if idist.get_world_size() > 1 else counts
        counts = counts.to(net.code_age.device)
        self.window = counts if self.window is None else self.window + counts
        net.code_age += 1
        net.code_age[counts > 0] = 0
        if self.dead_after is not None:
            self.restart_dead(net)
        if engine.state.iteration % self.interval == 0:
            stats = codebook_stats(self.window)
            stats["restarts"] = self.restarts
            self.history.append({"iteration": engine.state.iteration, **stats})
            for key in ("usage", "perplexity", "restarts"):
                engine.state.metrics[self.prefix + key] = stats[key]
            logger.info(f"iteration {engine.state.iteration}: codebook usage {stats['usage']:.3f} "
                        f"({stats['used']}/{k} codes), perplexity {stats['perplexity']:.1f}, "
                        f"restarts so far {self.restarts}")
            self.window = None

    def restart_dead(self, net) -> int:
        """Restart every code unused for ``dead_after`` iterations; returns how many were restarted."""
        dead = torch.nonzero(net.code_age >= self.dead_after).reshape(-1)
        if dead.numel() == 0 or net.last_encodings is None:
            return 0
        live = net.quantizer.embedding.weight.detach()[net.code_age < self.dead_after]
        vectors = farthest_first(net.last_encodings, live, dead.numel(), self.generator)
        scale = vectors.std().clamp_min(1e-6) * self.noise
        vectors = vectors + torch.randn(vectors.shape, generator=self.generator).to(vectors.device) * scale
        if idist.get_world_size() > 1:  # noise included: every rank must set the very same vectors
            vectors = idist.broadcast(vectors.contiguous(), src=0)
        restart_codes(net.quantizer, dead, vectors, noise=0.0)
        net.code_age[dead] = 0
        self.restarts += int(dead.numel())
        return int(dead.numel())
