"""The sweep folder may hold the user's own files: the runner's copy of the config has a name of its own
(sweep_config.yaml), and a file the runner would replace but did not write is refused in one line."""

from __future__ import annotations

import pytest
import yaml
from test_sweep import fake_sweep, run_sweep

from inat_classifier.cli import UserError

USERS_YAML = "# my sweep, with my notes\nprogram: fake_train.py  # the stand-in\n"


@pytest.mark.parametrize("case", ["the sweep's own yaml", "an unrelated sweep.yaml"])
def test_a_sweep_yaml_in_the_sweep_folder_is_left_as_it_is(tmp_path, case):
    cfg = fake_sweep(tmp_path, "grid", [0.5])
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    mine = sweep_dir / "sweep.yaml"
    if case == "the sweep's own yaml":  # kept beside its runs, with its comments
        mine.write_text("# my notes on this sweep\n" + cfg.read_text())
        (sweep_dir / "fake_train.py").write_text((tmp_path / "fake_train.py").read_text())  # beside its yaml
        cfg = mine
    else:
        mine.write_text(USERS_YAML)
    before = mine.read_bytes()
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    assert mine.read_bytes() == before
    assert yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())["parameters"] == {"q": {"values": [0.5]}}


@pytest.mark.parametrize(
    "name, text", [("sweep_config.yaml", USERS_YAML), ("leaderboard.csv", "a,b\n1,2\n"), ("best.yaml", "lr: 0.1\n")]
)
def test_a_file_the_sweep_would_replace_but_did_not_write_is_refused(tmp_path, name, text):
    cfg = fake_sweep(tmp_path, "grid", [0.5])
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / name).write_text(text)
    with pytest.raises(UserError, match=f"{sweep_dir / name}: already there, and not "):
        run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet")
    assert (sweep_dir / name).read_text() == text
    assert not (sweep_dir / "runs").exists() and not (sweep_dir / "optuna.journal").exists()


def test_a_continued_sweep_rewrites_only_its_own_files(tmp_path):
    cfg = fake_sweep(tmp_path, "grid", [0.5, 0.7])
    sweep_dir = tmp_path / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    for run in (sweep_dir / "runs").iterdir():  # what train_parta.py writes, and best.yaml is made of
        (run / "args.json").write_text('{"q": 0.5, "out_dir": "runs"}')
    assert run_sweep("--sweep_dir", sweep_dir, "--show") == 0
    assert run_sweep("--sweep_dir", sweep_dir, "--show") == 0  # its leaderboard.csv and best.yaml, again
    assert (sweep_dir / "best.yaml").read_text().startswith("# best run of ")
    (sweep_dir / "best.yaml").write_text("lr: 0.1  # mine now\n")
    with pytest.raises(UserError, match="best.yaml: already there, and not a best.yaml this program wrote"):
        run_sweep("--sweep_dir", sweep_dir, "--show")
    assert (sweep_dir / "best.yaml").read_text() == "lr: 0.1  # mine now\n"
