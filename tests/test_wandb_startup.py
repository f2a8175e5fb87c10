"""W&B start-up is bounded: with an API key but a server that never answers, a run goes offline in seconds."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import clean_env, make_dataset, run_cli, train_args


@pytest.fixture
def silent_server():
    """A loopback port that takes connections into its backlog but never accepts or answers them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_online_run_without_an_answering_server_goes_offline_within_a_bound(tmp_path, silent_server):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2)
    args = train_args(data, tmp_path / "runs", "r", 1)
    args[args.index("--wandb") + 1] = "online"
    env = clean_env(
        WANDB_API_KEY="0" * 40,
        WANDB_BASE_URL=silent_server,
        WANDB_CONFIG_DIR=tmp_path / "wandb-config",
        WANDB_CACHE_DIR=tmp_path / "wandb-cache",
        WANDB_DATA_DIR=tmp_path / "wandb-data",
        WANDB_INIT_TIMEOUT="3",
    )  # the bound is W&B's own setting: 15 s by default, 3 s here
    start = time.monotonic()
    proc = run_cli("train_parta.py", *args, env=env, timeout=60)  # without a bound W&B waits 90 s and more
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert elapsed < 40, elapsed
    said = [ln for ln in proc.stdout.splitlines() if ln.startswith("W&B:")]
    assert len(said) == 1 and "offline" in said[0] and silent_server in said[0], out
    assert list((tmp_path / "runs" / "r" / "wandb").glob("offline-run-*")), out
    assert (tmp_path / "runs" / "r" / "result.json").exists(), out
