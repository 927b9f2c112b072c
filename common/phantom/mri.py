"""MR signal equations and 3 T tissue parameters for the four BraTS contrasts.

Signals are closed-form steady-state magnitudes (relative units) from proton density (PD), T1 and T2:

* t1n: 3-D inversion-prepared T1-weighted (MPRAGE-like), S = PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)
* t1c: the same sequence after gadolinium: 1/T1 += r1 C, 1/T2 += r2 C (C = tissue concentration, mM)
* t2w: turbo spin echo, S = PD (1 - e^(-TR/T1)) e^(-TE/T2)
* t2f: FLAIR, S = PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2), TI chosen to null CSF

Relaxation times are mid-range literature values at 3 T (Wansapura et al. JMRI 1999; Stanisz et al. MRM 2005;
Lu et al. MRM 2005 for CSF; de Bazelaire et al. Radiology 2004 for fat and muscle; Ellingson and Bender for
glioma compartments and peritumoural oedema). Gadobutrol relaxivities at 3 T: r1 ~ 5, r2 ~ 6 /mM/s.
Everything is per case jittered a little, as scanners and patients differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np



@dataclass(frozen=True)
class Tissue:
    pd: float  # relative proton density (water = 1)
    t1: float  # ms at 3 T
    t2: float  # ms at 3 T
    gd: float = 0.0  # tissue gadolinium concentration after injection, mM


# Order matters: it is the tissue-label code (index + 1, 0 = air) exposed as PhantomCase.tissue_label.
TISSUES: dict[str, Tissue] = {
    "csf": Tissue(1.00, 4200.0, 1800.0, 0.0),
    "gm": Tissue(0.80, 1550.0, 95.0, 0.01),  # blood-pool contrast only (intact blood-brain barrier)
    "wm": Tissue(0.69, 1000.0, 70.0, 0.005),
    "meninges": Tissue(0.75, 1200.0, 60.0, 0.35),  # dura and venous sinuses enhance strongly
    "bone": Tissue(0.05, 300.0, 1.0, 0.0),
    "marrow": Tissue(0.85, 420.0, 120.0, 0.05),  # fatty diploe
    "muscle": Tissue(0.72, 1420.0, 35.0, 0.08),
    "fat": Tissue(0.90, 380.0, 130.0, 0.01),
    "skin": Tissue(0.65, 1100.0, 45.0, 0.10),
    "vitreous": Tissue(1.00, 4000.0, 1500.0, 0.0),
    "edema": Tissue(0.86, 1650.0, 160.0, 0.01),  # vasogenic oedema / infiltrated white matter (SNFH)
    # fluid-like necrosis: long T1 and T2, partly nulled by FLAIR's inversion -> the dark centre of an HGG on FLAIR
    "necrosis": Tissue(0.92, 3000.0, 350.0, 0.0),
    "et": Tissue(0.85, 1600.0, 120.0, 0.25),  # viable tumour with a leaky blood-brain barrier
    # solid non-enhancing tumour (most of an LGG): long T2, homogeneously bright on FLAIR and T2
    "netc": Tissue(0.86, 1900.0, 240.0, 0.01),
    "cavity": Tissue(0.98, 3600.0, 1200.0, 0.0),  # post-surgical fluid, sometimes proteinaceous
}
TISSUE_NAMES = ("air",) + tuple(TISSUES)
"""Names of PhantomCase.tissue_label codes (0 = air)."""


@dataclass(frozen=True)
class Protocol:
    """Sequence timings (ms) of one case; jittered around typical 3 T glioma protocols."""

    t1_tr: float = 2300.0
    t1_ti: float = 1100.0
    t1_te: float = 3.0
    t2_tr: float = 5000.0
    t2_te: float = 100.0
    flair_tr: float = 9000.0
    flair_te: float = 120.0
    flair_ti: float = 2500.0
    r1: float = 5.0  # /mM/s
    r2: float = 6.0

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Protocol":
        flair_tr = rng.uniform(8000, 11000)
        t1_csf = TISSUES["csf"].t1
        # choose TI to null CSF given TR (the point of FLAIR), with a small miss
        flair_ti = t1_csf * np.log(2.0 / (1.0 + np.exp(-flair_tr / t1_csf))) * rng.uniform(0.97, 1.03)
        return cls(
            t1_tr=rng.uniform(2000, 2500),
            t1_ti=rng.uniform(1000, 1200),
            t1_te=rng.uniform(2.5, 4.0),
            t2_tr=rng.uniform(4000, 6500),
            t2_te=rng.uniform(85, 115),
            flair_tr=flair_tr,
            flair_te=rng.uniform(100, 140),
            flair_ti=flair_ti,
            r1=rng.uniform(4.5, 5.5),
            r2=rng.uniform(5.0, 7.0),
        )


def jitter_tissues(rng: np.random.Generator) -> dict[str, Tissue]:
    """Per-patient variation: a shared relaxation-time scale (few %) keeps tissue order; tumours vary more."""
    g1, g2 = np.exp(rng.normal(0.0, 0.04, size=2))
    out = {}
    for name, t in TISSUES.items():
        s = 0.08 if name in ("edema", "necrosis", "et", "netc", "cavity") else 0.015
        f1, f2, f3 = np.exp(rng.normal(0.0, s, size=3))
        out[name] = replace(t, pd=min(t.pd * f3**0.5, 1.0), t1=t.t1 * g1 * f1, t2=t.t2 * g2 * f2)
    out["et"] = replace(out["et"], gd=rng.uniform(0.15, 0.35))
    if rng.random() < 0.4:  # cavity with blood products / protein: shorter T1 and T2
        c = out["cavity"]
        out["cavity"] = replace(c, t1=c.t1 * rng.uniform(0.55, 0.8), t2=c.t2 * rng.uniform(0.25, 0.6))
    return out


def _ir(pd, t1, t2, tr, ti, te):
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def signals(pd, t1, t2, gd, p: Protocol) -> dict[str, np.ndarray]:
    """Noise-free signal of every contrast; arguments may be scalars or arrays (ms, mM)."""
    t1c = 1.0 / (1.0 / t1 + p.r1 * gd / 1000.0)
    t2c = 1.0 / (1.0 / t2 + p.r2 * gd / 1000.0)
    return {
        "t1n": _ir(pd, t1, t2, p.t1_tr, p.t1_ti, p.t1_te),
        "t1c": _ir(pd, t1c, t2c, p.t1_tr, p.t1_ti, p.t1_te),
        "t2w": pd * (1.0 - np.exp(-p.t2_tr / t1)) * np.exp(-p.t2_te / t2),
        "t2f": _ir(pd, t1, t2, p.flair_tr, p.flair_ti, p.flair_te),
    }


def tissue_signals(tissues: dict[str, Tissue], p: Protocol) -> dict[str, dict[str, float]]:
    """tissue name -> contrast -> scalar signal."""
    return {n: {c: float(v) for c, v in signals(t.pd, t.t1, t.t2, t.gd, p).items()} for n, t in tissues.items()}


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (Rician; Rayleigh in air)."""
    re = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    np.multiply(re, re, out=re)
    np.multiply(im, im, out=im)
    re += im
    return np.sqrt(re, out=re)


