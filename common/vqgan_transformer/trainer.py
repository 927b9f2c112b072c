"""Stage-2 training: the class-conditional masked transformer on the frozen VQGAN's token grids.

Each iteration: ROIs -> (codes, importance) with the frozen :class:`ImportanceVQGAN` -> hybrid masking ->
``network(inputs, class_labels, drop_condition=...)`` -> cross-entropy on the ``[MASK]`` and replaced positions.
Condition dropout (``condition_dropout``) trains the null class used by classifier-free guidance.

Stage 1 is frozen and the paper's ROIs are not augmented, so the codes and scores of each ROI can be computed
once (:func:`precompute_tokens`): batches holding ``tokens`` and ``importance`` skip the VQGAN.

Output keys: ``loss``, ``masked_accuracy`` (argmax = true code on the loss positions), ``mask_fraction``,
``grad_norm`` (with clipping) and the tensors ``image``, ``pred`` (argmax codes), ``tokens``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from common.engines.base import GenerativeTrainer
from common.engines.distributed import unwrap
from common.vqgan_transformer.masking import HybridMasking

__all__ = ["MaskedTransformerTrainer", "precompute_tokens"]


@torch.no_grad()
def precompute_tokens(vqgan: torch.nn.Module, items: Iterable[dict], image_key: str = "image",
                      batch_size: int = 4, device=None) -> list[dict]:
    """Each item (a dict with ``image_key`` [C, *spatial]) plus ``tokens`` [*grid] and ``importance`` [*grid]
    from the frozen VQGAN (CPU tensors), for stage-2 training without a VQGAN pass per iteration."""
    net = unwrap(vqgan).eval()
    device = device or next(net.parameters()).device
    items = list(items)
    out = []
    for start in range(0, len(items), int(batch_size)):
        chunk = items[start:start + int(batch_size)]
        images = torch.stack([torch.as_tensor(d[image_key]).float() for d in chunk]).to(device)
        tokens, importance = net.tokens(images)
        for d, t, s in zip(chunk, tokens.cpu(), importance.float().cpu()):
            out.append({**d, "tokens": t, "importance": s})
    return out


class MaskedTransformerTrainer(GenerativeTrainer):
    """Cross-entropy trainer of :class:`~common.vqgan_transformer.networks.MaskedTokenTransformer`.

    Args:
        network: the transformer (wrap with DDP for multi-GPU).
        optimizer: its optimizer.
        vqgan: the trained stage-1 :class:`ImportanceVQGAN` (frozen here, kept in checkpoints).
        masking: a :class:`HybridMasking` (its ``num_embeddings`` must match the codebook).
        image_key, class_key: batch keys of the ROIs and of the class index (``CLASSES``: LGG 0, HGG 1).
        token_key, importance_key: batch keys of precomputed codes and scores (used when both are present).
        condition_dropout: probability per sample of training with the null class instead.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        vqgan: torch.nn.Module,
        masking: HybridMasking,
        image_key: str = "image",
        class_key: str = "class",
        token_key: str = "tokens",
        importance_key: str = "importance",
        condition_dropout: float = 0.1,
        label_smoothing: float = 0.0,
        amp: str | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        **kwargs: Any,
    ):
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        plain = unwrap(network)
        if masking.num_embeddings != plain.num_embeddings or unwrap(vqgan).num_embeddings != plain.num_embeddings:
            raise ValueError(
                f"codebook sizes differ: transformer {plain.num_embeddings}, masking {masking.num_embeddings}, "
                f"VQGAN {unwrap(vqgan).num_embeddings}"
            )
        vqgan.requires_grad_(False)
        super().__init__(device, max_epochs, train_data_loader, ema_network=network, amp=amp,
                         grad_clip_norm=grad_clip_norm, ema_decay=ema_decay, **kwargs)
        self.network = network
        self.optimizer = optimizer
        self.vqgan = vqgan
        self.masking = masking
        self.image_key = image_key
        self.class_key = class_key
        self.token_key = token_key
        self.importance_key = importance_key
        self.condition_dropout = float(condition_dropout)
        self.label_smoothing = float(label_smoothing)
        self.scaler = self._make_scaler()
        self._finish_init()

    def _named_state(self) -> dict[str, Any]:
        return {"network": self.network, "optimizer": self.optimizer, "scaler": self.scaler, "vqgan": self.vqgan}

    def _get(self, batchdata: Any, key: str) -> torch.Tensor:
        if not isinstance(batchdata, dict) or key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise KeyError(f"MaskedTransformerTrainer: batch has no '{key}' key (got {keys})")
        return torch.as_tensor(batchdata[key]).to(self.state.device, non_blocking=self.non_blocking)

    def _train_step(self, batchdata: dict) -> dict:
        labels = self._get(batchdata, self.class_key).long().reshape(-1)
        if isinstance(batchdata, dict) and self.token_key in batchdata and self.importance_key in batchdata:
            tokens = self._get(batchdata, self.token_key).long()
            importance = self._get(batchdata, self.importance_key).float()
            images = batchdata.get(self.image_key, tokens)
        else:
            images = self._get(batchdata, self.image_key).float()
            self.vqgan.eval()
            with self.autocast():
                tokens, importance = unwrap(self.vqgan).tokens(images)
        masked = self.masking(tokens, importance.float())
        targets = masked.targets
        flat = tokens.reshape(tokens.shape[0], -1)
        kwargs = {}
        if self.condition_dropout > 0:
            kwargs["drop_condition"] = torch.rand(labels.shape[0], device=labels.device) < self.condition_dropout

        self.network.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self.autocast():
            logits = self.network(masked.inputs, labels, **kwargs)
        loss = F.cross_entropy(logits[targets].float(), flat[targets], label_smoothing=self.label_smoothing)
        grad_norm = self.backward_step(loss, self.optimizer, self.scaler)

        pred = logits.detach().argmax(-1)
        scalars = {
            "loss": float(loss.detach()),
            "masked_accuracy": float((pred[targets] == flat[targets]).float().mean()),
            "mask_fraction": float(masked.is_mask.float().mean()),
        }
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        output: dict[str, Any] = self.reduce_scalars(scalars)
        output.update({"image": images, "pred": pred, "tokens": tokens})
        return output
