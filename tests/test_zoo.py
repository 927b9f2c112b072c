"""The MONAI model zoo's checks (``ci/verify_bundle.py``: min and full mode) for every bundle under ``bundles/``.

Files, ``version`` in ``changelog``, the installed ``brats-synth`` named in ``required_packages_version``, metadata
valid against the vendored schema (offline), ``download_large_files`` fetching from a loopback server and
refusing a changed byte, the inference workflow's properties, ``verify_net_in_out`` and a traced export of each
network the metadata describes (``<name>_data_format``; ``network`` is ``network_def``, others ``<name>_def``).

Convention for the metadata of a network with several forward arguments: its ``inputs`` name ``image`` first,
then the forward's other arguments, in forward order and named as the forward names them (``verify_net_in_out``
passes those as ``extra_forward_args``; the export traces with all of them, positionally).

A check that today's configs fail is listed in ``KNOWN_GAPS`` with what is missing: it runs as a strict xfail,
so it fails (and must be removed from the list) the day the config is fixed. New bundles get every check.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
NAMES = [b.name for b in BUNDLES]
PY = sys.executable
DIST = "brats-synth"

NECESSARY = ("configs/metadata.json", "LICENSE")
PREFERRED = ("models/model.pt", "configs/inference.json", "docs/README.md", "large_files.yml")

KNOWN_GAPS = {
    ("brats_mri_ldm3d", "net_in_out:autoencoder"):
        "autoencoder_data_format has no 'pred' output and autoencoder_def's forward returns a tuple "
        "(reconstruction, z_mu, z_sigma), not one tensor",
    ("brats_mri_vqgan_transformer", "net_in_out:vqgan"): "vqgan_def (ImportanceVQGAN) returns a dict (pred, "
        "quantization_loss, class_logits, importance, indices) that the trainer's loss terms read, not one tensor",
    ("brats_mri_vqgan_transformer", "export:vqgan"): "tracing refuses the dict output of vqgan_def (ImportanceVQGAN)",
}


def _check(name: str, check: str):
    """The pytest.param for one bundle and one check, a strict xfail when it is a known gap."""
    reason = KNOWN_GAPS.get((name, check))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, id=name, marks=marks)


def _params(check: str):
    return [_check(n, check) for n in NAMES]


def _meta(name: str) -> dict:
    return json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())


def _networks() -> list:
    """(bundle, format key, config id) for every ``<name>_data_format`` in every bundle's metadata."""
    out = []
    for name in NAMES:
        for key in sorted(k for k in _meta(name) if k.endswith("_data_format")):
            net = key[: -len("_data_format")]
            out.append((name, key, "network_def" if net == "network" else f"{net}_def", net))
    return out


def _net_params(check: str):
    params = []
    for name, key, net_id, net in _networks():
        reason = KNOWN_GAPS.get((name, f"{check}:{net}"))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, key, net_id, id=f"{name}:{net}", marks=marks))
    return params


def _env() -> dict:
    """A user's shell: no PYTHONPATH (the project is installed), one thread, no display."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **LOOPBACK_NO_PROXY}


def _configs(name: str) -> list[str]:
    """inference.json, plus the CPU-size overlay when the bundle has one (sizes do not change ids or names)."""
    cfg = REPO / "bundles" / name / "configs"
    return [str(cfg / f) for f in ("inference.json", "demo.json") if (cfg / f).is_file()]


LOOPBACK_NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # a CI proxy must not see it


@contextlib.contextmanager
def loopback_server(folder: str | os.PathLike, seconds: float = 120.0):
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) for at most ``seconds``; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = threading.Timer(seconds, server.shutdown)
    stop.daemon = True
    stop.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output readable
        pass


# ------------------------------------------------------------------------------------------ min mode
@pytest.mark.parametrize("name", NAMES)
def test_necessary_and_preferred_files(name):
    root = REPO / "bundles" / name
    missing = [f for f in NECESSARY + PREFERRED if not (root / f).is_file()]
    assert not missing, f"{name}: missing {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_version_in_changelog_and_required_packages(name):
    from importlib.metadata import PackageNotFoundError, version

    import common

    meta = _meta(name)
    assert meta["version"] in meta["changelog"], f"{name}: version {meta['version']} has no changelog entry"
    assert meta.get("monai_version") and meta.get("pytorch_version")
    required = meta["required_packages_version"]
    assert required.get(DIST) == common.__version__, (
        f"{name}: required_packages_version[{DIST!r}] = {required.get(DIST)!r}, common.__version__ = {common.__version__}")
    for package in required:  # a typo in a package name, or a dependency missing from requirements.txt
        try:
            version(package)
        except PackageNotFoundError:
            pytest.fail(f"{name}: required package {package!r} is not installed (`make setup` installs {DIST})")


def test_vendored_schema_is_the_one_the_bundles_name():
    from common.bundle.release import SCHEMA_NAME, metadata_schema

    schema = json.loads(metadata_schema().read_text())
    assert schema["$schema"].startswith("https://json-schema.org/") and "network_data_format" in schema["required"]
    for name in NAMES:
        assert _meta(name)["schema"].endswith("/" + SCHEMA_NAME), name


@pytest.mark.parametrize("name", NAMES)
def test_metadata_verifies_offline_with_the_vendored_schema(name, tmp_path):
    from common.bundle.release import metadata_schema

    root = REPO / "bundles" / name
    cmd = [PY, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
           "--filepath", str(metadata_schema())]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr

    from monai.bundle import verify_metadata

    bad = _meta(name)
    del bad["network_data_format"]  # the same check (in-process: one interpreter start is enough) catches it
    (tmp_path / "metadata.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(metadata_schema()))


@pytest.mark.parametrize("name", NAMES)
def test_large_files_are_listed_with_their_sha256(name):
    from common.bundle.release import check_large_files, read_large_files

    root = REPO / "bundles" / name
    entries = read_large_files(root)
    assert entries, f"{name}: large_files.yml lists nothing"
    check_large_files(root, entries)  # raises DataError naming a missing or changed file
    from monai.bundle import download_large_files

    download_large_files(bundle_path=str(root))  # the zoo CI's first step: files in place, hashes checked, no fetch
    listed = {e["path"] for e in entries}
    weights = {p.relative_to(root).as_posix() for p in (root / "models").rglob("*") if p.is_file()}
    assert weights <= listed, f"{name}: models/ files without a hash in large_files.yml: {sorted(weights - listed)}"
    assert all(e["hash_type"] == "sha256" and len(e["hash_val"]) == 64 for e in entries)


@pytest.mark.parametrize("name", NAMES)
def test_download_large_files_fetches_from_loopback_and_refuses_a_changed_byte(name, tmp_path, monkeypatch):
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    from common.bundle.release import file_hash, read_large_files, write_large_files

    for key, value in LOOPBACK_NO_PROXY.items():
        monkeypatch.setenv(key, value)
    root = REPO / "bundles" / name
    entries = read_large_files(root)
    www = tmp_path / "www"
    for e in entries:
        (www / e["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / e["path"], www / e["path"])
    with loopback_server(www) as url:
        good = tmp_path / "good"
        write_large_files(good, [{**e, "url": f"{url}/{e['path']}"} for e in entries])
        download_large_files(bundle_path=str(good))
        for e in entries:
            assert file_hash(good / e["path"]) == e["hash_val"]

        # the server's copy of the first file gets one changed byte: refused, and nothing is left behind
        first = www / entries[0]["path"]
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0xFF
        first.write_bytes(bytes(data))
        tampered = tmp_path / "tampered"
        write_large_files(tampered, [{**entries[0], "url": f"{url}/{entries[0]['path']}"}])
        with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
            download_large_files(bundle_path=str(tampered))
        assert not (tampered / entries[0]["path"]).exists()

    # a changed byte in a file already in place (a bundle unpacked from a zip) is refused too
    (tampered / entries[0]["path"]).parent.mkdir(parents=True, exist_ok=True)
    (tampered / entries[0]["path"]).write_bytes(bytes(data))
    with pytest.raises(HashCheckError, match="hash check of existing file failed"):
        download_large_files(bundle_path=str(tampered))
    assert hashlib.sha256(bytes(data)).hexdigest() != entries[0]["hash_val"]


# ----------------------------------------------------------------------------------------- full mode
@pytest.mark.parametrize("name", _params("inference_properties"))
def test_inference_workflow_properties(name, one_torch_thread):
    from monai.bundle import create_workflow

    root = REPO / "bundles" / name
    workflow = create_workflow(config_file=_configs(name), meta_file=str(root / "configs" / "metadata.json"),
                               logging_file=str(root / "configs" / "logging.conf"), workflow_type="inference",
                               bundle_root=str(root))
    try:
        missing = workflow.check_properties()
    except KeyError as e:  # MONAI raises on the first required id that is absent
        pytest.fail(f"{name}: {e}")
    assert missing == [], f"{name}: inference workflow lacks {missing}"


def _fake_inputs(inputs: dict, device="cpu") -> dict:
    """One batch of random tensors shaped and typed as ``network_data_format``'s inputs say (``*`` -> 1)."""
    import torch
    from monai.bundle.scripts import _get_fake_spatial_shape
    from monai.utils import get_equivalent_dtype

    torch.manual_seed(0)
    out = {}
    for key, spec in inputs.items():
        dtype = get_equivalent_dtype(spec.get("dtype", "float32"), torch.Tensor)
        spatial = _get_fake_spatial_shape(spec.get("spatial_shape") or [])
        shape = (1, spec.get("num_channels", 1), *spatial) if spec.get("type") == "image" else (1,)
        low, high = (list(spec.get("value_range") or []) + [0, 1])[:2]
        if dtype.is_floating_point and spec.get("format") != "labels":
            out[key] = torch.randn(shape).to(dtype)
        else:
            out[key] = torch.randint(int(low), int(high) + 1, shape).to(dtype)
        out[key] = out[key].to(device)
    return out


@pytest.mark.parametrize(("name", "fmt", "net_id"), _net_params("net_in_out"))
def test_verify_net_in_out(name, fmt, net_id, one_torch_thread):
    from monai.bundle import verify_net_in_out

    root = REPO / "bundles" / name
    spec = _meta(name)[fmt]
    extra = {k: v for k, v in _fake_inputs(spec["inputs"]).items() if k != "image"}
    verify_net_in_out(net_id=net_id, meta_file=str(root / "configs" / "metadata.json"), config_file=_configs(name),
                      device="cpu", extra_forward_args=extra, bundle_root=str(root),
                      **{"_meta_#network_data_format": spec})


@pytest.mark.slow  # metadata-size inputs through each network, twice (10-40 s on 2 shared cores)
@pytest.mark.parametrize(("name", "fmt", "net_id"), _net_params("export"))
def test_traced_export_loads_and_matches_eager(name, fmt, net_id, tmp_path, one_torch_thread):
    import torch
    from monai.bundle import ConfigParser
    from monai.networks.utils import convert_to_torchscript

    root = REPO / "bundles" / name
    parser = ConfigParser()
    parser.read_config(_configs(name))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content(net_id).eval()
    inputs = list(_fake_inputs(_meta(name)[fmt]["inputs"]).values())
    path = tmp_path / f"{net_id}.ts"
    # convert_to_torchscript compares the traced module's outputs with the eager ones (rtol 1e-4)
    convert_to_torchscript(net, filename_or_obj=str(path), inputs=inputs, use_trace=True, rtol=1e-3, atol=1e-4)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():  # same seed for both: a forward may sample (AutoencoderKL draws its latent)
        torch.manual_seed(1)
        eager = net(*inputs)
        torch.manual_seed(1)
        traced = loaded(*inputs)
    for a, b in zip(eager if isinstance(eager, (tuple, list)) else [eager],
                    traced if isinstance(traced, (tuple, list)) else [traced]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
