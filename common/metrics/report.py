"""What a person reads or looks at: Markdown tables per contrast and PNGs (histograms, montages, curves)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.io import atomic_path
from common.viz import _matplotlib


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        if abs(value) < 1e-12:  # float round-off of an exact zero (e.g. FID of a set with itself)
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def _ci(ci: Mapping | None) -> str:
    if not ci or ci.get("low") is None:
        return "-"
    return f"[{_fmt(ci['low'])}, {_fmt(ci['high'])}]"


def _ci_method(ci: Mapping | None) -> str:
    if not ci or ci.get("low") is None:
        return ""
    if "subsample_size" in ci:
        return f"; CI: half-sampling without replacement ({ci['n_subsamples']} x {ci['subsample_size'][0]}/{ci['subsample_size'][1]})"
    return f"; CI: bootstrap of the mean ({ci.get('n_bootstrap')})"


def contrast_rows(m: Mapping) -> list[tuple[str, str, str, str, str]]:
    """(metric, value, 95% CI, samples, definition) rows for one contrast's metrics dict."""
    rows = []
    extractor = m.get("extractor", "")
    if "fid" in m:
        f = m["fid"]
        rows.append(("FID", _fmt(f["value"]), _ci(f.get("ci")),
                     f"{f['n_real']} real / {f['n_synthetic']} synthetic volumes "
                     f"({f['n_real_features']} / {f['n_synthetic_features']} feature rows)",
                     f"{extractor} features; depends on the sample count{_ci_method(f.get('ci'))}"))
    if "kid" in m:
        k = m["kid"]
        rows.append(("KID", f"{_fmt(k['mean'])} ± {_fmt(k['std'])}", _ci(k.get("ci")),
                     f"{k['n_real']} real / {k['n_synthetic']} synthetic volumes",
                     f"{extractor} features, cubic kernel, {k['n_subsets']} subsets of {k['subset_size']} rows"
                     f"{_ci_method(k.get('ci'))}"))
    if "mmd" in m:
        d = m["mmd"]
        grid = "x".join(str(g) for g in d.get("grid", []))
        rows.append(("MMD", _fmt(d["value"]), "-", f"{d.get('n_real', d.get('n_per_set'))} real / "
                     f"{d.get('n_synthetic', d.get('n_per_set'))} synthetic",
                     f"linear-kernel MMD^2 (MONAI) summed over a {grid} grid ({_fmt(d.get('value_per_voxel'))} per "
                     f"voxel); {d.get('normalisation', '')}"))
    if "ms_ssim_fidelity" in m:
        f = m["ms_ssim_fidelity"]
        rows.append(("MS-SSIM fidelity (paired, ↑)", f"{_fmt(f['mean'])} ± {_fmt(f['std'])}", "-",
                     f"{f['n_pairs']} pairs", _ms_ssim_definition(f.get("settings"))))
    if "ms_ssim_diversity" in m and m["ms_ssim_diversity"].get("mean") is not None:
        d = m["ms_ssim_diversity"]
        drawn = f" (seed {d.get('seed')}, of {d.get('n_pairs_possible')} possible)" if "n_pairs_possible" in d else ""
        rows.append(("MS-SSIM diversity (within condition, ↓)", _fmt(d["mean"]), "-",
                     f"{d['n_pairs']} pairs{drawn} / {d['n_conditions']} conditions",
                     _ms_ssim_definition(d.get("settings"))))
    paired = m.get("paired", {})
    ssim_def = paired.get("ssim_definition")
    for key, value in paired.get("mean", {}).items():
        ci = paired.get("ci", {}).get(key)
        if key.startswith("ssim") and ssim_def:
            definition = (f"SSIM {ssim_def['name']}: {ssim_def['kernel_size']}-voxel Gaussian window, sigma "
                          f"{ssim_def['sigma']}, valid border; map over the whole image averaged in the region")
        else:
            definition = "on images clipped to brain percentiles " + "-".join(str(p) for p in paired.get("percentiles", [])) \
                + ", scaled to [0, 1]"
        rows.append((key.replace("_", " "), _fmt(value), _ci(ci), f"{paired['n_pairs']} pairs",
                     definition + _ci_method(ci)))
    if "memorisation" in m:
        mem = m["memorisation"]
        rows.append(("near-copies of training cases", f"{mem['n_flagged']} / {mem['n_synthetic']}", "-",
                     f"{mem['n_training']} training",
                     f"correlation distance < {_fmt(mem['ratio'])} x median training nearest-neighbour distance"))
    return rows


def _ms_ssim_definition(settings: Mapping | None) -> str:
    if not settings:
        return ""
    return (f"MS-SSIM {settings.get('name', '')}: {settings.get('n_scales', len(settings.get('weights', ())))} scales, "
            f"{settings['kernel_size']}-voxel window")


def markdown_report(metrics: Mapping) -> str:
    """One Markdown table per contrast (each value with its definition and sample count), then the rest."""
    lines = ["# Evaluation report", ""]
    info = metrics.get("info", {})
    if info:
        lines += [f"- {k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list))]
    cache = metrics.get("feature_cache")
    if cache:
        lines.append(f"- feature cache: {cache['hits']} read, {cache['misses']} computed ({cache['folder']})")
    lines.append("")
    for contrast, m in metrics.get("contrasts", {}).items():
        lines += [f"## {contrast}", "", "| metric | value | 95% CI | samples | definition |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in contrast_rows(m)]
        lines.append("")
    cond = metrics.get("conditioning_fidelity")
    if cond:
        lines += ["## Conditioning fidelity (segmentation of synthetic images vs their masks)", "",
                  f"{cond.get('n_cases', '?')} cases; HD95: {cond.get('hd95_convention', 'monai')} convention", "",
                  "| region | Dice | HD95 | ASSD |", "|---|---|---|---|"]
        for region, s in cond["mean"].get("per_region", {}).items():
            lines.append(f"| {region} | {_fmt(s['dice'])} | {_fmt(s['hd95'])} | {_fmt(s['assd'])} |")
        lines.append("")
    if metrics.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in metrics["notes"]] + [""]
    return "\n".join(lines)


def save_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _save(fig, path) -> Path:
    plt = _matplotlib()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_histograms(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray], path) -> Path:
    """Brain-voxel intensity histograms (normalised to [0, 1]) of real vs synthetic, one panel per contrast."""
    plt = _matplotlib()
    names = list(real)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    bins = np.linspace(0, 1, 65)
    for ax, name in zip(axes[0], names):
        ax.hist(real[name], bins=bins, density=True, histtype="step", color="tab:blue", label="real")
        ax.hist(synthetic[name], bins=bins, density=True, histtype="step", color="tab:orange", label="synthetic")
        ax.set_title(name)
        ax.set_xlabel("normalised intensity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_metric_curves(curves: Mapping[str, Mapping], path) -> Path:
    """FID and KID against the number of synthetic volumes, one line per contrast (flat = enough samples)."""
    plt = _matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, c in curves.items():
        for ax, key in zip(axes, ("fid", "kid")):
            ax.errorbar(c["counts"], c[f"{key}_mean"], yerr=c[f"{key}_std"], marker="o", capsize=2, label=name)
    for ax, key in zip(axes, ("FID", "KID")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of synthetic volumes")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def sample_values(volume: np.ndarray, mask: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    values = np.asarray(volume)[np.asarray(mask, dtype=bool)]
    return values if values.size <= limit else rng.choice(values, limit, replace=False)


def pairs_montage(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray], path, mask=None,
                  title: str | None = None, contrasts: Sequence[str] | None = None) -> Path:
    """Real and synthetic side by side for every contrast, slices through the tumor."""
    from common.viz import save_montage

    images = {}
    for c in contrasts or list(synthetic):
        if c in real:
            images[f"real {c}"] = real[c]
        images[f"synthetic {c}"] = synthetic[c]
    return save_montage(images, path, mask=mask, title=title)
