"""The deploy apps' Holoscan graphs (importing this imports MONAI and the SDK: ~10 s on our 2-core machines, so the
command-line entry points ``app.py`` and ``app_dicom_impute.py`` check the request first and import this after)."""

from __future__ import annotations

from pathlib import Path

from tools.deploy.runner import quiet_sdk

quiet_sdk()
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402

from common.bundle.serve import task_spec  # noqa: E402
from tools.deploy.dicom import SYNTHETIC_SERIES  # noqa: E402
from tools.deploy.operators import (  # noqa: E402
    DicomSeriesLoaderOperator,
    DicomSeriesWriterOperator,
    InputPathOperator,
    NiftiWriterOperator,
    ServeTaskOperator,
)

__all__ = ["Application", "DicomImputeApp", "ServeTaskApp"]


class _OneRequestApp(Application):
    """One request, then the app stops: its source operator runs once (``CountCondition(1)``). ``state`` collects
    what the writer wrote, or the request's refusal (``DataError``) for the entry point to print."""

    def __init__(self, *args, task: str, params: dict, output: Path, workdir: Path, config: str = "demo",
                 device: str = "cpu", **kwargs):
        self.task, self.params, self.output, self.workdir = task, params, output, workdir
        self.config, self.device = config, device
        self.state: dict = {}
        super().__init__(*args, **kwargs)

    def _run_op(self) -> ServeTaskOperator:
        return ServeTaskOperator(self, task=self.task, params=self.params, state=self.state, config=self.config,
                                 device=self.device, workdir=self.workdir, name="run_task")


class ServeTaskApp(_OneRequestApp):
    """NIfTI in -> NIfTI out: load -> ``run_task`` -> ``OUT/<case>-<image>.nii.gz`` + ``<case>-request.json``."""

    def __init__(self, *args, input_path: Path | None, **kwargs):
        self.input_path = input_path
        super().__init__(*args, **kwargs)

    def compose(self):
        load = InputPathOperator(self, CountCondition(self, 1), input_path=self.input_path, name="load")
        run = self._run_op()
        write = NiftiWriterOperator(self, output_dir=self.output, task=self.task, state=self.state, name="write")
        self.add_flow(load, run, {("path", "path")})
        self.add_flow(run, write, {("result", "result")})


class DicomImputeApp(_OneRequestApp):
    """DICOM series -> RAS NIfTI -> cGAN imputation -> ``OUT/synthetic-<image>/``, one file per source slice."""

    def __init__(self, *args, input_dir: Path, **kwargs):
        self.input_dir = input_dir
        super().__init__(*args, **kwargs)

    def compose(self):
        image, description = SYNTHETIC_SERIES[self.task]
        spec = task_spec(self.task)
        load = DicomSeriesLoaderOperator(self, CountCondition(self, 1), input_dir=self.input_dir,
                                         workdir=self.workdir, state=self.state, name="load_series")
        run = self._run_op()
        derivation = (f"{spec.description}; bundle {spec.bundle} ({self.config} weights), seed "
                      f"{self.params['seed']}. Synthetic image: not acquired, not for diagnosis.")
        write = DicomSeriesWriterOperator(self, output_dir=self.output / f"synthetic-{image}", image=image,
                                          description=description, derivation=derivation, state=self.state,
                                          name="write_series")
        self.add_flow(load, run, {("path", "path")})
        self.add_flow(load, write, {("series", "series")})
        self.add_flow(run, write, {("result", "result")})
