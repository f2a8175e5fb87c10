"""Signals and full disks: Ctrl-C / SIGTERM / kill -9 before the first epoch and in saves, damaged caches.

Real processes get real signals at the named moments (found by watching their files and output);
full disks are real tmpfs mounts in a private mount namespace (`unshare`), skipped where the
machine does not allow one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_robustness import poll_until, start_script, temp_files

import train_parta
import train_partb
from conftest import CLASSES, REPO, assert_one_line_error, clean_env, make_dataset, train_args
from inat_classifier.checkpoint import load_checkpoint

CAMERA = 640  # px: decoding takes long enough to be interrupted


@pytest.fixture(scope="module")
def camera_photos(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("camera") / "ds", CLASSES[:3], n_train=40, n_val=2, size=CAMERA)


def big_args(root: Path, out: Path, name: str, epochs: int = 1, *extra) -> list[str]:
    """Part A at 224 px without augmentation: the decoded cache takes a while to build."""
    return train_args(root, out, name, epochs, "--image_size", "224", "--no-augment", *extra)


def interrupted_line(done) -> str:
    last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return last


# ----------------------------------------------------------------------------- before the first epoch
def torch_loading(pid: int) -> bool:
    """Whether the process has mapped libtorch_python: in the middle of `import torch`."""
    try:
        return "libtorch_python" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import")
@pytest.mark.parametrize("script", ["train_parta.py", "train_partb.py", "evaluate.py", "sweep_offline.py"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_script_still_imports_torch_is_one_line_and_exit_130(script, sig, tmp_path):
    for attempt in range(5):
        proc = start_script(script, ["--help"], tmp_path / f"log{attempt}")
        poll_until(lambda proc=proc: torch_loading(proc.p.pid), proc, interval=0.001)
        if proc.alive():
            proc.p.send_signal(sig)
        done = proc.wait()
        if "usage:" not in done.stdout:  # the signal came before --help was printed
            break
    else:
        pytest.skip("the imports always finished before the signal")
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.strip()] == [
        "[sweep] interrupted; run the same command again to continue the sweep"
        if script == "sweep_offline.py"
        else "interrupted; nothing half-written is left: run the same command again to continue"
    ]


@pytest.mark.parametrize("sig,again", [(signal.SIGTERM, "same command"), (signal.SIGINT, "--resume")])
def test_a_signal_during_the_cache_build_exits_130_cleanly_and_the_run_continues(camera_photos, tmp_path, sig, again):
    args = big_args(camera_photos, tmp_path, "r")
    cache = tmp_path / "_cache"
    proc = start_script("train_parta.py", args, tmp_path / "log")
    assert poll_until(lambda: bool(temp_files(cache)) if cache.is_dir() else False, proc), "no build seen"
    proc.p.send_signal(sig)
    done = proc.wait()
    assert done.returncode == 130, done.stderr
    line = interrupted_line(done)
    assert line.startswith("interrupted;") and f"--resume {tmp_path / 'r'}" in line
    assert temp_files(cache) == [] and not list(cache.glob("*.npy"))
    rerun = args if again == "same command" else ["--resume", tmp_path / "r", "--workers", "0", "--device", "cpu"]
    done = start_script("train_parta.py", rerun, tmp_path / "log2").wait()
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1


def test_kill_9_during_the_cache_build_leaves_a_temp_file_the_next_build_removes(camera_photos, tmp_path):
    args = big_args(camera_photos, tmp_path, "r")
    cache = tmp_path / "_cache"
    proc = start_script("train_parta.py", args, tmp_path / "log")
    assert poll_until(lambda: bool(temp_files(cache)) if cache.is_dir() else False, proc)
    proc.p.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(temp_files(cache)) == 1  # kill -9 runs no clean-up: the next build must
    done = start_script("train_parta.py", args, tmp_path / "log2").wait()
    assert done.returncode == 0, done.stderr
    assert temp_files(cache) == [] and len(list(cache.glob("*.npy"))) == 1


def test_ctrl_c_during_partb_feature_extraction_exits_130_and_resume_finishes(camera_photos, r18_file, tmp_path):
    args = [
        "--data_dir",
        camera_photos,
        "--out_dir",
        tmp_path,
        "--run_name",
        "b",
        "--model",
        "resnet18",
        "--weights",
        r18_file,
        "--freeze",
        "all",
        "--no-augment",
        "--epochs",
        "1",
        "--cache",
        "off",
        "--image_size",
        "160",
        "--workers",
        "0",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
    ]
    proc = start_script("train_partb.py", args, tmp_path / "log")
    assert poll_until(lambda: "data: " in proc.out_path.read_text(), proc)
    time.sleep(0.3)  # into the extraction (about 100 photos of 640 px through resnet18: seconds)
    proc.p.send_signal(signal.SIGINT)
    done = proc.wait()
    assert done.returncode == 130 and "features:" not in done.stdout, done.stdout + done.stderr
    assert interrupted_line(done).startswith("interrupted;")
    assert temp_files(tmp_path / "feature_cache") == [] if (tmp_path / "feature_cache").exists() else True
    done = start_script(
        "train_partb.py", ["--resume", tmp_path / "b", "--workers", "0", "--device", "cpu"], tmp_path / "log2"
    ).wait()
    assert done.returncode == 0, done.stderr
    assert "features: train" in done.stdout and load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- signals during a save
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_the_save_keeps_last_pt(camera_photos, tmp_path, second):
    """Ctrl-C mid-epoch, then Ctrl-C (or SIGTERM) again while last.pt is being written: it is written."""
    big = [
        "--image_size",
        "64",
        "--pool",
        "flatten",
        "--dense_neurons",
        "1024",
        "--filters",
        "16",
    ]  # 25 MB best.pt, 75 MB last.pt
    proc = start_script("train_parta.py", train_args(camera_photos, tmp_path, "r", 3, *big), tmp_path / "log")
    run = tmp_path / "r"
    assert poll_until(lambda: "epoch   1/3" in proc.out_path.read_text(), proc)
    proc.p.send_signal(signal.SIGINT)
    assert poll_until(lambda: any(p.name.startswith(".last.pt.tmp-") for p in run.iterdir()), proc), "no save seen"
    proc.p.send_signal(second)
    done = proc.wait()
    assert done.returncode == 130, done.stderr
    assert "still saving last.pt" in done.stderr and "terminate called" not in done.stderr
    assert interrupted_line(done).startswith("interrupted: progress is in")
    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["batches_done"] > 0) == (1, True)  # the stop save, mid-epoch 2
    assert temp_files(run) == []


def test_kill_9_during_a_save_leaves_a_temp_file_that_resume_removes(camera_photos, tmp_path):
    big = ["--image_size", "64", "--pool", "flatten", "--dense_neurons", "1024", "--filters", "16"]
    proc = start_script("train_parta.py", train_args(camera_photos, tmp_path, "r", 1, *big), tmp_path / "log")
    run = tmp_path / "r"
    assert poll_until(lambda: run.is_dir() and any(p.name.startswith(".best.pt.tmp-") for p in run.iterdir()), proc)
    proc.p.send_signal(signal.SIGKILL)  # during the first save: no checkpoint yet, the resume starts over
    proc.wait()
    assert temp_files(run), "the kill came after the save"
    done = start_script(
        "train_parta.py", ["--resume", run, "--workers", "0", "--device", "cpu"], tmp_path / "l2"
    ).wait()
    assert done.returncode == 0, done.stderr
    assert temp_files(run) == [] and load_checkpoint(run / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- full disks
def tmpfs_works() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not tmpfs_works(), reason="cannot mount a tmpfs in a user namespace here")


def on_small_disk(folder: Path, megabytes: int, argv: list) -> subprocess.CompletedProcess:
    """Run argv with a fresh tmpfs of this size mounted on folder (seen by this process alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={megabytes}m tmpfs "$1" && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(folder), *map(str, argv)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


@needs_tmpfs
def test_a_cache_that_does_not_fit_is_one_line_naming_the_folder_and_leaves_nothing(camera_photos, tmp_path):
    cache = tmp_path / "small"
    args = big_args(camera_photos, tmp_path / "runs", "r", 1, "--cache", cache)
    done = on_small_disk(cache, 8, [sys.executable, REPO / "train_parta.py", *args])  # the cache needs ~24 MB
    line = assert_one_line_error(done, f"not enough disk space in {cache}", "decoded-image cache", "MiB")
    assert done.returncode == 2, line
    assert not (tmp_path / "runs" / "r").exists()  # the run folder it had made is gone again


@needs_tmpfs
def test_a_full_disk_while_decoding_is_an_error_not_a_bus_error(camera_photos, tmp_path):
    """Past the free-space check (another process fills the disk): the reserved blocks fail cleanly."""
    folder = tmp_path / "small"
    code = (
        "import sys, errno; from pathlib import Path; from inat_classifier import decoded_cache as d\n"
        "try:\n    d.preallocate(Path(sys.argv[1]) / 'x.npy', (100, 3, 256, 256))\n"
        "except OSError as e:\n    sys.exit(3 if e.errno == errno.ENOSPC else 4)\n"
    )
    done = on_small_disk(folder, 4, [sys.executable, "-c", code, folder])
    assert done.returncode == 3, (done.returncode, done.stderr)


@needs_tmpfs
def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_no_temp(two_class_data, tmp_path):
    out = tmp_path / "small"
    args = train_args(two_class_data, out, "r", 1, "--pool", "flatten", "--dense_neurons", "2048")  # ~16 MB last.pt
    code = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    done = on_small_disk(out, 6, [sys.executable, "-c", code, REPO / "train_parta.py", *args, "--cache", "off"])
    assert_one_line_error(done, f"not enough disk space in {out / 'r'}", "best.pt")
    assert done.returncode == 2


@pytest.fixture
def two_class_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=6, n_val=2)


# ----------------------------------------------------------------------------- damaged caches
@pytest.mark.parametrize("damage", ["[1, 2]", '{"n": 12, "bad": "none"}', '{"n": 12, "ba'])
def test_a_damaged_cache_index_is_rebuilt_with_one_line(two_class_data, tmp_path, capsys, damage):
    args = lambda name: train_parta.get_args_parser().parse_args(train_args(two_class_data, tmp_path, name, 1))  # noqa: E731
    train_parta.main(args("a"))
    (index,) = (tmp_path / "_cache").glob("*.json")
    index.write_text(damage)
    capsys.readouterr()
    assert train_parta.main(args("b")).epoch == 1
    out = capsys.readouterr().out
    assert f"decoded cache: {index} is damaged" in out and "rebuilding it" in out
    assert json.loads(index.read_text())["n"] == 12


def test_a_feature_cache_of_the_wrong_shape_is_recomputed_with_one_line(two_class_data, r18_file, tmp_path, capsys):
    def partb(name: str):
        return train_partb.main(
            train_partb.get_args_parser().parse_args(
                [
                    "--data_dir",
                    str(two_class_data),
                    "--out_dir",
                    str(tmp_path),
                    "--run_name",
                    name,
                    "--model",
                    "resnet18",
                    "--weights",
                    str(r18_file),
                    "--freeze",
                    "all",
                    "--no-augment",
                    "--epochs",
                    "1",
                    "--image_size",
                    "32",
                    "--cache",
                    str(tmp_path / "_cache"),
                    "--workers",
                    "0",
                    "--wandb",
                    "disabled",
                    "--device",
                    "cpu",
                ]
            )
        )

    partb("a")
    (train_file,) = (tmp_path / "feature_cache").glob("*-train-*.pt")
    n = len(torch.load(train_file, weights_only=True)["labels"])
    torch.save({"features": torch.zeros(n, 7), "labels": torch.zeros(n, dtype=torch.long)}, train_file)
    capsys.readouterr()
    assert partb("b").epoch == 1
    out = capsys.readouterr().out
    assert f"features: {train_file} is damaged (7 features per image, the head takes 512); recomputing it" in out
    assert torch.load(train_file, weights_only=True)["features"].shape == (n, 512)


def test_signals_during_a_save_are_held_then_delivered(tmp_path):
    """storage.signals_held: the block finishes, then the signal reaches the handler it interrupted."""
    code = (
        "import os, signal, sys\nfrom inat_classifier import storage\n"
        "got = []\nsignal.signal(signal.SIGTERM, lambda s, f: got.append('handler'))\n"
        "with storage.signals_held():\n    os.kill(os.getpid(), signal.SIGTERM)\n    got.append('block done')\n"
        "print(got)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert done.stdout.strip() == "['block done', 'handler']", done.stderr
