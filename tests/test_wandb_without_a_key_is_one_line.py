"""The default `--wandb auto` without an API key logs offline and says so in one line, not W&B's ~25."""

from __future__ import annotations

import shlex

from conftest import clean_env, make_dataset, run_cli, train_args


def test_keyless_auto_run_says_one_line_naming_its_logs_and_the_sync_command(tmp_path):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2)
    home = tmp_path / "home"
    home.mkdir()
    args = train_args(data, tmp_path / "runs", "r", 1)
    args[args.index("--wandb") + 1] = "auto"
    env = clean_env(HOME=home, XDG_CONFIG_HOME=home / ".config", XDG_CACHE_HOME=home / ".cache")  # no WANDB_*
    env.pop("NETRC", None)
    proc = run_cli("train_parta.py", *args, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert sum(line.startswith("wandb:") for line in out.splitlines()) == 0, out
    (said,) = [line for line in out.splitlines() if line.startswith("W&B:")]
    (logs,) = (tmp_path / "runs" / "r" / "wandb").glob("offline-run-*")
    assert shlex.split(said.split("upload later with: ")[1]) == ["wandb", "sync", str(logs)], said
    assert list(logs.glob("*.wandb")), out  # the offline logs are all there
