"""Write small ``vasprun.xml`` files (the parts pymatgen's ``Vasprun`` reads) for import tests.

The DOS is a uniform grid; ``pdos`` is (n_points, n_atoms, 9) per spin (LORBIT = 11 layout) or
(n_points, n_atoms, 3) with ``lorbit=10`` (s, p, d only).
"""
from __future__ import annotations

import numpy as np

M_FIELDS = ("s", "py", "pz", "px", "dxy", "dyz", "dz2", "dxz", "x2-y2")
L_FIELDS = ("s", "p", "d")


def _v(rows, fmt="{:.8f}"):
    return "".join("<v>" + " ".join(fmt.format(x) for x in row) + "</v>\n" for row in rows)


def _structure_xml(s, name=None):
    head = f'<structure name="{name}">' if name else "<structure>"
    rec = s.lattice.reciprocal_lattice_crystallographic.matrix
    return (f'{head}<crystal><varray name="basis">{_v(s.lattice.matrix)}</varray>'
            f'<i name="volume">{s.volume:.8f}</i><varray name="rec_basis">{_v(rec)}</varray></crystal>'
            f'<varray name="positions">{_v(s.frac_coords)}</varray></structure>\n')


def write_vasprun(path, structure, energies, pdos_by_spin, efermi, eigen=None, lorbit=11, incar_extra=None,
                  params_extra=None):
    """``pdos_by_spin``: list (1 or 2 spins) of (P, A, 9 or 3) arrays in states/eV.
    ``eigen``: optional (bands,) energies; occupations from ``efermi``."""
    s = structure
    spins = len(pdos_by_spin)
    elements = [site.specie.symbol for site in s]
    types = list(dict.fromkeys(elements))
    incar = {"SYSTEM": ("string", "test"), "ISPIN": ("int", spins), "LORBIT": ("int", lorbit or 0),
             "NEDOS": ("int", len(energies)), **(incar_extra or {})}
    params = {"ISPIN": ("int", spins), "LORBIT": ("int", lorbit or 0), "NEDOS": ("int", len(energies)),
              "LHFCALC": ("logical", "F"), "GGA": ("string", "--"), "LDAU": ("logical", "F"),
              "METAGGA": ("string", "--"), "AEXX": ("", 0.0), "HFSCREEN": ("", 0.0), "NELECT": ("", 8.0),
              "NBANDS": ("int", 8), "NELM": ("int", 60), "IBRION": ("int", -1), "NSW": ("int", 0),
              "ISMEAR": ("int", 0), "EDIFF": ("", 1e-6), **(params_extra or {})}

    def items(d):
        return "".join(f'<i type="{t}" name="{k}">{v}</i>\n' if t else f'<i name="{k}">{v}</i>\n'
                       for k, (t, v) in d.items())

    out = ['<?xml version="1.0" encoding="ISO-8859-1"?>\n<modeling>\n',
           '<generator><i name="program" type="string">vasp </i><i name="version" type="string">6.4.2 </i>'
           '<i name="subversion" type="string">test</i><i name="platform" type="string">linux</i>'
           '<i name="date" type="string">2026 12 04 </i><i name="time" type="string">12:00:00 </i></generator>\n',
           f"<incar>{items(incar)}</incar>\n",
           '<kpoints><generation param="Gamma"><v type="int" name="divisions">1 1 1</v></generation>'
           '<varray name="kpointlist"><v>0.0 0.0 0.0</v></varray><varray name="weights"><v>1.0</v></varray>'
           "</kpoints>\n",
           f'<parameters><separator name="general">{items(params)}</separator></parameters>\n',
           f"<atominfo><atoms>{len(s)}</atoms><types>{len(types)}</types>"
           '<array name="atoms"><dimension dim="1">ion</dimension><field type="string">element</field>'
           '<field type="int">atomtype</field><set>'
           + "".join(f"<rc><c>{el:2s}</c><c>{types.index(el) + 1}</c></rc>" for el in elements)
           + '</set></array><array name="atomtypes"><dimension dim="1">type</dimension>'
           '<field type="int">atomspertype</field><field type="string">element</field><field>mass</field>'
           '<field>valence</field><field type="string">pseudopotential</field><set>'
           + "".join(f"<rc><c>{elements.count(el)}</c><c>{el:2s}</c><c>1.0</c><c>1.0</c>"
                     f"<c>  PAW_PBE {el} 01Jan2000</c></rc>" for el in types)
           + "</set></array></atominfo>\n",
           _structure_xml(s, "initialpos"),
           "<calculation>\n",
           '<scstep><energy><i name="e_fr_energy">-1.0</i><i name="e_wo_entrp">-1.0</i>'
           '<i name="e_0_energy">-1.0</i></energy></scstep>\n',
           _structure_xml(s),
           f'<varray name="forces">{_v(np.zeros((len(s), 3)))}</varray>'
           f'<varray name="stress">{_v(np.zeros((3, 3)))}</varray>\n',
           '<energy><i name="e_fr_energy">-1.0</i><i name="e_wo_entrp">-1.0</i><i name="e_0_energy">-1.0</i>'
           "</energy>\n"]
    if eigen is not None:
        out.append('<eigenvalues><array><dimension dim="1">band</dimension><dimension dim="2">kpoint</dimension>'
                   '<dimension dim="3">spin</dimension><field>eigene</field><field>occ</field><set>')
        for sp in range(spins):
            out.append(f'<set comment="spin {sp + 1}"><set comment="kpoint 1">')
            out.extend(f"<r>{e:.6f} {1.0 if e <= efermi else 0.0:.4f}</r>" for e in eigen)
            out.append("</set></set>")
        out.append("</set></array></eigenvalues>\n")
    fields = M_FIELDS if lorbit == 11 else L_FIELDS
    out.append(f'<dos><i name="efermi">{efermi:.8f}</i><total><array><dimension dim="1">gridpoints</dimension>'
               '<dimension dim="2">spin</dimension><field>energy</field><field>total</field>'
               "<field>integrated</field><set>")
    de = energies[1] - energies[0]
    for sp in range(spins):
        tot = pdos_by_spin[sp].sum(axis=(1, 2))
        out.append(f'<set comment="spin {sp + 1}">')
        out.extend(f"<r>{e:.6f} {t:.6e} {c:.6e}</r>" for e, t, c in zip(energies, tot, np.cumsum(tot) * de))
        out.append("</set>")
    out.append("</set></array></total>")
    if lorbit is not None:
        out.append('<partial><array><dimension dim="1">gridpoints</dimension><dimension dim="2">spin</dimension>'
                   '<dimension dim="3">ion</dimension><field>energy</field>'
                   + "".join(f"<field>{f:>5s}</field>" for f in fields) + "<set>")
        for a in range(len(s)):
            out.append(f'<set comment="ion {a + 1}">')
            for sp in range(spins):
                out.append(f'<set comment="spin {sp + 1}">')
                out.extend("<r>" + f"{e:.6f} " + " ".join(f"{x:.6e}" for x in row) + "</r>"
                           for e, row in zip(energies, pdos_by_spin[sp][:, a, :]))
                out.append("</set>")
            out.append("</set>")
        out.append("</set></array></partial>")
    out.append("</dos>\n</calculation>\n")
    out.append(_structure_xml(s, "finalpos"))
    out.append("</modeling>\n")
    text = "".join(out)
    with open(path, "w") as fh:
        fh.write(text)
    return path
