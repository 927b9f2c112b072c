"""One MONAI Label infer task per ``common.bundle.serve`` task: the bundles are generators, not segmenters.

MONAI Label's stock ``BundleInferTask`` expects a segmentation network behind one ``inference.json``; here every
request runs the bundle's own inference config through :func:`common.bundle.serve.run_task` (fresh folder per
request, one lock for all) and answers with the synthesised *image* (a NIfTI on the study's grid, with its affine).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import nibabel as nib
import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from common.bundle.run import BUNDLES
from common.bundle.serve import TaskSpec, run_task
from common.io import DataError

# Keys MONAI Label itself (the /infer endpoint, MONAILabelApp.infer, its clients) puts into the request next to the
# JSON params: not task parameters, so neither passed on nor refused. Anything else unknown is refused by name.
SERVER_KEYS = frozenset({
    "model", "image", "label", "session", "description", "save_label", "label_tag", "device", "client_id",
    "timeout", "logging", "result_extension", "result_dtype", "result_compress", "label_info", "cache_transforms",
})
ALL = "all"


class GeneratorInferTask(InferTask):
    """Serve task ``spec``: request JSON params -> ``run_task`` -> one NIfTI image + the run's record as JSON.

    Tasks with several outputs (the four contrasts) take an extra ``contrast`` parameter: one of them (a 3-D
    image), or ``all`` (default: one sampling run, the volumes stacked on a 4th axis in the order listed under
    ``contrasts`` in the answer's JSON), because asking four times would sample four times.
    """

    def __init__(self, spec: TaskSpec, config: str = "demo", device: str = "cpu"):
        self.spec = spec
        self.run_config = config
        self.device = device
        defaults = {k: p.default for k, p in spec.params.items()}
        if len(spec.outputs) > 1:
            defaults["contrast"] = ALL
        super().__init__(type=InferType.OTHERS, labels=None, dimension=3, description=spec.description,
                         config=defaults)

    def info(self) -> Dict[str, Any]:
        info = {**super().info(), **self.spec.info()}
        if len(self.spec.outputs) > 1:
            info["params"]["contrast"] = {
                "type": "str", "default": ALL, "choices": [ALL, *self.spec.outputs],
                "help": f"which image to answer with: one contrast (3-D), or {ALL} (4-D, 4th axis in 'outputs' order)",
            }
        return info

    def is_valid(self) -> bool:
        return (BUNDLES / self.spec.bundle / "configs" / "inference.json").is_file()

    def _split_request(self, request: Dict[str, Any]) -> Tuple[dict, str]:
        """The task's own parameters and the answer's contrast; unknown keys refused (a typo must not pass)."""
        allowed = set(self.spec.params) | ({"contrast"} if len(self.spec.outputs) > 1 else set())
        unknown = sorted(k for k in request if k not in allowed and k not in SERVER_KEYS)
        if unknown:
            raise DataError(f"task {self.spec.name}", f"unknown parameter(s) {', '.join(unknown)}; "
                                                      f"accepted: {', '.join(sorted(allowed)) or 'none'}")
        params = {k: request[k] for k in self.spec.params if k in request}
        contrast = str(request.get("contrast", ALL)) if len(self.spec.outputs) > 1 else self.spec.outputs[0]
        if contrast not in (ALL, *self.spec.outputs):
            raise DataError(f"task {self.spec.name}", f"contrast={contrast!r}; choose one of "
                                                      f"{', '.join((ALL, *self.spec.outputs))}")
        return params, contrast

    def __call__(self, request: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        start = time.perf_counter()
        params, contrast = self._split_request(request)
        image = request.get("image") if self.spec.input != "none" else None
        # the run's folder and the answer file go to the system temp folder (never the studies): nothing outlives
        # the request, even if the server is killed between two of them
        result = run_task(self.spec.name, image or None, params, config=self.run_config, device=self.device)
        try:
            names = list(self.spec.outputs) if contrast == ALL else [contrast]
            answer = self._answer_file(result.images, names, result.record["params"].get("seed"))
        finally:  # the run's folder is ours: only the answer file survives, and MONAI Label deletes it once sent
            shutil.rmtree(result.folder, ignore_errors=True)
        record = {k: v for k, v in result.record.items() if k != "files"}
        record.update(contrasts=names, seconds=round(time.perf_counter() - start, 2))
        return answer, record

    def _answer_file(self, images: Dict[str, Path], names: list, seed) -> str:
        """The answer outside the run folder and the studies: one output moved as written, or the outputs stacked."""
        fd, answer = tempfile.mkstemp(prefix=f"{self.spec.name}-seed{seed}-", suffix=".nii.gz")
        os.close(fd)
        try:
            if len(names) == 1:
                shutil.move(str(images[names[0]]), answer)
            else:
                first = nib.load(images[names[0]])
                data = np.stack([np.asarray(nib.load(images[n]).dataobj, dtype=np.float32) for n in names], axis=-1)
                header = first.header.copy()
                header.set_data_dtype(np.float32)
                nib.save(nib.Nifti1Image(data, first.affine, header), answer)
        except BaseException:
            os.unlink(answer)
            raise
        return answer
