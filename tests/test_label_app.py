"""The MONAI Label app (``tools/label_app``) over loopback: a real ``start_server`` with phantom studies.

Needs the label venv (``make label-env``): MONAI Label cannot live in .venv (see tools/label_app/requirements.txt).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from email import policy
from email.parser import BytesParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.bundle.serve import TASKS

REPO = Path(__file__).resolve().parents[1]
LABEL_PY = REPO / ".label-env" / "bin" / "python"
START = REPO / "tools" / "label_app" / "start_server"
STARTUP_TIMEOUT = 120  # seconds: imports of torch + MONAI + MONAI Label on 2 busy cores
REQUEST_TIMEOUT = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LABEL_PY.exists(),
                       reason=f"no label venv at {LABEL_PY.parent.parent}: run `make label-env`"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(folder: Path) -> set:
    """Every file under ``folder`` (what a request could leave behind), bookkeeping of the datastore excepted."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            and p.name not in (".lock", "datastore_v2.json")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``start_server`` on a free loopback port over phantom studies; stopped at the end, even on failure."""
    from common.bundle import prepare_cases
    from common.data.datalist import build_datalist
    from common.phantom import make_phantoms

    root = tmp_path_factory.mktemp("label_app")
    make_phantoms(root / "data", n=2, shape=(64, 64, 40), layout="brats2023", seed=3, progress=False)
    build_datalist(root / "data", root / "datalist.json", folds=1, val_fold=0, progress=False)
    prepared = prepare_cases(root / "datalist.json", root / "prepared", "brats_mri_gliomagen",
                             ["inference.json", "demo.json"], section=["training", "validation"], progress=False)
    studies = root / "studies"
    studies.mkdir()
    for i, case in enumerate(sorted(p for p in (root / "data").iterdir() if p.is_dir())):
        for c in ("seg", "t1c", "t2w"):
            shutil.copy(glob.glob(str(case / f"*-{c}.nii.gz"))[0], studies / f"case{i}-{c}.nii.gz")
    shutil.copy(prepared[0]["label"], studies / "case0-mask6.nii.gz")
    seg = nib.load(studies / "case0-seg.nii.gz")
    bad = np.asarray(seg.dataobj).copy()
    bad[bad > 0] = 9  # a label outside the BraTS scheme
    nib.save(nib.Nifti1Image(bad, seg.affine, seg.header), studies / "case0-label9.nii.gz")

    port = _free_port()
    server_tmp = root / "server_tmp"  # the server's temp folder: run folders, answer files, uploads
    server_tmp.mkdir()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(START), "--studies", str(studies), "--port", str(port)], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(server_tmp)})

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()

    import requests

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {STARTUP_TIMEOUT} s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "studies": studies, "tmp": server_tmp, "tmp_at_start": _tree(server_tmp)}
    finally:
        stop()


def _assert_no_temp_left(server):
    """MONAI Label deletes the answer file in a background task just after sending it: allow it a moment."""
    deadline = time.monotonic() + 10
    while _tree(server["tmp"]) != server["tmp_at_start"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tree(server["tmp"]) == server["tmp_at_start"]
    assert not [p for p in server["tmp"].iterdir() if p.is_dir()]  # no run folder either


def _infer(server, task, image=None, params=None, **query):
    """POST /infer/<task>: (status, answer JSON, image) from the multipart answer; (status, error JSON) on failure."""
    import requests

    q = {**({"image": image} if image else {}), **query}
    r = requests.post(f"{server['url']}/infer/{task}", params=q, files={"params": (None, json.dumps(params or {}))},
                      timeout=REQUEST_TIMEOUT)
    if r.status_code != 200:
        return r.status_code, r.json(), None
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode() + r.content)
    parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.iter_parts()}
    data = parts["image"]
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return r.status_code, json.loads(parts["params"]), nib.Nifti1Image.from_bytes(data)


def test_info_describes_every_task_with_its_parameters(server):
    import requests

    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert sorted(info["models"]) == sorted(TASKS)
    for name, spec in TASKS.items():
        model = info["models"][name]
        expected = spec.info()["params"]
        assert {k: v for k, v in model["params"].items() if k != "contrast"} == expected
        assert model["outputs"] == list(spec.outputs) and model["input"] == spec.input
        assert model["config"] == {k: p["default"] for k, p in model["params"].items()}
    assert info["models"]["ldm3d"]["params"]["contrast"]["choices"] == ["all", "t1n", "t1c", "t2w", "t2f"]


@pytest.mark.parametrize("task,study", [("ldm3d", "case0-seg"), ("gliomagen", "case0-mask6"), ("vqgan", None),
                                        ("impute_flair", "case0-t2w"), ("impute_t1", "case0-t1c")])
def test_every_task_answers_an_image_on_the_study_grid(server, task, study):
    spec = TASKS[task]
    steps = {"ldm3d": 10, "gliomagen": 5}  # 10: what the FLAIR check below needs (as in test_serve.py)
    params = {"seed": 4, **({"num_inference_steps": steps[task]} if spec.input == "mask" else {})}
    status, record, image = _infer(server, task, study, params)
    assert status == 200, record
    assert record["task"] == task and record["params"]["seed"] == 4 and record["contrasts"] == list(spec.outputs)
    data = np.asarray(image.dataobj)
    assert np.isfinite(data).all() and data.any()
    if study is None:
        assert data.shape == (32, 32, 32)
        return
    ref = nib.load(server["studies"] / f"{study}.nii.gz")
    assert data.shape == ref.shape + ((4,) if len(spec.outputs) > 1 else ())
    np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
    if task == "ldm3d":  # the demo model follows the mask: FLAIR (last volume) brighter in the tumor
        flair, mask = data[..., spec.outputs.index("t2f")], np.asarray(ref.dataobj)
        outside = flair[(mask == 0) & (flair > 0)]
        assert (flair[mask > 0].mean() - outside.mean()) / (flair[flair > 0].std() + 1e-8) > 0.3


def test_uploaded_file_and_single_contrast(server):
    """A client may upload the study instead of naming it, and ask for one contrast (a 3-D image)."""
    import requests

    path = server["studies"] / "case1-seg.nii.gz"
    with open(path, "rb") as f:
        r = requests.post(f"{server['url']}/infer/ldm3d", params={"output": "image"}, timeout=REQUEST_TIMEOUT,
                          files={"file": ("mask.nii.gz", f), "params": (None, json.dumps(
                              {"seed": 2, "num_inference_steps": 2, "contrast": "t1c"}))})
    assert r.status_code == 200, r.text
    image = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    ref = nib.load(path)
    assert image.shape == ref.shape
    np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
    _assert_no_temp_left(server)  # the upload's copy too


def test_concurrent_requests_each_get_their_own_result_and_leave_nothing(server):
    """20 requests at once: 8 distinct (task, study, seed), each sent 2-3 times. Twins must agree, distinct ones
    differ, and every answer's record names its own request: no request can have got another's result."""
    before = _tree(server["studies"])
    # the cGAN is deterministic (its seed changes nothing): its requests differ by study; the LDM's by seed too
    distinct = [(task, f"case{i}-{src}", {"seed": 1}) for task, src in (("impute_flair", "t2w"), ("impute_t1", "t1c"))
                for i in range(2)] + [
        ("ldm3d", f"case{i % 2}-seg", {"seed": 10 + i, "num_inference_steps": 2, "contrast": "t2f"}) for i in range(4)]
    jobs = [k for k in range(len(distinct)) for _ in range(3 if distinct[k][0] != "ldm3d" else 2)]
    assert len(jobs) == 20
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda k: _infer(server, distinct[k][0], distinct[k][1], distinct[k][2]), jobs))
    arrays = {}
    for k, (status, record, image) in zip(jobs, answers):
        task, study, params = distinct[k]
        assert status == 200, record
        assert record["task"] == task and record["params"]["seed"] == params["seed"]
        assert Path(record["input"]).name == f"{study}.nii.gz"
        arrays.setdefault(k, []).append(np.asarray(image.dataobj))
    for k, (first, *twins) in arrays.items():
        for twin in twins:
            np.testing.assert_array_equal(first, twin)
    firsts = [arrays[k][0] for k in sorted(arrays)]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            if firsts[i].shape == firsts[j].shape:
                assert np.abs(firsts[i] - firsts[j]).max() > 1e-4, (distinct[i], distinct[j])
    assert _tree(server["studies"]) == before  # no partial, temporary or label file in the studies folder
    _assert_no_temp_left(server)


@pytest.mark.parametrize("task,study,params,code,expected", [
    ("nope", "case0-seg", {}, 404, "unknown task 'nope'"),
    ("ldm3d", None, {}, 400, "needs an input mask"),
    ("ldm3d", "case9-seg", {}, 404, "no study 'case9-seg'"),
    ("ldm3d", "case0-label9", {"num_inference_steps": 2}, 400, "label values [9] are not in scheme"),
    ("ldm3d", "case0-seg", {"num_inference_steps": "many"}, 400, "is not a int"),
    ("ldm3d", "case0-seg", {"contrast": "t3"}, 400, "contrast='t3'"),
    ("impute_flair", "case0-t2w", {"num_inference_steps": 3}, 400, "unknown parameter(s) num_inference_steps"),
    ("vqgan", None, {"class": "GBM"}, 400, "choose one of LGG, HGG"),
    ("gliomagen", "case0-seg", {"num_inference_steps": 2}, 400, "tumor outside the head"),
])
def test_bad_requests_get_4xx_with_the_reason(server, task, study, params, code, expected):
    before = _tree(server["studies"])
    status, answer, _ = _infer(server, task, study, params)
    assert status == code and expected in answer["detail"], answer
    assert _tree(server["studies"]) == before
    _assert_no_temp_left(server)
