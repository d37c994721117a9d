"""bench/answer.py: issue 13's studies in order from one folder of records, resumable, a failed
stage named in one line, the h5 frozen at its first build."""
import json
import sys
from pathlib import Path

import pytest

from records_factory import write_records

import train
from data_prep.__main__ import main as data_prep_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import answer  # noqa: E402 - bench/answer.py


def _in_process(calls):
    """Run the stages' commands in this process (the script spawns them: a second TensorFlow start each)."""
    def call(argv, log_path):
        calls.append(argv)
        if argv[1:3] == ["-m", "data_prep"]:
            return data_prep_main(argv[3:])
        assert argv[1] == "train.py"
        return train.main(argv[2:])
    return call


def _argv(tmp_path, *more):
    return ["--records", str(tmp_path / "records"), "--out", str(tmp_path / "answer"), "--folds", "2",
            "--seeds", "1", "--draws", "5", "--draw-models", "element_mean", *more]


# five families (the rock salts are one), none so large that a fold has nothing to train on
NAMES = ["NaCl", "MgO", "TiO2", "SrTiO3", "ZnS"]


def test_studies_in_order_then_a_rerun_resumes_without_rebuilding(tmp_path, capsys):
    write_records(tmp_path / "records", NAMES)
    calls = []
    argv = _argv(tmp_path, "--stages", "side,build,material,ablation,draws", "--models", "element_mean,bv_fitted")
    assert answer.main(argv, _in_process(calls)) == 0
    out = tmp_path / "answer"
    # in the study's order whatever the order given; the draw at its own split_seed
    assert [c[1] if c[1] == "train.py" else c[3] for c in calls] == ["build"] + ["train.py"] * 4
    assert calls[2][calls[2].index("--out") + 1] == str(out / "draw-5")
    assert json.loads((out / "params-draw-5.json").read_text())["split_seed"] == 5
    assert json.loads((out / "params-material.json").read_text())["split_by"] == "material"
    data = json.loads((out / "data.json").read_text())
    assert data["n_materials"] == 5
    abl = json.loads((out / "ablation" / "cv_ablation.json").read_text())
    assert set(abl["models"]) == {"element_mean", "bv_fitted"} and abl["split_by"] == "family"
    assert json.loads((out / "material" / "cv_ablation.json").read_text())["split_by"] == "material"
    side = (out / "side_by_side.md").read_text()
    assert "PBE, family, split_seed 88" in side and "PBE, material" in side and "split_seed 5" in side
    state = json.loads((out / "answer.json").read_text())
    assert [state["stages"][s]["state"] for s in ("build", "ablation", "draws", "material", "side")] == ["done"] * 5
    assert "5 materials" in (out / "answer.md").read_text()
    # a rerun: the h5 is kept (no build command), the studies resume with nothing left to train
    stamp = (out / "data.h5").stat().st_mtime_ns
    calls.clear()
    (tmp_path / "records" / "test-NaCl.npz").unlink()  # newer records do not change a study under way
    assert answer.main(argv, _in_process(calls)) == 0
    assert all(c[1] == "train.py" for c in calls) and (out / "data.h5").stat().st_mtime_ns == stamp
    assert "resumed" in (out / "ablation" / "cv_ablation.log").read_text()


def test_a_failed_stage_stops_the_study_in_one_line(tmp_path, capsys):
    write_records(tmp_path / "records")
    calls = []

    def failing(argv, log_path):
        calls.append(argv)
        return 0 if argv[1:3] == ["-m", "data_prep"] else 2

    (tmp_path / "answer").mkdir()
    (tmp_path / "answer" / "data.h5").write_bytes(b"")  # "built": the build stage has nothing to run
    (tmp_path / "answer" / "data.json").write_text("{}")
    rc = answer.main(_argv(tmp_path, "--stages", "ablation,curve"), failing)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "stage ablation failed (exit 2)" in err
    assert len(calls) == 1  # the curve did not start
    state = json.loads((tmp_path / "answer" / "answer.json").read_text())
    assert state["stages"]["ablation"]["state"] == "failed" and "curve" not in state["stages"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    write_records(tmp_path / "records")
    assert answer.main(_argv(tmp_path, "--dry-run"), _in_process([])) == 0
    text = capsys.readouterr().out
    assert "data_prep build --source records" in text and "--learning-curve --cv 2" in text
    assert "importance_reference" not in text and "--importance" in text and "--source embedded" in text
    assert not (tmp_path / "answer" / "data.h5").exists()
    imp = json.loads((tmp_path / "answer" / "params-dos-bonds.json").read_text())
    assert imp["structure_input"] == "bonds" and imp["importance_reference"] == "element"
    # an interrupted run resumes from its folder; a finished run and analysis are not redone
    run = tmp_path / "answer" / "dos-bonds"
    run.mkdir()
    (run / "params.json").write_text("{}")
    answer.main(_argv(tmp_path, "--dry-run", "--stages", "importance"), _in_process([]))
    assert capsys.readouterr().out.splitlines()[0].endswith(f"train.py --resume {run}")
    (run / "metrics.json").write_text("{}")
    (run / "importance").mkdir()
    (run / "importance" / "importance.json").write_text("{}")
    answer.main(_argv(tmp_path, "--dry-run", "--stages", "importance"), _in_process([]))
    assert capsys.readouterr().out == ""


def test_user_mistakes_are_one_line(tmp_path, capsys):
    write_records(tmp_path / "records", NAMES)
    bad_params = tmp_path / "p.json"
    bad_params.write_text("{not json")
    for more, words in ((["--stages", "ablation,fold"], "unknown stage 'fold'"),
                        (["--params", str(bad_params)], "cannot read params file"),
                        (["--records", str(tmp_path / "none")], "records folder not found")):
        with pytest.raises(SystemExit) as exc:  # a flag given twice: the last one counts
            answer.main(_argv(tmp_path, *more), _in_process([]))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in err and err.count("\n") == 1
