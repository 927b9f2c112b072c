"""One ``generate`` for every generator: conditions from a source -> the bundle's inferer (a sampler) -> a writer."""

from __future__ import annotations

import time

import torch

__all__ = ["GenerationRun", "generate"]


def generate(network, inferer, source, writer, device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """Draw ``inferer.num_samples`` samples per condition of ``source`` and hand each to ``writer``.

    ``source`` yields ``(item, condition)`` pairs (``item["id"]`` names the case; the rest is what the writer
    needs, e.g. the affine); ``inferer(condition, network)`` returns the samples in seed order; ``writer`` has
    ``write(name, volume, item) -> files`` and ``finish(records, settings)``. Returns one record per sample.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    network = network.to(device).eval()
    records = []
    for item, condition in tqdm(source, total=len(source), desc="conditions", disable=not progress):
        start = time.perf_counter()
        samples = inferer(condition.to(device), network).float().cpu().numpy()
        seconds = (time.perf_counter() - start) / max(len(samples), 1)
        for seed, volume in zip(inferer.seeds, samples):
            name = f"{item['id']}-s{seed}"
            files = writer.write(name, volume, item)
            records.append({"case": name, "source_id": item["id"], "condition": item.get("path"), "seed": int(seed),
                            "seconds": round(seconds, 2), "files": {k: str(v) for k, v in files.items()}})
    settings = inferer.describe() if hasattr(inferer, "describe") else {}
    writer.finish(records, settings)
    return records


class GenerationRun:
    """:func:`generate` as an object with ``run()``: the inference workflow's ``evaluator`` in a bundle config
    (MONAI's inference properties ask for ``dataset`` and ``evaluator``; for a generator they are the condition
    source and this)."""

    def __init__(self, network, inferer, source, writer, device: torch.device | str = "cpu", progress: bool = True):
        self.network, self.inferer, self.source, self.writer = network, inferer, source, writer
        self.device, self.progress = device, progress

    def run(self) -> list[dict]:
        return generate(self.network, self.inferer, self.source, self.writer, self.device, self.progress)
