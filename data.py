"""The dataset on disk and its split (inat_classifier.dataset, re-exported here), and the download/stats CLI.

Importable module plus a small CLI:
    python data.py download [--dest data] [--url URL]
    python data.py stats --data_dir data/inaturalist_12K
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
import functools
import json
from pathlib import Path

from inat_classifier.class_balance import imbalance_line
from inat_classifier.dataset import (  # noqa: F401  (the dataset's API, for scripts and notebooks)
    DEFAULT_DATA_DIR,
    HELDOUT_NAMES,
    IMG_EXTENSIONS,
    DatasetFiles,
    check_trainable,
    class_photos,
    discover,
    ensure_data,
    find_heldout_dir,
    is_image_file,
    list_class_dirs,
    photo_id,
    resolve_data_dir,
    scan_split,
    shown,
    split_from_json,
    split_to_json,
    stratified_split,
    unreadable_folder,
    warn,
)
from inat_classifier.download import default_url, download_dataset
from inat_classifier.images import load_image
from inat_classifier.storage import atomic_write_text, json_with_keys, refuse_foreign

# An existing --json file is replaced only when it is a statistics file (a JSON object with these keys).
is_stats_json = json_with_keys({"root", "classes", "counts", "unreadable"})


def dataset_stats(data_dir: str | Path, check_images: bool = True) -> dict:
    """Images per class per split, and the files that cannot be decoded."""
    ds = discover(data_dir, allow_empty=True)  # empty classes are reported, not refused
    splits = {"train": ds.train}
    if ds.heldout_name:
        splits[ds.heldout_name] = ds.heldout
    counts = {name: [0] * len(ds.classes) for name in splits}
    unreadable = []
    for name, samples in splits.items():
        for path, label in samples:
            counts[name][label] += 1
            if check_images:
                try:
                    load_image(path, draft_size=64)
                except Exception as e:
                    unreadable.append((path, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return {"root": str(ds.root), "classes": ds.classes, "counts": counts, "unreadable": unreadable}


def print_stats(stats: dict) -> None:
    splits = list(stats["counts"])
    width = max(len(c) for c in stats["classes"] + ["class"])
    print(f"{stats['root']}")
    print(f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits))
    for i, c in enumerate(stats["classes"]):
        print(f"{c:<{width}} " + " ".join(f"{stats['counts'][s][i]:>8}" for s in splits))
    print(f"{'total':<{width}} " + " ".join(f"{sum(stats['counts'][s]):>8}" for s in splits))
    print(imbalance_line(stats["counts"]["train"], stats["classes"], what="train/ class balance"))
    empty = {s: [c for c, n in zip(stats["classes"], stats["counts"][s], strict=True) if n == 0] for s in splits}
    for split, names in empty.items():
        if names:
            print(f"empty classes in {split}/ (no image files): {', '.join(map(shown, names))}")
    print(f"unreadable files: {len(stats['unreadable'])}")
    for path, reason in stats["unreadable"]:
        print(f"  {path}: {reason}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Download and inspect the image dataset.")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    )
    dl = sub.add_parser("download", help="download and extract nature_12K.zip (resumable)")
    dl.add_argument("--dest", default="data", help="folder to download and extract into (default: data)")
    dl.add_argument(
        "--url", default=None, help="archive URL (default: $INAT12K_URL when set, else the public nature_12K.zip)"
    )
    st = sub.add_parser("stats", help="images per class per split, and unreadable files")
    st.add_argument(
        "--data_dir",
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"dataset root holding train/ and val/ or test/ (default: {DEFAULT_DATA_DIR})",
    )
    st.add_argument("--json", help="also write the statistics to this JSON file")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.command == "download":
        download_dataset(args.dest, args.url or default_url())
    else:
        if args.json:
            refuse_foreign(Path(args.json), is_stats_json, "a statistics file", "--json")
        stats = dataset_stats(args.data_dir)
        print_stats(stats)
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(stats, indent=1))


if __name__ == "__main__":
    from inat_classifier.cli import run_cli

    run_cli(main, get_args_parser())
