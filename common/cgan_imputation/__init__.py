"""Genc et al., ISMRM 2022: pix2pix imputation of a missing MRI contrast (T2 -> FLAIR, T1c -> T1, several -> one).

Modules (imported on use, so importing the package stays cheap):

* ``networks`` -- the pix2pix ResNet-block generator (written here: MONAI has none) and MONAI's 70x70 PatchGAN.
* ``data`` -- axial slice sampling with "batch samples" per volume, brain-only slices, the lesion mask.
* ``impute`` -- whole-volume imputation on the source's grid with a synthetic sidecar (``python -m tools impute``).
* ``tune`` -- Optuna TPE search of lr, batch size, batch samples, L1 and mask-loss weights (``python -m tools tune``).
* ``evaluate`` -- the paper's Figure 5 / BraSyn scores: SSIM over the brain and in the lesion, PSNR, MAE,
  predicted-vs-target against input-vs-target.
* ``benchmark`` -- this method's speed suite.
"""
