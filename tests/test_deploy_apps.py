"""MONAI Deploy apps (``tools/deploy``): each runs as a process in the deploy env, on phantom input, and stops alone.

The SDK lives in its own venv (``make deploy-env``; see requirements-deploy.txt for why), so the apps run as
subprocesses of ``.deploy-env/bin/python``, and the DICOM helpers below (pydicom is only there) run there too via
:func:`_in_deploy_env`. Skipped, with the reason, when that env is absent.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import serve_study

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_PY = ROOT / ".deploy-env" / "bin" / "python"
APP, DICOM_APP = ROOT / "tools" / "deploy" / "app.py", ROOT / "tools" / "deploy" / "app_dicom_impute.py"
APP_TIMEOUT = 300  # s: an app that loops (no CountCondition) fails here instead of hanging the suite


def _sdk_installed() -> bool:
    return DEPLOY_PY.exists() and bool(glob.glob(str(ROOT / ".deploy-env/lib/python*/site-packages/monai/deploy/core")))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _sdk_installed(), reason="MONAI Deploy env absent: run `make deploy-env` (.deploy-env)"),
]


def _run(app: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPLOY_PY), str(app), *map(str, args)], capture_output=True, text=True,
                          timeout=APP_TIMEOUT, env={**os.environ, **(env or {})})


def _in_deploy_env(func: str, *args):
    """Call ``func(*args)`` of this module in the deploy env's interpreter (it has pydicom); its JSON result."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_deploy_apps as t; "
            f"print(json.dumps(t.{func}(*sys.argv[1:])))")
    proc = subprocess.run([str(DEPLOY_PY), "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_dicom_series(nifti: str, folder: str) -> int:
    """A NIfTI volume as an MR series (one file per z slice, LPS geometry, uint16 + rescale); returns the count.

    Written in reverse slice order on disk, so the app must sort by ImagePositionPatient, not by file name.
    """
    import datetime

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, ExplicitVRLittleEndian, generate_uid

    img = nib.load(nifti)
    vol = np.asarray(img.dataobj, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    lo, hi = vol.min(), vol.max()
    slope = (hi - lo) / 4095 if hi > lo else 1.0
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = Path(folder)
    out.mkdir(parents=True)
    n = vol.shape[2]
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / f"{n - k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Phantom^T2", "PHANTOM-1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, k + 1, "T2 phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.EchoTime, ds.RepetitionTime = 90, 5000
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{row_spacing:.6f}", f"{col_spacing:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.6f}"
        pixels = np.rint((vol[:, :, k].T - lo) / slope).astype(np.uint16)  # (rows=y, columns=x)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{lo:.10g}"
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)
    return n


def read_dicom_series(folder: str) -> list[dict]:
    """What the test compares per slice, sorted by position along the normal."""
    import pydicom

    rows = []
    for f in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        real = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        rows.append({"ipp": [float(v) for v in ds.ImagePositionPatient],
                     "iop": [float(v) for v in ds.ImageOrientationPatient],
                     "spacing": [float(v) for v in ds.PixelSpacing], "thickness": float(ds.SliceThickness),
                     "frame": ds.FrameOfReferenceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID,
                     "study": ds.StudyInstanceUID, "image_type": list(ds.ImageType),
                     "description": str(ds.SeriesDescription), "echo_time": "EchoTime" in ds,
                     "finite": bool(np.isfinite(real).all()), "max": float(real.max()), "min": float(real.min())})
    iop = np.array(rows[0]["iop"])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(rows, key=lambda r: float(np.dot(normal, r["ipp"])))


def dicom_to_nifti_affine(folder: str) -> list:
    from tools.deploy.dicom import read_series

    s = read_series(folder)
    return [s.affine.tolist(), list(s.volume.shape)]


def compare_volumes(source: str, synthetic: str) -> dict:
    """Both series read back as volumes: same affine? intensity correlation as written, and with any axis flipped
    or x/y swapped (a slice written transposed or in the wrong order would correlate better that way)."""
    from tools.deploy.dicom import read_series

    a, b = read_series(source), read_series(synthetic)
    corr = lambda x: float(np.corrcoef(a.volume.ravel(), x.ravel())[0, 1])  # noqa: E731
    wrong = [np.swapaxes(b.volume, 0, 1), b.volume[::-1], b.volume[:, ::-1], b.volume[:, :, ::-1]]
    return {"same_affine": bool(np.allclose(a.affine, b.affine, atol=1e-4)), "corr": corr(b.volume),
            "corr_wrong": max(corr(w) for w in wrong)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return serve_study(tmp_path_factory.mktemp("deploy"))


@pytest.mark.parametrize("task,input_key,extra", [
    ("ldm3d", "seg", ["--steps", "5"]),
    ("gliomagen", "six_label", ["--steps", "5"]),
    ("vqgan", None, ["--class", "LGG", "--seed", "2"]),
    ("impute_flair", "t2w", []),
    ("impute_t1", "t1c", []),
])
def test_nifti_app_writes_each_output_on_the_input_grid_and_exits(study, tmp_path, task, input_key, extra):
    from common.bundle.serve import task_spec

    source = Path(study[input_key]) if input_key else None
    args, env = ["--task", task, *extra, "-o", tmp_path / "out"], {}
    if task == "impute_t1":  # as a MAP container runs it: no options, the SDK's environment variables
        args, env = [], {"BRATS_SYNTH_TASK": task, "HOLOSCAN_INPUT_PATH": str(source),
                         "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "out")}
    elif source is not None:  # a folder holding the one NIfTI, as a MAP's input mount would
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / source.name).symlink_to(source)
        args += ["-i", tmp_path / "in"]
    proc = _run(APP, *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    outputs = task_spec(task).outputs
    stem = source.name.rsplit("-", 1)[0] if source else "vqgan-LGG-2"
    assert written == sorted([f"{stem}-{o}.nii.gz" for o in outputs] + [f"{stem}-request.json"])
    for name in outputs:
        image = nib.load(tmp_path / "out" / f"{stem}-{name}.nii.gz")
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all() and np.abs(data).max() > 0
        if source is not None:
            ref = nib.load(source)
            assert image.shape == ref.shape
            np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
        else:
            assert image.shape == (32, 32, 32)
    record = json.loads((tmp_path / "out" / f"{stem}-request.json").read_text())
    assert record["task"] == task and record["input"] == (str(source.resolve()) if source else None)
    assert not list(tmp_path.glob("out/.*")), "temporary files left in the output folder"


def test_dicom_series_round_trips_to_the_nifti_affine(study, tmp_path):
    """The reader's LPS -> RAS affine is the phantom's own: the geometry the synthetic series is written back on."""
    _in_deploy_env("write_dicom_series", study["t2w"], tmp_path / "t2")
    affine, shape = _in_deploy_env("dicom_to_nifti_affine", tmp_path / "t2")
    ref = nib.load(study["t2w"])
    assert tuple(shape) == ref.shape
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)


def test_dicom_impute_app_writes_a_synthetic_series_on_the_source_slices(study, tmp_path):
    n = _in_deploy_env("write_dicom_series", study["t2w"], tmp_path / "t2")
    proc = _run(DICOM_APP, "-i", tmp_path / "t2", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = _in_deploy_env("read_dicom_series", tmp_path / "t2")
    out = _in_deploy_env("read_dicom_series", tmp_path / "out" / "synthetic-t2f")
    assert len(out) == len(source) == n == 40
    for s, o in zip(source, out):
        np.testing.assert_allclose(o["ipp"], s["ipp"], atol=1e-4)
        np.testing.assert_allclose(o["iop"], s["iop"], atol=1e-6)
        np.testing.assert_allclose(o["spacing"], s["spacing"], atol=1e-6)
        assert o["thickness"] == pytest.approx(s["thickness"])
        assert o["frame"] == s["frame"] and o["study"] == s["study"]
        assert o["series"] != s["series"] and o["sop"] != s["sop"]
        assert "DERIVED" in o["image_type"] and "SYNTHETIC" in o["description"]
        assert o["finite"] and not o["echo_time"]  # the T2's acquisition parameters are not the FLAIR's
    assert len({o["series"] for o in out}) == 1 and len({o["sop"] for o in out}) == n
    assert max(o["max"] for o in out) > min(o["min"] for o in out)  # not a blank series
    volumes = _in_deploy_env("compare_volumes", tmp_path / "t2", tmp_path / "out" / "synthetic-t2f")
    assert volumes["same_affine"]
    assert volumes["corr"] > 0.5 and volumes["corr"] > volumes["corr_wrong"] + 0.1, volumes  # FLAIR follows the T2


@pytest.mark.parametrize("app,bad,expected", [
    (APP, "empty folder", "no NIfTI file"),
    (APP, "text file", "not a NIfTI file"),
    (DICOM_APP, "folder without DICOM", "no DICOM image"),
])
def test_bad_input_ends_with_one_clear_error(tmp_path, app, bad, expected):
    source = tmp_path / "in"
    source.mkdir()
    if bad == "text file":
        source = source / "notes.txt"
        source.write_text("not an image")
    elif bad == "folder without DICOM":
        (source / "IM0001.dcm").write_text("not DICOM")
    proc = _run(app, *(["--task", "ldm3d"] if app == APP else []), "-i", source, "-o", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("out/*")), "a refused request wrote something"


def test_a_request_refused_by_the_bundle_ends_with_one_clear_error(study, tmp_path):
    """Refused inside the graph (the bundle's own input check), not before it: same one line, nothing written."""
    proc = _run(APP, "--task", "gliomagen", "--steps", "2", "-i", study["seg"], "-o", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "tumor outside the head" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("out/*"))


if __name__ == "__main__":  # pragma: no cover - the helpers are run in the deploy env by _in_deploy_env
    sys.exit("run with pytest")
