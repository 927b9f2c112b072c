"""One generator/discriminator trainer for every adversarial stage of the collection: the LDM-3D KL autoencoder,
the VQGAN and pix2pix.

Each iteration: a generator step on ``sum_i w_i * term_i + w_adv * lambda * G_adv + w_fm * FM``, then
``d_steps`` discriminator steps on the patch-GAN loss (MONAI ``PatchAdversarialLoss``: least squares, hinge or
BCE). Before ``adversarial_warmup_iterations`` are done the discriminator is neither used nor updated.

* ``losses``: named :mod:`common.engines.losses` terms, each reported on its own under its name.
* ``adaptive_weight`` (VQGAN, Esser et al.): ``lambda = ||grad_L rec|| / (||grad_L G_adv|| + 1e-4)`` at the
  generator's ``last_layer`` weight, clamped to [0, 1e4] and detached; otherwise ``lambda = 1``.
* ``feature_matching_weight``: L1 between the discriminator's intermediate features of real and generated
  images (the discriminator returns a list of features, logits last, as MONAI's ``PatchDiscriminator``).
* ``condition_key`` (pix2pix): the discriminator sees ``cat(batch[condition_key], image)``; the generator input
  is ``batch[input_key]`` and its target ``batch[target_key]`` (the same key for an autoencoder).

Generator outputs: a tensor (pix2pix), ``(reconstruction, z_mu, z_sigma)`` (MONAI ``AutoencoderKL``),
``(reconstruction, quantization_loss)`` (MONAI ``VQVAE``) or a dict with ``pred`` and any other named outputs.
Output keys: ``loss`` (generator total), one per term, ``g_adv``, ``adv_weight`` (effective), ``fm``, ``d_loss``
(floats; ``grad_norm``/``d_grad_norm`` when clipping) and ``image``/``pred``/``label`` tensors (detached).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from monai.losses import PatchAdversarialLoss

from common.engines.base import GenerativeTrainer

__all__ = ["AdversarialTrainer", "generator_outputs"]


def generator_outputs(out: Any) -> dict[str, torch.Tensor]:
    """The generator's outputs by name (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return {"pred": out}
    if isinstance(out, Mapping):
        if "pred" not in out:
            raise ValueError(f"the generator returned a dict without 'pred' (keys {sorted(out)})")
        return dict(out)
    if isinstance(out, (tuple, list)) and len(out) == 3:
        return {"pred": out[0], "z_mu": out[1], "z_sigma": out[2]}
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return {"pred": out[0], "quantization_loss": out[1]}
    raise ValueError(
        f"the generator returned {type(out).__name__}; expected a tensor, (reconstruction, z_mu, z_sigma), "
        "(reconstruction, quantization_loss) or a dict with 'pred'"
    )


def _logits(out: Any) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


class AdversarialTrainer(GenerativeTrainer):
    """Generator + optional patch discriminator trainer. See the module docstring.

    Args:
        generator, optimizer: the network and its optimizer (wrap both with DDP beforehand for multi-GPU).
        losses: name -> :class:`common.engines.losses.LossTerm` (at least one).
        discriminator, d_optimizer: optional patch discriminator and its optimizer.
        adversarial_weight, adversarial_warmup_iterations, adversarial_criterion: the adversarial term's weight,
            the iterations before it (and the discriminator) start (resume-safe), and the GAN loss.
        adaptive_weight, last_layer: VQGAN's adaptive weight and the parameter it is measured at.
        d_steps: discriminator updates per generator update.
        input_key, target_key, condition_key: batch keys (see the module docstring).
        ema_decay: EMA of the generator weights (``trainer.ema_model``).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        losses: Mapping[str, Any],
        discriminator: torch.nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.01,
        adversarial_warmup_iterations: int = 0,
        adversarial_criterion: str = "least_squares",
        adaptive_weight: bool = False,
        last_layer: torch.Tensor | None = None,
        feature_matching_weight: float = 0.0,
        d_steps: int = 1,
        input_key: str = "image",
        target_key: str | None = None,
        condition_key: str | None = None,
        amp: str | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        **kwargs: Any,
    ):
        if (discriminator is None) != (d_optimizer is None):
            raise ValueError("AdversarialTrainer: give both discriminator and d_optimizer, or neither")
        if not losses:
            raise ValueError("AdversarialTrainer: give at least one loss term")
        if adversarial_warmup_iterations < 0:
            raise ValueError(f"adversarial_warmup_iterations must be >= 0, got {adversarial_warmup_iterations}")
        if int(d_steps) < 1:
            raise ValueError(f"d_steps must be >= 1, got {d_steps}")
        if adaptive_weight and last_layer is None:
            raise ValueError("adaptive_weight needs last_layer (the generator's last weight, e.g. its output conv)")
        reserved = {"loss", "g_adv", "adv_weight", "fm", "d_loss", "grad_norm", "d_grad_norm"}
        if reserved & set(losses):
            raise ValueError(f"loss term names {sorted(reserved & set(losses))} are reserved; rename them")
        super().__init__(device, max_epochs, train_data_loader, ema_network=generator, amp=amp,
                         grad_clip_norm=grad_clip_norm, ema_decay=ema_decay, **kwargs)
        self.generator = generator
        self.optimizer = optimizer
        self.losses = dict(losses)
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_warmup_iterations = int(adversarial_warmup_iterations)
        self.adversarial_loss = PatchAdversarialLoss(criterion=adversarial_criterion, reduction="mean")
        self.adaptive_weight = bool(adaptive_weight)
        self.last_layer = last_layer
        self.feature_matching_weight = float(feature_matching_weight)
        self.d_steps = int(d_steps)
        self.input_key = input_key
        self.target_key = target_key or input_key
        self.condition_key = condition_key
        self.g_scaler = self._make_scaler()
        self.d_scaler = self._make_scaler()
        self._finish_init()

    def _named_state(self) -> dict[str, Any]:
        return {"generator": self.generator, "optimizer": self.optimizer, "discriminator": self.discriminator,
                "d_optimizer": self.d_optimizer, "g_scaler": self.g_scaler, "d_scaler": self.d_scaler}

    def adversarial_active(self) -> bool:
        """True once the warm-up is over (the current iteration number is 1-based)."""
        return self.discriminator is not None and self.state.iteration > self.adversarial_warmup_iterations

    def _tensor(self, batch: dict, key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"AdversarialTrainer: batch has no '{key}' key (got {sorted(batch)})")
        return torch.as_tensor(batch[key].to(self.state.device, non_blocking=self.non_blocking)).float()

    def _d_input(self, image: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return (image if condition is None else torch.cat([condition, image.to(condition.dtype)], 1)).contiguous()

    def _adaptive(self, rec: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
        rec_grad = torch.autograd.grad(rec, self.last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(g_adv, self.last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def _train_step(self, batchdata: dict) -> dict:
        if not isinstance(batchdata, dict):
            raise KeyError(f"AdversarialTrainer: batches must be dicts, got {type(batchdata).__name__}")
        inputs = self._tensor(batchdata, self.input_key)
        target = inputs if self.target_key == self.input_key else self._tensor(batchdata, self.target_key)
        condition = None if self.condition_key is None else self._tensor(batchdata, self.condition_key)
        adversarial = self.adversarial_active()
        zero = torch.zeros((), device=inputs.device)

        # generator step
        self.generator.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self.autocast():
            outputs = generator_outputs(self.generator(inputs))
        pred = outputs["pred"].float()
        values: dict[str, torch.Tensor] = {}
        rec = zero
        for name, term in self.losses.items():
            if not term.active:
                values[name] = zero
                continue
            with self.autocast():
                values[name] = term(pred, target, outputs, batchdata).float()
            rec = rec + term.weight * values[name]
        loss = rec
        g_adv = fm = zero
        adv_weight = zero
        if adversarial:
            with self.autocast():
                fake_out = self.discriminator(self._d_input(outputs["pred"], condition))
            g_adv = self.adversarial_loss(_logits(fake_out).float(), target_is_real=True, for_discriminator=False)
            lam = self._adaptive(rec, g_adv) if self.adaptive_weight else torch.ones((), device=inputs.device)
            adv_weight = self.adversarial_weight * lam
            loss = loss + adv_weight * g_adv
            if self.feature_matching_weight > 0:
                with torch.no_grad(), self.autocast():
                    real_out = self.discriminator(self._d_input(target, condition))
                fm = torch.stack([(f.float() - r.float()).abs().mean()
                                  for f, r in zip(fake_out[:-1], real_out[:-1])]).mean()
                loss = loss + self.feature_matching_weight * fm
        grad_norm = self.backward_step(loss, self.optimizer, self.g_scaler)

        # discriminator steps
        d_loss = zero
        d_grad_norm = None
        if adversarial:
            self.discriminator.train()
            fake = self._d_input(outputs["pred"].detach(), condition)
            real = self._d_input(target, condition)
            for _ in range(self.d_steps):
                self.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
                with self.autocast():
                    fake_logits = _logits(self.discriminator(fake))
                    real_logits = _logits(self.discriminator(real))
                d_loss = 0.5 * (
                    self.adversarial_loss(fake_logits.float(), target_is_real=False, for_discriminator=True)
                    + self.adversarial_loss(real_logits.float(), target_is_real=True, for_discriminator=True)
                )
                d_grad_norm = self.backward_step(d_loss, self.d_optimizer, self.d_scaler)

        scalars = {"loss": float(loss.detach()), "g_adv": float(g_adv.detach()), "adv_weight": float(adv_weight),
                   "fm": float(fm.detach()), "d_loss": float(d_loss.detach())}
        scalars.update({name: float(v.detach()) for name, v in values.items()})
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        if d_grad_norm is not None:
            scalars["d_grad_norm"] = d_grad_norm
        output: dict[str, Any] = self.reduce_scalars(scalars)
        pred_out = pred.detach()
        output.update({"image": target, "pred": pred_out, "label": target})
        return output
