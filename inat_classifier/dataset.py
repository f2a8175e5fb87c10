"""The dataset on disk: finding classes and photos, and the stratified train/val split (data.py is its CLI)."""

from __future__ import annotations

import os
import random
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inat_classifier.cli import UserError
from inat_classifier.download import DownloadFailed, default_url, download_dataset
from inat_classifier.images import special_kind

DEFAULT_DATA_DIR = "data/inaturalist_12K"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
HELDOUT_NAMES = ("test", "val")


# ----------------------------------------------------------------------------- discovery
@dataclass
class DatasetFiles:
    """The files of one dataset root: class names and (path, label) samples per split."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    heldout: list[tuple[str, int]]
    heldout_name: str


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# Characters a class name may not hold: control characters (a newline or tab would split or shift the
# one-line messages, the printed tables and the CSV rows that name the class), line and paragraph
# separators (the same in many terminals), and the surrogates Python uses for bytes that are not UTF-8
# (such a name cannot be printed, drawn in a figure or written to the cache's index). Any other name a
# folder can have (spaces, quotes, commas, '$', non-Latin scripts, emoji) is a class name like any other.
REFUSED_CATEGORIES = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator"}


def shown(name: str) -> str:
    """A class or file name as messages show it: as is when plain, else quoted like repr (bytes that are
    not UTF-8 as b'...'), so that an odd name stays on one line and its ends are visible."""
    if any(unicodedata.category(ch) == "Cs" for ch in name):
        return repr(os.fsencode(name))
    plain = name.isprintable() and name == name.strip() and not any(ch in name for ch in ",'\"")
    return name if plain else repr(name)


def unshowable(name: str) -> str | None:
    """Why a class name cannot be shown on one line (see REFUSED_CATEGORIES), or None when it can."""
    if any(unicodedata.category(ch) == "Cs" for ch in name):
        return "is not valid UTF-8 (written in another encoding)"
    bad = next((ch for ch in name if unicodedata.category(ch) in REFUSED_CATEGORIES), None)
    if bad is not None:
        return f"holds {REFUSED_CATEGORIES[unicodedata.category(bad)]} ({bad!r}), which would break the one-line output"
    return None


def check_class_name(split_dir: Path, name: str) -> None:
    """Refuse, at discovery, a class folder whose name no message, table or figure can show (see above)."""
    problem = unshowable(name)
    if problem:
        hint = "rename it in UTF-8 (e.g. with convmv -f latin1 -t utf8)" if "UTF-8" in problem else "rename the folder"
        raise UserError(f"class folder {shown(name)} in {split_dir}: its name {problem}; {hint}")


def list_class_dirs(split_dir: Path) -> list[str]:
    """Class folders of a split; hidden ones (.name) are not classes, and each is named in a warning.

    A name that cannot be shown on one line (check_class_name) is a one-line error here, before any work.
    """
    dirs = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    for name in (d for d in dirs if d.startswith(".")):
        warn(f"ignoring the folder {split_dir / name}: hidden folders (names starting with '.') are not classes")
    classes = [d for d in dirs if not d.startswith(".")]
    for name in classes:
        check_class_name(split_dir, name)
    return classes


def unreadable_folder(error: OSError) -> None:
    """os.walk's onerror: a folder it cannot list (no permission) is an error, not an empty class."""
    raise UserError(
        f"folder {error.filename} cannot be read ({error.strerror}); fix its permissions (chmod) or remove it"
    )


def photo_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a photo file, through links: one id for symlinks and hard links alike.

    None, with a warning, for what cannot be a photo: a broken link, a FIFO, socket or device
    (a FIFO would block the first open() forever, so none of them is ever opened).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        broken = os.path.islink(path) and not os.path.exists(path)
        warn(
            f"skipping {path}: "
            + (f"a link to {os.readlink(path)}, which does not exist" if broken else f"{e.strerror or e}")
        )
        return None
    kind = special_kind(st.st_mode)
    if kind:
        warn(f"skipping {path}: {kind}, not a regular file (never opened)")
        return None
    return st.st_dev, st.st_ino


def class_photos(class_dir: Path) -> dict[tuple[int, int], str]:
    """Image files below one class folder (recursively, through symlinks): file id -> its first path.

    Each real file once, however many links (symbolic or hard) reach it. A folder link back into
    what is already walked (`ln -s . self`, `ln -s .. up`, two links to one place) would count
    photos twice or walk forever: it is skipped, with a warning.
    """
    top = os.path.realpath(class_dir)
    visited: set[str] = set()
    files: dict[tuple[int, int], str] = {}  # file id -> the first path (in sorted order) that reaches it
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable_folder, followlinks=True):
        visited.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(n for n in dirnames if not n.startswith(".")):
            target = os.path.realpath(os.path.join(dirpath, d))
            if target in visited or top == target or top.startswith(target + os.sep):
                warn(
                    f"skipping {os.path.join(dirpath, d)}: a link to {target}, which is "
                    f"already included (a loop or a second way to the same photos)"
                )
                continue
            visited.add(target)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if is_image_file(name):
                path = os.path.join(dirpath, name)
                key = photo_id(path)
                if key is not None:
                    files.setdefault(key, path)
    return dict(sorted(files.items(), key=lambda kv: kv[1]))


def resolve_data_dir(data_dir: str | Path) -> Path:
    """The folder that holds train/; accepts the zip's parent folder too."""
    root = Path(data_dir).expanduser()
    if (root / "train").is_dir():
        return root
    if (root / "inaturalist_12K" / "train").is_dir():
        return root / "inaturalist_12K"
    raise UserError(
        f"no dataset found: looked for {root / 'train'}/<class>/*.jpg; get iNaturalist 12K with "
        f"'python data.py download --dest data' (or add --download yes), or pass --data_dir DIR"
    )


def find_heldout_dir(root: Path) -> tuple[Path, str] | None:
    for name in HELDOUT_NAMES:
        if (root / name).is_dir():
            return root / name, name
    return None


def scan_split(
    split_dir: Path, classes: Sequence[str], owners: dict[tuple[int, int], str], allow_empty: bool = False
) -> list[tuple[str, int]]:
    """(path, label) of every photo of a split; owners (file id -> path) spans splits and classes.

    A class folder without image files is an error, unless allow_empty (data.py stats reports them).
    """
    samples = []
    for label, name in enumerate(classes):
        photos = class_photos(split_dir / name)
        if not photos and not allow_empty:
            raise UserError(
                f"class folder {split_dir / name} has no images "
                f"('python data.py stats --data_dir {split_dir.parent}' lists every empty class)"
            )
        for key, f in photos.items():
            first = owners.setdefault(key, f)
            if first != f:
                raise UserError(
                    f"the same photo is in two places, {first} and {f} (a link or a copy by "
                    f"link); every photo must belong to one class of one split"
                )
        samples.extend((f, label) for f in photos.values())
    return samples


def warn_unused_val(root: Path, classes: Sequence[str], heldout_name: str) -> None:
    """With test/ as the held-out split, a val/ beside it is not read: one line when its classes are not train/'s
    (photos in the wrong folder, most likely); the run's own validation split comes from train/ either way."""
    if heldout_name != "test" or not (root / "val").is_dir():
        return
    val_classes = [c for c in sorted(d.name for d in (root / "val").iterdir() if d.is_dir()) if not c.startswith(".")]
    if val_classes != list(classes):
        only_val = [shown(c) for c in val_classes if c not in classes]
        only_train = [shown(c) for c in classes if c not in val_classes]
        warn(
            f"{root / 'val'} is not used (the held-out split is {root / 'test'}) and its classes differ from "
            f"train/'s: only in val: {', '.join(only_val) or 'none'}; only in train: {', '.join(only_train) or 'none'}"
        )


def discover(data_dir: str | Path, need_heldout: bool = False, allow_empty: bool = False) -> DatasetFiles:
    """Find classes and samples; class folders must match between train/ and the held-out split.

    allow_empty: a class folder without images is no error (for reports); training refuses it later.
    """
    root = resolve_data_dir(data_dir)
    classes = list_class_dirs(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders (expected train/<class>/*.jpg)")
    heldout = find_heldout_dir(root)
    heldout_samples: list[tuple[str, int]] = []
    heldout_name = ""
    if heldout is not None:
        held_dir, heldout_name = heldout
        held_classes = list_class_dirs(held_dir)
        if held_classes != classes:
            only_train = sorted(set(classes) - set(held_classes))
            only_held = sorted(set(held_classes) - set(classes))
            raise UserError(
                f"class folders differ between {root / 'train'} and {held_dir}: "
                f"only in train: {only_train or 'none'}; only in {heldout_name}: {only_held or 'none'}"
            )
        warn_unused_val(root, classes, heldout_name)
    elif need_heldout:
        raise UserError(f"no held-out split: expected {root / 'val'} or {root / 'test'}")
    owners: dict[tuple[int, int], str] = {}
    train = scan_split(root / "train", classes, owners, allow_empty)
    if heldout is not None:
        heldout_samples = scan_split(held_dir, classes, owners, allow_empty)
    return DatasetFiles(root, classes, train, heldout_samples, heldout_name)


def check_trainable(
    classes: Sequence[str], samples: Sequence[tuple[str, int]], unreadable: set[str], where: Path | str
) -> None:
    """Refuse a dataset a classifier cannot learn from: under 2 classes, or a class without a readable image."""
    if len(classes) < 2:
        raise UserError(
            f"{where} has {len(classes)} class folder{'s' * (len(classes) != 1)} "
            f"({', '.join(classes) or 'none'}); a classifier needs at least 2"
        )
    readable = [0] * len(classes)
    for path, label in samples:
        readable[label] += path not in unreadable
    if not any(readable):
        raise UserError(
            f"none of the {len(samples)} images in {where} can be read (not images, or damaged); "
            f"'python data.py stats --data_dir DIR' lists them"
        )
    empty = [c for c, n in zip(classes, readable, strict=True) if n == 0]
    if empty:
        raise UserError(
            f"class{'es' * (len(empty) > 1)} {', '.join(map(shown, empty))} in {where} "
            f"ha{'ve' if len(empty) > 1 else 's'} no readable image; fix or remove "
            f"{'them' if len(empty) > 1 else 'it'} ('python data.py stats' lists unreadable files)"
        )


def stratified_split(samples: Sequence[tuple[str, int]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and val: `val_fraction` of every class, the same for the same seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    train_idx, val_idx = [], []
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: samples[i][0])
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) > 1:
            n_val = max(n_val, 1)  # every class in both parts
        n_val = min(n_val, len(idx) - 1)  # never leave a class without training images
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return sorted(train_idx), sorted(val_idx)


def split_to_json(root: Path, samples, train_idx, val_idx) -> dict:
    """The split as paths relative to the data root, so it survives moving the dataset."""
    rel = lambda i: os.path.relpath(samples[i][0], root)  # noqa: E731
    return {"train": [rel(i) for i in train_idx], "val": [rel(i) for i in val_idx]}


def split_from_json(root: Path, split: dict, classes: Sequence[str]) -> tuple[list, list]:
    """Samples of a saved split; the label comes from the class folder in the path."""
    index = {c: i for i, c in enumerate(classes)}

    def load(rel_paths):
        out = []
        for rel in rel_paths:
            cls = Path(rel).parts[1] if len(Path(rel).parts) > 2 else Path(rel).parts[0]
            if cls not in index:
                raise UserError(f"saved split names class '{cls}' that is not among {list(classes)}")
            out.append((str(root / rel), index[cls]))
        return out

    train, val = load(split["train"]), load(split["val"])
    missing = [path for path, _ in train + val if not os.path.isfile(path)]
    if missing:
        raise UserError(
            f"{len(missing)} of the run's {len(train) + len(val)} photos are no longer in {root} "
            f"(first: {os.path.relpath(missing[0], root)}); the data folder changed since the run: "
            f"restore them, or pass --data_dir with the original dataset"
        )
    return train, val


def ensure_data(data_dir: str | Path, download: str = "auto", url: str | None = None) -> Path:
    """Resolve the data root, fetching nature_12K.zip first when it is missing and `download` says so.

    download: "yes" fetches into any missing folder; "auto" only into the default folder (the first
    run of a new user), never into a --data_dir somebody typed; "no" never.
    """
    try:
        return resolve_data_dir(data_dir)
    except UserError:
        if download == "no" or (download == "auto" and str(data_dir) != DEFAULT_DATA_DIR):
            raise
    url = url or default_url()
    data_dir = Path(data_dir)
    dest = data_dir.parent if data_dir.name == "inaturalist_12K" else data_dir
    print(f"no dataset in {data_dir}: downloading {url} (once; later runs reuse it)")
    try:
        download_dataset(dest, url)
    except DownloadFailed as e:  # offline: the hand-placed archive; other errors (full disk, a clash) say their own fix
        raise UserError(
            f"{e}. Without internet, put the archive at {dest / Path(url.split('?')[0]).name} "
            f"(it is extracted on the next run), or pass --data_dir"
        ) from None
    return resolve_data_dir(data_dir)
