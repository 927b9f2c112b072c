"""``python -m tools evaluate``: synthetic vs real images -> metrics.json, report.md, PNGs."""

from __future__ import annotations

from pathlib import Path

from common.errors import fail


def evaluate(
    real: str,
    synthetic: str,
    out: str,
    extractor: str = "inception2d",
    weights: str | None = None,
    extractor_mode: str = "3d",
    slice_stride: int = 1,
    train: str | None = None,
    segmenter: str | None = None,
    contrasts: str | tuple | list | None = None,
    label_scheme: str = "brats2023",
    hd95_convention: str = "monai",
    n_bootstrap: int = 200,
    n_subsamples: int = 100,
    kid_subset_size: int = 1000,
    ssim: str = "standard",
    ms_ssim: str = "auto",
    diversity_pairs: int | None = 200,
    n_montages: int = 3,
    device: str | None = None,
    workers: int = 1,
    shard: str | None = None,
    merge: bool = False,
    feature_cache: str | None = "default",
    seed: int = 0,
    progress: bool = True,
):
    """Evaluate synthetic against real images (FID/KID, MMD, MS-SSIM fidelity and diversity, SSIM/PSNR/MAE in
    brain and lesion, memorisation, conditioning fidelity) and write metrics.json, report.md and PNGs.

    A synthetic case is paired with the real case named by its ``source_id`` / ``condition_id`` (datalist
    items) or with the real case of the same id. Several synthetic cases of one condition give diversity.

    Args:
        real: datalist JSON (every section) or dataset folder of the real images (with labels for lesion metrics).
        synthetic: datalist JSON or folder of generated cases (one folder per case, files named by contrast).
        out: output folder (created); files appear only once the whole evaluation has succeeded.
        extractor: FID/KID features: inception2d (torchvision ImageNet Inception-v3 on axial slices),
            radimagenet2.5d (RadImageNet ResNet-50 on three planes), medicalnet3d (MedicalNet 3D ResNet-50),
            a TorchScript feature network file, or "none" to skip FID/KID.
        weights: local weight file of the extractor; default: torch.hub.get_dir()/checkpoints/<published name>:
            inception_v3_google-0cc3c7bd.pth (torchvision), RadImageNet-ResNet50.pt (RadImageNet PyTorch backbone),
            resnet_50_23dataset.pth (MedicalNet; also found in the huggingface cache).
        extractor_mode: for a TorchScript extractor: 2d, 2.5d or 3d.
        slice_stride: keep every n-th slice for the slice-based extractors (faster on CPU).
        train: datalist or folder of the training images: enables the memorisation (near-copy) check.
        segmenter: TorchScript segmentation network (input: the contrasts stacked, z-scored on brain voxels;
            output: logits) for conditioning fidelity (Dice/HD95/ASSD against the conditioning mask).
        contrasts: contrasts to evaluate, e.g. t2f or "t1n,t2f" (default: all four).
        label_scheme: label scheme of the masks (brats2019, brats2023, brats2024, msd, six_label).
        hd95_convention: monai (larger directed 95th percentile over boundary voxels) or brats (the BraTS 2023
            metrics code: DeepMind surface-distance over area-weighted surfels), for conditioning fidelity.
        n_bootstrap: bootstrap resamples for the intervals of the paired means (SSIM/PSNR/MAE).
        n_subsamples: half-samples (without replacement) for the FID/KID intervals.
        kid_subset_size: KID subset size (capped by the smaller set; the value used is reported).
        ssim: SSIM window: standard (11-voxel Gaussian, sigma 1.5; the literature's) or w7 (former 7-voxel one).
        ms_ssim: MS-SSIM setting: auto (the largest that fits the volume), standard (5 scales, needs >= 176 a
            side), 3-scale, 3-scale-w7 or 2-scale-w5. The report prints the setting beside each value.
        diversity_pairs: within-condition pairs drawn (seeded) for the diversity MS-SSIM; 0 or None: all pairs.
        n_montages: number of real-vs-synthetic slice montages.
        device: cuda or cpu (default: cuda when present).
        workers: parallel processes scoring cases (each builds its own extractor).
        shard: "i/n": score only every n-th case/pair into OUT/shards/; run all n, then --merge.
        merge: combine OUT/shards/ into the full report (same --real/--synthetic and settings as the shards).
        feature_cache: folder caching FID/KID features by file hash ("default": the project cache, "none": off).
        seed: seed of subsets, half-samples, pairs and bootstrap.
        progress: show progress bars.
    """
    import torch

    from common import CONTRASTS
    from common.io import DataError, check_output
    from common.metrics import EvalConfig, evaluate_sets, load_items
    from common.metrics.evaluate import evaluate_shard, merge_shards

    if isinstance(contrasts, str):
        contrasts = [c.strip() for c in contrasts.split(",") if c.strip()]
    contrasts = tuple(contrasts or CONTRASTS)
    check_output(out, "dir", flag="out")  # before the hour of scoring that fills it
    for flag, path in (("real", real), ("synthetic", synthetic), ("train", train), ("segmenter", segmenter)):
        if path is not None and not Path(path).exists():
            raise DataError(f"--{flag} {path}", "does not exist (give a dataset folder or a datalist JSON)")
    options = {}
    if slice_stride != 1 and extractor in ("inception2d", "radimagenet2.5d"):
        options["stride"] = slice_stride
    config = EvalConfig(
        extractor=None if str(extractor).lower() == "none" else extractor, weights=weights,
        extractor_mode=extractor_mode, extractor_options=options, device=device, contrasts=contrasts,
        label_scheme=label_scheme, hd95_convention=hd95_convention, n_bootstrap=n_bootstrap, n_subsamples=n_subsamples,
        kid_subset_size=kid_subset_size, ssim=ssim, ms_ssim=ms_ssim, diversity_pairs=diversity_pairs or None,
        n_montages=n_montages, workers=workers, seed=seed, progress=progress,
        feature_cache=None if str(feature_cache).lower() == "none" else feature_cache,
    )
    if shard and merge:
        raise SystemExit("--shard scores one part, --merge combines the parts: give one of them")
    seg_net = None
    if segmenter:
        try:
            seg_net = torch.jit.load(segmenter, map_location=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except Exception as exc:
            raise DataError(segmenter, f"cannot load TorchScript segmentation network ({exc})") from exc
        seg_net.eval()
    try:
        real_items, synth_items = load_items(real), load_items(synthetic)
        if shard:
            path = evaluate_shard(real_items, synth_items, out, shard, config)
            print(f"wrote {path}; when every shard is done: python -m tools evaluate ... --merge")
            return
        run = merge_shards if merge else evaluate_sets
        metrics = run(real_items, synth_items, out, config,
                      train_items=load_items(train) if train else None, segmenter=seg_net)
    except (DataError, FileNotFoundError) as exc:  # user mistakes (missing weights too); anything else is a bug
        fail(exc, "nothing written")
    for note in metrics["notes"]:
        print(f"note: {note}")
    print(f"wrote {out}/metrics.json, {out}/report.md and {len(metrics['files']) - 2} PNGs")
