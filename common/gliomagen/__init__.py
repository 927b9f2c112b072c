"""GliomaGen (Renner; a Med-DDPM variant for BraTS 2024 post-treatment glioma): the 6-label condition and mask
augmentation (:mod:`common.gliomagen.masks`), nnU-Net v2 exports of real and synthetic datasets
(:mod:`common.gliomagen.nnunet`). Dataset synthesis itself is generic: :mod:`common.generation.synthesis`."""
