"""Generation: condition sources -> a sampler -> output writers (:func:`generate`), and resumable, sharded
dataset synthesis (:mod:`common.generation.synthesis`)."""

from common.generation.core import GenerationRun, generate
from common.generation.sources import MaskSource, collect_masks, load_mask
from common.generation.writers import NiftiWriter, save_generated, write_datalist

__all__ = ["GenerationRun", "MaskSource", "NiftiWriter", "collect_masks", "generate", "load_mask", "save_generated", "write_datalist"]
