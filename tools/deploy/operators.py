"""Holoscan operators of the deploy apps: load an input, run a serving task, write its images.

Not the SDK's own: ``NiftiDataLoader`` drops the affine, there is no NIfTI writer, and ``MonaiBundleInferenceOperator``
treats every output as a segmentation and cannot run a generator's sampling loop. So the task operator calls
:func:`common.bundle.serve.run_task` (the bundle's own inference config) and the writers put its outputs on the
input's grid, atomically. A request's fault (``DataError``) is recorded in ``state["error"]`` instead of raised, so
the app ends with one clear line rather than the executor's error log; any other exception is a bug and propagates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.io import DataError, load_nifti, open_nifti, save_json, save_nifti
from monai.deploy.core import Fragment, Operator, OperatorSpec


def case_stem(path: Path | None, task: str, params: dict) -> str:
    """The name outputs start with: the input's BraTS case id (``BraTS-GLI-00000-000-seg`` -> the id), or for a task
    without input its request (``vqgan-HGG-seed0``)."""
    if path is None:
        return "-".join([task, *(str(params[k]) for k in ("class", "seed") if k in params)])
    name = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    head, _, tail = name.rpartition("-")
    return head if head and tail in ("seg", "t1n", "t1c", "t2w", "t2f", "mask", "label") else name


class InputPathOperator(Operator):
    """Source: emits the input file's path once (``None`` for a task without input); the app adds CountCondition(1)."""

    def __init__(self, fragment: Fragment, *args, input_path: Path | None, **kwargs):
        self.input_path = input_path
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("path")

    def compute(self, op_input, op_output, context):
        op_output.emit(self.input_path, "path")


class ServeTaskOperator(Operator):
    """Runs one serving task on the received path; emits ``(input_path, TaskResult)`` (the writer owns the folder)."""

    def __init__(self, fragment: Fragment, *args, task: str, params: dict, state: dict, config: str = "demo",
                 device: str = "cpu", workdir: Path | None = None, **kwargs):
        self.task, self.params, self.state = task, params, state
        self.config, self.device, self.workdir = config, device, workdir
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("path")
        spec.output("result")

    def compute(self, op_input, op_output, context):
        from common.bundle.serve import run_task

        path = op_input.receive("path")
        try:
            result = run_task(self.task, path, self.params, work_root=self.workdir, config=self.config,
                              device=self.device)
        except DataError as exc:
            self.state["error"] = exc
            return
        op_output.emit((path, result), "result")


class NiftiWriterOperator(Operator):
    """Writes each image of a task result into ``output_dir`` as ``<case>-<name>.nii.gz`` (atomic), plus
    ``<case>-request.json`` (task, parameters, files).

    Checks that each image is on the input's grid (shape, affine) before writing it: the apps promise that.
    """

    def __init__(self, fragment: Fragment, *args, output_dir: Path, task: str, state: dict, **kwargs):
        self.output_dir, self.task, self.state = Path(output_dir), task, state
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("result")

    def compute(self, op_input, op_output, context):
        path, result = op_input.receive("result")
        try:
            stem = case_stem(Path(path) if path else None, self.task, result.record["params"])
            ref = open_nifti(path) if path else None  # header only: the grid the outputs must be on
            written = {}
            for name, image in sorted(result.images.items()):
                data, affine, header = load_nifti(image)
                if ref is not None:
                    if data.shape != ref.shape[:3] or not np.allclose(affine, ref.affine, atol=1e-4):
                        raise RuntimeError(f"{self.task}: output {name} {data.shape} is not on the input grid "
                                           f"{ref.shape}")
                    affine = ref.affine
                written[name] = save_nifti(data, affine, self.output_dir / f"{stem}-{name}.nii.gz", header=header)
            save_json({**result.record, "files": {k: str(v) for k, v in written.items()}},
                      self.output_dir / f"{stem}-request.json")
            self.state["written"] = written
        finally:
            shutil.rmtree(result.folder, ignore_errors=True)


class DicomSeriesLoaderOperator(Operator):
    """Source: reads the DICOM series once, writes it as a RAS NIfTI in ``workdir``; emits the path and the series."""

    def __init__(self, fragment: Fragment, *args, input_dir: Path, workdir: Path, state: dict, **kwargs):
        self.input_dir, self.workdir, self.state = Path(input_dir), Path(workdir), state
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("path")
        spec.output("series")

    def compute(self, op_input, op_output, context):
        from tools.deploy.dicom import read_series, write_nifti

        try:
            series = read_series(self.input_dir)
        except DataError as exc:
            self.state["error"] = exc
            return
        path = write_nifti(series, self.workdir / "source.nii.gz")
        op_output.emit(str(path), "path")
        op_output.emit(series, "series")


class DicomSeriesWriterOperator(Operator):
    """Writes the task's one image back onto the source slices as a new synthetic series (see ``write_series``)."""

    def __init__(self, fragment: Fragment, *args, output_dir: Path, image: str, description: str, derivation: str,
                 state: dict, **kwargs):
        self.output_dir, self.image, self.state = Path(output_dir), image, state
        self.series_description, self.derivation = description, derivation
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("series")
        spec.input("result")

    def compute(self, op_input, op_output, context):
        from tools.deploy.dicom import write_series

        series = op_input.receive("series")
        _, result = op_input.receive("result")
        try:
            data, affine, _ = load_nifti(result.images[self.image])
            if not np.allclose(affine, series.affine, atol=1e-4):
                raise RuntimeError(f"output {self.image} is not on the series grid")
            self.state["written"] = write_series(series, data, self.output_dir, self.series_description,
                                                         self.derivation)
        finally:
            shutil.rmtree(result.folder, ignore_errors=True)
