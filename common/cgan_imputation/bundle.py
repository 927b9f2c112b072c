"""What the ``brats_mri_cgan_imputation`` bundle's configs call around the shared engines.

* :class:`ImputationRun` -- the inference workflow's ``evaluator``: ``run()`` imputes a case folder or dataset
  with the configured (already loaded) generator through :func:`common.cgan_imputation.impute.impute_dataset`.
* :class:`VolumeImputationInferer` + :func:`brain_ssim_handler` -- validation on whole held-out volumes, slice by
  slice as imputation does, scored by the BraSyn SSIM over the brain (the number the paper maximises).
* :class:`TuneReport` -- hands each validation SSIM to the hyper-parameter search (``@tune_report``).
* :class:`GeneratorExporter` -- ``models/*.pt`` in the format ``python -m tools impute`` reads (weights, generator
  arguments, task, slice size).
* :class:`BundleObjective` -- a picklable search objective training this bundle through its ``training`` run
  (``tune.bundle_objective`` runs the id ``train``, which is the bundle's sub-config, not its run list).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from common.engines.checkpoint import WeightsExporter
from common.io import DataError, check_bool, check_output


def required(value: Any, flag: str, what: str) -> Any:
    """``value``, or a ``DataError`` naming the flag a config needs (one line, not a KeyError deep in a run)."""
    if value in (None, "", [], {}):
        raise DataError(flag, f"not given; fix: {flag} <{what}>")
    return value


class GeneratorExporter(WeightsExporter):
    """At the end of training (rank 0) write the generator with :func:`save_generator` (task and size kept)."""

    def __init__(self, path: str | os.PathLike, sources: Sequence[str], target: str,
                 spatial_size: Sequence[int], key: str = "generator", event: str = "COMPLETED"):
        super().__init__(path, key=key, event=event)
        self.sources, self.target, self.spatial_size = list(sources), target, list(spatial_size)

    def export(self, engine) -> Path | None:
        import ignite.distributed as idist

        from common.cgan_imputation.impute import save_generator
        from common.engines.distributed import unwrap

        objects = engine.checkpoint_objects()
        if self.key not in objects:
            raise KeyError(f"GeneratorExporter: trainer has no '{self.key}' (has {sorted(objects)})")
        if idist.get_rank() != 0:
            return None
        return save_generator(unwrap(objects[self.key]), self.path, self.sources, self.target, self.spatial_size,
                              iterations=int(engine.state.iteration))


class VolumeImputationInferer:
    """``inferer(source, network, condition=brain)``: ``(B, S, X, Y, Z)`` -> imputed ``(B, 1, X, Y, Z)``, axial
    slices ``batch`` at a time on the training slice size (what ``impute_volume`` does at inference)."""

    def __init__(self, batch: int = 16, spatial_size: Sequence[int] = (256, 256)):
        self.batch, self.spatial_size = int(batch), tuple(int(s) for s in spatial_size)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, condition: torch.Tensor | None = None):
        from common.cgan_imputation.impute import impute_volume
        from common.engines.distributed import unwrap

        net = unwrap(network)
        out = []
        for b in range(inputs.shape[0]):
            brain = None if condition is None else condition[b, 0]
            vol = impute_volume(net, inputs[b], brain, batch=self.batch, spatial_size=self.spatial_size,
                                device=inputs.device)
            out.append(torch.from_numpy(vol)[None])
        return torch.stack(out).to(inputs.device)


def brain_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BraSyn SSIM over the brain (the target's non-zero voxels, 0.5-99.5 % clipping), as
    :func:`common.cgan_imputation.evaluate.score_scan` scores a scan."""
    from common.metrics import paired_scores

    values = [paired_scores(p[0].detach().cpu().numpy(), t[0].detach().cpu().numpy())["ssim_brain"]
              for p, t in zip(pred, target)]
    return torch.tensor(values, dtype=torch.float32)


def brain_ssim_handler():
    """Ignite metric of :func:`brain_ssim` (mean over the validation volumes)."""
    from common.engines.validation import metric_handler

    return metric_handler(brain_ssim)


class TuneReport:
    """Evaluator handler: after each validation, ``report(epoch, metrics[metric])`` (the search's pruner)."""

    def __init__(self, report: Callable[[int, float], None] | None, metric: str = "val_ssim"):
        self.report, self.metric = report, metric

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if self.report is not None and self.metric in engine.state.metrics:
            self.report(int(engine.state.epoch), float(engine.state.metrics[self.metric]))


class BundleObjective:
    """``objective(params, report) -> float`` for :func:`common.cgan_imputation.tune.run_search`: one training run
    of ``bundle`` (``run_bundle(..., run_id="training")``) with the trial's parameters as config overrides
    (names via ``config_ids``) on top of ``overrides`` (the same for every trial: where runs and weights go, no
    resume) and ``report`` put in as ``@<report_id>``; the value is the last reported score.
    A module-level class, so worker processes receive it pickled."""

    def __init__(self, bundle: str | os.PathLike, configs: Sequence[str], config_ids: Mapping[str, str] | None = None,
                 report_id: str = "tune_report", run_id: str = "training", overrides: Mapping[str, Any] | None = None,
                 **fixed: Any):
        self.bundle, self.configs, self.report_id, self.run_id = str(bundle), list(configs), report_id, run_id
        self.config_ids, self.fixed = dict(config_ids or {}), {**dict(overrides or {}), **fixed}

    def __call__(self, params: dict, report: Callable[[int, float], None]) -> float:
        from common.bundle.run import run_bundle

        last: list[float] = []

        def tracked(step: int, value: float) -> None:
            last.append(float(value))
            report(step, value)

        overrides = {self.config_ids.get(k, k): v for k, v in params.items()}
        run_bundle(self.bundle, self.configs, run_id=self.run_id, **self.fixed, **overrides,
                   **{self.report_id: tracked})
        if not last:
            raise ValueError(f"bundle {self.bundle} reported no validation score through @{self.report_id}; "
                             "fix: val_interval must not exceed the number of epochs")
        return last[-1]


class ImputationRun:
    """The inference workflow's ``evaluator``: ``run()`` -> one record per case (see ``impute_dataset``).

    ``output=None`` writes into the case folders (only where the target is missing, unless ``overwrite``);
    a folder writes a copy of the dataset there with the imputed contrast added.
    """

    def __init__(self, network: torch.nn.Module, input: str | os.PathLike, sources: Sequence[str], target: str,
                 output: str | os.PathLike | None = None, batch: int = 16, device: Any = None,
                 overwrite: bool = False, skip_existing: bool = False, spatial_size: Sequence[int] | None = None,
                 load_path: str | os.PathLike | None = None, amp: str | None = None, progress: bool = True):
        self.network, self.input, self.sources, self.target = network, input, list(sources), target
        self.output, self.batch, self.device = output or None, int(batch), device
        if self.output is not None:
            check_output(self.output, "dir", flag="output_dir")
        if self.batch < 1:
            raise DataError("--batch", f"must be >= 1, got {batch}")
        self.overwrite = check_bool("overwrite", overwrite)
        self.skip_existing = check_bool("skip_existing", skip_existing)
        self.spatial_size, self.load_path, self.amp = spatial_size, load_path, amp
        self.progress = check_bool("progress", progress)

    def _model_name(self) -> str | None:
        if not self.load_path or not Path(self.load_path).is_file():
            return None
        from common.bundle.release import file_hash

        return f"brats_mri_cgan_imputation {Path(self.load_path).name} (sha256 {file_hash(self.load_path)})"

    def check_task(self) -> None:
        """Weights saved for another task (``sources``/``target`` stored beside them) are refused by name."""
        if not self.load_path or not Path(self.load_path).is_file():
            return
        from common.io import torch_load

        state = torch_load(self.load_path)
        trained = (state.get("sources"), state.get("target")) if isinstance(state, dict) else (None, None)
        if trained[0] is not None and (list(trained[0]) != self.sources or trained[1] != self.target):
            raise DataError(self.load_path, f"trained for {'+'.join(trained[0])} -> {trained[1]}, configured "
                                            f"{'+'.join(self.sources)} -> {self.target}; fix: add that task's "
                                            "overlay (configs/task_*.json) or its weights (--load_path)")

    def run(self) -> list[dict]:
        from common.cgan_imputation.data import check_task
        from common.cgan_imputation.impute import impute_dataset

        check_task(self.sources, self.target)
        if not self.input:
            raise DataError("--dataset_dir", "no input given; fix: --dataset_dir <case folder or dataset folder>")
        self.check_task()
        amp = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        device = str(self.device) if self.device is not None else None
        return impute_dataset(self.input, self.network, source=self.sources, target=self.target, output=self.output,
                              batch=self.batch, device=device, overwrite=self.overwrite,
                              skip_existing=self.skip_existing, amp_dtype=amp, spatial_size=self.spatial_size,
                              model=self._model_name(), progress=self.progress)
