"""A summary (counts, target statistics, a figure) of an h5 written by ``data_prep build``;
opening and the layout are ``data_prep.h5schema``'s."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.h5schema import SPLITS, TARGETS, BuildError, open_h5


def summary(path) -> dict:
    """Counts and per-split target statistics of a data_prep h5."""
    with open_h5(path) as h:
        split = h.split()
        origin = h.meta_strings("origin")
        m_origin = h.material_strings("origin")
        m_split = h.material_strings("split")
        try:
            m_family = h.material_strings("family_id")
        except KeyError:  # a file without families: every material its own
            m_family = h.material_strings("material_id")
        elements = h.meta_strings("element")
        out = {
            "file": str(path),
            "n_materials": int(len(m_origin)),
            "n_samples": int(len(split)),
            "dos_shape": list(h.dos.shape),
            "n_structure_features": int(h.structure().shape[1]),
            "materials_per_origin": dict(sorted(Counter(m_origin).items())),
            "samples_per_origin": dict(sorted(Counter(origin).items())),
            "materials_per_split": {s: int(np.sum(m_split == s)) for s in SPLITS},
            "samples_per_split": {s: int(np.sum(split == s)) for s in SPLITS},
            "n_families": int(len(set(m_family))),
            "families_per_split": {s: int(len(set(np.asarray(m_family)[np.asarray(m_split) == s]))) for s in SPLITS},
            "n_elements": int(len(set(elements))),
            "targets": {},
            "skipped": h.attr_json("skipped", {}),
            "grid": h.attr_json("grid"),
        }
        for t in TARGETS:
            y = h.target(t)
            out["targets"][t] = {s: _stats(y[split == s]) for s in SPLITS}
    return out


def _stats(y) -> dict:
    if y.size == 0:
        return {"n": 0}
    return {"n": int(y.size), "mean": float(np.mean(y)), "std": float(np.std(y)),
            "min": float(np.min(y)), "max": float(np.max(y))}


def format_summary(s: dict) -> str:
    lines = [f"{s['file']}: {s['n_materials']} materials, {s['n_samples']} samples, DOS {tuple(s['dos_shape'])}, "
             f"{s['n_structure_features']} structure features, {s['n_elements']} elements at sites",
             "materials per origin: " + ", ".join(f"{k} {v}" for k, v in s["materials_per_origin"].items()),
             "samples per origin:   " + ", ".join(f"{k} {v}" for k, v in s["samples_per_origin"].items()),
             f"split (materials / samples / families of {s['n_families']}): " + ", ".join(
                 f"{k} {s['materials_per_split'][k]}/{s['samples_per_split'][k]}/{s['families_per_split'][k]}"
                 for k in SPLITS),
             "", f"{'target':18s} {'split':5s} {'n':>6s} {'mean':>8s} {'std':>7s} {'min':>8s} {'max':>8s}"]
    for t, per in s["targets"].items():
        for sp, st in per.items():
            if st["n"]:
                lines.append(f"{t:18s} {sp:5s} {st['n']:6d} {st['mean']:8.3f} {st['std']:7.3f} {st['min']:8.3f} {st['max']:8.3f}")
    reasons = Counter(r.split(":")[0] for r in s["skipped"].values())
    lines.append("")
    lines.append(f"skipped materials: {len(s['skipped'])}" + (
        " (" + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) + ")" if reasons else ""))
    return "\n".join(lines)


def plot_summary(path, out_png, sample: int = 0) -> Path:
    """Figure: one sample's 27 DOS channels (by atom) and the target distributions per split."""
    from data_prep.layout import ORBITALS
    from data_prep.plotting import pyplot

    plt = pyplot()
    with open_h5(path) as h:
        if not 0 <= sample < h.n:
            raise BuildError(f"sample {sample} out of range (0..{h.n - 1})")
        x = h.dos[sample]
        labels = h.channel_labels()
        grid = h.grid()
        title = (f"{h.meta_strings('material_id')[sample]} site {h.meta('site_index')[sample]} "
                 f"({h.meta_strings('element')[sample]})")
        split = h.split()
        ys = {t: h.target(t) for t in TARGETS}
    n_atoms = x.shape[1] // len(ORBITALS)
    fig, axes = plt.subplots(2, max(n_atoms, len(TARGETS)), figsize=(4 * max(n_atoms, len(TARGETS)), 7))
    e = grid.energies_ev
    for a in range(n_atoms):
        ax = axes[0, a]
        for o, orb in enumerate(ORBITALS):
            ax.plot(e, x[:, a * len(ORBITALS) + o], lw=0.8, label=orb)
        ax.axvline(0, color="k", ls=":", lw=0.8)
        ax.set_title(labels[a * len(ORBITALS)].split(":")[0])
        ax.set_xlabel("E - E_ref (eV)")
    axes[0, 0].set_ylabel("states/eV")
    axes[0, 0].legend(fontsize=6, ncol=3)
    for a in range(n_atoms, axes.shape[1]):
        axes[0, a].axis("off")
    for k, (t, y) in enumerate(ys.items()):
        ax = axes[1, k]
        for sp in SPLITS:
            if np.any(split == sp):
                ax.hist(y[split == sp], bins=40, alpha=0.5, label=sp, density=True)
        ax.set_title(t)
    axes[1, 0].legend()
    for a in range(len(TARGETS), axes.shape[1]):
        axes[1, a].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
