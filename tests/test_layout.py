"""Project layout: who may import whom (DOSnet/ stands alone, data_prep never imports dosnet_bv),
no import cycles, no private names imported across modules, packages-only install, and the h5
schema version check."""
import ast
import json
import tomllib

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_cli

PACKAGES = ("DOSnet", "data_prep", "dosnet_bv")


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(top=PACKAGES):
    for pkg in top:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _imports(path):
    """(module imported, names imported from it) for every import statement of ``path``, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _project_imports(path):
    """Project modules imported by ``path`` (a ``from pkg import module`` counts as the module)."""
    known = {_module_name(p) for p in _sources()}
    mods = set()
    for base, names in _imports(path):
        for n in names:
            if f"{base}.{n}" in known:
                mods.add(f"{base}.{n}")
        if base in known or base.split(".")[0] in PACKAGES:
            mods.add(base)
    return mods


def test_dosnet_imports_nothing_of_ours():
    """DOSnet/ mirrors upstream DOSnet and is read beside the paper: no dosnet_bv, data_prep, net, train."""
    for path in sorted((ROOT / "DOSnet").rglob("*.py")):
        for base, _ in _imports(path):
            top = base.split(".")[0]
            assert top not in ("dosnet_bv", "data_prep", "net", "train", "bench"), f"{path.name} imports {base}"


def test_data_prep_never_imports_dosnet_bv():
    for path in sorted((ROOT / "data_prep").rglob("*.py")):
        for base, _ in _imports(path):
            assert base.split(".")[0] not in ("dosnet_bv", "train", "net"), f"{path} imports {base}"


def test_no_import_cycles():
    graph = {_module_name(p): {m for m in _project_imports(p) if m != _module_name(p)} for p in _sources()}
    # a package's __init__ is not an edge target for its own modules (importing pkg.mod runs pkg first)
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if n not in graph or n == m.rsplit(".", 1)[0]:
                continue
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_names_imported_across_modules():
    files = list(_sources()) + sorted((ROOT / "bench").glob("*.py")) + [ROOT / "train.py", ROOT / "net.py"]
    for path in files:
        for base, names in _imports(path):
            if base.split(".")[0] in PACKAGES + ("net", "train", "speed"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {base}"


def test_install_is_packages_only():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py-modules" not in tool
    assert set(tool["packages"]["find"]["include"]) == {f"{p}*" for p in PACKAGES}


def test_old_schema_files_get_a_one_line_rebuild_hint(tmp_path):
    """A file without ``schema_version`` (written before the schema module) or with an older one."""
    from data_prep import h5schema
    from data_prep.h5schema import BuildError, open_h5
    from data_prep.layout import EnergyGrid
    from h5_factory import write_minimal_h5

    L, n = 16, 6
    path = write_minimal_h5(tmp_path / "old.h5", dos=np.ones((n, L, 27), np.float32), structure=np.zeros((n, 2)),
                            labels=["a", "b"], families=["site", "site"], bvs=np.ones(n), valence=np.ones(n),
                            mids=np.repeat(["m1", "m2", "m3"], 2), elements=["O"] * n,
                            split=["train"] * 2 + ["val"] * 2 + ["test"] * 2, sites=2, grid=EnergyGrid(n_points=L))
    with open_h5(path) as h:
        assert h.attr(h5schema.VERSION_ATTR) == h5schema.SCHEMA_VERSION and h.n == n
    for version in (None, h5schema.MIN_READ_VERSION - 1):
        with h5py.File(path, "r+") as h:
            if version is None:
                del h.attrs[h5schema.VERSION_ATTR]
            else:
                h.attrs[h5schema.VERSION_ATTR] = version
        with pytest.raises(BuildError, match="python -m data_prep build"):
            open_h5(path)
        r = run_cli("-m", "data_prep", "inspect", path)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "make data" in r.stderr, r.stderr
    params = json.loads((ROOT / "params.json").read_text())
    params.update(data_file=str(path), length=L)
    (tmp_path / "p.json").write_text(json.dumps(params))
    r = run_cli("train.py", "--params", tmp_path / "p.json")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "rebuild it with" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
