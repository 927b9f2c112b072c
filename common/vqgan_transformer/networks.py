"""Networks of Zhou & Khalvati (MIDL 2024): a 3D VQGAN whose token grid carries an importance score learned with
an LGG/HGG classifier, and a bidirectional class-conditional masked transformer over that grid (MaskGIT-style).

Stage 1 is MONAI's ``VQVAE`` (EMA codebook) and ``PatchDiscriminator``; what MONAI lacks is the importance
head + classifier (:class:`ImportanceVQGAN`) and the masked token transformer (:class:`MaskedTokenTransformer`,
built from MONAI ``TransformerBlock`` s with PyTorch's fused ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import VQVAE, PatchDiscriminator

from common.io import check_bool

__all__ = [
    "CLASSES",
    "build_vqgan",
    "build_discriminator",
    "ImportanceVQGAN",
    "MaskedTokenTransformer",
    "build_transformer",
]

# class index of each grade, everywhere in this module (labels, class tokens, classifier outputs)
CLASSES = ("LGG", "HGG")


def build_vqgan(
    in_channels: int = 1,
    channels: Sequence[int] = (64, 128, 256, 256),
    num_res_layers: int = 2,
    num_embeddings: int = 1024,
    embedding_dim: int = 128,
    commitment_cost: float = 0.25,
    decay: float = 0.99,
    spatial_dims: int = 3,
    use_checkpointing: bool = False,
    ddp_sync: bool = True,
) -> VQVAE:
    """MONAI ``VQVAE`` with one stride-2 level per entry of ``channels`` (4 levels: 128^3 -> 8^3 tokens)
    and an EMA codebook of ``num_embeddings`` x ``embedding_dim`` (paper: 512-1024 x 128)."""
    levels = len(channels)
    return VQVAE(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        num_res_layers=num_res_layers,
        num_res_channels=tuple(channels),
        downsample_parameters=((2, 4, 1, 1),) * levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * levels,
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
        commitment_cost=commitment_cost,
        decay=decay,
        ddp_sync=ddp_sync,
        use_checkpointing=check_bool("gradient_checkpointing", use_checkpointing),
    )


def build_discriminator(in_channels: int = 1, channels: int = 64, num_layers_d: int = 3,
                        spatial_dims: int = 3) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` (its last output is the patch logits; the others serve feature matching)."""
    return PatchDiscriminator(spatial_dims=spatial_dims, num_layers_d=num_layers_d, channels=channels,
                              in_channels=in_channels, out_channels=1)


def full_precision(device: torch.device):
    """Autocast off (the codebook lookup must run in float32); nothing to switch off on the meta device."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class ImportanceVQGAN(nn.Module):
    """VQVAE + importance head + LGG/HGG classifier, trained together (public code: 0.8 recon + 0.2 cls).

    The head gives one logit per token; its softmax over the grid weights the pooling of the quantized
    features that the classifier reads, so tokens that decide the grade get the high scores (the
    "importance score map" of the paper). ``forward`` returns a dict a loss term can read:
    ``pred`` (reconstruction), ``quantization_loss`` (commitment), ``class_logits`` [B, 2],
    ``importance`` [B, 1, *grid] (sums to 1 per sample) and ``indices`` [B, *grid].

    The quantizer runs in float32 with autocast off on every device (MONAI disables it on CUDA only; a bf16
    distance matrix on CPU picks wrong codes). The last batch's indices and encoder outputs are kept
    (``last_indices``, ``last_encodings``) for :class:`~common.vqgan_transformer.codebook.CodebookHealth`;
    ``code_age`` (iterations since each code was last used) is a buffer, so it is checkpointed.
    """

    def __init__(self, vqvae: VQVAE, num_classes: int = len(CLASSES), head_channels: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.vqvae = vqvae
        dim = vqvae.embedding_dim
        conv = nn.Conv3d if vqvae.spatial_dims == 3 else nn.Conv2d
        self.importance_head = nn.Sequential(conv(dim, head_channels, 3, padding=1), nn.GELU(),
                                             conv(head_channels, 1, 1))
        self.classifier = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, head_channels), nn.GELU(),
                                        nn.Dropout(dropout), nn.Linear(head_channels, num_classes))
        self.num_classes = num_classes
        self.register_buffer("code_age", torch.zeros(vqvae.num_embeddings, dtype=torch.long))
        self.last_indices: torch.Tensor | None = None
        self.last_encodings: torch.Tensor | None = None

    @property
    def quantizer(self):
        """MONAI's ``EMAQuantizer`` (codebook ``embedding``, EMA buffers ``ema_cluster_size``/``ema_w``)."""
        return self.vqvae.quantizer.quantizer

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where the VQGAN adaptive weight compares gradients (``last_layer``)."""
        return self.vqvae.decoder.blocks[-1].conv.weight

    @property
    def num_embeddings(self) -> int:
        return int(self.vqvae.num_embeddings)

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input of ``spatial_size`` (each level halves it)."""
        factor = 2 ** len(self.vqvae.channels)
        bad = [s for s in spatial_size if s % factor]
        if bad:
            raise ValueError(f"input size {tuple(spatial_size)} must be divisible by {factor} (2^levels)")
        return tuple(int(s) // factor for s in spatial_size)

    def _quantize(self, z: torch.Tensor):
        with full_precision(z.device):
            return self.quantizer(z.float())

    def _importance(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.importance_head(quantized).float()
        weights = torch.softmax(logits.flatten(1), dim=1)
        pooled = (quantized.float().flatten(2) * weights[:, None]).sum(-1)
        return weights.view_as(logits), self.classifier(pooled)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.vqvae.encode(images)
        quantized, quantization_loss, indices = self._quantize(z)
        reconstruction = self.vqvae.decode(quantized)
        importance, class_logits = self._importance(quantized)
        self.last_indices = indices.detach()
        self.last_encodings = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])
        return {"pred": reconstruction, "quantization_loss": quantization_loss, "class_logits": class_logits,
                "importance": importance, "indices": indices}

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (code indices [B, *grid], importance scores [B, *grid]) without touching the codebook.

        (MONAI's ``index_quantize`` runs the EMA update when the module is in training mode.)
        """
        z = self.vqvae.encode(images)
        with full_precision(z.device):
            _, _, indices = self.quantizer.quantize(z.float())
            quantized = self.quantizer.embed(indices)
        importance, _ = self._importance(quantized)
        return indices, importance[:, 0]

    @torch.no_grad()
    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, *grid] -> images [B, C, *spatial]."""
        with full_precision(indices.device):
            quantized = self.quantizer.embed(indices.long())
        return self.vqvae.decode(quantized)


class MaskedTokenTransformer(nn.Module):
    """Bidirectional transformer over the token grid, conditioned on a class token (MaskGIT-style).

    Input tokens are code indices in ``[0, num_embeddings)`` or ``mask_token_id`` (= ``num_embeddings``);
    a class token (``CLASSES`` index, or ``null_class`` = ``num_classes`` for the unconditional model of
    classifier-free guidance) is prepended; learned position embeddings; pre-norm MONAI ``TransformerBlock`` s
    with ``use_flash_attention`` (``F.scaled_dot_product_attention``: flash / memory-efficient kernels on
    CUDA). Output: logits over the codebook for every grid token, ``[B, N, num_embeddings]``.

    ``class_on_every_token`` also adds the class embedding to every token's input (no new parameters): a small
    transformer trained on few ROIs learns to ignore a condition it can reach only through attention.

    Attention dropout is switched off in eval mode here (:meth:`train`): MONAI's ``SABlock`` passes its
    ``dropout_rate`` to ``scaled_dot_product_attention`` whatever the mode, and that function always applies it
    (PyTorch documents it, pytorch/pytorch#124464), so sampling from a model with dropout would be random
    beyond its seeds and would depend on the other samples of the batch.
    """

    def __init__(
        self,
        num_embeddings: int,
        grid_size: Sequence[int] = (8, 8, 8),
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = len(CLASSES),
        dropout: float = 0.1,
        class_on_every_token: bool = False,
    ):
        super().__init__()
        self.class_on_every_token = check_bool("class_on_every_token", class_on_every_token)
        self.num_embeddings = int(num_embeddings)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_tokens = int(math.prod(self.grid_size))
        self.num_classes = int(num_classes)
        self.mask_token_id = self.num_embeddings
        self.null_class = self.num_classes
        self.token_embedding = nn.Embedding(self.num_embeddings + 1, hidden_size)
        self.class_embedding = nn.Embedding(self.num_classes + 1, hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_tokens + 1, hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, int(hidden_size * mlp_ratio), num_heads, dropout_rate=dropout,
                             qkv_bias=True, use_flash_attention=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, self.num_embeddings)
        self.attention_dropout = float(dropout)
        self._init_weights()
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for block in self.blocks:
            block.attn.dropout_rate = self.attention_dropout if mode else 0.0
        return self

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor,
                drop_condition: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens per sample (grid {self.grid_size}), "
                             f"got {tokens.shape[1]}")
        labels = torch.as_tensor(class_labels, device=tokens.device).long().reshape(-1)
        if drop_condition is not None:
            labels = torch.where(torch.as_tensor(drop_condition, device=tokens.device).bool(),
                                 torch.full_like(labels, self.null_class), labels)
        cls = self.class_embedding(labels)[:, None]
        embedded = self.token_embedding(tokens)
        if self.class_on_every_token:  # a direct path for the condition, not only through attention
            embedded = embedded + cls
        x = torch.cat([cls, embedded], dim=1)
        x = self.dropout(x + self.position_embedding)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))


def build_transformer(num_embeddings: int = 1024, grid_size: Sequence[int] = (8, 8, 8), hidden_size: int = 1024,
                      num_layers: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, dropout: float = 0.1,
                      num_classes: int = len(CLASSES), class_on_every_token: bool = False) -> MaskedTokenTransformer:
    """Paper size by default (24 layers, 16 heads, 1024-d over an 8^3 grid of a 1024-entry codebook)."""
    return MaskedTokenTransformer(num_embeddings, grid_size, hidden_size, num_layers, num_heads, mlp_ratio,
                                  num_classes, dropout, class_on_every_token)
