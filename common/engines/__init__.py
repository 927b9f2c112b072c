"""Shared ignite/MONAI training engine for the generative bundles.

Trainers (MONAI ``Trainer`` subclasses, hence ignite Engines usable in bundle configs):

* :class:`AdversarialTrainer` -- generator + patch discriminator with named, weighted loss terms
  (:mod:`common.engines.losses`), adversarial term after a warm-up, optional adaptive weight and feature
  matching, D steps per G step: the LDM-3D autoencoder, the VQGAN and pix2pix;
* :class:`DiffusionTrainer` -- epsilon / v-prediction / sample / rectified-flow regression in pixel or
  latent space, condition dropout for classifier-free guidance, latent scale factor stored in the network.

Both: ``amp="bf16"|"fp16"|None``, ``grad_clip_norm``, ``ema_decay`` (``trainer.ema_model``), losses
averaged over processes. ``engine.state.output`` is an :class:`EngineOutput`: ``output["loss"]`` is a
float and MONAI's ``from_engine(["loss"], first=True)`` (``--tracking mlflow``, ``StatsHandler``) works.
Around them:

* :mod:`common.engines.checkpoint` -- :class:`FullStateCheckpointer` (exact resume, RNG included),
  :class:`WeightsExporter` (plain ``models/*.pt``, e.g. of the EMA weights), :class:`WeightsCard` (what they were
  trained as, beside them), :func:`load_weights`;
* :mod:`common.engines.data` -- :func:`make_dataloader` / :class:`ResumableSampler`; :func:`training_loader` (the
  ``loader`` switch: that loader as is, or :class:`DaliLoader`, the same data served by NVIDIA DALI);
* :mod:`common.engines.distributed` -- ``setup()``, ``wrap_model()``, ``is_main_process()`` for torchrun;
* :mod:`common.engines.validation` -- seeded evaluators, prepare-batch, inferers and metric handlers.

Logging is MONAI's (``StatsHandler``, ``TensorBoardStatsHandler``, ``MLFlowHandler`` through ``--tracking mlflow``),
plus :class:`common.engines.validation.ValidationImages` (real above generated slices in TensorBoard).
"""

from common.engines import losses
from common.engines.adversarial import AdversarialTrainer
from common.engines.base import EngineOutput, GenerativeTrainer
from common.engines.checkpoint import FullStateCheckpointer, WeightsCard, WeightsExporter, load_weights, write_card
from common.engines.data import DaliLoader, ResumableSampler, make_dataloader, training_loader
from common.engines.diffusion import DiffusionTrainer, diffusion_target

__all__ = [
    "AdversarialTrainer",
    "DiffusionTrainer",
    "GenerativeTrainer",
    "EngineOutput",
    "FullStateCheckpointer",
    "WeightsCard",
    "WeightsExporter",
    "load_weights",
    "write_card",
    "losses",
    "ResumableSampler",
    "make_dataloader",
    "training_loader",
    "DaliLoader",
    "diffusion_target",
]
