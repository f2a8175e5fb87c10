"""A --config file (and a sweep yaml) is read within limits: aliases (a "billion laughs" expands a few hundred
bytes into gigabytes) and files over 1 MiB are refused with one line, before anything is built from them."""

from __future__ import annotations

from conftest import assert_one_line_error, run_cli

NO_DATA = ["--data_dir", "/nonexistent/inat-config-test", "--download", "no"]  # never a download, whatever happens


def alias_bomb(levels: int) -> str:
    """Nested aliases: 9**levels strings once expanded, from a file of a few hundred bytes."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"kernel_size: *a{levels - 1}")  # a flag, so that its value is read
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(4))  # small enough to be harmless where aliases are read
    proc = run_cli("train_parta.py", "--config", bomb, *NO_DATA)
    assert_one_line_error(proc, f"--config {bomb}", "aliases are not read", "line 2")
    assert proc.returncode == 2


def test_a_config_file_over_the_size_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments: valid, empty YAML
    proc = run_cli("train_parta.py", "--config", big, *NO_DATA)
    assert_one_line_error(proc, f"--config {big}", "MiB")


def test_a_sweep_yaml_with_aliases_is_refused_in_one_line(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("program: train_parta.py\nmethod: grid\nparameters:\n  lr: &lr {values: [0.1]}\n  wd: *lr\n")
    proc = run_cli("sweep_offline.py", "--config", config, "--sweep_dir", tmp_path / "s", "--dry_run")
    assert_one_line_error(proc, str(config), "aliases are not read")
    assert not (tmp_path / "s").exists()
