"""The GliomaGen bundle's model as a ``generate_case(case, seed)`` for dataset synthesis
(``python -m tools synthesize --generator common.gliomagen.generator:demo_generator``): the bundle's own network,
weights and sampler, read from its configs."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

BUNDLE = "brats_mri_gliomagen"


def bundle_generator(config_files: Sequence[str] = ("inference.json",), bundle: str = BUNDLE,
                     **overrides) -> Callable[[dict, int], dict]:
    """``generate_case(case, seed) -> {contrast: volume}`` for masks on the model grid (6 labels, or a scheme that
    converts to them with the head label present, e.g. ``augment-masks`` output). Under torchrun each process
    samples on ``cuda:$LOCAL_RANK`` when CUDA is there."""
    import torch

    from common.bundle import bundle_config
    from common.data.labels import convert_labels
    from common.gliomagen.masks import input_problems
    from common.io import DataError

    if torch.cuda.is_available():
        overrides.setdefault("device", f"$torch.device('cuda:{int(os.environ.get('LOCAL_RANK', 0))}')")
    parser = bundle_config(bundle, config_files, **overrides)
    network = parser.get_parsed_content("network")
    sampler = parser.get_parsed_content("inferer")
    sampler.progress = False
    grid = tuple(int(s) for s in parser.get_parsed_content("spatial_size"))
    contrasts = parser.get_parsed_content("contrasts")
    device = next(network.parameters()).device

    def generate_case(case: dict, seed: int) -> dict:
        where = case.get("label") or case.get("id")
        labels = np.asarray(case["mask"])
        scheme = case.get("scheme", "six_label")
        if scheme != "six_label":
            labels = convert_labels(labels, scheme, "six_label", lossy="error", where=where)
        problems = input_problems(labels)
        if problems:
            raise DataError(where, "; ".join(problems))
        if labels.shape != grid:
            raise DataError(where, f"mask grid {labels.shape} is not the model grid {grid}: bring it there with the "
                                   "bundle's chain (common.bundle.prepare_cases)")
        condition = torch.as_tensor(labels.astype(np.float32))[None, None].to(device)
        images = sampler(condition, network, seeds=[int(seed)])[0].float().cpu().numpy()
        return {c: images[i] for i, c in enumerate(contrasts)}

    return generate_case


def demo_generator():
    """The committed CPU-size demo model (``configs/demo.json``)."""
    return bundle_generator(("inference.json", "demo.json"))


def paper_generator():
    """The paper-size model in the bundle's ``models/model.pt``."""
    return bundle_generator(("inference.json",))
