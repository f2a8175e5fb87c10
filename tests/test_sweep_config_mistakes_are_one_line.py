"""A sweep yaml that cannot be a sweep is one line naming what is wrong, exit 2, before anything starts."""

from __future__ import annotations

import re

import pytest
import yaml
from test_sweep import fake_sweep, run_sweep, write_yaml

from conftest import assert_one_line_error, clean_env, run_cli
from inat_classifier.cli import UserError


@pytest.mark.parametrize(
    "content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00", "program: trainé.py\n".encode("latin-1")]
)
def test_a_binary_or_non_utf8_yaml_is_one_line(tmp_path, content):
    (tmp_path / "sweep.yaml").write_bytes(content)
    proc = run_cli(
        "sweep_offline.py", "--config", tmp_path / "sweep.yaml", "--sweep_dir", tmp_path / "s", env=clean_env()
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, str(tmp_path / "sweep.yaml"), "not a text file in UTF-8")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"program": 42}, "program: expected the file name of a script, got 42"),
        ({"program": ["fake_train.py"]}, "program: expected the file name of a script"),
        (
            {"command": ["${env}", "${interpreter}", "${program}", {"epochs": 2}, "${args}"]},
            "command[3]: expected a word or a macro like ${args}, got a mapping",
        ),
        ({"command": ["${interpreter}", "${program}", None]}, "command[2]: expected a word"),
    ],
)
def test_a_program_or_command_that_is_no_command_line_is_one_line(tmp_path, change, fragment):
    cfg = yaml.safe_load(fake_sweep(tmp_path, "grid", [0.5]).read_text())
    path = write_yaml(tmp_path / "bad.yaml", {**cfg, **change})
    with pytest.raises(UserError, match=re.escape(fragment)):
        run_sweep("--config", path, "--sweep_dir", tmp_path / "s", "--dry_run")


def test_command_words_yaml_reads_as_numbers_still_count(tmp_path, capsys):
    cfg = yaml.safe_load(fake_sweep(tmp_path, "grid", [0.5]).read_text())
    path = write_yaml(
        tmp_path / "ok.yaml", {**cfg, "command": ["${interpreter}", "${program}", "--epochs", 2, "${args}"]}
    )
    assert run_sweep("--config", path, "--sweep_dir", tmp_path / "s", "--dry_run", "--count", "1") == 0
    assert "fake_train.py --epochs 2 --q=0.5" in capsys.readouterr().out
