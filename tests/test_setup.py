"""Project plumbing: environment.yml agrees with pyproject.toml, the patch series reproduces the
root files, the unified-diff applier round-trips, CI runs the README's test command."""
import random
import re
import sys
import tomllib

import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "patches"))
import patchtool  # noqa: E402


def _split(spec: str):
    spec = spec.split(";")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", spec)
    name, rng = m.group(1).lower(), m.group(2).replace(" ", "")
    return name, rng


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = {}
    for spec in project["dependencies"]:
        name, rng = _split(spec)
        py[name] = rng
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep["pip"]:
                name, rng = _split(spec)
                conda[name] = rng
        else:
            name, rng = _split(dep.replace("=", "==", 1) if re.match(r"^python=\d", dep) else dep)
            conda[name] = rng
    assert conda.pop("python") == "==3.11"
    conda.pop("pip")
    py.pop("tensorflow")  # the non-Linux-x86 alternative of tensorflow-cpu, same range
    assert conda == py
    assert project["requires-python"].startswith(">=3.11")


def test_patch_series_reproduces_root_files():
    assert patchtool.check() == []


def test_diff_round_trip():
    rng = random.Random(0)
    base = (ROOT / "DOSnet" / "net.py").read_text()
    lines = base.splitlines(keepends=True)
    for _ in range(20):
        edited = list(lines)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(edited))
            op = rng.choice(["del", "ins", "mod"])
            if op == "del":
                del edited[i]
            elif op == "ins":
                edited.insert(i, f"# inserted {rng.random()}\n")
            else:
                edited[i] = f"# modified {rng.random()}\n"
        new = "".join(edited)
        diff = patchtool.make_diff(base, new, "net.py")
        _, parts = patchtool.split_patch("header\n\n" + diff)
        assert patchtool.apply_diff(base, parts["net.py"], "net.py") == new


def test_stale_patch_is_detected():
    diff = patchtool.make_diff("a\nb\nc\n", "a\nB\nc\n", "net.py")
    _, parts = patchtool.split_patch(diff)
    try:
        patchtool.apply_diff("a\nx\nc\n", parts["net.py"], "net.py")
    except patchtool.PatchError as exc:
        assert "does not apply" in str(exc)
    else:
        raise AssertionError("a patch with wrong context applied")


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make train" in readme
