"""OS metrics read in-process (no PL/Python helpers): only when reaper runs on the server's host."""

from __future__ import annotations

import os

from reaper.special import Result, SpecialContext, register


async def cpu_load(ctx: SpecialContext) -> Result:
    one, five, fifteen = os.getloadavg()
    return [("cpu_load", [{"epoch_ns": ctx.wall_ns, "load_1min": one, "load_5min": five, "load_15min": fifteen}])]


register("cpu_load", cpu_load, local_only=True, deadline_seconds=5)
