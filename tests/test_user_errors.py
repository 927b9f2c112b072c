"""Issue 14: every user mistake, through every entry point, reads as a short message naming the file or flag.

One table of bad inputs, run as a user runs them (``python -m tools ...`` and ``python -m monai.bundle run ...``
in fresh interpreters). For each bad input: exit status 1, the last lines name the file or flag, no traceback,
and nothing new left in the output folder. Then valid-but-unusual inputs that must simply work.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LDM = ROOT / "bundles" / "brats_mri_ldm3d"
GLIOMAGEN = ROOT / "bundles" / "brats_mri_gliomagen"
VQGAN = ROOT / "bundles" / "brats_mri_vqgan_transformer"
CGAN = ROOT / "bundles" / "brats_mri_cgan_imputation"
DEMO = "['configs/inference.json','configs/demo.json']"
LDM_GRID, GLIOMAGEN_GRID = (64, 64, 32), (32, 32, 24)  # the demo weights' grids (configs/demo.json)


@dataclass(frozen=True)
class Bad:
    """One mistake: ``argv`` after ``python -m``, with ``{placeholders}`` of the corpus; ``names`` must appear in the
    last lines printed; ``cwd`` a bundle folder for bundle runs."""

    id: str
    argv: tuple[str, ...]
    names: str
    cwd: Path | None = None

    @property
    def slow(self) -> bool:
        return self.cwd is not None


def tools(*argv: str) -> tuple[str, ...]:
    return ("tools", *argv)


def bundle(*argv: str, configs: str = DEMO) -> tuple[str, ...]:
    return ("monai.bundle", "run", "--config_file", configs, *argv)


OUT = "{out}/result"  # the output each command is given: must not exist afterwards (or stay as it was)

BAD = [
    # tools phantoms
    Bad("phantoms: zero cases", tools("phantoms", OUT, "--n", "0"), "--n"),
    Bad("phantoms: unknown layout", tools("phantoms", OUT, "--layout", "bids"), "--layout"),
    Bad("phantoms: shape too small", tools("phantoms", OUT, "--shape", "0,64,40"), "--shape"),
    Bad("phantoms: shape not numbers", tools("phantoms", OUT, "--shape", "big"), "--shape"),
    Bad("phantoms: zero workers", tools("phantoms", OUT, "--n", "1", "--workers", "0"), "--workers"),
    Bad("phantoms: output under a file", tools("phantoms", "{file}/sub", "--n", "1"), "{file}"),
    Bad("phantoms: over an existing dataset", tools("phantoms", "{dataset_copy}", "--n", "1"), "{dataset_copy}"),
    # tools datalist
    Bad("datalist: missing folder", tools("datalist", "{missing}", "--out", OUT + ".json"), "{missing}"),
    Bad("datalist: unknown layout", tools("datalist", "{data}", "--layout", "bids", "--out", OUT + ".json"), "--layout"),
    Bad("datalist: zero folds", tools("datalist", "{data}", "--folds", "0", "--out", OUT + ".json"), "--folds"),
    Bad("datalist: fold out of range", tools("datalist", "{data}", "--folds", "3", "--val_fold", "7",
                                             "--out", OUT + ".json"), "--val_fold"),
    Bad("datalist: unknown check", tools("datalist", "{data}", "--check", "bogus", "--out", OUT + ".json"), "--check"),
    Bad("datalist: unknown label scheme", tools("datalist", "{data}", "--label_scheme", "bogus",
                                                "--out", OUT + ".json"), "--label_scheme"),
    Bad("datalist: boolean flag", tools("datalist", "{data}", "--require_label", "maybe", "--out", OUT + ".json"),
        "--require_label"),
    Bad("datalist: output under a file", tools("datalist", "{data}", "--folds", "3", "--out", "{file}/dl.json"), "{file}"),
    Bad("datalist: output is a folder", tools("datalist", "{data}", "--folds", "3", "--out", "{folder}"), "{folder}"),
    Bad("datalist: folder without cases", tools("datalist", "{empty}", "--out", OUT + ".json"), "{empty}"),
    Bad("datalist: too few cases for the folds", tools("datalist", "{data}", "--folds", "50", "--out", OUT + ".json"),
        "folds"),
    Bad("datalist: NaN in an image", tools("datalist", "{nan_dataset}", "--folds", "1", "--out", OUT + ".json"),
        "NaN"),
    Bad("datalist: two files for one contrast", tools("datalist", "{two_files_dataset}", "--folds", "1",
                                                      "--out", OUT + ".json"), "t1n.nii"),
    # tools preprocess: every flag before the first (minute-long) case
    Bad("preprocess: zero spacing", tools("preprocess", "{data}", OUT, "--spacing", "0"), "--spacing"),
    Bad("preprocess: misspelt normalisation", tools("preprocess", "{data}", OUT, "--normalisation", "zcore"),
        "--normalisation"),
    Bad("preprocess: unknown skull stripping", tools("preprocess", "{data}", OUT, "--skull_strip", "bogus"),
        "--skull_strip"),
    Bad("preprocess: unknown reference", tools("preprocess", "{data}", OUT, "--reference", "t3"), "--reference"),
    Bad("preprocess: missing atlas", tools("preprocess", "{data}", OUT, "--atlas", "{missing}.nii.gz"), "--atlas"),
    Bad("preprocess: zero workers", tools("preprocess", "{data}", OUT, "--workers", "0"), "--workers"),
    Bad("preprocess: bad shard", tools("preprocess", "{data}", OUT, "--shard", "3/2"), "--shard"),
    Bad("preprocess: output under a file", tools("preprocess", "{data}", "{file}/pre"), "{file}"),
    Bad("preprocess: boolean flag", tools("preprocess", "{data}", OUT, "--n4", "perhaps"), "--n4"),
    # tools evaluate: before the hour of scoring
    Bad("evaluate: missing real set", tools("evaluate", "{missing}", "{data}", OUT), "{missing}"),
    Bad("evaluate: output under a file", tools("evaluate", "{data}", "{data}", "{file}/eval"), "{file}"),
    Bad("evaluate: unknown extractor", tools("evaluate", "{data}", "{data}", OUT, "--extractor", "bogus"),
        "--extractor"),
    Bad("evaluate: unknown HD95 convention", tools("evaluate", "{data}", "{data}", OUT, "--hd95_convention", "bogus"),
        "--hd95_convention"),
    Bad("evaluate: negative bootstrap", tools("evaluate", "{data}", "{data}", OUT, "--n_bootstrap", "-1"),
        "--n_bootstrap"),
    Bad("evaluate: unknown contrast", tools("evaluate", "{data}", "{data}", OUT, "--contrasts", "t1n,dwi"),
        "--contrasts"),
    # tools impute, augment-masks, synthesize, score-segmentation, export-nnunet, tune, benchmark, package
    Bad("impute: missing weights", tools("impute", "{data}", "{missing}.pt", "--output", OUT), "{missing}.pt"),
    Bad("impute: weights that are not a checkpoint", tools("impute", "{data}", "{file}", "--output", OUT), "{file}"),
    Bad("impute: target equals source", tools("impute", "{data}", "{cgan_weights}", "--source", "t2w",
                                              "--target", "t2w", "--output", OUT), "--target"),
    Bad("impute: zero batch", tools("impute", "{data}", "{cgan_weights}", "--batch", "0", "--output", OUT), "--batch"),
    Bad("augment-masks: zero masks", tools("augment-masks", "{data}", OUT, "--n", "0"), "--n"),
    Bad("augment-masks: missing input", tools("augment-masks", "{missing}", OUT), "{missing}"),
    Bad("synthesize: generator not module:function", tools("synthesize", "{data}", OUT, "--generator", "{missing}"),
        "--generator"),
    Bad("score-segmentation: unknown scheme", tools("score-segmentation", "{data}", "{data}", "--scheme", "bogus"),
        "--label_scheme"),
    Bad("export-nnunet: fraction above 1", tools("export-nnunet", OUT, "{data}", "--hq_fraction", "2"),
        "--hq_fraction"),
    Bad("export-nnunet: unknown mode", tools("export-nnunet", OUT, "{data}", "--mode", "bogus"), "--mode"),
    Bad("tune: objective module missing", tools("tune", "--objective", "no_such_module:fn", "--out", OUT), "--objective"),
    Bad("benchmark: unknown suite", tools("benchmark", "--suite", "bogus", "--out", OUT), "--suite"),
    Bad("package: unknown bundle", tools("package", "--bundle", "no_such_bundle", "--out", OUT), "no_such_bundle"),
    Bad("tools: unknown command", tools("frobnicate"), "frobnicate"),
    # bundle runs through monai.bundle (the DataError re-wrapped by MONAI's expression evaluator must not show)
    Bad("ldm3d: truncated mask", bundle("--input", "{bad}/truncated.nii.gz", "--output_dir", OUT), "truncated.nii.gz",
        LDM),
    Bad("ldm3d: empty file", bundle("--input", "{bad}/empty.nii.gz", "--output_dir", OUT), "empty.nii.gz", LDM),
    Bad("ldm3d: 4-D mask", bundle("--input", "{bad}/four_d.nii.gz", "--output_dir", OUT), "four_d.nii.gz", LDM),
    Bad("ldm3d: 2-D mask", bundle("--input", "{bad}/two_d.nii.gz", "--output_dir", OUT), "two_d.nii.gz", LDM),
    Bad("ldm3d: NaN in the mask", bundle("--input", "{bad}/nan.nii.gz", "--output_dir", OUT), "nan.nii.gz", LDM),
    Bad("ldm3d: labels outside the scheme", bundle("--input", "{bad}/labels_9.nii.gz", "--output_dir", OUT),
        "labels_9.nii.gz", LDM),
    Bad("ldm3d: no tumour voxel", bundle("--input", "{bad}/no_tumour.nii.gz", "--output_dir", OUT), "no_tumour.nii.gz",
        LDM),
    Bad("ldm3d: unknown output space", bundle("--input", "{ldm_mask}", "--output_space", "scanner", "--output_dir", OUT),
        "--output_space", LDM),
    Bad("ldm3d: missing mask", bundle("--input", "{missing}.nii.gz", "--output_dir", OUT), "{missing}.nii.gz", LDM),
    Bad("ldm3d: folder without masks", bundle("--input", "{empty}", "--output_dir", OUT), "{empty}", LDM),
    Bad("ldm3d: malformed datalist", bundle("--input", "{bad}/broken.json", "--output_dir", OUT), "broken.json", LDM),
    Bad("ldm3d: two masks, one case id", bundle("--input", "{duplicate_ids}", "--output_dir", OUT), "BraTS-GLI-00000-000",
        LDM),
    Bad("ldm3d: zero steps", bundle("--input", "{ldm_mask}", "--num_inference_steps", "0", "--output_dir", OUT),
        "--num_inference_steps", LDM),
    Bad("ldm3d: zero samples", bundle("--input", "{ldm_mask}", "--num_samples", "0", "--output_dir", OUT),
        "--num_samples", LDM),
    Bad("ldm3d: output under a file", bundle("--input", "{ldm_mask}", "--output_dir", "{file}/generated"), "{file}", LDM),
    Bad("ldm3d: output of an earlier generation", bundle("--input", "{ldm_mask}", "--output_dir", "{earlier}"),
        "{earlier}", LDM),
    Bad("ldm3d: demo weights in the paper-size network", bundle("--input", "{ldm_mask}", "--output_dir", OUT,
                                                                configs="configs/inference.json"), "models/", LDM),
    Bad("ldm3d: missing weights file", bundle("--input", "{ldm_mask}", "--load_path", "{missing}.pt", "--output_dir", OUT),
        "{missing}.pt", LDM),
    Bad("ldm3d: an image given as the mask", bundle("--input", "{data}/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
                                                    "--output_dir", OUT), "t1n.nii.gz", LDM),
    Bad("gliomagen: labels outside the six-label scheme", bundle("--input", "{bad}/gliomagen_labels_9.nii.gz",
                                                                 "--output_dir", OUT), "gliomagen_labels_9.nii.gz",
        GLIOMAGEN),
    Bad("gliomagen: unknown sampler", bundle("--input", "{gliomagen_mask}", "--sampler", "euler", "--output_dir", OUT),
        "--sampler", GLIOMAGEN),
    Bad("vqgan: unknown class", bundle("--class", "GBM", "--output_dir", OUT), "--class", VQGAN),
    Bad("vqgan: zero count", bundle("--class", "both", "--count", "0", "--output_dir", OUT), "--count", VQGAN),
    Bad("vqgan: output of an earlier run", bundle("--class", "both", "--count", "1", "--output_dir", "{earlier_rois}"),
        "{earlier_rois}", VQGAN),
    Bad("vqgan: output under a file", bundle("--class", "both", "--count", "1", "--output_dir", "{file}/rois"), "{file}",
        VQGAN),
    Bad("cgan: case without the source contrast", bundle("--dataset_dir", "{no_t2w_case}", "--output_dir", OUT),
        "t2w", CGAN),
    Bad("cgan: folder without cases", bundle("--dataset_dir", "{empty}", "--output_dir", OUT), "{empty}", CGAN),
]


def _mask_on_grid(seg: np.ndarray, grid) -> np.ndarray:
    """The phantom mask cropped/padded (centred) to ``grid``: a mask already on a model's grid."""
    out = np.zeros(grid, seg.dtype)
    src, dst = [], []
    for n, g in zip(seg.shape, grid):
        a, b = max((n - g) // 2, 0), max((g - n) // 2, 0)
        m = min(n, g)
        src.append(slice(a, a + m))
        dst.append(slice(b, b + m))
    out[tuple(dst)] = seg[tuple(src)]
    return out


@pytest.fixture(scope="module")
def corpus(phantom_root, tmp_path_factory):
    """The files the table refers to, made once: broken masks, a dataset with a NaN, a case without T2, ..."""
    import nibabel as nib

    from common.data.labels import convert_labels

    root = tmp_path_factory.mktemp("user errors")  # a space in every path on purpose
    bad = root / "bad"
    bad.mkdir()
    case = sorted(p for p in phantom_root.iterdir() if p.is_dir())[0]
    seg_path = case / f"{case.name}-seg.nii.gz"
    seg_img = nib.load(seg_path)
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    affine = seg_img.affine

    def save(name, data, dtype=np.uint8):
        nib.save(nib.Nifti1Image(np.asarray(data, dtype), affine), str(bad / name))
        return bad / name

    on_grid = _mask_on_grid(seg, LDM_GRID)
    (bad / "truncated.nii.gz").write_bytes(seg_path.read_bytes()[:300])
    (bad / "empty.nii.gz").write_bytes(b"")
    save("four_d.nii.gz", np.stack([on_grid, on_grid], -1))
    save("two_d.nii.gz", on_grid[:, :, 10])
    nan = on_grid.astype(np.float32)
    nan[0, 0, 0] = np.nan
    save("nan.nii.gz", nan, np.float32)
    save("labels_9.nii.gz", np.where(on_grid == 1, 9, on_grid))
    save("no_tumour.nii.gz", np.zeros_like(on_grid))
    (bad / "broken.json").write_text('{"validation": [ not json')
    ldm_mask = save("ldm_mask.nii.gz", on_grid)
    six = convert_labels(_mask_on_grid(seg, GLIOMAGEN_GRID), "brats2023", "six_label")
    gliomagen_mask = save("gliomagen_mask.nii.gz", six)
    save("gliomagen_labels_9.nii.gz", np.where(six == six.max(), 9, six))  # a tumour label, not the head
    duplicate_ids = root / "duplicate ids"
    for sub in ("a", "b"):
        (duplicate_ids / sub).mkdir(parents=True)
        shutil.copy(ldm_mask, duplicate_ids / sub / f"{case.name}-seg.nii.gz")

    (root / "a file").write_text("not a folder")
    (root / "a folder.json").mkdir()
    (root / "empty").mkdir()
    shutil.copytree(phantom_root, root / "dataset copy")
    nan_dataset = root / "nan dataset"
    shutil.copytree(case, nan_dataset / case.name)
    t1n = nan_dataset / case.name / f"{case.name}-t1n.nii.gz"
    img = nib.load(t1n)
    data = np.asarray(img.dataobj, np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(t1n))
    two_files = root / "two files" / case.name
    shutil.copytree(case, two_files)
    nib.save(nib.load(two_files / f"{case.name}-t1n.nii.gz"), str(two_files / f"{case.name}-t1n.nii"))
    no_t2w = root / "no t2w" / case.name
    shutil.copytree(case, no_t2w)
    (no_t2w / f"{case.name}-t2w.nii.gz").unlink()
    (no_t2w / f"{case.name}-t2f.nii.gz").unlink()
    earlier = root / "earlier generation"
    earlier.mkdir()
    (earlier / "generation.json").write_text(json.dumps({"samples": []}))
    earlier_rois = root / "earlier rois"
    earlier_rois.mkdir()
    (earlier_rois / "manifest.json").write_text(json.dumps({"samples": []}))
    return {
        "data": str(phantom_root), "bad": str(bad), "file": str(root / "a file"), "folder": str(root / "a folder.json"),
        "empty": str(root / "empty"), "missing": str(root / "no such thing"), "dataset_copy": str(root / "dataset copy"),
        "nan_dataset": str(nan_dataset), "two_files_dataset": str(two_files.parent), "no_t2w_case": str(no_t2w), "ldm_mask": str(ldm_mask),
        "gliomagen_mask": str(gliomagen_mask), "duplicate_ids": str(duplicate_ids), "earlier": str(earlier), "earlier_rois": str(earlier_rois),
        "cgan_weights": str(CGAN / "models" / "model.pt"), "root": root,
    }


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.exists() else {}


def _run(argv, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("BRATS_SYNTH_TRACEBACK", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_bad(case: Bad, corpus: dict, out: Path) -> dict:
    fill = {**{k: v for k, v in corpus.items() if isinstance(v, str)}, "out": str(out)}
    argv = [a.format(**fill) for a in case.argv]
    watched = [corpus["root"], out]
    before = [_tree(w) for w in watched]
    proc = _run(argv, case.cwd or corpus["root"])
    after = [_tree(w) for w in watched]
    return {"argv": argv, "proc": proc, "names": case.names.format(**fill), "changed": before != after,
            "new": [sorted(set(a) - set(b)) for a, b in zip(after, before)]}


def _assert_refused(result: dict) -> None:
    proc = result["proc"]
    shown = f"{' '.join(result['argv'])}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-2500:]}"
    assert proc.returncode == 1, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    last = "\n".join(proc.stderr.strip().splitlines()[-3:])
    assert result["names"] in last, f"the last lines do not name {result['names']!r}:\n{last}"
    assert last.count("\n") <= 2 and len(last) < 1200, f"not a short message:\n{last}"
    assert not result["changed"], f"left behind: {result['new']}\n{shown}"


FAST = [c for c in BAD if not c.slow]
SLOW = [c for c in BAD if c.slow]


def test_the_table_covers_every_entry_point():
    assert len(BAD) >= 40 and len({c.id for c in BAD}) == len(BAD)
    commands = {c.argv[1] if c.argv[0] == "tools" else c.cwd.name for c in BAD}
    assert {"phantoms", "datalist", "preprocess", "evaluate", "impute", "augment-masks", "synthesize", "tune",
            "brats_mri_ldm3d", "brats_mri_gliomagen", "brats_mri_vqgan_transformer", "brats_mri_cgan_imputation"} <= commands


@pytest.mark.parametrize("case", FAST, ids=[c.id for c in FAST])
def test_a_tools_mistake_is_one_clear_message(case, corpus, tmp_path):
    _assert_refused(_run_bad(case, corpus, tmp_path / "out"))


@pytest.fixture(scope="module")
def bundle_results(corpus, tmp_path_factory):
    """The bundle runs, two at a time (each is a fresh interpreter that imports MONAI and builds networks)."""
    base = tmp_path_factory.mktemp("bundle runs")
    with ThreadPoolExecutor(2) as pool:
        futures = {c.id: pool.submit(_run_bad, c, corpus, base / f"run{i}") for i, c in enumerate(SLOW)}
    return {k: f.result() for k, f in futures.items()}


@pytest.mark.slow  # ~15 s per bundle run, 2 at a time
@pytest.mark.parametrize("case", SLOW, ids=[c.id for c in SLOW])
def test_a_bundle_mistake_is_one_clear_message(case, bundle_results):
    _assert_refused(bundle_results[case.id])


@pytest.mark.parametrize("raised, short", [
    ("raise RuntimeError('Failed to evaluate') from DataError('mask.nii.gz', 'labels outside the scheme')", True),
    ("raise KeyError('a bug')", False),
])
def test_only_user_mistakes_lose_their_traceback(raised, short, tmp_path):
    """A DataError anywhere in the chain (as MONAI's evaluator re-wraps it) prints one line; any other exception is
    a bug and keeps its traceback; BRATS_SYNTH_TRACEBACK=1 shows it for user mistakes too."""
    code = f"import common\nfrom common.io import DataError\n{raised}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    if short:
        assert proc.stderr == "error: mask.nii.gz: labels outside the scheme\n"
        shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, BRATS_SYNTH_TRACEBACK="1"))
        assert "Traceback" in shown.stderr and "Failed to evaluate" in shown.stderr
    else:
        assert "Traceback" in proc.stderr and "a bug" in proc.stderr


# --- valid but unusual input: must simply work -------------------------------------------------------------------


def test_doubtful_input_is_processed_with_warnings_kept_in_the_datalist(phantom_root, tmp_path):
    """A misnamed case folder, disagreeing qform/sform and a 1e30 image: the datalist is written, each doubt is
    printed as ``warning: <file>: ...`` and recorded under ``warnings``."""
    import nibabel as nib

    src = tmp_path / "data"
    shutil.copytree(phantom_root, src)
    cases = sorted(p for p in src.iterdir() if p.is_dir())
    cases[0].rename(src / "BraTS-GLI-0000-000 copy")  # no longer the BraTS 2023 case pattern
    t1n = cases[1] / f"{cases[1].name}-t1n.nii.gz"
    img = nib.load(t1n)
    img.header.set_qform(img.affine + _shift(2.0), code=1)  # 2 mm off the sform
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(t1n))
    t2w = cases[2] / f"{cases[2].name}-t2w.nii.gz"
    img = nib.load(t2w)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * np.float32(1e27), img.affine), str(t2w))
    out = tmp_path / "datalist.json"
    proc = _run(["tools", "datalist", str(src), "--folds", "2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = json.loads(out.read_text())["warnings"]
    assert len(warnings) == 3, warnings
    assert any("BraTS-GLI-0000-000 copy" in w and "case pattern" in w for w in warnings)
    assert any(t1n.name in w and "qform and sform" in w for w in warnings)
    assert any(t2w.name in w and "implausible" in w for w in warnings)
    assert sum(line.startswith("warning: ") for line in proc.stderr.splitlines()) == 3


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift



@pytest.mark.slow
def test_unusual_but_valid_inputs_work(phantom_root, tmp_path):
    """Spaces and accents in paths, a read-only input folder, a left-right flipped affine, anisotropic voxels."""
    import nibabel as nib

    src = tmp_path / "données brutes" / "mes cas"
    shutil.copytree(phantom_root, src)
    cases = sorted(p for p in src.iterdir() if p.is_dir())
    for path in cases[0].glob("*.nii.gz"):  # case 0: left-right flipped affine
        img = nib.load(path)
        flip = np.diag([-1.0, 1, 1, 1]) @ img.affine
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1], flip, img.header), str(path))
    for path in cases[1].glob("*.nii.gz"):  # case 1: 1 x 1 x 3 mm voxels
        img = nib.load(path)
        aniso = img.affine @ np.diag([1.0, 1, 3, 1])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aniso, img.header), str(path))
    modes = {p: p.stat().st_mode for p in [src, *src.rglob("*")]}
    for p in sorted(modes, key=lambda p: -len(p.parts)):  # read-only, deepest first
        p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
    try:
        out = tmp_path / "sortie à côté" / "datalist.json"
        proc = _run(["tools", "datalist", str(src), "--folds", "3", "--out", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads(out.read_text())
        assert len(data["training"]) + len(data["validation"]) == len(cases)
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))


@pytest.mark.slow
def test_a_mask_with_a_flipped_affine_generates_on_its_own_grid(corpus, tmp_path):
    """LDM-3D from a left-right flipped, anisotropic mask: outputs keep that affine."""
    import nibabel as nib

    img = nib.load(corpus["ldm_mask"])
    affine = np.diag([-1.0, 1.0, 2.5, 1.0]) @ img.affine
    mask = tmp_path / "masque retourné.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(mask))
    out = tmp_path / "généré"
    proc = _run(list(bundle("--input", str(mask), "--output_dir", str(out), "--num_inference_steps", "2")), LDM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (t1n,) = out.rglob("*-t1n.nii.gz")
    assert np.allclose(nib.load(t1n).affine, affine)
    proc = _run(list(bundle("--input", str(mask), "--output_dir", str(out), "--num_inference_steps", "2")), LDM)
    assert proc.returncode == 1 and "earlier generation" in proc.stderr, proc.stderr[-2000:]  # refused, never mixed


def test_evaluate_notes_what_it_scored_as_given_and_refuses_duplicate_real_ids(phantom_root, tmp_path):
    """An all-zero synthetic contrast and a lesion mask with label 7 are scored, each with a note printed and kept
    in metrics.json; a real set with a duplicated id is refused before scoring."""
    import nibabel as nib

    cases = sorted(p for p in phantom_root.iterdir() if p.is_dir())[:2]
    real, synth = tmp_path / "real", tmp_path / "synthetic"
    for case in cases:
        shutil.copytree(case, real / case.name)
        shutil.copytree(case, synth / case.name)
    zeroed = synth / cases[0].name / f"{cases[0].name}-t2f.nii.gz"
    img = nib.load(zeroed)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(zeroed))
    seg = synth / cases[1].name / f"{cases[1].name}-seg.nii.gz"  # the mask the lesion metrics use
    img = nib.load(seg)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    labels[labels == labels.max()] = 7
    nib.save(nib.Nifti1Image(labels, img.affine), str(seg))
    out = tmp_path / "eval"
    args = ["--extractor", "none", "--n_bootstrap", "10", "--diversity_pairs", "0", "--n_montages", "0",
            "--progress", "false", "--contrasts", "t1n,t2f"]
    proc = _run(["tools", "evaluate", str(real), str(synth), str(out), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any(n.startswith("t2f: 1 synthetic images are all zero") and cases[0].name in n for n in notes), notes
    assert any("outside brats2023" in n and cases[1].name in n and "[7]" in n for n in notes), notes
    assert "note: t2f: 1 synthetic images are all zero" in proc.stdout + proc.stderr

    datalist = tmp_path / "real.json"
    item = {"id": cases[0].name, **{c: str(real / cases[0].name / f"{cases[0].name}-{c}.nii.gz") for c in ("t1n",)}}
    datalist.write_text(json.dumps({"training": [item, dict(item)], "validation": []}))
    proc = _run(["tools", "evaluate", str(datalist), str(synth), str(tmp_path / "eval2"), *args], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "duplicated id" in proc.stderr and cases[0].name in proc.stderr
    assert not (tmp_path / "eval2").exists()
