"""``common.bundle.serve``: what the MONAI Label and MONAI Deploy apps run for every request."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
from helpers import serve_study

from common.bundle.serve import TASKS, request_params, run_task, task_spec
from common.io import DataError


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return serve_study(tmp_path_factory.mktemp("serve"))


def _brighter_inside(image, mask) -> float:
    inside, outside = image[mask > 0], image[(mask == 0) & (image > 0)]
    return float((inside.mean() - outside.mean()) / (image[image > 0].std() + 1e-8))


@pytest.mark.parametrize("name,input_key", [("ldm3d", "seg"), ("gliomagen", "six_label"), ("vqgan", None),
                                            ("impute_flair", "t2w"), ("impute_t1", "t1c")])
def test_every_task_writes_its_images_on_the_input_grid(study, tmp_path, name, input_key):
    spec = task_spec(name)
    params = {"num_inference_steps": 10} if spec.input == "mask" else {}
    source = study[input_key] if input_key else None
    result = run_task(name, source, params, work_root=tmp_path)
    assert sorted(result.images) == sorted(spec.outputs)
    assert result.record["params"] == request_params(spec, params)
    for image_path in result.images.values():
        image = nib.load(image_path)
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all() and data.any()
        if source:
            ref = nib.load(source)
            assert image.shape == ref.shape
            np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
    if spec.outputs == ("roi",):
        assert nib.load(result.images["roi"]).shape == (32, 32, 32)
    if name == "ldm3d":  # the demo model follows the mask (as the bundle's own test asserts)
        flair = np.asarray(nib.load(result.images["t2f"]).dataobj)
        assert _brighter_inside(flair, np.asarray(nib.load(source).dataobj)) > 0.3


def test_same_seed_same_image_new_seed_new_image(study, tmp_path):
    a = run_task("ldm3d", study["seg"], {"seed": 5, "num_inference_steps": 5}, work_root=tmp_path)
    b = run_task("ldm3d", study["seg"], {"seed": 5, "num_inference_steps": 5}, work_root=tmp_path)
    c = run_task("ldm3d", study["seg"], {"seed": 6, "num_inference_steps": 5}, work_root=tmp_path)
    assert a.folder != b.folder
    x, y, z = (np.asarray(nib.load(r.images["t1n"]).dataobj) for r in (a, b, c))
    np.testing.assert_array_equal(x, y)
    assert np.abs(x - z).max() > 1e-3


@pytest.mark.parametrize("name,input_,params,expected", [
    ("nope", None, {}, "unknown task 'nope'"),
    ("ldm3d", None, {}, "needs an input mask"),
    ("ldm3d", "/nonexistent/mask.nii.gz", {}, "does not exist"),
    ("ldm3d", "{seg}", {"steps": 3}, "unknown parameter(s) steps"),
    ("ldm3d", "{seg}", {"num_inference_steps": "many"}, "is not a int"),
    ("ldm3d", "{seg}", {"num_inference_steps": 0}, "must be at least 1"),
    ("vqgan", None, {"class": "GBM"}, "choose one of LGG, HGG"),
    ("impute_flair", "{root}/datalist.json", {}, "not a NIfTI file"),
    ("gliomagen", "{seg}", {}, "tumor outside the head"),  # a BraTS mask without the head label
])
def test_bad_requests_are_refused_by_name_and_leave_nothing(study, tmp_path, name, input_, params, expected):
    if input_:
        input_ = input_.format(**{k: str(v) for k, v in study.items()})
    with pytest.raises(DataError) as err:
        run_task(name, input_, params, work_root=tmp_path)
    assert expected in str(err.value)
    assert not list(tmp_path.iterdir())


def test_task_info_lists_parameters_with_defaults():
    info = {name: spec.info() for name, spec in TASKS.items()}
    assert info["ldm3d"]["params"]["num_inference_steps"] == {"type": "int", "default": 50,
                                                              "help": "sampler steps (DDIM by default)"}
    assert info["vqgan"]["params"]["class"]["choices"] == ["LGG", "HGG"]
    assert info["impute_t1"]["outputs"] == ["t1n"]
