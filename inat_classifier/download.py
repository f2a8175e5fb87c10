"""The dataset download: resumable, extracted safely (no zip-slip, never half, never over a user's file)."""

from __future__ import annotations

import filecmp
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from inat_classifier.cli import UserError
from inat_classifier.storage import (
    HOST,
    check_free_space,
    disk_full_error,
    format_bytes,
    full_disk_is_one_line,
    is_disk_full,
    process_alive,
)
from inat_classifier.tracking import progress, say, took

DATASET_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
URL_ENV = "INAT12K_URL"  # a mirror of the archive, used instead of DATASET_URL when set
STALL_TIMEOUT = 60.0  # seconds without a byte before a download counts as cut (what arrived is kept)
EXTRACT_DIR = re.compile(r"^\.extract-(?:(.+)-)?(\d+)$")  # .extract-HOST-PID (.extract-PID from older versions)


class DownloadFailed(UserError):
    """The server could not be reached or refused the file: an archive put in place by hand avoids it."""


def default_url() -> str:
    """$INAT12K_URL when set (a mirror), else the official archive."""
    return os.environ.get(URL_ENV) or DATASET_URL


def one_line(text: object) -> str:
    """Exception texts (urllib's redirect error has three lines) as one line."""
    return " ".join(str(text).split())


def open_url(url: str, have: int, timeout: float) -> http.client.HTTPResponse | None:
    """The response for url from byte `have` on; None when a part file of `have` bytes is already whole (416)."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the part file is already complete
            return None
        if 300 <= e.code < 400:
            raise DownloadFailed(f"download failed: {url}: redirects in a loop (HTTP {e.code})") from None
        raise DownloadFailed(f"download failed: {url}: HTTP {e.code} {one_line(e.reason)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadFailed(f"download failed: {url}: {one_line(getattr(e, 'reason', e))} (no internet?)") from None


def whole_size(resp: http.client.HTTPResponse, have: int) -> int | None:
    """The file's full size: Content-Range's total on a resumed answer, else have + Content-Length; None if unsaid."""
    total = re.fullmatch(r"bytes \d+-\d+/(\d+)", resp.headers.get("Content-Range") or "")
    if resp.status == 206 and total:
        return int(total[1])
    length = resp.headers.get("Content-Length")
    return have + int(length) if length else None


def receive(resp: http.client.HTTPResponse, part: Path, have: int, total: int | None, chunk: int) -> None:
    """Append the body to part as it arrives; read1 hands over what came, so a stall loses no received byte."""
    start = time.perf_counter()
    with (
        open(part, "ab" if have else "wb") as f,
        progress(total=total, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part")) as bar,
    ):
        while block := resp.read1(chunk):
            f.write(block)
            bar.update(len(block))
    got = part.stat().st_size - have
    say(f"downloaded {format_bytes(got)} {took(got / 2**20, start, 'MiB')}")


def download_file(url: str, dest: Path, chunk: int = 1 << 20, stall_timeout: float = STALL_TIMEOUT) -> None:
    """Fetch the zip at url into dest with a progress bar, resuming a partial dest.part via HTTP Range.

    What arrived stays in dest.part until the file is known whole: by its size, or where the server
    sends none, by the zip directory at its end. So a cut, a stall or a full disk resumes on the next run.
    """
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    resp = open_url(url, have, stall_timeout)
    if resp is None:
        part.replace(dest)
        return
    with resp:
        restarted = bool(have) and resp.status != 206  # the server ignored Range: start over
        have = 0 if restarted else have
        total = whole_size(resp, have)
        if total is not None:
            check_free_space(dest.parent, total - have, dest.name)
        try:
            receive(resp, part, have, total, chunk)
        except (OSError, http.client.HTTPException) as e:  # a stall time-out, a reset connection, a full disk
            if is_disk_full(e):
                size = part.stat().st_size
                what = dest.name if total else f"{dest.name} ({format_bytes(size)} so far, size unknown)"
                raise disk_full_error(dest.parent, total - size if total else None, what) from None
            raise UserError(f"download interrupted ({one_line(e)}); run the same command again to resume") from None
    size = part.stat().st_size
    if size < (total or 0) or (total is None and not restarted and not zipfile.is_zipfile(part)):
        got = f"{size} of {total} bytes" if total else f"{size} bytes, the server sent no size"
        raise UserError(f"download incomplete ({got}); run the same command again to resume")
    part.replace(dest)


def check_zip_members(zf: zipfile.ZipFile, dest: Path) -> None:
    """Refuse entries that would land outside dest (../, absolute paths) or are symlinks."""
    base = dest.resolve()
    for info in zf.infolist():
        name = info.filename
        target = (base / name).resolve()
        if name.startswith(("/", "\\")) or ":" in name.split("/")[0] or not (target == base or base in target.parents):
            raise UserError(f"refusing archive entry outside the destination: {name!r}")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"refusing symbolic link in archive: {name!r}")


def verify_crcs(zf: zipfile.ZipFile, archive: Path) -> None:
    """Read every member once (zipfile checks its CRC at its end), as ZipFile.testzip does, with a bar."""
    start = time.perf_counter()
    members = zf.infolist()
    for info in progress(members, desc="verifying", unit="file", leave=False):
        try:
            with zf.open(info) as member:
                while member.read(1 << 20):
                    pass
        except zipfile.BadZipFile:
            raise UserError(
                f"corrupt archive {archive}: bad CRC in {info.filename}; delete it and download again"
            ) from None
    say(f"verified {archive.name} {took(len(members), start, 'files')}")


def unpack(archive: Path, dest: Path, tmp: Path) -> None:
    """Verify the archive (CRCs, member names, the space its contents need), then extract it into tmp."""
    try:
        with zipfile.ZipFile(archive) as zf:
            verify_crcs(zf, archive)
            check_zip_members(zf, dest)
            members = zf.infolist()
            need, what = sum(i.file_size for i in members), f"extracting {archive.name}"
            check_free_space(dest, need, what)
            start = time.perf_counter()
            with full_disk_is_one_line(dest, need, what):
                for info in progress(members, desc="extracting", unit="file", leave=False):
                    zf.extract(info, tmp)
            say(f"extracted {len(members)} files ({format_bytes(need)}) {took(len(members), start, 'files')}")
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
        raise UserError(f"corrupt archive {archive}: {one_line(e)}; delete it and download again") from None
    except OSError as e:  # a name too long, a file/folder clash
        raise UserError(f"could not extract {archive} into {dest}: {one_line(e)}") from None


def plan_merge(tmp: Path, dest: Path) -> list[tuple[Path, Path]]:
    """The renames that put tmp's tree into dest without replacing anything; the first clash is refused.

    A folder dest lacks moves whole; one it has is merged entry by entry; a file it has with the
    same bytes (an earlier extraction, by hand or cut short) stays as it is.
    """
    moves, todo = [], [(tmp, dest)]
    while todo:
        src_dir, dst_dir = todo.pop()
        for src in sorted(src_dir.iterdir()):
            target = dst_dir / src.name
            if not os.path.lexists(target):
                moves.append((src, target))
            elif src.is_dir() and target.is_dir():
                todo.append((src, target))
            elif src.is_dir() or not target.is_file() or not filecmp.cmp(src, target, shallow=False):
                kind = "folder" if src.is_dir() else "different file"
                raise UserError(
                    f"{target} is in the way: the archive has a {kind} there; "
                    f"move it away and run the same command again"
                )
    return moves


def remove_stale_extractions(dest: Path) -> None:
    """Delete the temp folders that extractions on this machine, killed or cut by Ctrl-C, left in dest."""
    for entry in dest.iterdir():
        match = EXTRACT_DIR.match(entry.name)
        if (
            match
            and match[1] in (None, HOST)
            and int(match[2]) != os.getpid()
            and not process_alive(int(match[2]))
            and entry.is_dir()
            and not entry.is_symlink()
        ):
            shutil.rmtree(entry, ignore_errors=True)


def extract_zip(archive: Path, dest: Path) -> None:
    """Verify and extract the archive into a temp folder, then merge that into dest (never half-extracted).

    Nothing of dest's is replaced: what is already there with the same bytes is kept, anything else
    in the way stops the merge before it starts.
    """
    tmp = dest / f".extract-{HOST}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack(archive, dest, tmp)
        for src, target in plan_merge(tmp, dest):
            os.rename(src, target)
    finally:  # also on Ctrl-C: what was not moved yet is still in the archive
        shutil.rmtree(tmp, ignore_errors=True)


def download_dataset(dest: str | Path = "data", url: str = DATASET_URL, stall_timeout: float = STALL_TIMEOUT) -> Path:
    """Download and extract nature_12K.zip into dest; a no-op when it is already there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_extractions(dest)
    marker = dest / ".extracted"
    archive = dest / (Path(url.split("?")[0]).name or "dataset.zip")
    if marker.exists() and marker.read_text().strip() == archive.name:
        print(f"dataset already downloaded and extracted in {dest}")
        return dest
    if not archive.exists():
        download_file(url, archive, stall_timeout=stall_timeout)
    print(f"extracting {archive} ...")
    extract_zip(archive, dest)
    marker.write_text(archive.name + "\n")
    print(f"done: {dest}")
    return dest
