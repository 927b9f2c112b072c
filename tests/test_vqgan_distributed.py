"""Codebook health on 2 CPU processes (gloo, torchrun): code counts are summed over ranks and restarted codes
come from rank 0, so both ranks keep the same codebook although each sees its own data.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2``; the ``__main__``
block is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_codebook_restarts_stay_identical_across_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["restarts"] == reports[1]["restarts"] > 0
    assert reports[0]["usage"] == reports[1]["usage"]
    books = [torch.load(tmp_path / f"codebook{r}.pt", weights_only=True) for r in range(2)]
    for key in books[0]:
        assert torch.equal(books[0][key], books[1][key]), key
    assert reports[0]["data_sum"] != reports[1]["data_sum"]  # the ranks did see different data


def _worker(out: Path) -> None:
    import ignite.distributed as idist
    from ignite.engine import Engine

    from common.engines.distributed import finalize, setup
    from common.vqgan_transformer.codebook import CodebookHealth
    from common.vqgan_transformer.networks import ImportanceVQGAN, build_vqgan

    setup("gloo")
    rank = idist.get_rank()
    torch.manual_seed(0)  # same initial network on both ranks
    vqgan = ImportanceVQGAN(build_vqgan(channels=(8, 8), num_res_layers=1, num_embeddings=16, embedding_dim=8),
                            head_channels=8).train()
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    data = [torch.randn(2, 1, 16, 16, 16, generator=g) * (1 + rank) for _ in range(6)]

    def step(engine, batch):
        with torch.no_grad():
            vqgan(batch)

    engine = Engine(step)
    health = CodebookHealth(vqgan, interval=2, dead_after=2, seed=rank)  # different seeds: rank 0's choice wins
    health.attach(engine)
    engine.run(data, max_epochs=1)
    q = vqgan.quantizer
    torch.save({"embedding": q.embedding.weight.detach(), "ema_w": q.ema_w, "cluster": q.ema_cluster_size,
                "age": vqgan.code_age}, out / f"codebook{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": idist.get_world_size(), "restarts": health.restarts,
        "usage": [h["usage"] for h in health.history], "data_sum": float(sum(float(d.sum()) for d in data)),
    }))
    finalize()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
