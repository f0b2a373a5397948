"""Process limits a long-running daemon sets for itself at start."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("reaper")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit is 1024, its hard
    limit far higher: a daemon holding one or two connections per source needs the room). Logged once.
    Returns (soft before, soft after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        if soft != hard:
            log.info("open files limit: %d (the hard limit is unlimited; left as it is)", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("open files limit: %d; could not raise it to the hard limit %d: %s", soft, hard, e)
        return soft, soft
    log.info("open files limit raised from %d to %d (the hard limit)", soft, hard)
    return soft, hard
