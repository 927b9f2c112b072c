"""`make demo`'s job end to end, on a small grid: every step's output is there and means what it says."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_runs_every_step_and_resumes(tmp_path, monkeypatch, capsys):
    from tools.demo import demo

    monkeypatch.setenv("BRATS_SYNTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    # a tuple is what fire hands over for --phantom_shape 96,96,64
    demo(out=str(out), n=2, phantom_shape=(96, 96, 64), spacing=3.0, workers=1)

    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) == 1 and len(datalist["validation"]) == 1
    records = sorted((out / "preprocessed").glob("*/preprocess.json"))
    assert len(records) == 2 and len(list((out / "preprocessed" / "qc").glob("*.png"))) == 2
    samples = json.loads((out / "ldm3d" / "generated" / "generation.json").read_text())["samples"]
    assert len(samples) == 4 and len({s["seed"] for s in samples}) == 2
    for sample in samples:
        volume = np.asarray(nib.load(sample["files"]["t2f"]).dataobj)
        assert volume.shape == (64, 64, 32) and np.isfinite(volume).all() and volume.std() > 0
    overview = Image.open(out / "overview.png")
    parts = [Image.open(out / name) for name in ("preprocessed.png", "generated.png")]
    assert overview.height == sum(p.height for p in parts)
    # the other bundles' demos: one picture each, from their committed weights
    gliomagen = Image.open(out / "gliomagen" / "gliomagen.png")
    assert gliomagen.height > 2 * gliomagen.width / 4  # augmentation preview + two generated montages
    assert list((out / "gliomagen" / "generated_augmented").glob("*/*-t2f.nii.gz"))
    for folder, name in (("vqgan_transformer", "*.png"), ("cgan_imputation", "cgan_imputation.png")):
        pictures = sorted((out / folder).glob(name))
        assert pictures and all(Image.open(p).height > 50 for p in pictures), folder

    mtimes = [r.stat().st_mtime_ns for r in records]
    capsys.readouterr()
    demo(out=str(out), n=2, phantom_shape="96,96,64", spacing=3.0, workers=1, generate=False)
    assert "skipped (already done) 2" in capsys.readouterr().out
    assert [r.stat().st_mtime_ns for r in records] == mtimes
