"""Files that hold the operator's data: measurements, spill queues, status, pid and lock files.

They are created private (folders 0700, files 0600 unless configured otherwise), whatever the umask,
because measurements and status describe the monitored servers. One place, so every writer agrees.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path) -> None:
    """Create `path` and every missing parent with mode 0700 (mkdir's `mode` only applies to the last
    one, and the umask narrows it anyway). Folders that exist already are left as they are."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():  # (mkdir's own error says only "File exists")
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder)) from None
            continue
        os.chmod(folder, PRIVATE_DIR_MODE)


def open_append(path: Path, mode: int = PRIVATE_FILE_MODE) -> int:
    """A file descriptor for appending to `path`, created with `mode` exactly (not narrowed by the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
    try:
        if os.fstat(fd).st_size == 0:  # we (probably) created it: the umask must not narrow the mode
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def pause_file_notice(path: str) -> str | None:
    """Why creating `[collector] pause_file` would fail, if its folder says so now: the operator's emergency
    pause (`touch FILE`) must not turn out unusable on the day it is needed. None when the folder is there.

    A warning, not a config error: the folder may be made later (by the service manager, at boot)."""
    folder = Path(path).parent
    if folder.is_dir():
        return None
    for above in (folder, *folder.parents):  # the nearest that exists
        if above.exists() and not above.is_dir():
            return f"{path}: {above} is not a folder: the pause file can never be created there"
        if above.exists():
            break
    return f"{path}: its folder {folder} does not exist (yet): create it, or `touch {path}` will fail"
