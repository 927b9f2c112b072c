"""What the ``brats_mri_vqgan_transformer`` bundle's configs call: the inference request (class, count, seeds),
the sampler and the run that writes ROIs, stage-2 token datasets and validation, real ROIs through the bundle's
own chain, and the evaluation report.

The inference workflow's model-zoo ids map onto these: ``dataset`` = :class:`ClassRequest` (bad input fails here,
before anything is written), ``inferer`` = :class:`TokenSampler`, ``evaluator`` = :class:`ROIGenerationRun`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from common.io import DataError, check_bool, check_output, save_json
from common.vqgan_transformer.networks import CLASSES
from common.vqgan_transformer.sampling import METHODS, generate_rois, parse_classes, save_rois

__all__ = ["ClassRequest", "TokenSampler", "ROIGenerationRun", "ReconstructionOutput", "MaskedTokenLossInferer",
           "token_dataset",
           "real_rois", "load_generated", "evaluate_generated"]


class ClassRequest:
    """``--class LGG|HGG|both``, ``--count`` (per class) and ``--seed`` (base) or ``--seeds`` (one per sample)
    -> the samples to draw. Unknown class, a count below 1, or seeds that do not match raise ``DataError``."""

    def __init__(self, class_label: str = "both", count: int = 1, seed: int = 0,
                 seeds: Sequence[int] | None = None):
        self.labels = parse_classes(class_label, count)
        self.class_label, self.count = str(class_label), int(count)
        if seeds is None or (isinstance(seeds, (list, tuple)) and len(seeds) == 0):
            self.seeds = [int(seed) + i for i in range(len(self.labels))]
        else:
            try:
                self.seeds = [int(s) for s in seeds]
            except (TypeError, ValueError):
                raise DataError("--seeds", f"seeds must be integers, got {seeds!r}") from None
            if len(self.seeds) != len(self.labels):
                raise DataError("--seeds", f"{len(self.seeds)} seeds given for {len(self.labels)} samples; "
                                "give one per sample")

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter({"class": CLASSES[c], "seed": s} for c, s in zip(self.labels, self.seeds))


class TokenSampler:
    """Decoding settings -> ``sampler(vqgan, transformer, request)`` = :func:`generate_rois`' result."""

    def __init__(self, method: str = "maskgit", steps: int = 12, guidance_scale: float = 1.0,
                 temperature: float = 1.0, choice_temperature: float = 4.5, batch_size: int = 4,
                 progress: bool = True):
        if method not in METHODS:
            raise DataError("--method", f"unknown decoding method {method!r}; use {', '.join(METHODS)}")
        if int(steps) < 1:
            raise DataError("--steps", f"steps must be >= 1, got {steps!r}")
        self.method, self.steps, self.guidance_scale = method, int(steps), float(guidance_scale)
        self.temperature, self.choice_temperature = float(temperature), float(choice_temperature)
        self.batch_size, self.progress = int(batch_size), bool(progress)

    def __call__(self, vqgan, transformer, request: ClassRequest) -> dict:
        return generate_rois(vqgan, transformer, request.class_label, request.count, seeds=request.seeds,
                             method=self.method, steps=self.steps, guidance_scale=self.guidance_scale,
                             temperature=self.temperature, choice_temperature=self.choice_temperature,
                             batch_size=self.batch_size, progress=self.progress)


class ROIGenerationRun:
    """The inference ``evaluator``: ``run()`` samples the request and writes ``output_dir`` (one NIfTI per ROI,
    ``montage.png``, ``manifest.json``). Files are written into a temporary sibling folder and moved in only
    when all are written, so an interrupted run leaves no partial set; earlier files of the same names are
    replaced.

    ``background_threshold``: decoded voxels below it are set to -1, the value outside the tumour of every real
    ROI (the chain multiplies by the mask); a small VQGAN decodes that background as noise just above -1, which
    would otherwise count as tumour. ``None`` keeps the decoder's values.
    """

    def __init__(self, vqgan, network, inferer: TokenSampler, dataset: ClassRequest, output_dir,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), background_threshold: float | None = None):
        self.vqgan, self.network, self.inferer, self.dataset = vqgan, network, inferer, dataset
        self.output_dir = check_output(output_dir, "dir", flag="output_dir")
        if (self.output_dir / "manifest.json").exists():  # its ROIs and the new ones would mix under one manifest
            raise DataError(f"--output_dir {self.output_dir}", "holds earlier ROIs (manifest.json); give a new "
                            "folder, or remove this one to generate again")
        self.spacing = tuple(float(s) for s in spacing)
        self.background_threshold = None if background_threshold is None else float(background_threshold)

    def run(self) -> dict:
        result = self.inferer(self.vqgan, self.network, self.dataset)
        if self.background_threshold is not None:
            images = result["images"]
            result["images"] = torch.where(images < self.background_threshold, torch.full_like(images, -1.0), images)
        out = self.output_dir
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            save_rois(result, tmp, spacing=self.spacing)
            manifest = json.loads((tmp / "manifest.json").read_text())
            save_json({**manifest, "background_threshold": self.background_threshold,
                       "spacing": list(self.spacing)}, tmp / "manifest.json")
            out.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in tmp.iterdir() if p.name != "manifest.json") + ["manifest.json"]
            for name in names:  # the manifest last: a folder with a manifest is complete
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"output_dir": str(out), "classes": result["classes"], "seeds": result["seeds"],
                "background_threshold": self.background_threshold,
                "method": result["method"], "network_passes": result["network_passes"],
                "seconds": result["seconds"]}


class ReconstructionOutput:
    """Stage-1 validation inferer: the VQGAN's reconstruction (its forward returns a dict; ``pred`` is the image)."""

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        return network(inputs)["pred"]


class MaskedTokenLossInferer:
    """Stage-2 validation: ``inferer(tokens, network, condition=class)`` -> per-sample cross-entropy [B, 1] of the
    transformer on a fixed random half of the tokens masked (seeded per batch position), the same masks at
    every validation: comparable across top-k ratios, since it does not depend on the importance scores."""

    def __init__(self, mask_ratio: float = 0.5, seed: int = 0):
        if not 0.0 < float(mask_ratio) <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.mask_ratio, self.seed = float(mask_ratio), int(seed)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, network, condition: torch.Tensor | None = None) -> torch.Tensor:
        from common.engines.distributed import unwrap

        net = unwrap(network)
        flat = tokens.reshape(tokens.shape[0], -1).long()
        b, n = flat.shape
        g = torch.Generator().manual_seed(self.seed)
        order = torch.rand(b, n, generator=g).argsort(1).to(flat.device)
        masked = order < max(1, int(round(self.mask_ratio * n)))
        inputs = flat.masked_fill(masked, net.mask_token_id)
        labels = torch.zeros(b, dtype=torch.long, device=flat.device) if condition is None else condition
        logits = network(inputs, labels.reshape(-1).long()).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), flat, reduction="none")
        return ((ce * masked).sum(1) / masked.sum(1))[:, None]


def token_dataset(vqgan, items: Iterable[dict], transform: Callable, batch_size: int = 4, device=None,
                  progress: bool = True) -> list[dict]:
    """Datalist items -> the ROI chain -> codes and importance scores of the frozen VQGAN, once (stage 2 trains
    on these: the paper's ROIs are not augmented). Items keep ``id``, ``class``, ``tokens``, ``importance``."""
    from tqdm.auto import tqdm

    from common.vqgan_transformer.trainer import precompute_tokens

    rois = []
    for item in tqdm(list(items), desc="ROIs for stage 2", disable=not progress):
        d = transform(dict(item))
        rois.append({"id": d.get("id", ""), "class": torch.as_tensor(d["class"]).long(),
                     "image": torch.as_tensor(d["image"]).float()})
    out = precompute_tokens(vqgan, rois, batch_size=batch_size, device=device)
    return [{k: v for k, v in d.items() if k != "image"} for d in out]


def real_rois(datalist, transform: Callable, sections: str | Sequence[str] = ("training", "validation"),
              progress: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """ROIs ``[1, *roi]`` and class indices of a datalist's cases through the bundle's ``preprocessing`` chain."""
    from tqdm.auto import tqdm

    from common.data.datalist import load_datalist

    sections = [sections] if isinstance(sections, str) else list(sections)
    items = [it for s in sections for it in load_datalist(datalist, s)]
    if not items:
        raise DataError(datalist, f"no cases in section(s) {', '.join(sections)}")
    rois, labels = [], []
    for item in tqdm(items, desc="real ROIs", disable=not progress):
        d = transform(dict(item))
        rois.append(np.asarray(d["image"], dtype=np.float32))
        labels.append(int(d["class"]))
    return rois, labels


def load_generated(folder) -> tuple[list[np.ndarray], list[int]]:
    """ROIs ``[1, *roi]`` and requested class indices of a folder written by :class:`ROIGenerationRun`."""
    from common.io import load_nifti

    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise DataError(folder, "no manifest.json: not a complete folder of generated ROIs (run inference first)")
    samples = json.loads(manifest.read_text())["samples"]
    rois, labels = [], []
    for s in samples:
        data = load_nifti(folder / s["file"])
        volume = np.asarray(data[0] if isinstance(data, tuple) else data, dtype=np.float32)
        rois.append(volume[None])
        labels.append(CLASSES.index(s["class"]))
    return rois, labels


def evaluate_generated(real_datalist, generated: Mapping[str, str] | str, output_dir, transform: Callable,
                       folds: int = 5, real_train_fraction: float = 1.0, pretrain_epochs: int = 20,
                       finetune_epochs: int = 10, classifier_channels: Sequence[int] = (16, 32, 64, 128),
                       downstream: bool = True, seed: int = 0, device=None, progress: bool = True) -> dict:
    """The poster's tables for each generated set (e.g. one per top-k ratio): per-class MMD and MS-SSIM, class
    adherence (classifiers trained on real ROIs score the generated ones), and with ``downstream`` the LGG/HGG
    ROI classifier pretrained on the synthetic ROIs and fine-tuned on the real ones against real only
    (mean +- std over ``folds``). Writes ``output_dir/report.json`` and returns it."""
    from common.vqgan_transformer.evaluation import class_adherence, downstream_classification, per_class_quality

    sets = {"generated": generated} if isinstance(generated, (str, os.PathLike)) else dict(generated)
    if not sets:
        raise DataError("--generated", "no generated folders given")
    rois, labels = real_rois(real_datalist, transform, progress=progress)
    real = {c: [r for r, y in zip(rois, labels) if y == i] for i, c in enumerate(CLASSES)}
    report = {"real": {"datalist": str(real_datalist), "counts": {c: len(v) for c, v in real.items()}}, "sets": {}}
    for name, folder in sets.items():
        gen, requested = load_generated(folder)
        synthetic = {c: [r for r, y in zip(gen, requested) if y == i] for i, c in enumerate(CLASSES)}
        synthetic = {c: v for c, v in synthetic.items() if v}
        row = {"folder": str(folder), "quality": per_class_quality(real, synthetic, seed=seed),
               "class_adherence": class_adherence(rois, labels, gen, requested, seed=seed)}
        if check_bool("downstream", downstream):
            row["downstream"] = downstream_classification(
                rois, labels, gen, requested, folds=folds, real_train_fraction=real_train_fraction,
                pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs, channels=classifier_channels,
                seed=seed, device=device, progress=progress)
        report["sets"][name] = row
    save_json(report, Path(output_dir) / "report.json")
    return report
