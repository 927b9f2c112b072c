"""One serving request -> one run of a bundle's own inference config, for the MONAI Label and MONAI Deploy apps.

Servers cannot use the stock MONAI Label ``BundleInferTask`` or MONAI Deploy's ``MonaiBundleInferenceOperator``:
both treat every output as a segmentation, and a generator is a sampling loop over several networks, not one
``network_def``. So every server calls :func:`run_task`, which runs exactly the command a user would
(``inference.json`` + overlays, through :func:`common.bundle.run_bundle`) in a fresh folder per request, and
hands back the written NIfTI files (on the input's grid, with its affine) and their record. Runs are serialised
by one lock: a bundle run sets process-wide state (torch threads, MONAI logging) and the models are small next to
the sampling loop, so queuing is the honest way to serve concurrent requests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.io import DataError

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
_RUN_LOCK = threading.Lock()


@dataclass(frozen=True)
class Param:
    """A request parameter: its type, default and what it means (what MONAI Label's ``/info`` shows)."""

    type: type
    default: Any
    help: str
    choices: tuple = ()


@dataclass(frozen=True)
class TaskSpec:
    """A servable task: which bundle, which input it takes, which parameters it accepts."""

    name: str
    bundle: str
    input: str  # "mask": a tumor mask file; "image": the acquired contrast; "none": parameters only
    description: str
    params: Mapping[str, Param] = field(default_factory=dict)
    overlays: tuple = ()
    outputs: tuple = CONTRASTS  # image names handed back: contrasts, or "roi"
    source: str = ""  # the acquired contrast an "image" task reads

    def info(self) -> dict:
        """JSON-ready description (type names, defaults, choices) for a server's task list."""
        return {
            "bundle": self.bundle, "input": self.input, "description": self.description,
            "outputs": list(self.outputs), "params": {k: {"type": p.type.__name__, "default": p.default, "help": p.help,
                           **({"choices": list(p.choices)} if p.choices else {})} for k, p in self.params.items()},
        }


_SEED = Param(int, 0, "random seed of the sample (same seed, same image)")
_RECORDED_SEED = Param(int, 0, "recorded with the output only: the cGAN generator is deterministic")
_SAMPLING = {
    "seed": _SEED,
    "num_inference_steps": Param(int, 50, "sampler steps (DDIM by default)"),
    "guidance_scale": Param(float, 1.0, "classifier-free guidance scale (1 = plain conditional)"),
}

TASKS: dict[str, TaskSpec] = {
    "ldm3d": TaskSpec(
        "ldm3d", "brats_mri_ldm3d", "mask",
        "LDM-3D: the four contrasts (T1, T1c, T2, FLAIR) from the study's BraTS tumor mask, on the mask's grid",
        dict(_SAMPLING),
    ),
    "gliomagen": TaskSpec(
        "gliomagen", "brats_mri_gliomagen", "mask",
        "GliomaGen / Med-DDPM: the four contrasts from the study's 6-label mask (0 background, 1 head, 2 NETC, "
        "3 SNFH, 4 ET, 5 RC: what augment-masks and prepare_cases write), on the mask's grid",
        dict(_SAMPLING),
    ),
    "vqgan": TaskSpec(
        "vqgan", "brats_mri_vqgan_transformer", "none",
        "VQGAN + masked transformer: one FLAIR tumor region of the requested grade",
        {"class": Param(str, "HGG", "tumor grade of the region", ("LGG", "HGG")), "seed": _SEED,
         "steps": Param(int, 12, "MaskGIT decoding steps")},
        outputs=("roi",),
    ),
    "impute_flair": TaskSpec(
        "impute_flair", "brats_mri_cgan_imputation", "image",
        "cGAN imputation: FLAIR synthesised from the study's T2, on the T2's grid",
        {"seed": _RECORDED_SEED}, outputs=("t2f",), source="t2w",
    ),
    "impute_t1": TaskSpec(
        "impute_t1", "brats_mri_cgan_imputation", "image",
        "cGAN imputation: T1 (pre-contrast) synthesised from the study's T1c, on the T1c's grid",
        {"seed": _RECORDED_SEED}, overlays=("task_t1c_to_t1n.json",), outputs=("t1n",), source="t1c",
    ),
}


@dataclass
class TaskResult:
    """Written images by name (contrast, or ``roi``) and the run's record (settings, seed, input)."""

    images: dict[str, Path]
    record: dict
    folder: Path


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError("task", f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def request_params(spec: TaskSpec, params: Mapping[str, Any] | None) -> dict:
    """Defaults filled in, values converted to the declared types; unknown or ill-typed values are refused."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise DataError(f"task {spec.name}", f"unknown parameter(s) {', '.join(unknown)}; "
                                             f"accepted: {', '.join(spec.params) or 'none'}")
    out = {}
    for name, p in spec.params.items():
        value = params.get(name, p.default)
        try:
            value = p.type(value)
        except (TypeError, ValueError):
            raise DataError(f"task {spec.name}", f"{name}={value!r} is not a {p.type.__name__}") from None
        if p.choices and value not in p.choices:
            raise DataError(f"task {spec.name}", f"{name}={value!r}; choose one of {', '.join(p.choices)}")
        if p.type is int and name != "seed" and value < 1:
            raise DataError(f"task {spec.name}", f"{name}={value} must be at least 1")
        out[name] = value
    return out


def _image_case(spec: TaskSpec, image: Path, work: Path) -> Path:
    """The acquired contrast as a one-case BraTS folder (the layout the imputation bundle reads)."""
    case = work / "input" / "BraTS-GLI-00000-000"
    case.mkdir(parents=True)
    suffix = ".nii.gz" if image.name.endswith(".gz") else ".nii"
    os.symlink(image, case / f"{case.name}-{spec.source}{suffix}")
    return case


def _check_input(spec: TaskSpec, input_path) -> Path | None:
    if spec.input == "none":
        return None
    if not input_path:
        raise DataError(f"task {spec.name}", f"needs an input {spec.input} (a NIfTI file); none was given")
    path = Path(input_path).resolve()
    if not path.is_file():
        raise DataError(path, f"input {spec.input} does not exist or is not a file")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise DataError(path, "not a NIfTI file (.nii or .nii.gz); fix: convert it first (e.g. DICOM -> NIfTI)")
    return path


def run_task(
    name: str,
    input_path: str | os.PathLike | None = None,
    params: Mapping[str, Any] | None = None,
    work_root: str | os.PathLike | None = None,
    config: str = "demo",
    device: str = "cpu",
) -> TaskResult:
    """Run task ``name`` on one input in a new folder under ``work_root`` (the caller owns and removes it).

    ``config``: ``"demo"`` layers the bundle's ``demo.json`` (the shipped weights), ``"paper"`` the main configs
    (weights trained at paper size in the bundle's ``models/``). Raises ``DataError`` (the request's fault: a
    server answers 4xx with its message) before anything is written, or from the bundle's own input checks.
    """
    import json

    from common.bundle.run import run_bundle
    from common.errors import user_error

    spec = task_spec(name)
    values = request_params(spec, params)
    path = _check_input(spec, input_path)
    if config not in ("demo", "paper"):
        raise DataError("config", f"{config!r}; choose demo or paper")
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work_root))
    out = work / "output"
    overrides: dict[str, Any] = {"output_dir": str(out), "device": f"$torch.device('{device}')"}
    if spec.input == "mask":
        overrides.update(input=str(path), num_samples=1, seed=values["seed"],
                         num_inference_steps=values["num_inference_steps"], guidance_scale=values["guidance_scale"])
    elif spec.input == "none":
        overrides.update({"class": values["class"], "count": 1, "seed": values["seed"], "steps": values["steps"]})
    else:
        overrides.update(input=str(_image_case(spec, path, work)))
    files = ["inference.json", *spec.overlays] + (["demo.json"] if config == "demo" else [])
    try:
        with _RUN_LOCK:
            run_bundle(spec.bundle, files, **overrides)
    except Exception as exc:  # a user mistake arrives wrapped by MONAI's expression evaluator
        shutil.rmtree(work, ignore_errors=True)
        err = user_error(exc)
        if isinstance(err, DataError):
            raise err from None
        raise
    images = _collect(spec, out)
    if not images:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"task {name}: the bundle run wrote no image into {out}")
    record = {"task": name, "bundle": spec.bundle, "config": config, "input": str(path) if path else None,
              "params": values, "files": {k: str(v) for k, v in images.items()}}
    (work / "request.json").write_text(json.dumps(record, indent=2))
    return TaskResult(images, record, work)


def _collect(spec: TaskSpec, out: Path) -> dict[str, Path]:
    found = sorted(out.rglob("*.nii.gz")) + sorted(out.rglob("*.nii"))
    if spec.outputs == ("roi",):
        return {"roi": found[0]} if found else {}
    images = {}
    for f in found:
        stem = f.name[: -len(".nii.gz")] if f.name.endswith(".nii.gz") else f.stem
        contrast = stem.rsplit("-", 1)[-1]
        if contrast in spec.outputs:
            images[contrast] = f
    return images
