"""Model-zoo releases of a bundle: a reproducible ``NAME.zip`` (the folder ``NAME/`` at its top, sorted entries,
fixed timestamps and permissions, so the same bundle gives the same bytes and the same sha1, which is how the
zoo identifies a release), large files checked against the sha256 in ``large_files.yml``, and the vendored
metadata schema that lets ``verify_metadata`` run offline.

Large files either travel inside the zip (the default: the demo weights are a few MB, and a download then works
with no second server) or, with ``base_url``, are left out: the zip's ``large_files.yml`` then names
``<base_url>/NAME/<path>`` for each, ``download_large_files`` fetches and hash-checks them, and the files to host
are written beside the zip under ``<out>/NAME/<path>``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

from common.io import DataError, atomic_path, file_hash

SCHEMA_NAME = "meta_schema_20240725.json"

# What a model-zoo bundle holds (ANCHORS: bundle layout); everything else in the folder (runs/, outputs/,
# data/, eval/, logs/, caches) is a local by-product and stays out of a release.
RELEASE_ENTRIES = ("LICENSE", "configs", "docs", "models", "scripts", "large_files.yml")
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp")
LARGE_FILES = "large_files.yml"

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can store; $SOURCE_DATE_EPOCH overrides it
FILE_MODE = 0o100644
DIR_MODE = 0o040755


def metadata_schema() -> Path:
    """Path of the vendored bundle metadata schema (package data, so it is there in a wheel install too)."""
    from importlib.resources import files

    path = Path(str(files("common.bundle") / "schema" / SCHEMA_NAME))
    if not path.is_file():
        raise DataError(path, "vendored metadata schema missing; reinstall the brats-synth package")
    return path


def check_metadata(meta_file: str | os.PathLike) -> None:
    """The metadata against the vendored schema, offline: a release never ships metadata the zoo refuses.

    The same ``jsonschema.validate`` call as ``monai.bundle verify_metadata`` (which tests/test_zoo.py runs),
    without importing monai.bundle, which costs a packaging command several seconds."""
    import jsonschema

    try:
        jsonschema.validate(instance=json.loads(Path(meta_file).read_text()),
                            schema=json.loads(metadata_schema().read_text()))
    except json.JSONDecodeError as e:
        raise DataError(meta_file, f"not valid JSON ({e})") from e
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "top level"
        raise DataError(meta_file, f"fails the model-zoo metadata schema at {where}: {e.message[:300]}") from e


def read_large_files(root: str | os.PathLike, require_hash: bool = True) -> list[dict]:
    """The entries of ``large_files.yml`` (``path``, ``url``, ``hash_val``, ``hash_type``), checked for form;
    ``require_hash=False`` accepts an empty ``hash_val`` (a new bundle's list, filled by ``--update_hashes``)."""
    import yaml

    path = Path(root) / LARGE_FILES
    if not path.is_file():
        return []
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(path, f"not valid YAML ({e}); fix the file") from e
    entries = (doc or {}).get("large_files") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise DataError(path, "needs a top-level 'large_files:' list of {path, url, hash_val, hash_type}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("path") or (require_hash and not e.get("hash_val")):
            raise DataError(path, f"entry {i} needs 'path' and 'hash_val' (sha256; `python -m tools package "
                                  f"--bundle {Path(root).name} --update_hashes` fills it in); got {e!r}")
        e["url"] = e.get("url") or ""
        e["hash_val"] = e.get("hash_val") or ""
        e["hash_type"] = e.get("hash_type") or "sha256"
    return entries


def write_large_files(root: str | os.PathLike, entries: Iterable[dict]) -> Path:
    """(Re)write ``large_files.yml`` in the model zoo's key order."""
    import yaml

    doc = {"large_files": [{k: e.get(k, "") for k in ("path", "url", "hash_val", "hash_type")} for e in entries]}
    path = Path(root) / LARGE_FILES
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    return path


def check_large_files(root: str | os.PathLike, entries: list[dict], update_hashes: bool = False) -> list[dict]:
    """Every listed file is present and has its listed hash; ``update_hashes`` rewrites the list instead."""
    root = Path(root)
    changed = False
    for e in entries:
        path = root / e["path"]
        if not path.is_file():
            raise DataError(path, f"listed in {LARGE_FILES} but missing; train it or fetch it with "
                                  f"`python -m monai.bundle download_large_files --bundle_path {root}`")
        actual = file_hash(path, e["hash_type"])
        if actual != e["hash_val"]:
            if not update_hashes:
                raise DataError(path, f"{e['hash_type']} {actual} differs from {LARGE_FILES} ({e['hash_val']}); "
                                      "restore the file, or rerun with --update_hashes if it was retrained")
            e["hash_val"], changed = actual, True
    if changed:
        write_large_files(root, entries)
    return entries


def _skipped(rel: Path) -> bool:
    return any(p in SKIP_DIRS or p.startswith(".") for p in rel.parts) or rel.name.endswith(SKIP_SUFFIXES)


def release_files(root: str | os.PathLike, large: Iterable[str] = (), include_large: bool = True
                  ) -> tuple[list[str], list[str]]:
    """(files in the release, files left out), both sorted POSIX paths relative to the bundle root.

    Files under ``models/`` are released only when ``large_files.yml`` lists them (weights without a hash are
    not a release); caches, hidden files and run outputs never are."""
    root = Path(root)
    large = set(large)
    keep, left = [], []
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if entry not in RELEASE_ENTRIES:
            left.append(entry + ("/" if path.is_dir() else ""))
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(root).as_posix()
            if _skipped(Path(rel)):
                continue
            if rel in large:
                (keep if include_large else left).append(rel)
            elif rel.startswith("models/"):
                left.append(rel)
            else:
                keep.append(rel)
    return sorted(keep), sorted(left)


def _zip_time() -> tuple:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return ZIP_EPOCH
    return max(ZIP_EPOCH, time.gmtime(int(epoch))[:6])


def _zip_info(name: str, mode: int, when: tuple) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=when)
    info.create_system = 3  # unix, so the permission bits below are read back
    info.external_attr = mode << 16 | (0x10 if mode == DIR_MODE else 0)
    info.compress_type = zipfile.ZIP_STORED if mode == DIR_MODE else zipfile.ZIP_DEFLATED
    return info


def write_zip(path: str | os.PathLike, top: str, members: dict[str, Path | bytes]) -> Path:
    """A zip of ``members`` (relative name -> source file or bytes) under ``top/``: sorted, fixed time and modes."""
    when = _zip_time()
    dirs = {top}
    for name in members:
        parts = name.split("/")[:-1]
        dirs.update("/".join([top, *parts[: i + 1]]) for i in range(len(parts)))
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            entries = {d + "/": None for d in dirs} | {f"{top}/{name}": src for name, src in members.items()}
            for name in sorted(entries):  # one name order; a folder comes right before what it holds
                src = entries[name]
                if src is None:
                    zf.writestr(_zip_info(name, DIR_MODE, when), b"")
                    continue
                info = _zip_info(name, FILE_MODE, when)
                if isinstance(src, bytes):
                    zf.writestr(info, src)
                    continue
                info.file_size = os.path.getsize(src)
                with open(src, "rb") as fin, zf.open(info, "w", force_zip64=info.file_size > zipfile.ZIP64_LIMIT) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
    return Path(path)


def write_release(bundle: str | os.PathLike, out_dir: str | os.PathLike = "dist", base_url: str | None = None,
                  update_hashes: bool = False) -> dict[str, Any]:
    """Write ``out_dir/NAME.zip`` for a bundle; returns what the zoo records (name, version, sha1) and the files.

    ``base_url``: leave the large files out of the zip, point their ``url`` at ``<base_url>/NAME/<path>`` and
    copy them to ``out_dir/NAME/<path>`` for hosting. ``update_hashes``: take the current hashes of the large
    files into the bundle's ``large_files.yml`` (after retraining) instead of refusing a mismatch."""
    import yaml

    from common.bundle.run import bundle_root

    root = bundle_root(bundle)
    name = root.name
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise DataError(meta_path, "missing: a bundle needs configs/metadata.json (version, changelog, ...)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(meta_path, f"not valid JSON ({e})") from e
    version = meta.get("version")
    if not version or version not in meta.get("changelog", {}):
        raise DataError(meta_path, f"'version' ({version!r}) must be set and have an entry in 'changelog'")
    check_metadata(meta_path)
    large = check_large_files(root, read_large_files(root, require_hash=not update_hashes), update_hashes=update_hashes)
    keep, left = release_files(root, [e["path"] for e in large], include_large=base_url is None)
    members: dict[str, Path | bytes] = {rel: root / rel for rel in keep}
    out = Path(out_dir)
    if base_url is not None:
        base = base_url.rstrip("/")
        for e in large:
            e["url"] = f"{base}/{name}/{e['path']}"
            hosted = out / name / e["path"]
            hosted.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(hosted) as tmp:
                shutil.copyfile(root / e["path"], tmp)
        members[LARGE_FILES] = yaml.safe_dump({"large_files": large}, sort_keys=False).encode()
    zip_path = write_zip(out / f"{name}.zip", name, members)
    return {
        "name": name,
        "version": version,
        "zip": str(zip_path),
        "sha1": file_hash(zip_path, "sha1"),
        "files": sorted(members),
        "left_out": left,
        "large_files": large,
        "large_files_in_zip": base_url is None,
    }
