"""Issue 17: the MP fetch's failure modes end in one line with nothing lost, DOS reads use the
partitions of the (stand-in's) Delta tables, and the pins admit only what was tested.

Every test here runs the real client against ``tests/mp_server.py`` on 127.0.0.1 with failures
injected into the stand-in; loops are bounded by ``--retries``/``--abort-after`` and the rules'
``times``. ``test_live_record_matches_mprester`` is opt-in (``MP_API_KEY=... pytest -m live``).
"""
import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from data_prep.mp import FetchConfig, fetch_mp
from data_prep.records import MaterialRecord
from mp_server import running_standin, STANDIN_KEY, StandIn, build_standin, default_specs

FAST = dict(backoff_s=0.01, retries=2)
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    with running_standin(tmp_path_factory.mktemp("standin17"), default_specs()) as (srv, by_id, folder):
        yield srv, by_id, folder


@pytest.fixture()
def srv(standin):
    server, _, _ = standin
    server.reset()
    return server


@pytest.fixture(scope="module")
def two_records(standin, tmp_path_factory):
    """A folder holding the records of a finished two-material fetch (copied by each test)."""
    server, _, _ = standin
    server.reset()
    out = tmp_path_factory.mktemp("two")
    m = fetch_mp(FetchConfig(limit=2, **FAST), out, progress=False, log=lambda line: None)
    assert m["counts"]["fetched"] == 2
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npz"))}


def _cli(tmp_path, two_records, capsys, *extra):
    """``python -m data_prep fetch`` (in process) into a copy of ``two_records``: (rc, stderr, folder, before)."""
    from data_prep.__main__ import main

    out = tmp_path / "out"
    shutil.copytree(two_records, out)
    before = _snapshot(out)
    rc = main(["fetch", "--source", "mp", "--out", str(out), "--no-progress", "--backoff", "0.01",
               "--retries", "2", *extra])
    captured = capsys.readouterr()
    return rc, captured.err, out, before


def _assert_one_line(rc, err, out, before):
    assert rc == 1 and err.count("\n") == 1 and err.startswith("data_prep: error: "), err
    assert "Traceback" not in err and not ANSI.search(err) and STANDIN_KEY not in err
    after = _snapshot(out)
    assert after == before  # the records written before are untouched and still load
    for p in out.glob("*.npz"):
        MaterialRecord.from_npz(p).validate()
    index = json.loads((out / "index.json").read_text())["materials"]
    assert {m for m, e in index.items() if e["status"] == "complete"} >= {p.stem for p in out.glob("*.npz")}


# ----------------------------------------------------------------------------- item 1: selection phase
@pytest.mark.parametrize("action", ["500", "502", "504", "429", "mprest"])
def test_selection_failures_end_in_one_line(srv, two_records, tmp_path, capsys, action):
    """A persistent 500/502/504/429 on the summary search, or mp-api's own MPRestError (here its
    answer to a 400), stops the fetch with one line naming the request; nothing written is lost."""
    rule = {"kind": "summary", "action": "400" if action == "mprest" else action, "times": 1000}
    if action == "429":
        rule["retry_after"] = 0
    srv.config(rules=[rule])
    rc, err, out, before = _cli(tmp_path, two_records, capsys)
    _assert_one_line(rc, err, out, before)
    assert "selecting materials failed (summary search)" in err and "/materials/summary/" in err
    if action != "mprest":
        assert f"HTTP {action} from GET /materials/summary/ on 127.0.0.1:{srv.port}" in err
    assert "API key" not in err


def test_disk_full_while_writing_is_one_line(srv, two_records, tmp_path, capsys, monkeypatch):
    """A record that cannot be written (full disk) stops the run with one line naming the material;
    the records written before stay intact."""
    def full(self, path, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MaterialRecord, "save", full)
    rc, err, out, before = _cli(tmp_path, two_records, capsys, "--concurrency", "1")
    _assert_one_line(rc, err, out, before)
    assert "No space left on device" in err and re.search(r"error: mp-10\d\d: cannot write its record", err)


# ----------------------------------------------------------------------------- item 2: what was seen
def test_html_403_from_a_proxy_is_not_blamed_on_the_key(srv, two_records, tmp_path, capsys, monkeypatch):
    srv.config(rules=[{"kind": "summary", "action": "403", "times": 1000, "body": "html"}])
    rc, err, out, before = _cli(tmp_path, two_records, capsys)
    _assert_one_line(rc, err, out, before)
    assert "rejected the API key" not in err and "HTTP 403" in err and f"127.0.0.1:{srv.port}" in err
    assert "HTML page" in err and "not an answer of the Materials Project API" in err
    # the API's own JSON 403 still names the key (tests/test_mp.py covers 401 and 403 end to end)
    srv.reset()
    srv.config(auth_status=403)
    monkeypatch.setenv("MP_API_KEY", "wrongkey" * 4)
    rc, err, out, before = _cli(tmp_path / "json", two_records, capsys)
    _assert_one_line(rc, err, out, before)
    assert "rejected the API key (HTTP 403)" in err


def test_object_store_errors_are_plain_and_name_status_and_host(srv, two_records, tmp_path, capsys):
    srv.config(rules=[{"kind": "delta_log", "action": "403", "times": 1000, "body": "html"}])
    rc, err, out, before = _cli(tmp_path, two_records, capsys)
    _assert_one_line(rc, err, out, before)
    assert "cannot open the Materials Project DOS store" in err and "API key" not in err
    assert "HTTP 403 from GET " in err and f"127.0.0.1:{srv.port}" in err and "HTML page" in err
    # one material's data file keeps answering 500: its failure reason is plain and names status and host
    srv.reset()
    srv.config(rules=[{"kind": "projected_dos", "action": "500", "times": 1000, "material": "mp-1003"}])
    m = fetch_mp(FetchConfig(limit=4, **FAST), tmp_path / "o2", progress=False, log=lambda line: None)
    (reason,) = [e["reason"] for e in m["failed"].values()]
    assert list(m["failed"]) == ["mp-1003"] and m["failed"]["mp-1003"]["category"] == "HTTP 500"
    assert not ANSI.search(reason) and "\n" not in reason
    assert "HTTP 500 from GET /materialsproject-parsed/core/electronic-structure/projected-dos/" in reason
    assert f"127.0.0.1:{srv.port}" in reason


# ----------------------------------------------------------------------------- item 3: no retry when it cannot help
@pytest.fixture(scope="module")
def misfit(tmp_path_factory):
    """A stand-in whose projections table names its identifier column differently (a layout the
    fetcher's query does not fit)."""
    specs = default_specs(n_extra=8, n_points=61)
    folder = build_standin(tmp_path_factory.mktemp("misfit"), specs, layout="renamed-identifier")
    with StandIn(folder) as server:
        yield server


def test_schema_mismatch_is_not_retried_and_stops_the_run(misfit, tmp_path, monkeypatch, capsys):
    from data_prep.__main__ import main

    for k, v in misfit.env().items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rc = main(["fetch", "--source", "mp", "--out", str(out), "--no-progress", "--backoff", "0.5",
               "--retries", "6", "--concurrency", "1", "--batch-size", "4", "--abort-after", "5"])
    err = capsys.readouterr().err
    *per_material, last = err.splitlines()
    assert rc == 1 and "Traceback" not in err and not ANSI.search(err)
    assert len(per_material) <= 5 and all(re.match(r"mp-\d+: failed: DOS: ", line) for line in per_material)
    assert last.startswith("data_prep: error: stopped: the first 5 materials all failed for the same reason")
    assert "No field named identifier" in last and "mp-1001" in last
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retries"] == 0                      # a schema error is not retried
    assert manifest["counts"]["failed"] <= 8             # stopped early (23 materials in the stand-in)
    assert all(e["permanent"] for e in manifest["failed"].values())
    assert manifest["stopped"].startswith("stopped: the first 5 materials")


def test_mixed_failures_do_not_stop_the_run(srv, tmp_path):
    """Only one permanent reason shared by the first N stops the run: one material failing with a
    403 while the others succeed leaves the run going."""
    srv.config(rules=[{"kind": "projected_dos", "action": "403", "times": 1000, "material": "mp-1001",
                       "body": "html"}])
    m = fetch_mp(FetchConfig(limit=5, abort_after=2, **FAST), tmp_path, progress=False, log=lambda line: None)
    assert m["stopped"] is None and list(m["failed"]) == ["mp-1001"] and m["counts"]["fetched"] == 4
    assert m["failed"]["mp-1001"]["permanent"] and m["retries"] == 0


# ----------------------------------------------------------------------------- item 4: versions and names
def test_pins_admit_only_the_tested_mp_api():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if d.startswith("mp-api")]
    assert not spec.specifier.contains("0.46.0") and not spec.specifier.contains("0.46.1")
    from data_prep.mp.api import MP_API_TESTED

    assert spec.specifier.contains(MP_API_TESTED) and version("mp-api") == MP_API_TESTED
    env = (ROOT / "environment.yml").read_text()
    assert f"mp-api{spec.specifier}" in env.replace(" ", "")


@pytest.mark.parametrize("how", ["old-version", "no-delta-reader"])
def test_incompatible_mp_api_is_one_line(srv, two_records, tmp_path, capsys, monkeypatch, how):
    import importlib.metadata

    import mp_api.client.core.client as mp_client

    if how == "old-version":  # what 0.46.0 and 0.46.1 report
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.46.1" if name == "mp-api" else real(name))
    else:  # what they lack
        monkeypatch.delattr(mp_client, "QueryBuilderWithCache")
    rc, err, out, before = _cli(tmp_path, two_records, capsys)
    _assert_one_line(rc, err, out, before)
    assert "mp-api" in err and "pip install 'mp-api==0.46.5'" in err


def test_dx2_projections_survive_the_removal_of_pymatgens_alias(standin, monkeypatch):
    """Tables written before pymatgen-core renamed d(x^2-y^2) name it ``dx2``; pymatgen keeps
    ``Orbital["dx2"]`` only as a deprecated alias (to be removed 2027-08-17). Remove it here."""
    import warnings

    from pymatgen.electronic_structure.core import Orbital, Spin

    from data_prep.mp.fetch import complete_dos_from_rows
    from mp_server import _dos_rows

    meta = type(Orbital)

    def no_alias_getitem(cls, name):
        if name == "dx2":
            raise KeyError(name)
        return super(meta, cls).__getitem__(name)

    monkeypatch.setattr(meta, "__getitem__", no_alias_getitem)
    with pytest.raises(KeyError):
        Orbital["dx2"]
    _, specs, _ = standin
    spec = specs["mp-1002"]
    assert spec["dx2_name"] == "dx2"
    total, proj = _dos_rows(spec)[0]
    assert "dx2" in proj["orbital"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # nor may the alias be used while it exists
        cdos = complete_dos_from_rows(total, proj)
    site = cdos.structure[0]
    np.testing.assert_allclose(cdos.pdos[site][Orbital.dx2_y2][Spin.up],
                               spec["cdos"].pdos[spec["cdos"].structure[0]][Orbital.dx2_y2][Spin.up])


# ----------------------------------------------------------------------------- partitions
def _partition(key: str) -> str:
    m = re.search(r"/run_type=([^/]+)/", key)
    return m.group(1).replace("%2B", "+").replace("%252B", "+") if m else ""


def test_dos_reads_stay_in_the_tasks_run_type_partition(srv, standin, tmp_path):
    """One GGA material (CaO, whose task identifier falls inside the identifier range of the GGA+U
    data files): its queries open only files of the run_type=GGA partition, download its own DOS
    task's row group once per table and never the material's GGA+U task."""
    from data_prep.mp.api import dos_identifier
    from mp_server import _other_task_number, _task_number

    _, specs, folder = standin
    mid = "mp-1005"
    mine, other = dos_identifier(f"mp-{_task_number(mid)}"), dos_identifier(f"mp-{_other_task_number(mid)}")
    files = json.loads((folder / "s3_files.json").read_text())
    plus_u = [f for k, f in files.items() if _partition(k) == "GGA+U"]
    assert any(min(min(g[3]) for g in f["groups"]) < mine < max(max(g[3]) for g in f["groups"]) for f in plus_u)
    m = fetch_mp(FetchConfig(elements=["Ca"], limit=1, **FAST), tmp_path, progress=False, log=lambda line: None)
    assert m["counts"]["fetched"] == 1 and specs[mid]["run_type"] == "GGA" and (tmp_path / f"{mid}.npz").is_file()
    st = srv.stats()
    data_files = {k for k in st["file_gets"] if k.endswith(".parquet")}
    assert data_files and {_partition(k) for k in data_files} == {"GGA"}
    for kind in ("total_dos", "projected_dos"):
        assert st["tasks"][kind] == {mine: 1}, kind
    assert other not in json.dumps(st["tasks"])


def test_bytes_per_material_within_the_layout_bound(srv, standin, tmp_path):
    """Over all materials: object-store data bytes per material stay under the bound the layout
    implies (per table, the largest footer + page index plus the largest row group)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from mp_fetch import layout_bound

    _, specs, folder = standin
    bound = layout_bound(folder)
    files = json.loads((folder / "s3_files.json").read_text())
    assert max(len({m for g in f["groups"] for m in g[2]}) for f in files.values()) >= 6  # many per file
    m = fetch_mp(FetchConfig(**FAST), tmp_path, progress=False, log=lambda line: None)
    st = srv.stats()
    n = m["counts"]["targets"]
    for kind in ("total_dos", "projected_dos"):
        assert st["bytes"][kind] / n <= bound[kind]["bound_per_material"], kind
        assert st["bytes"][kind] < bound[kind]["bytes"] * 2
    assert not [t for kind in st["tasks"].values() for t, k in kind.items() if k > 1]


# ----------------------------------------------------------------------------- live (opt-in)
def _summed(cdos):
    """Per site and orbital (pymatgen ``Orbital`` index 0-8), the density summed over spins: (A, 9, P)."""
    from pymatgen.electronic_structure.core import Orbital

    out = np.zeros((len(cdos.structure), 9, len(cdos.energies)))
    for i, site in enumerate(cdos.structure):
        for orb, by_spin in cdos.pdos.get(site, {}).items():
            if isinstance(orb, Orbital) and orb.value < 9:
                out[i, orb.value] = sum(np.asarray(v) for v in by_spin.values())
    return out


@pytest.mark.live
@pytest.mark.parametrize("material_id", ["mp-149", "mp-1265"])  # Si; MgO
def test_live_record_matches_mprester(tmp_path, monkeypatch, material_id):
    """``MP_API_KEY=... pytest -m live``: the fetched record of Si and of MgO carries the DOS that
    ``MPRester().get_dos_by_material_id`` returns, projections summed over spins the same way:
    same energies, same per-site per-orbital weights to 1e-6."""
    if not os.environ.get("MP_API_KEY"):
        pytest.skip("MP_API_KEY not set")
    for var in ("MP_API_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(var, raising=False)
    from mp_api.client import MPRester

    from data_prep.mp.api import MPClient, RetryPolicy
    from data_prep.mp.fetch import Fetcher

    out = tmp_path / "live"
    cfg = FetchConfig()
    fetcher = Fetcher(cfg, out, progress=False)
    fetcher.client = MPClient(os.environ["MP_API_KEY"], policy=RetryPolicy(attempts=3), stop=fetcher.stop)
    fetcher.client.select = lambda filters: [{"material_id": material_id}]
    m = fetcher.run()
    assert m["counts"]["fetched"] == 1, m
    rec = MaterialRecord.from_npz(out / f"{material_id}.npz")
    with MPRester(os.environ["MP_API_KEY"], mute_progress_bars=True) as mpr:
        cdos = mpr.get_dos_by_material_id(material_id, load_projections=True)
    energies = np.asarray(cdos.energies, dtype=float)
    np.testing.assert_allclose(rec.spectrum.energies_ev, energies, rtol=0, atol=1e-6)
    # per site and orbital, spins summed, times the energy step: the states the record stores
    assert len(rec.structure) == len(cdos.structure)
    assert [s.species_string for s in rec.structure] == [s.species_string for s in cdos.structure]
    want = _summed(cdos).transpose(2, 0, 1) * np.gradient(energies)[:, None, None]   # (P, A, 9)
    got = np.asarray(rec.spectrum.weights, dtype=float)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # the record stores float32
