"""Conditions: what a generator is conditioned on, turned into what a MONAI ``DiffusionModelUNet`` takes.

Every condition module maps a raw condition to ``(channels, tokens)``: ``channels`` are concatenated with the
denoiser input (on its grid), ``tokens`` feed the UNet's cross-attention; either may be ``None``. Each holds a
learned *null* condition that replaces the real one where ``drop`` is true: condition dropout in training and the
unconditional branch of classifier-free guidance use the same path, so the sampler needs nothing else.

* :class:`MaskCondition` -- a label map (or one-hot) -> one-hot channels, optionally brought to a coarser grid
  by strided convolutions (latent diffusion), and/or tokens.
* :class:`ClassCondition` -- an integer class (e.g. LGG/HGG) -> one embedding token.
* :class:`ImageCondition` -- source images -> channels (image-to-image).
* :class:`ConditionedDenoiser` -- a UNet + a condition: ``forward(x, t, condition=None, drop_condition=None)``,
  the interface of :class:`common.engines.DiffusionTrainer` and :class:`common.samplers.DiffusionSampler`.
"""

from common.conditions.core import ClassCondition, ConditionedDenoiser, ImageCondition, MaskCondition, apply_drop

__all__ = ["ClassCondition", "ConditionedDenoiser", "ImageCondition", "MaskCondition", "apply_drop"]
