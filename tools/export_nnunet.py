"""``python -m tools export-nnunet``: the GliomaGen training sets as nnU-Net v2 raw datasets."""

from __future__ import annotations

from common.errors import fail


def _hq_ids(folders, fraction: float, count: int | None = None) -> list[str]:
    """The best ``fraction`` (or ``count``) of the synthetic cases of the given synthesis folders (by the quality
    score in their manifests)."""
    import json
    from pathlib import Path

    from common.generation.synthesis import MANIFEST, select_high_quality
    from common.io import DataError

    cases = []
    for folder in folders:
        path = Path(folder) / MANIFEST
        if not path.exists():
            raise DataError(path, "no synthesis manifest: the high-quality subset needs the folder written by "
                                  "`python -m tools synthesize`")
        cases += json.loads(path.read_text())["cases"]
    return select_high_quality({"cases": cases}, fraction, count=count)


def export_nnunet(
    out: str,
    real: str,
    synthetic: str | None = None,
    augmented: str | None = None,
    test: str | None = None,
    configs: str = "all",
    dataset_id: int = 501,
    hq_fraction: float = 0.5,
    hq_count: int | None = None,
    seed: int = 0,
    mode: str = "copy",
    verify: bool = False,
) -> str:
    """Export the paper's training sets as nnU-Net v2 raw datasets (``imagesTr``, ``labelsTr``, ``dataset.json``).

    Configurations (one dataset each, always the same id: ``dataset_id`` + 0..5 in this order): real,
    real+synthetic, real+augmented, real+hq, half_real+hq, hq (those whose inputs are given). ``hq`` is the best ``hq_fraction``
    of the synthetic cases by their quality score (the synthesis manifests). Test sets stay real: segment the
    held-out real cases with each trained model and compare with ``python -m tools score-segmentation``.

    Args:
        out: the ``$nnUNet_raw`` folder to write ``DatasetNNN_GliomaGen<Config>/`` into.
        real: real dataset folder (BraTS 2024 layout, or any layout ``datalist`` reads).
        synthetic: synthetic dataset made from the real masks (``python -m tools synthesize`` output).
        augmented: synthetic dataset made from augmented masks.
        test: held-out real cases: written once to ``<out>/GliomaGenTest/imagesTs`` (for ``nnUNetv2_predict``)
            and ``labelsTs`` (the references for ``score-segmentation``).
        configs: ``all`` or a comma-separated list of the configurations above.
        dataset_id: nnU-Net id of the first dataset.
        hq_fraction: share of the synthetic cases (both folders together) kept as the high-quality subset.
        hq_count: size of the high-quality subset instead (the paper's HQS: 598).
        seed: seed of the random half of the real cases.
        mode: copy | symlink the image files.
        verify: run nnU-Net's own integrity check on every export (needs requirements-nnunet.txt).
    Returns:
        The output folder.
    """
    import sys

    from common.data.layouts import layout_label_scheme, read_layout
    from common.gliomagen.nnunet import (
        CONFIGURATIONS, config_name, export_dataset, export_test_set, paper_configurations, verify_integrity,
    )
    from common.io import DataError, check_output

    try:
        if not 0 < float(hq_fraction) <= 1:
            raise DataError("--hq_fraction", f"must be in (0, 1], got {hq_fraction}")
        if hq_count is not None and int(hq_count) < 1:
            raise DataError("--hq_count", f"must be >= 1, got {hq_count}")
        check_output(out, "dir", flag="out")
        wanted = CONFIGURATIONS if configs == "all" else (
            tuple(configs) if isinstance(configs, (list, tuple)) else tuple(c.strip() for c in str(configs).split(",")))
        unknown = [c for c in wanted if c not in CONFIGURATIONS]
        if unknown:
            raise DataError("--configs", f"unknown configuration(s) {unknown}; choose from {CONFIGURATIONS}")

        def items(folder):
            if not folder:
                return []
            scheme = layout_label_scheme(folder)
            return [dict(it, label_scheme=scheme) for it in read_layout(folder)]

        syn_folders = [f for f in (synthetic, augmented) if f]
        needs_hq = any("hq" in c for c in wanted)
        hq = _hq_ids(syn_folders, hq_fraction, hq_count) if needs_hq and syn_folders else []
        groups = paper_configurations(items(real), items(synthetic), items(augmented), hq, seed)
        written = []
        for config in (c for c in wanted if c in groups):
            folder = export_dataset(out, int(dataset_id) + CONFIGURATIONS.index(config), config_name(config), groups[config], mode=mode,
                                    description=f"GliomaGen training set '{config}'")
            counts = ", ".join(f"{len(v)} {p}" for p, v in groups[config])
            print(f"{folder.name}: {counts}", file=sys.stderr)
            if verify:
                verify_integrity(folder)
            written.append(folder)
        if test:
            test_items = items(test)
            folder = export_test_set(out, test_items, mode=mode)
            print(f"{folder.name}: {len(test_items)} real test cases (imagesTs, labelsTs)", file=sys.stderr)
        skipped = [c for c in wanted if c not in groups]
        if skipped:
            print(f"skipped (inputs not given): {', '.join(skipped)}", file=sys.stderr)
    except DataError as err:
        fail(err)
    return str(out)
