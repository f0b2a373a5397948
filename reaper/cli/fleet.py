"""`reaper fleet leave`: drain a fleet member (SIGUSR1 to its daemon, verified as for `reaper reload`).

The member stops every source, ends its coordination session (the other members take its sources at
their next refresh) and stays up; its status shows it as left. A restart makes it a member again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any


def add_parser(verbs: Any) -> None:
    """The `fleet` verb."""
    fleet = verbs.add_parser("fleet", help="fleet mode: drain a member",
                             description="Fleet mode ([fleet]): several reaper processes share the sources.")
    fverbs = fleet.add_subparsers(dest="fleet_verb", metavar="ACTION")
    leave = fverbs.add_parser("leave", help="release every source of the running member and stay up",
                              description="Send SIGUSR1 to the daemon (the pid in --pidfile, else in the status "
                                          "file of --config's state dir, verified as for `reaper reload`): it "
                                          "stops every source, leaves the fleet (the other members take its sources "
                                          "at their next refresh) and stays up until it is restarted.")
    leave.add_argument("--pidfile", metavar="FILE", help="the daemon's --pidfile (default: as for `reaper status`)")
    where = leave.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", metavar="FILE", help="find the state_dir in this config file")
    where.add_argument("--state-dir", metavar="DIR", help="the daemon's state_dir (default: as the daemon's)")
    leave.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the member to report that it left (default 30)")


def cmd_fleet(args: argparse.Namespace) -> int:
    from reaper.cli.operate import _read, our_daemon  # rich: only here

    if getattr(args, "fleet_verb", None) != "leave":
        print("fleet: give an action: leave", file=sys.stderr)
        return 2
    found = our_daemon(args)
    if isinstance(found, int):
        return found
    pid, path, status = found
    if status.fleet is None:
        print(f"process {pid} is not a fleet member (no [fleet] in its config)", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = _read(path)
        if now is not None and now.fleet is not None and now.fleet.leaving:
            print(f"fleet member {now.fleet.member} (pid {pid}) left the fleet: it collects nothing and stays up")
            return 0
        time.sleep(0.2)
    print(f"fleet member (pid {pid}) was signalled but has not reported leaving within {args.wait:g}s", file=sys.stderr)
    return 1
