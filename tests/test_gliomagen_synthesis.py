"""Resumable, sharded dataset synthesis (common.generation.synthesis) and ``python -m tools synthesize``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import CONTRASTS
from common.generation import synthesis as syn
from common.io import DataError, load_nifti, save_nifti

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 8)
# tissue intensity per BraTS 2024 label (0 background, 1 NETC, 2 SNFH, 3 ET, 4 RC) and contrast
SIGNATURE = {c: np.array([0.0, 0.3 + 0.1 * k, 0.8 - 0.1 * k, 0.9, 0.1]) for k, c in enumerate(CONTRASTS)}


def fake_generate_case(case: dict, seed: int) -> dict:
    """A cheap deterministic stand-in for a diffusion model: mask-driven intensities + seeded noise."""
    delay = float(os.environ.get("FAKE_GENERATOR_DELAY", "0"))
    if delay:
        time.sleep(delay)
    rng = np.random.default_rng(seed)
    from common.data.labels import convert_labels

    mask = convert_labels(case["mask"], case.get("scheme", "brats2024"), "brats2024").astype(int)
    return {c: (SIGNATURE[c][mask] + 0.4 * (mask == 0) + 0.02 * rng.standard_normal(mask.shape)).astype(np.float32)
            for c in CONTRASTS}


def fake_generator():
    """``--generator tests.test_gliomagen_synthesis:fake_generator``."""
    return fake_generate_case


def _mask(k: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[3 : 9, 3 : 9, 2 : 6] = 2  # SNFH
    m[4 : 8, 4 : 7 + k % 2, 3 : 5] = 3  # ET
    m[5 : 7, 5 : 6, 3 : 5] = 1  # NETC
    if k % 3 == 0:
        m[3:5, 8:10, 5:7] = 4  # RC
    return m


def _write_masks(folder: Path, n: int) -> list[dict]:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-10, 5, 7)
    cases = []
    for k in range(n):
        case_id = f"BraTS-GLI-{k:05d}-100"
        path = save_nifti(_mask(k), affine, folder / f"{case_id}-seg.nii.gz", dtype=np.uint8)
        cases.append({"id": case_id, "label": str(path)})
    return cases


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.nii.gz")) if STATE not in p.parts}


STATE = syn.STATE_DIR


def test_shards_split_the_cases_once_and_torchrun_ranks_refine_them(monkeypatch):
    cases = [{"id": f"c{k}"} for k in range(11)]
    assert syn.parse_shard("1/3") == (1, 3) and syn.parse_shard((0, 2)) == (0, 2)
    for bad in ("3/3", "a/b", "1", "0/0"):
        with pytest.raises(DataError, match="--shard"):
            syn.parse_shard(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for machine in range(2):
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            index, count = syn.worker_shard(f"{machine}/2")
            assert count == 4
            seen += [c["id"] for c in syn.shard_cases(cases, index, count)]
    assert sorted(seen) == sorted(c["id"] for c in cases)
    # seeds depend on the case, not on the worker or the list order
    assert syn.case_seed({"id": "c3"}, 0) == syn.case_seed({"id": "c3"}, 0) != syn.case_seed({"id": "c3"}, 1)
    assert syn.case_seed({"id": "c3", "seed": 7}, 0) == 7


def test_two_shards_write_the_same_files_as_one_run(tmp_path):
    cases = _write_masks(tmp_path / "masks", 5)
    one = syn.synthesize_dataset(cases, fake_generate_case, tmp_path / "one", progress=False)
    assert one["generated"] == 5 and one["complete"]
    for i in range(2):
        s = syn.synthesize_dataset(cases, fake_generate_case, tmp_path / "two", shard=f"{i}/2", progress=False)
        assert s["assigned"] == (3 if i == 0 else 2)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(a) == 5 * 5 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), "shards must write byte-identical NIfTI"
    manifest = json.loads((tmp_path / "two" / syn.MANIFEST).read_text())
    assert manifest["complete"] and [c["id"] for c in manifest["cases"]] == [c["id"] for c in cases]
    # outputs on the mask's grid, -seg in BraTS 2024 labels
    img, affine, _ = load_nifti(tmp_path / "one" / cases[0]["id"] / f"{cases[0]['id']}-seg.nii.gz", dtype=None)
    src, src_affine, _ = load_nifti(cases[0]["label"], dtype=None)
    assert np.array_equal(img, src) and np.allclose(affine, src_affine)
    # a second run has nothing to do
    again = syn.synthesize_dataset(cases, fake_generate_case, tmp_path / "one", progress=False)
    assert again["generated"] == 0 and again["skipped"] == 5


def test_six_label_masks_are_written_back_in_brats_labels(tmp_path):
    m = _mask(0)
    six = np.where(m > 0, m + 1, 1).astype(np.uint8)  # brats2024 -> six_label, everything else head
    case = {"id": "BraTS-GLI-00009-100", "mask": six, "affine": np.eye(4), "scheme": "six_label"}
    syn.synthesize_dataset([case], fake_generate_case, tmp_path, progress=False)
    seg, _, _ = load_nifti(tmp_path / case["id"] / f"{case['id']}-seg.nii.gz", dtype=None)
    assert np.array_equal(seg, m)


_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_gliomagen_synthesis import fake_generate_case
from common.generation.synthesis import synthesize_dataset
import json
cases = json.load(open({cases!r}))
synthesize_dataset(cases, fake_generate_case, {out!r}, progress=False)
"""


@pytest.mark.slow  # several fresh interpreters (torch import each)
def test_kill9_mid_run_then_restart_gives_every_case_exactly_once(tmp_path):
    cases = _write_masks(tmp_path / "masks", 8)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out"
    script = _DRIVER.format(repo=str(REPO), cases=str(tmp_path / "cases.json"), out=str(out))
    env = dict(os.environ, FAKE_GENERATOR_DELAY="0.15", OMP_NUM_THREADS="1")
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
        if attempt < 3:  # kill at different moments: after 1, 3 and 5 finished cases (plus part of the next)
            target = 2 * attempt + 1
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                done = len(list((out / STATE / "records").glob("*.json"))) if (out / STATE / "records").exists() else 0
                if done >= target:
                    time.sleep(0.07 * (attempt + 1))
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        else:
            assert proc.wait(timeout=120) == 0
            break
    assert kills >= 2
    folders = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.is_dir())
    assert folders == [c["id"] for c in cases]
    for c in cases:  # every file is whole and readable, exactly the 5 of the layout
        files = sorted((out / c["id"]).iterdir())
        assert [p.name for p in files] == sorted(f"{c['id']}-{k}.nii.gz" for k in (*CONTRASTS, "seg"))
        for p in files:
            load_nifti(p)
    assert not any((out / STATE / "partial").iterdir()), "partial folders left behind"
    assert not [p for p in out.rglob(".*.nii.gz")], "temporary files left behind"
    manifest = json.loads((out / syn.MANIFEST).read_text())
    ids = [c["id"] for c in manifest["cases"]]
    assert manifest["complete"] and sorted(ids) == [c["id"] for c in cases] and len(set(ids)) == len(ids)
    # and the files equal an uninterrupted run's
    syn.synthesize_dataset(cases, fake_generate_case, tmp_path / "clean", progress=False)
    clean = _files(tmp_path / "clean")
    assert _files(out) == clean


def test_quality_score_ranks_mask_following_images_first(tmp_path):
    m = _mask(0)
    rng = np.random.default_rng(0)
    good = {c: SIGNATURE[c][m] + 0.02 * rng.standard_normal(m.shape) for c in CONTRASTS}
    noisy = {c: v + 0.5 * rng.standard_normal(m.shape).astype(np.float32) for c, v in good.items()}
    ignored = {c: rng.random(m.shape).astype(np.float32) for c in CONTRASTS}
    s_good, s_noisy, s_ignored = (syn.mask_agreement_score(v, m) for v in (good, noisy, ignored))
    assert s_good > 0.9 > s_noisy > s_ignored
    assert s_ignored < 0.1
    assert syn.mask_agreement_score(good, np.zeros_like(m)) is None
    manifest = {"cases": [{"id": "a", "quality": s_noisy}, {"id": "b", "quality": s_good},
                          {"id": "c", "quality": None}, {"id": "d", "quality": s_ignored}]}
    assert syn.select_high_quality(manifest, 0.5) == ["b", "a"]
    assert syn.select_high_quality(manifest, 1.0) == ["b", "a", "d", "c"]
    assert syn.select_high_quality(manifest, count=3) == ["b", "a", "d"]
    with pytest.raises(DataError):
        syn.select_high_quality(manifest, 0)


def test_bad_generator_output_names_the_case_and_writes_nothing_for_it(tmp_path):
    cases = _write_masks(tmp_path / "masks", 2)

    def broken(case, seed):
        out = fake_generate_case(case, seed)
        if case["id"].endswith("00001-100"):
            out["t2f"] = out["t2f"][:-1]
        return out

    with pytest.raises(DataError, match="BraTS-GLI-00001-100.*t2f"):
        syn.synthesize_dataset(cases, broken, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / cases[0]["id"]).is_dir()
    assert not (tmp_path / "out" / cases[1]["id"]).exists()
    with pytest.raises(DataError, match="duplicate"):
        syn.synthesize_dataset(cases + cases[:1], fake_generate_case, tmp_path / "dup", progress=False)


def test_cli_synthesize_with_a_generator_path(tmp_path):
    _write_masks(tmp_path / "masks", 3)
    cmd = [sys.executable, "-m", "tools", "synthesize", "--masks", str(tmp_path / "masks"), "--out",
           str(tmp_path / "out"), "--generator", "tests.test_gliomagen_synthesis:fake_generator", "--shard", "0/1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "out" / syn.MANIFEST).read_text())
    assert manifest["n_cases"] == 3 and all(c["quality"] > 0.5 for c in manifest["cases"])
    from common.data.layouts import detect_layout, read_layout

    assert detect_layout(tmp_path / "out") == "brats2024"
    assert len(read_layout(tmp_path / "out")) == 3
    bad = subprocess.run(cmd[:-4] + ["--generator", "no_such_module:f"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "--generator" in bad.stderr


@pytest.mark.slow  # several fresh interpreters (torch import each)
def test_torchrun_ranks_split_the_masks(tmp_path):
    _write_masks(tmp_path / "masks", 5)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "tools", "synthesize", "--masks",
                          str(tmp_path / "masks"), "--out", str(tmp_path / "out"), "--generator",
                          "tests.test_gliomagen_synthesis:fake_generator", "--progress", "False"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / syn.MANIFEST).read_text())
    assert manifest["complete"] and manifest["n_cases"] == 5
    assert {c["shard"] for c in manifest["cases"]} == {"0/2", "1/2"}
    clean = syn.synthesize_dataset(_write_masks(tmp_path / "masks", 5), fake_generate_case, tmp_path / "one",
                                   progress=False, distributed=False)
    assert clean["generated"] == 5 and _files(tmp_path / "out") == _files(tmp_path / "one")
