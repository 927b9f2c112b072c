"""Zhou & Khalvati, MIDL 2024: class-conditional (LGG/HGG) 3D tumour-ROI generation with a VQGAN whose tokens
carry a learned importance score and a bidirectional masked transformer trained with hybrid masking.

Modules: ``transforms`` (FLAIR ROI chain, grade -> class), ``networks`` (VQGAN + importance head/classifier,
masked token transformer), ``codebook`` (usage, perplexity, dead-code restart), ``masking`` (hybrid masking),
``trainer`` (stage-2 trainer), ``sampling`` (MaskGIT and raster decoding, ROI generation), ``evaluation``
(per-class MMD / MS-SSIM, downstream LGG/HGG classification), ``benchmark`` (this bundle's speed suite).
Stage 1 trains with the shared :class:`common.engines.AdversarialTrainer`.
"""

from common.vqgan_transformer.networks import (
    CLASSES,
    ImportanceVQGAN,
    MaskedTokenTransformer,
    build_discriminator,
    build_transformer,
    build_vqgan,
)

__all__ = ["CLASSES", "ImportanceVQGAN", "MaskedTokenTransformer", "build_discriminator", "build_transformer",
           "build_vqgan"]
