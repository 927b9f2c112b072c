"""Adversarial autoencoder training (KL or VQ) (stage 1 of latent diffusion).

Each iteration: a generator step on ``l1*|x-x'| + kl*KL + perceptual*P + ssim*(1-SSIM) + adv*G_adv``,
then, once ``adversarial_warmup_iterations`` are done, a discriminator step on the least-squares
patch-GAN loss (MONAI ``PatchAdversarialLoss``). Before the warm-up ends the discriminator is neither
used nor updated. Output keys: ``loss`` (generator total), ``l1``, ``kl``, ``vq``, ``perceptual``, ``ssim``,
``g_adv``, ``d_loss`` (floats; ``grad_norm``/``d_grad_norm`` when clipping) and ``image`` /
``reconstruction`` / ``pred`` tensors (detached) for image handlers.

The autoencoder returns ``(reconstruction, z_mu, z_sigma)`` like ``monai.networks.nets.AutoencoderKL``
(KL term) or ``(reconstruction, quantization_loss)`` like ``monai.networks.nets.VQVAE`` (the VQ term,
weight ``vq_weight``, reported as ``vq``; ``kl`` is then 0).
Gradient checkpointing is the network's own option (``AutoencoderKL(use_checkpoint=True)``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from monai.losses import PatchAdversarialLoss
from monai.metrics.regression import compute_ssim_and_cs

from common.engines.base import GenerativeTrainer

__all__ = ["AutoencoderTrainer", "kl_divergence", "ssim_similarity"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def ssim_similarity(pred: torch.Tensor, target: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """Mean SSIM (gaussian window) with the data range taken from the target batch, differentiable in ``pred``.

    The window shrinks to the smallest spatial size (odd), so tiny test volumes work.
    """
    spatial = pred.shape[2:]
    k = min(kernel_size, min(spatial))
    k = k if k % 2 == 1 else k - 1
    data_range = (target.max() - target.min()).detach().clamp_min(1e-6)
    ssim, _ = compute_ssim_and_cs(
        y_pred=pred.float(),
        y=target.float(),
        spatial_dims=len(spatial),
        kernel_size=[k] * len(spatial),
        kernel_sigma=[1.5] * len(spatial),
        data_range=data_range,
        kernel_type="gaussian",
        k1=0.01,
        k2=0.03,
    )
    return ssim.mean()


class AutoencoderTrainer(GenerativeTrainer):
    """Generator (autoencoder) + optional patch discriminator trainer. See the module docstring.

    Args:
        autoencoder, optimizer: the network and its optimizer (wrap both with DDP beforehand for multi-GPU).
        discriminator, d_optimizer: optional patch discriminator (returns a tensor or a list whose last item
            holds the logits, like ``monai.networks.nets.PatchDiscriminator``).
        perceptual_loss: callable ``(pred, target) -> loss`` (e.g. ``monai.losses.PerceptualLoss``); skipped
            when None or ``perceptual_weight == 0``.
        adversarial_warmup_iterations: generator adversarial term and discriminator steps start after this
            many iterations (counted from the start of training, resume-safe).
        adversarial_criterion: ``PatchAdversarialLoss`` criterion (``least_squares``, ``bce`` or ``hinge``).
        ema_decay: EMA of the autoencoder weights (``trainer.ema_model``).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        autoencoder: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        l1_weight: float = 1.0,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        ssim_weight: float = 0.0,
        kl_weight: float = 1e-6,
        vq_weight: float = 1.0,
        adversarial_weight: float = 0.01,
        adversarial_warmup_iterations: int = 0,
        adversarial_criterion: str = "least_squares",
        image_key: str = "image",
        amp: str | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        **kwargs: Any,
    ):
        if (discriminator is None) != (d_optimizer is None):
            raise ValueError("AutoencoderTrainer: give both discriminator and d_optimizer, or neither")
        if adversarial_warmup_iterations < 0:
            raise ValueError(f"adversarial_warmup_iterations must be >= 0, got {adversarial_warmup_iterations}")
        super().__init__(device, max_epochs, train_data_loader, ema_network=autoencoder, amp=amp,
                         grad_clip_norm=grad_clip_norm, ema_decay=ema_decay, **kwargs)
        self.autoencoder = autoencoder
        self.optimizer = optimizer
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.l1_weight = l1_weight
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.ssim_weight = ssim_weight
        self.kl_weight = kl_weight
        self.vq_weight = vq_weight
        self.adversarial_weight = adversarial_weight
        self.adversarial_warmup_iterations = int(adversarial_warmup_iterations)
        self.adversarial_loss = PatchAdversarialLoss(criterion=adversarial_criterion, reduction="mean")
        self.image_key = image_key
        self.g_scaler = self._make_scaler()
        self.d_scaler = self._make_scaler()
        self._finish_init()

    def _named_state(self) -> dict[str, Any]:
        return {
            "autoencoder": self.autoencoder,
            "optimizer": self.optimizer,
            "discriminator": self.discriminator,
            "d_optimizer": self.d_optimizer,
            "g_scaler": self.g_scaler,
            "d_scaler": self.d_scaler,
        }

    def adversarial_active(self) -> bool:
        """True once the warm-up is over (the current iteration number is 1-based)."""
        return self.discriminator is not None and self.state.iteration > self.adversarial_warmup_iterations

    @staticmethod
    def _logits(out: Any) -> torch.Tensor:
        return out[-1] if isinstance(out, (list, tuple)) else out

    def _train_step(self, batchdata: dict) -> dict:
        if not isinstance(batchdata, dict) or self.image_key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise KeyError(f"AutoencoderTrainer: batch has no '{self.image_key}' key (got {keys})")
        images = batchdata[self.image_key].to(self.state.device, non_blocking=self.non_blocking)
        images = torch.as_tensor(images).float()
        adversarial = self.adversarial_active()
        zero = torch.zeros((), device=images.device)

        # generator step
        self.autoencoder.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self.autocast():
            outputs = self.autoencoder(images)
        reconstruction = outputs[0]
        recon = reconstruction.float()
        l1 = (recon - images).abs().mean()
        kl = vq = zero
        if len(outputs) == 3:
            kl = kl_divergence(outputs[1], outputs[2])
            loss = self.l1_weight * l1 + self.kl_weight * kl
        elif len(outputs) == 2:
            vq = outputs[1].float().mean()
            loss = self.l1_weight * l1 + self.vq_weight * vq
        else:
            raise ValueError(
                f"AutoencoderTrainer: the autoencoder returned {len(outputs)} outputs; expected "
                "(reconstruction, z_mu, z_sigma) or (reconstruction, quantization_loss)"
            )
        perceptual = zero
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            with self.autocast():
                perceptual = self.perceptual_loss(recon, images).float().mean()
            loss = loss + self.perceptual_weight * perceptual
        ssim_term = zero
        if self.ssim_weight > 0:
            ssim_term = 1.0 - ssim_similarity(recon, images)
            loss = loss + self.ssim_weight * ssim_term
        g_adv = zero
        if adversarial:
            with self.autocast():
                fake_logits = self._logits(self.discriminator(reconstruction.contiguous()))
            g_adv = self.adversarial_loss(fake_logits.float(), target_is_real=True, for_discriminator=False)
            loss = loss + self.adversarial_weight * g_adv
        grad_norm = self.backward_step(loss, self.optimizer, self.g_scaler)

        # discriminator step
        d_loss = zero
        d_grad_norm = None
        if adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
            with self.autocast():
                fake_logits = self._logits(self.discriminator(reconstruction.detach().contiguous()))
                real_logits = self._logits(self.discriminator(images.contiguous()))
            d_loss = 0.5 * (
                self.adversarial_loss(fake_logits.float(), target_is_real=False, for_discriminator=True)
                + self.adversarial_loss(real_logits.float(), target_is_real=True, for_discriminator=True)
            )
            d_grad_norm = self.backward_step(d_loss, self.d_optimizer, self.d_scaler)

        scalars = {
            "loss": float(loss.detach()),
            "l1": float(l1.detach()),
            "kl": float(kl.detach()),
            "vq": float(vq.detach()),
            "perceptual": float(perceptual.detach()),
            "ssim": float(ssim_term.detach()),
            "g_adv": float(g_adv.detach()),
            "d_loss": float(d_loss.detach()),
        }
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        if d_grad_norm is not None:
            scalars["d_grad_norm"] = d_grad_norm
        output: dict[str, Any] = self.reduce_scalars(scalars)
        recon_out = recon.detach()
        output.update({"image": images, "reconstruction": recon_out, "pred": recon_out, "label": images})
        return output
