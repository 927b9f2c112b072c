"""Sampling of class-conditional tumour ROIs: token grids from the masked transformer, then the VQGAN decoder.

Two decoders on the same bidirectional transformer:

* :func:`maskgit_decode` -- MaskGIT parallel iterative decoding (Chang et al. 2022): start from an all-``[MASK]``
  grid; at step t sample every masked token, keep the most confident ones and re-mask the
  ``floor(N * cos(pi/2 * t/T))`` least confident (confidence = log-probability plus Gumbel noise annealed by
  ``choice_temperature * (1 - t/T)``). ``steps`` network passes in all.
* :func:`raster_decode` -- one token at a time in raster order, as the public code samples: N passes.

Both use classifier-free guidance (``logits = u + w (c - u)``, conditional and null-class rows in one batched
pass; ``guidance_scale`` 1 = conditional only) and per-sample seeds: every random number of sample i comes from
its own generator seeded with ``seeds[i]``, so a sample is the same whatever the batch size it is drawn in.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.engines.distributed import unwrap
from common.io import DataError, save_json, save_nifti
from common.vqgan_transformer.networks import CLASSES

__all__ = ["parse_classes", "maskgit_decode", "raster_decode", "generate_rois", "save_rois", "save_real_vs_generated",
           "METHODS"]

METHODS = ("maskgit", "raster")


def parse_classes(class_label: str | int, count: int) -> list[int]:
    """``"LGG"``, ``"HGG"`` or ``"both"`` (``count`` of each) -> class indices; bad input is a ``DataError``."""
    try:
        n = int(count)
    except (TypeError, ValueError):
        raise DataError("--count", f"count must be a positive integer, got {count!r}") from None
    if n < 1 or n != count:
        raise DataError("--count", f"count must be a positive integer, got {count!r}")
    name = str(class_label).strip().upper()
    if name == "BOTH":
        return [c for c in range(len(CLASSES)) for _ in range(n)]
    if name not in CLASSES:
        raise DataError("--class", f"unknown class {class_label!r}; use {', '.join(CLASSES)} or both")
    return [CLASSES.index(name)] * n


def _generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _uniform(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One draw of ``shape`` per sample from its own generator, stacked on the batch."""
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


class _Guided:
    """Guided logits of the transformer; counts network passes."""

    def __init__(self, network, labels: torch.Tensor, guidance_scale: float):
        self.network = network
        self.labels = labels
        self.scale = float(guidance_scale)
        self.passes = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        if self.scale == 1.0:
            return self.network(tokens, self.labels).float()
        b = tokens.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
        both = self.network(torch.cat([tokens, tokens]), torch.cat([self.labels, self.labels]),
                            drop_condition=drop).float()
        cond, uncond = both[:b], both[b:]
        return uncond + self.scale * (cond - uncond)


def _check(network, labels, seeds) -> tuple[torch.Tensor, list[int]]:
    labels = torch.as_tensor(labels).long().reshape(-1)
    seeds = [int(s) for s in seeds]
    if len(seeds) != labels.numel():
        raise ValueError(f"need one seed per sample, got {len(seeds)} seeds for {labels.numel()} samples")
    bad = [int(c) for c in labels.tolist() if not 0 <= c < network.num_classes]
    if bad:
        raise DataError("--class", f"class indices {bad} outside 0..{network.num_classes - 1}")
    return labels, seeds


@torch.no_grad()
def maskgit_decode(network, class_labels, seeds: Sequence[int], steps: int = 12, guidance_scale: float = 1.0,
                   temperature: float = 1.0, choice_temperature: float = 4.5) -> tuple[torch.Tensor, dict]:
    """Parallel iterative decoding -> (codes [B, *grid], {"network_passes", "steps"})."""
    net = unwrap(network)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(net.parameters()).device
    labels, seeds = _check(net, class_labels, seeds)
    labels = labels.to(device)
    b, n, k, mask_id = labels.numel(), net.num_tokens, net.num_embeddings, net.mask_token_id
    gens = _generators(seeds, device)
    guided = _Guided(network, labels, guidance_scale)
    tokens = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    for t in range(int(steps)):
        unknown = tokens == mask_id
        logits = guided(tokens)
        if temperature > 0:
            sampled = (logits / temperature + _gumbel(_uniform(gens, (n, k), device))).argmax(-1)
        else:
            sampled = logits.argmax(-1)
        log_p = torch.log_softmax(logits, -1).gather(-1, sampled[..., None])[..., 0]
        sampled = torch.where(unknown, sampled, tokens)
        frac = (t + 1) / int(steps)
        n_mask = int(math.floor(n * math.cos(math.pi / 2 * frac)))
        n_mask = max(0, min(n_mask, int(unknown.sum(1).min()) - 1))
        noise = _gumbel(_uniform(gens, (n,), device))
        confidence = log_p + choice_temperature * (1.0 - frac) * noise
        confidence = confidence.masked_fill(~unknown, float("inf"))
        if n_mask > 0:
            lowest = confidence.argsort(dim=1)[:, :n_mask]
            sampled = sampled.scatter(1, lowest, mask_id)
        tokens = sampled
    return tokens.view(b, *net.grid_size), {"network_passes": guided.passes, "steps": int(steps)}


@torch.no_grad()
def raster_decode(network, class_labels, seeds: Sequence[int], guidance_scale: float = 1.0,
                  temperature: float = 1.0, max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """One token per pass in raster order (the public code's sampling) -> (codes [B, *grid], info).

    ``max_tokens`` stops after that many tokens (the rest stay ``[MASK]``): the benchmark times a prefix,
    every pass costing the same.
    """
    net = unwrap(network)
    device = next(net.parameters()).device
    labels, seeds = _check(net, class_labels, seeds)
    labels = labels.to(device)
    b, n, k = labels.numel(), net.num_tokens, net.num_embeddings
    gens = _generators(seeds, device)
    guided = _Guided(network, labels, guidance_scale)
    tokens = torch.full((b, n), net.mask_token_id, dtype=torch.long, device=device)
    for i in range(n if max_tokens is None else min(n, int(max_tokens))):
        logits = guided(tokens)[:, i]
        if temperature > 0:
            tokens[:, i] = (logits / temperature + _gumbel(_uniform(gens, (k,), device))).argmax(-1)
        else:
            tokens[:, i] = logits.argmax(-1)
    return tokens.view(b, *net.grid_size), {"network_passes": guided.passes, "steps": n}


@torch.no_grad()
def generate_rois(vqgan, transformer, class_label: str = "both", count: int = 1,
                  seeds: int | Sequence[int] | None = None, method: str = "maskgit", steps: int = 12,
                  guidance_scale: float = 1.0, temperature: float = 1.0, choice_temperature: float = 4.5,
                  batch_size: int = 4, progress: bool = True) -> dict:
    """Class label(s), count and seeds in -> ROI volumes out (the VQGAN decoder on the sampled codes).

    ``seeds``: None -> 0, 1, ...; an int -> that base + 0, 1, ...; a list -> one per sample. Returns
    ``{"images": float tensor [M, C, *spatial] in [-1, 1] on the CPU, "classes": [...], "seeds": [...],
    "method", "network_passes", "seconds"}``.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise DataError("--method", f"unknown decoding method {method!r}; use {', '.join(METHODS)}")
    labels = parse_classes(class_label, count)
    if seeds is None or isinstance(seeds, (int, np.integer)):
        base = int(seeds or 0)
        seeds = [base + i for i in range(len(labels))]
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(labels):
        raise DataError("--seeds", f"{len(seeds)} seeds given for {len(labels)} samples; give one per sample")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vq, tr = unwrap(vqgan).eval(), unwrap(transformer).eval()
    t0 = time.perf_counter()
    images, passes = [], 0
    for start in tqdm(range(0, len(labels), int(batch_size)), desc=f"sampling ({method})", disable=not progress):
        lab, sd = labels[start:start + int(batch_size)], seeds[start:start + int(batch_size)]
        if method == "maskgit":
            codes, info = maskgit_decode(tr, lab, sd, steps, guidance_scale, temperature, choice_temperature)
        else:
            codes, info = raster_decode(tr, lab, sd, guidance_scale, temperature)
        passes += info["network_passes"]
        images.append(vq.decode_tokens(codes).float().clamp(-1, 1).cpu())
    return {"images": torch.cat(images), "classes": [CLASSES[c] for c in labels], "seeds": seeds,
            "method": method, "network_passes": passes, "seconds": round(time.perf_counter() - t0, 3)}


def save_rois(result: dict, out_dir, spacing: Sequence[float] = (1.0, 1.0, 1.0), montage: bool = True) -> Path:
    """Write each ROI as NIfTI (``roi_0000_HGG.nii.gz``; RAS affine, centred, ``spacing`` mm), one montage PNG of
    the middle slices and ``manifest.json`` (written last: a folder with a manifest is complete)."""
    from common.viz import save_montage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = result["images"]
    shape = images.shape[2:]
    affine = np.diag([float(s) for s in spacing] + [1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing, dtype=float)
    entries, panels = [], {}
    for i, (img, cls, seed) in enumerate(zip(images, result["classes"], result["seeds"])):
        name = f"roi_{i:04d}_{cls}.nii.gz"
        volume = img[0].numpy() if img.shape[0] == 1 else np.moveaxis(img.numpy(), 0, -1)
        save_nifti(volume.astype(np.float32), affine, out / name)
        entries.append({"file": name, "class": cls, "seed": seed})
        if len(panels) < 8:
            panels[f"{cls} #{i}"] = img[0].numpy()
    if montage and panels:
        save_montage(panels, out / "montage.png", title=f"generated ROIs ({result['method']})", affine=affine)
    save_json({"generator": "common.vqgan_transformer.sampling.generate_rois", "method": result["method"],
               "network_passes": result["network_passes"], "seconds": result["seconds"], "samples": entries},
              out / "manifest.json")
    return out


def save_real_vs_generated(real: dict, generated: dict, path, per_class: int = 2, title: str | None = None) -> Path:
    """Real and generated ROIs of each class side by side (middle slices through the ROI centre, where the
    tumour is): ``real``/``generated`` map a class name to ROIs ``[1, *spatial]`` or ``[*spatial]``."""
    from common.viz import save_montage

    def plain(v):
        v = np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
        return v[0] if v.ndim == 4 else v

    panels = {}
    for cls in CLASSES:
        for kind, source in (("real", real), ("generated", generated)):
            for i, volume in enumerate(list(source.get(cls, []))[:per_class]):
                panels[f"{kind} {cls} {i + 1}"] = plain(volume)
    if not panels:
        raise ValueError("no ROIs to draw")
    return save_montage(panels, path, title=title or "real vs generated tumour ROIs")
