"""Releases that travel: ``python -m tools package`` writes the same zip twice, with only the bundle in it; large
files are hash-checked (inside the zip or hosted); and, end to end, a bundle downloaded from a loopback server
runs its documented command with the project installed from its wheel (not this source tree), no PYTHONPATH."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.io import DataError
from test_zoo import BUNDLES, NAMES, REPO, _env, loopback_server

PY = sys.executable


def _copy_bundle(name: str, dst: Path) -> Path:
    root = dst / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("runs", "outputs", "data", "eval",
                                                                                "logs", "__pycache__"))
    return root


def _add_junk(root: Path) -> list[str]:
    """What a used bundle folder holds besides the bundle: none of it may reach a release."""
    junk = ["runs/diffusion/latest.pt", "outputs/case-s0/case-s0-t1n.nii.gz", "data/phantoms/x.nii.gz",
            "configs/__pycache__/x.pyc", "configs/.inference.json.swp", "models/unlisted_checkpoint.pt", ".DS_Store"]
    for j in junk:
        (root / j).parent.mkdir(parents=True, exist_ok=True)
        (root / j).write_bytes(b"junk")
    return junk


@pytest.mark.parametrize("name", NAMES)
def test_release_zip_is_reproducible_and_holds_only_the_bundle(name, tmp_path):
    from common.bundle.release import file_hash, read_large_files, write_release

    root = _copy_bundle(name, tmp_path / "src")
    junk = _add_junk(root)
    first = write_release(root, tmp_path / "a")
    os.utime(root / "configs" / "metadata.json", (1.7e9, 1.7e9))  # other mtimes, other umask, same bytes
    os.chmod(root / "LICENSE", 0o600)
    second = write_release(root, tmp_path / "b")
    a, b = Path(first["zip"]).read_bytes(), Path(second["zip"]).read_bytes()
    assert a == b and first["sha1"] == second["sha1"] == hashlib.sha1(a).hexdigest()
    assert Path(first["zip"]).name == f"{name}.zip"

    with zipfile.ZipFile(first["zip"]) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and all(n.startswith(f"{name}/") for n in names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        modes = {stat.S_IMODE(i.external_attr >> 16) for i in infos if not i.is_dir()}
        assert modes == {0o644}
        files = {n[len(name) + 1:] for n in names if not n.endswith("/")}
        for j in junk:
            assert j not in files, j
        large = {e["path"] for e in read_large_files(root)}
        assert large <= files and {"configs/metadata.json", "LICENSE"} <= files
        for rel in files:  # the content is the bundle's, byte for byte
            assert zf.read(f"{name}/{rel}") == (root / rel).read_bytes(), rel
    assert {"runs/", "outputs/", "data/"} <= set(first["left_out"]) and "models/unlisted_checkpoint.pt" in first["left_out"]
    assert all(e["hash_val"] == file_hash(root / e["path"]) for e in first["large_files"])


def test_large_files_can_be_hosted_outside_the_zip(tmp_path):
    import yaml

    from common.bundle.release import file_hash, write_release

    name = NAMES[0]
    root = _copy_bundle(name, tmp_path / "src")
    info = write_release(root, tmp_path / "dist", base_url="https://example.org/releases/")
    assert not info["large_files_in_zip"]
    with zipfile.ZipFile(info["zip"]) as zf:
        files = set(zf.namelist())
        listed = yaml.safe_load(zf.read(f"{name}/large_files.yml"))["large_files"]
    assert listed and not any(f"{name}/{e['path']}" in files for e in listed)
    for e in listed:
        assert e["url"] == f"https://example.org/releases/{name}/{e['path']}"
        hosted = tmp_path / "dist" / name / e["path"]
        assert file_hash(hosted) == e["hash_val"] == file_hash(root / e["path"])
    # the source bundle's own list is left as it was
    assert yaml.safe_load((root / "large_files.yml").read_text()) == yaml.safe_load(
        (REPO / "bundles" / name / "large_files.yml").read_text())


def test_a_changed_large_file_stops_packaging_unless_hashes_are_updated(tmp_path):
    from common.bundle.release import file_hash, read_large_files, write_large_files, write_release

    name = NAMES[0]
    root = _copy_bundle(name, tmp_path / "src")
    target = root / read_large_files(root)[0]["path"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        write_release(root, tmp_path / "dist")
    assert str(target) in str(err.value) and "--update_hashes" in str(err.value)
    assert not (tmp_path / "dist" / f"{name}.zip").exists()

    info = write_release(root, tmp_path / "dist", update_hashes=True)
    assert read_large_files(root)[0]["hash_val"] == file_hash(target)
    assert Path(info["zip"]).is_file()

    # a new bundle lists its weights without hashes: refused, until --update_hashes fills them in
    write_large_files(root, [{**e, "hash_val": ""} for e in read_large_files(root)])
    with pytest.raises(DataError, match="hash_val.*--update_hashes"):
        write_release(root, tmp_path / "dist")
    write_release(root, tmp_path / "dist", update_hashes=True)
    assert [e["hash_val"] for e in read_large_files(root)] == [file_hash(root / e["path"]) for e in read_large_files(root)]

    target.unlink()
    with pytest.raises(DataError, match="missing.*download_large_files"):
        write_release(root, tmp_path / "dist")


def test_not_a_bundle_is_named(tmp_path):
    from common.bundle.release import write_release

    with pytest.raises(DataError, match="not a bundle"):
        write_release(tmp_path, tmp_path / "dist")
    (tmp_path / "configs").mkdir()
    with pytest.raises(DataError, match="metadata.json.*missing"):
        write_release(tmp_path, tmp_path / "dist")
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"version": "0.2.0", "changelog": {"0.1.0": "x"}}))
    with pytest.raises(DataError, match="changelog"):
        write_release(tmp_path, tmp_path / "dist")
    meta = json.loads((REPO / "bundles" / NAMES[0] / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="schema.*network_data_format"):
        write_release(tmp_path, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_package_command_prints_the_sha1_without_pythonpath(tmp_path):
    name = NAMES[0]
    proc = subprocess.run([PY, "-m", "tools", "package", "--bundle", name, "--out", str(tmp_path)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sha1 = re.search(r"^sha1 ([0-9a-f]{40})$", proc.stdout, re.M)
    assert sha1 and sha1.group(1) == hashlib.sha1((tmp_path / f"{name}.zip").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- download, end to end
def _first_run_command(bundle: Path) -> list[str]:
    """The first ``python -m monai.bundle run`` line of the bundle's docs/README.md, as a user would paste it."""
    for line in (bundle / "docs" / "README.md").read_text().splitlines():
        if line.strip().startswith("python -m monai.bundle run"):
            return shlex.split(line.split(" #")[0])
    raise AssertionError(f"{bundle}/docs/README.md documents no `python -m monai.bundle run` command")


def _first_input(cmd: list[str], bundle: Path, tmp: Path):
    """Put a real input where the docs' first command has a placeholder (in place), and return the check of what
    that command must write: 4 contrasts on a mask's grid (mask-conditioned generators), the imputed contrast
    beside a case's sources (imputation), or the requested ROIs (class-conditional generation)."""
    import nibabel as nib

    from common.bundle.data import phantom_datalist
    from common.bundle.prepare import prepare_cases

    demo = json.loads((bundle / "configs" / "demo.json").read_text())
    masks = [i for i, a in enumerate(cmd) if a.endswith((".nii.gz", ".nii"))]
    if masks:
        datalist = phantom_datalist(tmp / "cache", n=1, shape=tuple(demo.get("phantom_shape", (64, 64, 40))),
                                    seed=1000, folds=1, progress=False)
        if json.loads((bundle / "configs" / "inference.json").read_text()).get("mask_scheme") == "six_label":
            (case,) = prepare_cases(datalist, tmp / "masks", bundle, ["inference.json", "demo.json"],
                                    section=("training", "validation"), progress=False)  # the head label added
            mask = Path(case["label"])
        else:  # a BraTS mask as it comes, in its own (scanner) space
            from common.data.datalist import load_datalist

            mask = Path(load_datalist(datalist)[0]["label"])
        cmd[masks[0]] = str(mask)

        def check(generated):
            contrasts = {p.name.rsplit("-", 1)[-1].split(".")[0] for p in generated}
            assert {"t1n", "t1c", "t2w", "t2f"} <= contrasts, [p.name for p in generated]
            for p in generated:
                assert nib.load(p).shape[:3] == nib.load(mask).shape, p
        return check

    if "--dataset_dir" in cmd:  # one case folder lacking the target contrast
        from common.phantom import make_phantoms

        root = tmp / "case_dataset"
        make_phantoms(root, n=1, layout="brats2023", seed=3, shape=tuple(demo.get("phantom_shape", (64, 64, 40))),
                      progress=False)
        (case,) = [p for p in root.iterdir() if p.is_dir()]
        (case / f"{case.name}-t2f.nii.gz").unlink()
        cmd[cmd.index("--dataset_dir") + 1] = str(case)

        def check(generated):
            (imputed,) = [p for p in generated if p.name == f"{case.name}-t2f.nii.gz"]
            assert nib.load(imputed).shape == nib.load(case / f"{case.name}-t2w.nii.gz").shape
            assert json.loads(imputed.with_name(f"{case.name}-t2f.json").read_text())["synthetic"] is True
            assert not (case / f"{case.name}-t2f.nii.gz").exists()  # the input case is left as it was
        return check

    count = int(cmd[cmd.index("--count") + 1])
    classes = ["LGG", "HGG"] if cmd[cmd.index("--class") + 1] == "both" else [cmd[cmd.index("--class") + 1]]

    def check(generated):
        assert sorted(p.name.split("_")[-1].split(".")[0] for p in generated) == sorted(classes * count)
        manifest = json.loads((generated[0].parent / "manifest.json").read_text())
        assert len(manifest["samples"]) == len(classes) * count
    return check


def _build_wheel(tmp: Path) -> Path:
    """The project's wheel, built from a copy of what the distribution holds (the checkout stays untouched)."""
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / f, src / f)
    for pkg in ("common", "tools"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "wheels"
    proc = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                           "-w", str(out), str(src)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("brats_synth-*.whl")
    with zipfile.ZipFile(wheel) as zf:  # every module and the package data made it (a folder without
        held = set(zf.namelist())       # __init__.py would be dropped silently)
    for pkg in ("common", "tools"):
        for f in (src / pkg).rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and (f.suffix == ".py" or "schema/" in rel):
                assert rel in held, f"{rel} is not in the wheel"
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv with the wheel installed and .venv's dependencies visible through a .pth (no source tree)."""
    import site
    import sysconfig

    venv = tmp / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                           text=True).strip())
    deps = [p for p in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
            if Path(p).is_dir()]
    (purelib / "zz_project_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    proc = subprocess.run([PY, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                           str(wheel)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return py


@pytest.mark.slow
@pytest.mark.parametrize("name", [b.name for b in BUNDLES if (b / "configs" / "demo.json").is_file()])
def test_download_from_loopback_and_generate_from_the_wheel(name, tmp_path, one_torch_thread):
    """The wheel in a fresh venv; both release forms downloaded from 127.0.0.1; the docs' first run command, as
    written with a real input in place of its placeholder, from the unpacked bundle folder (outside the
    repository, no PYTHONPATH) writes what the bundle promises, and so does the same command from another folder
    with ``--bundle_root``."""
    from common.bundle.release import write_release

    tmp = tmp_path
    assert REPO not in tmp.resolve().parents  # everything below runs outside the repository
    py = _fresh_venv(tmp, _build_wheel(tmp))
    env = _env()
    where = subprocess.run([str(py), "-c", "import common, tools, monai; print(common.__file__); print(tools.__file__)"],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to((tmp / "venv").resolve()), f"imported from {path}, not the wheel"

    source = REPO / "bundles" / name
    www = tmp / "www"
    www.mkdir()

    def run(args, cwd):
        proc = subprocess.run([str(py), "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    with loopback_server(www, seconds=300) as url:
        # weights inside the zip (the default) ...
        full = write_release(source, www / "full")
        run(["download", "--name", name, "--url", f"{url}/full/{name}.zip", "--bundle_dir", str(tmp / "full")], tmp)
        for rel in full["files"]:
            assert (tmp / "full" / name / rel).read_bytes() == (source / rel).read_bytes(), rel
        run(["download_large_files", "--bundle_path", "."], tmp / "full" / name)  # hash check only

        # ... or hosted beside it, fetched and hash-checked by download_large_files
        hosted = write_release(source, www / "hosted", base_url=f"{url}/hosted")
        run(["download", "--name", name, "--url", f"{url}/hosted/{name}.zip", "--bundle_dir", str(tmp / "hosted")], tmp)
        bundle = tmp / "hosted" / name
        assert hosted["large_files"] and not any((bundle / e["path"]).exists() for e in hosted["large_files"])
        run(["download_large_files", "--bundle_path", "."], bundle)
        for e in hosted["large_files"]:
            assert (bundle / e["path"]).read_bytes() == (source / e["path"]).read_bytes(), e["path"]

    cmd = _first_run_command(bundle)
    assert cmd[:4] == ["python", "-m", "monai.bundle", "run"], cmd
    cmd = [str(py)] + cmd[1:]
    out = tmp / "generated"
    if "--output_dir" in cmd:
        cmd[cmd.index("--output_dir") + 1] = str(out)
    else:
        cmd += ["--output_dir", str(out)]
    check = _first_input(cmd, bundle, tmp)
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    generated = sorted(out.rglob("*.nii.gz"))
    check(generated)

    # the same command from another folder, the bundle named by --bundle_root and absolute config paths
    configs = cmd[cmd.index("--config_file") + 1]
    cmd[cmd.index("--config_file") + 1] = configs.replace("configs/", f"{bundle}/configs/")
    cmd[cmd.index("--output_dir") + 1] = str(tmp / "elsewhere")
    cmd += ["--bundle_root", str(bundle)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert sorted(p.name for p in (tmp / "elsewhere").rglob("*.nii.gz")) == sorted(p.name for p in generated)
