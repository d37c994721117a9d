"""A local stand-in for the Materials Project: the REST endpoints and the DOS object store mp-api uses.

Two halves:

- ``build_standin(folder, specs)`` (needs pymatgen, emmet, deltalake) writes the data the way MP
  serves it (below: what, and where each fact comes from);
- ``python tests/mp_server.py FOLDER`` (standard library only, so it starts fast) serves that
  folder on 127.0.0.1 at a free port, printed on the first line of stdout: ``/heartbeat``,
  ``/materials/{summary,electronic_structure,oxidation_states,core}/`` with MP's query parameters
  (``material_ids``, ``_fields``, ``_limit``, ``_skip``, filters) and ``{"data", "meta"}`` responses,
  the ``x-api-key`` check (401), and a minimal S3 (path-style GET with ranges, HEAD,
  ListObjectsV2) for the object store. mp-api's Delta reads hold the GIL, so the server must run
  in another process than the client.

What the stand-in reproduces, and the source of each fact (mp-api 0.46.5 and emmet-core 0.87.3,
as installed with the project):

- The DOS tables: bucket ``materialsproject-parsed``, prefixes ``core/electronic-structure/total-dos/``
  and ``.../projected-dos/``, registered as ``total_dos`` and ``dos_projections``
  (``mp_api/client/routes/materials/electronic_structure.py``, ``DosRester.get_dos_from_task_id``).
  mp-api 0.46.0 and 0.46.1 have no such reader (their ``core/client.py`` has no
  ``QueryBuilderWithCache`` or ``_get_delta_table``).
- Rows are keyed by ``identifier`` = ``str(AlphaID(task_id.split("-")[-1], padlen=8))`` and
  ``run_type`` (an emmet ``RunType`` value: ``GGA``, ``GGA+U``, ``r2SCAN``): the same method builds
  ``WHERE identifier='...'`` and, given a run type, ``AND run_type='{RunType(...).value}'``, and runs
  the same WHERE clause on the projections table, so both tables have both columns.
- ``run_type`` is a partition column: that method's docstring says the run type "will speed up
  query due to delta table partitioning" (the band-structure tables add ``path_convention`` the same
  way, ``BandStructureRester.get_bandstructure_from_task_id``). The installed sources name no
  other partition column of the DOS tables, so ``PARTITION_BY`` is ``["run_type"]`` (mp-api's
  ``BaseRester._query_delta_backed`` partitions its own local copies of other collections by
  ``version``, hive style; that is not these tables).
- Row schema: emmet's ``ElectronicDos`` (``identifier``, ``structure``, ``run_type``,
  ``spin_up_densities``, ``spin_down_densities``, ``energies``, ``efermi``, ``projected_densities``)
  and, for projections, ``identifier`` + ``run_type`` + emmet's ``ProjectedDos`` (``spin_up_densities``,
  ``spin_down_densities``, ``orbital``, ``site_index``), as arrow schemas from
  ``emmet.core.arrow.arrowize``; rows from ``ElectronicDos.from_pmg`` on real pymatgen
  ``CompleteDos`` objects (``emmet/core/band_theory.py``). mp-api converts with
  ``ElectronicDos(**total_row, projected_densities=proj_row).to_pmg()``, whose
  ``ProjectedDos.to_pmg_like`` looks orbitals up with ``Orbital[name]``; older tables name
  d(x^2-y^2) ``dx2`` (pymatgen-core's deprecated alias, ``pymatgen/electronic_structure/core.py``),
  which specs with ``dx2_name`` reproduce.
- REST documents: the electronic-structure document is an emmet ``ElectronicStructureDoc``
  (``from_structure``, dumped with ``model_dump(mode="json")``, so ids are in emmet's ``AlphaID``
  spelling, ``mp-aaaaabmn``) whose ``dos`` is a ``DosData`` (``task_id``, ``total`` per spin of
  ``DosSummaryData``) and whose ``origins`` hold a ``PropertyOrigin`` named ``electronic_structure``
  for the DOS task, as ``emmet/core/electronic_structure.py::_generate_dos_data`` names it. The core
  document's ``calc_types`` (``MaterialsDoc``) map task ids to calculation types spelled
  ``f"{run_type} {task_type}"`` (``emmet/core/vasp/calc_types/utils.py::calc_type``), e.g.
  ``GGA+U NSCF Uniform``: that is where the DOS task's run type is named. Summary and core
  documents carry only fields of emmet's ``SummaryDoc`` / ``MaterialsDoc`` (checked when built);
  oxidation states are ``OxidationStateDoc.from_structure``.
- Every material has two uniform DOS tasks of different run types (``OTHER_RUN_TYPE``; the one its
  electronic-structure document does not name has its densities halved, so reading it shows).
- Error answers as mp-api reports them (``core/client.py::_submit_request_and_process``: JSON
  ``detail`` from the API, ``Response <body>`` otherwise); mp-api's session itself retries 429,
  502 and 504 (``Retry(status_forcelist=[429, 504, 502])``) before the fetcher sees them.

Not in the sources, so chosen here and stated as such: how MP cuts its tables into files. Rows are
sorted by (run type, identifier) and written one commit per data file of ``rows_per_file``
DOS tasks (many materials each; delta-rs records min/max ``identifier`` per file in the log, which
the reader uses to skip files) with ``rows_per_group`` tasks per parquet row group (1 by default, so
the server can count per material exactly; ``bench/mp_fetch.py`` varies it).

Control endpoints (no key): ``GET /_standin/stats``, ``POST /_standin/config`` (JSON: ``latency_s``,
``rules``, ``auth_status``), ``POST /_standin/reset``. A rule ``{"kind", "action", "times",
"material"?, "retry_after"?, "body"?}`` fails the first ``times`` matching requests; ``action`` is
``drop`` (close the connection without answering) or an HTTP status (``500``, ``502``, ``503``,
``504``, ``429`` with ``Retry-After``, ``403``, ``400``, ...); ``"body": "html"`` answers with an HTML
page (a proxy's or firewall's) instead of the API's JSON or S3's XML. Kinds: ``summary``,
``electronic_structure``, ``oxidation_states``, ``materials``, ``heartbeat``, and for the object
store ``total_dos`` / ``projected_dos`` (data files, matched per material by the row groups a
range overlaps) and ``delta_log``.

Stats: requests per kind; per kind and material, successful downloads (REST: each document in a
200 response; object store: bytes served from the material's row groups / their size, rounded,
also per task identifier under ``tasks``); object-store bytes and GETs per kind and GETs per file.
"""
from __future__ import annotations

import contextlib

import email.utils
import hashlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

STANDIN_KEY = "standin0key0for0local0tests0only"  # 32 characters, like a real key
DB_VERSION = "2025.09.25"
BUCKET = "materialsproject-parsed"
TABLES = {"total_dos": "core/electronic-structure/total-dos",
          "projected_dos": "core/electronic-structure/projected-dos"}
REST_KINDS = {"summary": "summary", "electronic_structure": "electronic_structure",
              "oxidation_states": "oxidation_states", "core": "materials"}


# ============================================================================= data (test side)
def complete_dos_from_states(structure, energies_ev, weights, grid_ev, sigma_ev=0.1, spin_split=0.0,
                             efermi_ev=0.0, orbitals=None):
    """Spectral states -> a gridded pymatgen ``CompleteDos`` (Gaussian broadening, states/eV).

    ``weights``: (S, A, 9) states in ``layout.ORBITALS`` order. With ``spin_split`` > 0 the density is
    split between Spin.up (fraction 0.5 + spin_split) and Spin.down; otherwise Spin.up only.
    """
    import numpy as np
    from pymatgen.electronic_structure.core import Orbital, Spin
    from pymatgen.electronic_structure.dos import CompleteDos, Dos

    grid = np.asarray(grid_ev, dtype=float)
    g = np.exp(-0.5 * ((grid[None, :] - np.asarray(energies_ev)[:, None]) / sigma_ev) ** 2)
    g /= sigma_ev * np.sqrt(2 * np.pi)                                    # (S, P) per state, 1/eV
    dens = np.einsum("sp,sao->aop", g, np.asarray(weights, dtype=float))  # (A, 9, P)
    orbs = orbitals or list(Orbital)[:9]
    pdos, total_up, total_dn = {}, np.zeros(grid.size), np.zeros(grid.size)
    for i, site in enumerate(structure):
        pdos[site] = {}
        for k, orb in enumerate(orbs):
            d = dens[i, k]
            if spin_split:
                up, dn = d * (0.5 + spin_split), d * (0.5 - spin_split)
                pdos[site][orb] = {Spin.up: up, Spin.down: dn}
                total_up += up
                total_dn += dn
            else:
                pdos[site][orb] = {Spin.up: d}
                total_up += d
    tot = {Spin.up: total_up} if not spin_split else {Spin.up: total_up, Spin.down: total_dn}
    return CompleteDos(structure, Dos(efermi_ev, grid, tot), pdos)


def gapped_states(n_atoms, seed, gap_ev=2.0, n_states=80):
    """Discrete states from ``records_factory.random_spectrum`` moved apart to open a gap at 0..gap."""
    import numpy as np
    from records_factory import random_spectrum

    sp = random_spectrum(n_atoms, seed=seed, n_states=n_states)
    e = np.asarray(sp.energies_ev)
    e = np.where(e < 0, np.clip(e, -12, -0.6), np.clip(e, 0, 6) + gap_ev + 0.6)
    return e, np.asarray(sp.weights)


def default_specs(n_extra: int = 0, n_points: int = 241):
    """The stand-in's materials: records_factory crystals with DOS, plus one of each problem case.

    Returns a list of dicts; ``expect`` is what the fetcher should do with each (``record`` or a
    skip category). ``n_extra`` adds rescaled copies of the crystals (for benchmarks).
    """
    import numpy as np
    from pymatgen.core import Lattice, Structure
    from records_factory import structures

    grid = np.linspace(-14.0, 10.0, n_points)
    crystals = structures()
    base = [  # id, crystal, run type, spin split, theoretical, e_above_hull, orbital names
        ("mp-1001", "NaCl", "GGA", 0.0, False, 0.0, None),
        ("mp-1002", "MgO", "GGA", 0.0, False, 0.0, "dx2"),
        ("mp-1003", "TiO2", "GGA+U", 0.1, False, 0.0, None),
        ("mp-1004", "KBr", "GGA", 0.0, True, 0.02, None),
        ("mp-1005", "CaO", "GGA", 0.0, False, 0.0, None),
        ("mp-1006", "SrTiO3", "GGA+U", 0.05, False, 0.0, "dx2"),
        ("mp-1007", "ZnS", "r2SCAN", 0.0, False, 0.01, None),
        ("mp-1008", "LiF", "GGA", 0.0, True, 0.0, None),
    ]
    specs = []
    for k, (mid, name, rt, split, theo, ehull, dx2) in enumerate(base):
        specs.append(dict(material_id=mid, structure=crystals[name], run_type=rt, spin_split=split,
                          theoretical=theo, energy_above_hull=ehull, seed=k, dx2_name=dx2, expect="record"))
    for j in range(n_extra):
        mid0, name, rt, split, theo, ehull, dx2 = base[j % len(base)]
        s = crystals[name].copy()
        s.scale_lattice(s.volume * (1.0 + 0.01 * (j // len(base) + 1)) ** 3)
        specs.append(dict(material_id=f"mp-{2001 + j}", structure=s, run_type=rt, spin_split=split,
                          theoretical=theo, energy_above_hull=ehull, seed=100 + j, dx2_name=dx2,
                          expect="record"))
    nacl, mgo = crystals["NaCl"], crystals["MgO"]
    specials = [
        ("mp-1021", nacl, {"case": "l-resolved"}, "l-resolved"),
        ("mp-1022", mgo, {"case": "missing-rows"}, "dos-missing"),
        ("mp-1023", crystals["CaO"], {"case": "malformed"}, "malformed-dos"),
        ("mp-1024", crystals["KBr"], {"case": "no-dos-field"}, "no-dos"),
        ("mp-1025", crystals["LiF"], {"case": "no-oxi-doc"}, "record"),
        ("mp-1026", crystals["ZnS"], {"case": "oxi-disagrees"}, "record"),
        ("mp-1027", Structure(Lattice.cubic(5.64), [{"Na": 0.5, "K": 0.5}, "Cl"],
                              [[0, 0, 0], [0.5, 0.5, 0.5]]), {"case": "disordered"}, "disordered"),
    ]
    for j, (mid, s, extra, expect) in enumerate(specials):
        specs.append(dict(material_id=mid, structure=s, run_type="GGA", spin_split=0.0, theoretical=False,
                          energy_above_hull=0.0, seed=50 + j, dx2_name=None, expect=expect, **extra))
    for spec in specs:
        e, w = gapped_states(len(spec["structure"]), spec["seed"])
        spec["cdos"] = complete_dos_from_states(spec["structure"], e, w, grid, spin_split=spec["spin_split"],
                                                efermi_ev=0.3)
    return specs


#: Run types of the stand-in's tasks (emmet ``RunType`` values) and the other run type each material
#: also has a uniform DOS task for (MP computes GGA and GGA+U for many oxides; r2SCAN for newer ones).
OTHER_RUN_TYPE = {"GGA": "GGA+U", "GGA+U": "GGA", "r2SCAN": "GGA"}


def _task_number(material_id: str) -> int:
    return 500000 + int(material_id.split("-")[1])


def _other_task_number(material_id: str) -> int:
    return 700000 + int(material_id.split("-")[1])


def _docs_for(spec):
    """REST documents (summary, electronic structure, oxidation states, core) of one spec.

    The electronic-structure document is emmet's ``ElectronicStructureDoc`` (ids in emmet's
    ``AlphaID`` spelling, the DOS origin named ``electronic_structure`` as emmet's
    ``_generate_dos_data`` names it); the others carry only fields of emmet's ``SummaryDoc``,
    ``MaterialsDoc`` and ``OxidationStateDoc``.
    """
    from datetime import datetime, timezone

    from emmet.core.electronic_structure import DosData, DosSummaryData, ElectronicStructureDoc
    from emmet.core.material import MaterialsDoc, PropertyOrigin
    from emmet.core.oxidation_states import OxidationStateDoc
    from emmet.core.summary import SummaryDoc
    from pymatgen.electronic_structure.core import Spin

    mid, s, cdos, case = spec["material_id"], spec["structure"], spec["cdos"], spec.get("case")
    task = f"mp-{_task_number(mid)}"
    other = f"mp-{_other_task_number(mid)}"
    comp = s.composition
    elements = sorted({el.symbol for el in comp.elements})
    summary = {"material_id": mid, "formula_pretty": comp.reduced_formula, "nsites": len(s),
               "nelements": len(elements), "elements": elements, "chemsys": "-".join(elements),
               "energy_above_hull": spec["energy_above_hull"], "is_stable": spec["energy_above_hull"] == 0.0,
               "theoretical": spec["theoretical"], "deprecated": False,
               "has_props": {"materials": True, "electronic_structure": True, "dos": True,
                             "oxi_states": case != "no-oxi-doc"}}
    assert set(summary) <= set(SummaryDoc.model_fields)
    cbm, vbm = cdos.get_cbm_vbm()
    gap = max(0.0, cbm - vbm)
    spins = list(cdos.densities)
    total = {sp: DosSummaryData(band_gap=gap, cbm=cbm, vbm=vbm, efermi=cdos.efermi,
                                spin_polarization=0.0 if len(spins) == 1 else 0.1) for sp in spins}
    now = datetime(2025, 9, 25, tzinfo=timezone.utc)
    es_doc = ElectronicStructureDoc.from_structure(
        meta_structure=s, material_id=mid, band_gap=round(gap + 0.05, 4), cbm=cbm, vbm=vbm, efermi=cdos.efermi,
        is_gap_direct=False, is_metal=bool(gap < 0.1), deprecated=False,
        dos=None if case == "no-dos-field" else DosData(
            task_id=task, total=total,
            # shaped as emmet's _generate_dos_data fills them (values: the total's summary); None
            # would not survive emmet's own DosData validator, which mp-api's document models run
            orbital={o: dict(total) for o in ("s", "p", "d")},
            elemental={el: {o: dict(total) for o in ("total", "s", "p", "d")} for el in elements}),
        origins=[PropertyOrigin(name="electronic_structure", task_id=task, last_updated=now)])
    es = es_doc.model_dump(mode="json")
    es.pop("structure", None)  # the API leaves it out unless asked
    oxi = None
    if case != "no-oxi-doc" and s.is_ordered:
        oxi = OxidationStateDoc.from_structure(s, material_id=mid).model_dump(mode="json")
        if case == "oxi-disagrees":  # a guess that swaps the charges
            oxi["possible_valences"] = [-v for v in oxi["possible_valences"]]
            oxi["method"] = "Oxidation State Guess"
    rt, rt2 = spec["run_type"], OTHER_RUN_TYPE[spec["run_type"]]
    static = f"mp-{_task_number(mid) + 1}"
    core = {"material_id": mid, "deprecated": False, "task_ids": [task, static, other],
            "calc_types": {task: f"{rt} NSCF Uniform", static: f"{rt} Static", other: f"{rt2} NSCF Uniform"}}
    assert set(core) <= set(MaterialsDoc.model_fields)
    assert Spin.up in cdos.densities
    return summary, es, oxi, core, task


def _ident(task: str) -> str:
    from emmet.core.mpid import AlphaID

    return str(AlphaID(task.split("-")[-1], padlen=8))


def _dos_rows(spec):
    """[(total row, projected row)] of a spec's two uniform DOS tasks (the one its electronic-structure
    document names, of ``run_type``, and one of ``OTHER_RUN_TYPE``, whose densities are scaled by 0.5
    so that reading the wrong one shows), as mp-api 0.46 reads them."""
    from emmet.core.band_theory import ElectronicDos

    case = spec.get("case")
    if case == "missing-rows":
        return []
    out = []
    for task, rt, scale in ((f"mp-{_task_number(spec['material_id'])}", spec["run_type"], 1.0),
                            (f"mp-{_other_task_number(spec['material_id'])}", OTHER_RUN_TYPE[spec["run_type"]], 0.5)):
        ident = _ident(task)
        ed = ElectronicDos.from_pmg(spec["cdos"], identifier=ident, run_type=rt)
        row = ed.model_dump(mode="json")
        proj = dict(row.pop("projected_densities"))
        row["projected_densities"] = None
        proj["identifier"], proj["run_type"] = ident, row["run_type"]
        if scale != 1.0:
            for k in ("spin_up_densities", "spin_down_densities"):
                if row.get(k):
                    row[k] = [v * scale for v in row[k]]
                if proj.get(k):
                    proj[k] = [[v * scale for v in d] if d else d for d in proj[k]]
        if spec.get("dx2_name"):  # older tables: pymatgen's pre-2026 name of d(x^2-y^2)
            proj["orbital"] = [spec["dx2_name"] if o == "dx2_y2" else o for o in proj["orbital"]]
        if case == "l-resolved":  # sum m components into s/p/d, as an l-resolved (LORBIT=10) DOS would be
            merged: dict = {}
            for idx, orb, up in zip(proj["site_index"], proj["orbital"], proj["spin_up_densities"]):
                l_name = "s" if orb == "s" else orb[0]
                acc = merged.setdefault((idx, l_name), [0.0] * len(up))
                merged[(idx, l_name)] = [a + b for a, b in zip(acc, up)]
            proj["site_index"] = [k[0] for k in merged]
            proj["orbital"] = [k[1] for k in merged]
            proj["spin_up_densities"] = list(merged.values())
            proj["spin_down_densities"] = None
        if case == "malformed":  # projections on fewer energies than the total DOS
            proj["spin_up_densities"] = [d[: len(d) // 2] for d in proj["spin_up_densities"]]
        out.append((row, proj))
    return out


#: Partition column(s) of MP's DOS tables (see the module docstring for where this comes from).
PARTITION_BY = ["run_type"]


def build_standin(folder, specs, rows_per_group: int = 1, rows_per_file: int = 250, layout: str = "mp") -> Path:
    """Write REST documents and the two partitioned DOS Delta tables for ``specs`` into ``folder``.

    Each table holds its rows sorted by identifier, partitioned by ``PARTITION_BY``, in data files
    of ``rows_per_file`` rows (DOS tasks: many materials each; one commit per file) with
    ``rows_per_group`` rows per parquet row group. ``layout="renamed-identifier"`` writes the projections table with
    its ``identifier`` column named ``task_identifier`` (a layout the fetcher's query does not fit).

    ``s3_files.json`` maps every data file to its table and, per row group, the byte span and the
    materials in it (for the server's per-material accounting).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import WriterProperties, write_deltalake
    from emmet.core.arrow import arrowize
    from emmet.core.band_theory import ElectronicDos, ProjectedDos

    folder = Path(folder)
    rest = {k: [] for k in ("summary", "electronic_structure", "oxidation_states", "materials")}
    total_schema = pa.schema(arrowize(ElectronicDos))
    proj_schema = pa.schema([pa.field("identifier", pa.string()), pa.field("run_type", pa.string())]
                            + list(pa.schema(arrowize(ProjectedDos))))
    tables = {kind: folder / "s3" / BUCKET / prefix for kind, prefix in TABLES.items()}
    rows: dict[str, list] = {"total_dos": [], "projected_dos": []}
    owner: dict[str, str] = {}  # identifier -> material id
    for spec in specs:
        summary, es, oxi, core, task = _docs_for(spec)
        for doc in (summary, es, oxi, core):  # the id the server matches on, whatever spelling the doc has
            if doc is not None:
                doc["_mid"] = spec["material_id"]
        rest["summary"].append(summary)
        rest["electronic_structure"].append(es)
        if oxi is not None:
            rest["oxidation_states"].append(oxi)
        rest["materials"].append(core)
        for total, proj in _dos_rows(spec):
            rows["total_dos"].append(total)
            rows["projected_dos"].append(proj)
            owner[total["identifier"]] = spec["material_id"]
    files: dict[str, dict] = {}
    props = WriterProperties(max_row_group_size=max(1, int(rows_per_group)), compression="SNAPPY")
    for kind, schema in (("total_dos", total_schema), ("projected_dos", proj_schema)):
        data = sorted(rows[kind], key=lambda r: (r["run_type"], r["identifier"]))
        parts = [r[PARTITION_BY[0]] for r in data]
        start = 0
        while start < len(data):  # contiguous identifier ranges: one file per chunk of one partition
            stop = min(len(data), start + max(1, int(rows_per_file)))
            stop = next((i for i in range(start + 1, stop) if parts[i] != parts[start]), stop)
            # a fresh table per chunk: delta-rs 1.5 panics on a sliced arrow table with nested columns
            table = pa.Table.from_pylist(data[start:stop], schema=schema)
            if kind == "projected_dos" and layout == "renamed-identifier":
                table = table.rename_columns(["task_identifier" if n == "identifier" else n
                                              for n in table.column_names])
            write_deltalake(str(tables[kind]), table, partition_by=PARTITION_BY,
                            mode="overwrite" if start == 0 else "append", writer_properties=props)
            start = stop
        for p in sorted(tables[kind].rglob("*.parquet")):
            meta = pq.ParquetFile(p).metadata
            id_col = next(i for i in range(meta.num_columns)
                          if meta.schema.column(i).path.split(".")[0] in ("identifier", "task_identifier"))
            idents = pq.ParquetFile(p)
            groups = []
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                starts = [min(c for c in (rg.column(i).dictionary_page_offset, rg.column(i).data_page_offset)
                              if c is not None) for i in range(rg.num_columns)]
                ends = [starts[i] + rg.column(i).total_compressed_size for i in range(rg.num_columns)]
                ids = idents.read_row_group(g, columns=[meta.schema.column(id_col).path]).column(0).to_pylist()
                groups.append([min(starts), max(ends), sorted({owner[i] for i in ids}), sorted(ids)])
            files[f"{BUCKET}/{TABLES[kind]}/{p.relative_to(tables[kind]).as_posix()}"] = {
                "kind": kind, "groups": groups, "size": p.stat().st_size}
    from monty.json import MontyEncoder

    (folder / "rest").mkdir(parents=True, exist_ok=True)
    for name, docs in rest.items():  # MontyEncoder: numpy scalars and MSON objects as the API writes them
        (folder / "rest" / f"{name}.json").write_text(json.dumps(docs, cls=MontyEncoder))
    (folder / "s3_files.json").write_text(json.dumps(files))
    return folder


# ============================================================================= client side helper
class StandIn:
    """Run ``mp_server.py FOLDER`` in a subprocess; talk to its control endpoints."""

    def __init__(self, folder, key: str = STANDIN_KEY):
        self.folder = Path(folder)
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.folder), "--key", key],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"stand-in server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}/"

    def env(self) -> dict:
        """Environment that points mp-api (REST) and the Delta reader (object store) here."""
        return {"MP_API_ENDPOINT": self.url, "AWS_ENDPOINT_URL": self.url.rstrip("/"),
                "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true", "MP_API_KEY": STANDIN_KEY}

    def _post(self, path, body=None):
        import urllib.request

        req = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def config(self, **kw):
        return self._post("_standin/config", kw)

    def reset(self):
        return self._post("_standin/reset")

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "_standin/stats", timeout=10) as r:
            return json.loads(r.read())

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================= server
class Store:
    """Documents, object-store files, failure rules and counters (shared by the handler threads)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key
        self.docs = {k: json.loads((folder / "rest" / f"{k}.json").read_text())
                     for k in ("summary", "electronic_structure", "oxidation_states", "materials")}
        self.files = json.loads((folder / "s3_files.json").read_text())
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.latency_s = 0.0
            self.rules: list[dict] = []
            self.auth_status = 401
            self.requests: dict[str, int] = {}
            self.served: dict[str, dict[str, int]] = {}
            self.overlap: dict[tuple, int] = {}          # (file key, row group) -> bytes served from it
            self.bytes: dict[str, int] = {}              # kind -> bytes served (GET bodies)
            self.gets: dict[str, int] = {}               # kind -> successful GETs
            self.file_gets: dict[str, int] = {}          # object key -> successful GETs
            self.injected: dict[str, int] = {}
            self.params: list[dict] = []

    def rule_for(self, kind: str, materials) -> dict | None:
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
            for rule in self.rules:
                if rule.get("kind") != kind or rule.get("times", 0) <= 0:
                    continue
                if rule.get("material") and rule["material"] not in materials:
                    continue
                rule["times"] -= 1
                self.injected[rule["action"]] = self.injected.get(rule["action"], 0) + 1
                return dict(rule)
        return None

    def count_docs(self, kind, docs):
        with self.lock:
            per = self.served.setdefault(kind, {})
            for d in docs:
                per[d["_mid"]] = per.get(d["_mid"], 0) + 1

    def materials_in(self, key: str, start: int, end: int) -> tuple:
        """Materials whose row groups of data file ``key`` overlap bytes ``start..end``."""
        info = self.files.get(key)
        if not info:
            return ()
        return tuple(sorted({m for a, b, mids, _ids in info["groups"] if a <= end and b > start for m in mids}))

    def count_get(self, kind: str, key: str, start: int, end: int) -> None:
        """Account a served byte range: per kind, and per row group of a data file."""
        with self.lock:
            self.bytes[kind] = self.bytes.get(kind, 0) + (end - start + 1)
            self.gets[kind] = self.gets.get(kind, 0) + 1
            self.file_gets[key] = self.file_gets.get(key, 0) + 1
            info = self.files.get(key)
            if info:
                for g, (a, b, _mids, _ids) in enumerate(info["groups"]):
                    ov = min(b, end + 1) - max(a, start)
                    if ov > 0:
                        self.overlap[(key, g)] = self.overlap.get((key, g), 0) + ov

    def stats(self) -> dict:
        """Requests per kind; for REST each document served per material; for the object store,
        per material, how many times its row group was downloaded (bytes served from the group /
        the group's size, rounded: exact when a row group holds one material's task), plus bytes
        and GETs per kind."""
        with self.lock:
            served = {k: dict(v) for k, v in self.served.items()}
            tasks: dict[str, dict[str, int]] = {}
            for (key, g), nbytes in self.overlap.items():
                info = self.files[key]
                a, b, mids, ids = info["groups"][g]
                n = int(round(nbytes / max(1, b - a)))
                if n == 0:
                    continue
                per = served.setdefault(info["kind"], {})
                for m in mids:
                    per[m] = max(per.get(m, 0), n)
                per_task = tasks.setdefault(info["kind"], {})
                for i in ids:
                    per_task[i] = max(per_task.get(i, 0), n)
            return {"requests": dict(self.requests), "served": served, "tasks": tasks,
                    "injected": dict(self.injected),
                    "rules_left": [r for r in self.rules if r.get("times", 0) > 0], "params": list(self.params),
                    "bytes": dict(self.bytes), "gets": dict(self.gets), "file_gets": dict(self.file_gets)}


def _truthy(v: str) -> bool:
    return str(v).lower() in ("true", "1", "yes")


def _match(doc: dict, q: dict) -> bool:
    """MP's summary/materials filters that the fetcher sends (unknown ones are ignored)."""
    def one(name):
        return q[name][0] if name in q else None

    if one("material_ids") is not None and doc["_mid"] not in one("material_ids").split(","):
        return False
    els = set(doc.get("elements") or [])
    if one("elements") and not set(one("elements").split(",")) <= els:
        return False
    if one("exclude_elements") and set(one("exclude_elements").split(",")) & els:
        return False
    for field in ("nelements", "energy_above_hull", "nsites"):
        lo, hi = one(f"{field}_min"), one(f"{field}_max")
        if (lo is not None or hi is not None) and doc.get(field) is None:
            return False
        if lo is not None and doc[field] < float(lo) - 1e-12:
            return False
        if hi is not None and doc[field] > float(hi) + 1e-12:
            return False
    for field in ("is_stable", "theoretical", "deprecated"):
        if one(field) is not None and field in doc and bool(doc[field]) != _truthy(one(field)):
            return False
    if one("has_props"):
        hp = doc.get("has_props") or {}
        if not all(hp.get(p) for p in one("has_props").split(",")):
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store = None  # set by main

    def log_message(self, *args):
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _send(self, status, body: bytes = b"", ctype="application/json", headers=None, head=False):
        headers = dict(headers or {})
        length = headers.pop("Content-Length-Override", None)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length if length is not None else len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status, obj, headers=None):
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _fail(self, rule, s3=False) -> None:
        action = str(rule["action"])
        if action == "drop":
            self.close_connection = True
            return
        status = int(action)
        headers = {"Retry-After": str(rule.get("retry_after", 1))} if status == 429 else None
        if rule.get("body") == "html":  # a proxy's or firewall's page, not the API's or S3's answer
            body = (f"<html><head><title>{status} Forbidden</title></head><body><h1>Access denied</h1>"
                    "<p>This request was blocked by the network security policy.</p></body></html>").encode()
            self._send(status, body, "text/html", headers)
        elif s3:
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                    f"<Message>injected {status}</Message></Error>").encode()
            self._send(status, body, "application/xml", headers)
        else:
            self._json(status, {"detail": f"injected failure {status}"}, headers)

    # -- verbs ---------------------------------------------------------------------------
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}") if n else {}
        st = self.store
        if self.path.startswith("/_standin/reset"):
            st.reset()
            return self._json(200, {"ok": True})
        if self.path.startswith("/_standin/config"):
            with st.lock:
                if "latency_s" in body:
                    st.latency_s = float(body["latency_s"])
                if "rules" in body:
                    st.rules = [dict(r) for r in body["rules"]]
                if "auth_status" in body:
                    st.auth_status = int(body["auth_status"])
            return self._json(200, {"ok": True})
        self._json(405, {"detail": "method not allowed"})

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        st = self.store
        url = urlparse(self.path)
        path = unquote(url.path)
        q = parse_qs(url.query, keep_blank_values=True)
        if path.startswith("/_standin/stats"):
            return self._json(200, st.stats())
        if st.latency_s:
            time.sleep(st.latency_s)
        if path.rstrip("/") == "/heartbeat":
            if (rule := st.rule_for("heartbeat", ())) is not None:
                return self._fail(rule)
            return self._json(200, {"db_version": DB_VERSION, "access_controlled_batch_ids": [],
                                    "version": "0.87.3"})
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "materials" and parts[1] in REST_KINDS:
            return self._rest(REST_KINDS[parts[1]], q)
        if parts and parts[0] == BUCKET:
            return self._s3(parts, q, head)
        self._json(404, {"detail": f"not found: {path}"})

    def _rest(self, kind, q):
        st = self.store
        ids = (q.get("material_ids") or [""])[0].split(",")
        if self.headers.get("x-api-key") != st.key:
            st.rule_for(kind, ids)  # counted as a request
            return self._json(st.auth_status, {"detail": "API key not valid" if st.auth_status == 401
                                               else "Forbidden"})
        if (rule := st.rule_for(kind, ids)) is not None:
            return self._fail(rule)
        with st.lock:
            st.params.append({"kind": kind, **{k: v[0] for k, v in q.items()}})
        docs = [d for d in st.docs[kind] if _match(d, q)]
        total = len(docs)
        skip = int((q.get("_skip") or ["0"])[0])
        limit = int((q.get("_limit") or ["1000"])[0])
        docs = docs[skip: skip + limit]
        st.count_docs(kind, docs)
        fields = (q.get("_fields") or [""])[0]
        if fields and not _truthy((q.get("_all_fields") or ["false"])[0]):
            keep = set(fields.split(",")) | {"material_id"}
        else:
            keep = None
        docs = [{k: v for k, v in d.items() if k != "_mid" and (keep is None or k in keep)} for d in docs]
        self._json(200, {"data": docs, "meta": {"api_version": "stand-in", "time_stamp": time.strftime(
            "%Y-%m-%dT%H:%M:%S"), "total_doc": total, "max_limit": 1000, "db_version": DB_VERSION}})

    def _s3(self, parts, q, head):
        st = self.store
        key = "/".join(parts[1:])
        if "list-type" in q:
            prefix = (q.get("prefix") or [""])[0]
            after = (q.get("start-after") or [""])[0]
            kind = "delta_log" if "_delta_log" in prefix else "list"
            if (rule := st.rule_for(kind, ())) is not None:
                return self._fail(rule, s3=True)
            base = st.folder / "s3" / BUCKET
            items = []
            for f in sorted(base.rglob("*")):
                k = f.relative_to(base).as_posix()
                if f.is_file() and k.startswith(prefix) and k > after:
                    items.append((k, f.stat().st_size, f.stat().st_mtime))
            xml = ['<?xml version="1.0" encoding="UTF-8"?>',
                   '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                   f"<Name>{BUCKET}</Name><Prefix>{prefix}</Prefix><KeyCount>{len(items)}</KeyCount>",
                   "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"]
            for k, size, mtime in items:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))
                xml.append(f"<Contents><Key>{k}</Key><LastModified>{stamp}</LastModified>"
                           f'<ETag>"{hashlib.md5(k.encode()).hexdigest()}"</ETag><Size>{size}</Size>'
                           "<StorageClass>STANDARD</StorageClass></Contents>")
            xml.append("</ListBucketResult>")
            return self._send(200, "".join(xml).encode(), "application/xml", head=head)
        if key not in st.files and f"{BUCKET}/{key}" not in st.files:
            alt = key.replace("%", "%25")  # a partition value escaped once more by the client
            key = alt if f"{BUCKET}/{alt}" in st.files else key
        fkey = f"{BUCKET}/{key}"
        info = st.files.get(fkey)
        kind = info["kind"] if info else ("delta_log" if "_delta_log" in key else "object")
        f = st.folder / "s3" / BUCKET / key
        if not f.is_file():
            if (rule := st.rule_for(kind, ())) is not None:
                return self._fail(rule, s3=True)
            body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>'
            return self._send(404, body, "application/xml", head=head)
        n = f.stat().st_size
        start, end, status = 0, n - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a == "":
                start = max(0, n - int(b))
            else:
                start, end = int(a), min(n - 1, int(b)) if b else n - 1
            status = 206
        if (rule := st.rule_for(kind, st.materials_in(fkey, start, end) if info else ())) is not None:
            return self._fail(rule, s3=True)
        with open(f, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start + 1) if not head else b""
        stat = f.stat()
        headers = {"ETag": f'"{hashlib.md5(f"{key}:{stat.st_size}:{stat.st_mtime}".encode()).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{n}"
        if head:
            headers["Content-Length-Override"] = str(end - start + 1)
        self._send(status, data, "application/octet-stream", headers, head=head)
        if not head:
            st.count_get(kind, fkey, start, end)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="local stand-in for the Materials Project API and DOS store")
    ap.add_argument("folder")
    ap.add_argument("--key", default=STANDIN_KEY)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    Handler.store = Store(Path(args.folder), args.key)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


@contextlib.contextmanager
def running_standin(folder, specs):
    """The stand-in built in ``folder`` and served, with the environment pointing at it (and no
    pymatgen key): yields (server, specs by material id, folder). Shared by the MP test modules."""
    import pytest

    folder = build_standin(folder, specs)
    with StandIn(folder) as srv, pytest.MonkeyPatch.context() as mp:
        for k, v in srv.env().items():
            mp.setenv(k, v)
        mp.delenv("PMG_MAPI_KEY", raising=False)
        yield srv, {s["material_id"]: s for s in specs}, folder
