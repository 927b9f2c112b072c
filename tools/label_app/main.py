"""MONAI Label app: the collection's generators (``common.bundle.serve.TASKS``) as infer tasks.

Start it with ``tools/label_app/start_server --studies STUDIES`` (loopback, port 8000; see README.md). A study is
a NIfTI file: the tumor mask itself for the mask tasks, the acquired contrast for imputation; vqgan needs none.

MONAI Label 0.8.5 answers every exception from an infer with a bare 500. A bad request is the client's fault and
must say what to fix, so :meth:`GeneratorApp.infer` turns ``DataError`` (and unknown task / study) into 4xx with
the message, and :func:`_refuse_requests_without_input` does the same for the one check the endpoint makes itself.
"""

from __future__ import annotations

import functools
import os

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp

from common.bundle.serve import TASKS, task_spec
from common.io import DataError
from tools.label_app.lib.infer import GeneratorInferTask  # by package: MONAI Label loads main.py by path

NO_IMAGE = "-"  # what a parameters-only task (vqgan) is given when the request names no study


class GeneratorApp(MONAILabelApp):
    """One infer task per serve task; ``--conf config paper`` serves the paper-size weights, ``--conf device cuda``."""

    def __init__(self, app_dir, studies, conf):
        self.run_config = (conf or {}).get("config", "demo")
        self.device = (conf or {}).get("device", "cpu")
        if self.run_config not in ("demo", "paper"):
            raise ValueError(f"--conf config {self.run_config!r}: choose demo or paper")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Brain-tumor MRI synthesis",
                         description="Generators of the BraTS synthesis bundles (LDM-3D, GliomaGen, VQGAN, cGAN)",
                         version="1.0")

    def init_infers(self):
        return {name: GeneratorInferTask(spec, self.run_config, self.device)
                for name, spec in TASKS.items()}

    def init_strategies(self):
        return {}  # no active learning: studies are inputs to synthesise from, not images to label

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with the client's mistakes answered 4xx and their message (not a bare 500)."""
        try:
            spec = task_spec(request.get("model", ""))
        except DataError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        image = request.get("image")
        if spec.input != "none" and isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"task {spec.name}: no study {image!r} in the studies "
                                                            f"folder (a study id is the file name without .nii.gz)")
        try:
            return super().infer(request, datastore)
        except DataError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None


def _refuse_requests_without_input():
    """The /infer endpoint answers a request with no image with a 500; make it 400 (vqgan needs no image at all).

    The endpoint function looks ``run_inference`` up in its module at call time, so wrapping that name is enough.
    """
    from monailabel.endpoints import infer as endpoint

    original = endpoint.run_inference
    if getattr(original, "_label_app", False):
        return

    @functools.wraps(original)
    def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None,
                      output=None):
        if not (file or image or session_id):
            spec = TASKS.get(model)
            if spec is None:
                raise HTTPException(status_code=404, detail=f"unknown task {model!r}; choose one of {', '.join(TASKS)}")
            if spec.input != "none":
                raise HTTPException(status_code=400, detail=f"task {model} needs an input {spec.input}: name a study "
                                                            f"(?image=<study id>) or upload a NIfTI file (file=@...)")
            image = NO_IMAGE
        return original(background_tasks, model, image, session_id, params, file, label, output)

    run_inference._label_app = True
    endpoint.run_inference = run_inference


_refuse_requests_without_input()
