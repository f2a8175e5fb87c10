"""Downloading the dataset archive (resumable) and extracting it safely (no zip-slip, never half-extracted)."""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from cli import UserError

DATASET_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
URL_ENV = "INAT12K_URL"  # a mirror of the archive, used instead of DATASET_URL when set


def default_url() -> str:
    """$INAT12K_URL when set (a mirror), else the official archive."""
    return os.environ.get(URL_ENV) or DATASET_URL


def download_file(url: str, dest: Path, chunk: int = 1 << 20) -> None:
    """Fetch url into dest with a progress bar, resuming a partial dest.part via HTTP Range."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the part file is already complete
            part.replace(dest)
            return
        raise UserError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"download failed: {url}: {getattr(e, 'reason', e)} (no internet?)") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name
        ) as bar:
            try:
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as e:
                raise UserError(f"download interrupted ({e}); run the same command again to resume") from None
    if total is not None and part.stat().st_size < total:
        raise UserError(
            f"download incomplete ({part.stat().st_size} of {total} bytes); run the same command again to resume"
        )
    part.replace(dest)


def check_zip_members(zf: zipfile.ZipFile, dest: Path) -> None:
    """Refuse entries that would land outside dest (../, absolute paths) or are symlinks."""
    base = dest.resolve()
    for info in zf.infolist():
        name = info.filename
        target = (base / name).resolve()
        if name.startswith(("/", "\\")) or ":" in name.split("/")[0] or not (
            target == base or base in target.parents
        ):
            raise UserError(f"refusing archive entry outside the destination: {name!r}")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"refusing symbolic link in archive: {name!r}")


def extract_zip(archive: Path, dest: Path) -> None:
    """Verify the archive, then extract into a temp folder and move into place (never half-extracted)."""
    tmp = dest / f".extract-{os.getpid()}"
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise UserError(f"corrupt archive {archive}: bad CRC in {bad}; delete it and download again")
            check_zip_members(zf, dest)
            shutil.rmtree(tmp, ignore_errors=True)
            zf.extractall(tmp)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"corrupt archive {archive}: {e}; delete it and download again") from None
    except OSError as e:  # a name too long, a file/folder clash, a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not extract {archive} into {dest}: {e}") from None
    for entry in tmp.iterdir():
        target = dest / entry.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        entry.replace(target)
    tmp.rmdir()


def download_dataset(dest: str | Path = "data", url: str = DATASET_URL) -> Path:
    """Download and extract nature_12K.zip into dest; a no-op when it is already there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / ".extracted"
    archive = dest / (Path(url.split("?")[0]).name or "dataset.zip")
    if marker.exists() and marker.read_text().strip() == archive.name:
        print(f"dataset already downloaded and extracted in {dest}")
        return dest
    if not archive.exists():
        download_file(url, archive)
    print(f"extracting {archive} ...")
    extract_zip(archive, dest)
    marker.write_text(archive.name + "\n")
    print(f"done: {dest}")
    return dest
