"""Shared fixtures: tiny phantom datasets made once per test session, GPU test skipping."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

# Small grid for tests: the whole 240x240x155 mm field of view at coarser voxels.
TINY_SHAPE = (64, 64, 40)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    import torch

    # under pytest-xdist (make test: -n 2) each worker gets its share of the cores: 2 workers x 2 threads on 2
    # cores oversubscribe, and OpenMP's spinning then slows both
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run faster on one thread; it also avoids oversubscribing the 2 cores of CI."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """Six tiny BraTS-2023-layout phantom cases (HGG and LGG), shared read-only by the whole session."""
    from common.phantom import make_phantoms

    root = tmp_path_factory.mktemp("phantoms_brats2023")
    make_phantoms(root, n=6, layout="brats2023", seed=0, shape=TINY_SHAPE, progress=False)
    return root


@pytest.fixture
def without_flair(phantom_root, tmp_path):
    """``without_flair(n)``: a copy of the first ``n`` phantom cases with their FLAIR deleted (imputation input)."""
    import shutil

    def make(n: int):
        root = tmp_path / "dataset"
        for case in sorted(p for p in phantom_root.iterdir() if p.is_dir())[:n]:
            shutil.copytree(case, root / case.name)
            (root / case.name / f"{case.name}-t2f.nii.gz").unlink()
        return root

    return make
