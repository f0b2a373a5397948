"""Sinks: one task per sink, each draining its own bounded channel; the fan-out feeds them all.

A source hands a measurement to `FanOut.send` (fanout.py), which never blocks and never waits on a
sink: it puts the measurement on every sink's bounded memory channel. Each sink runs in its own task
(runner.py): it reports started before it opens, so a sink that cannot open or write never stops the
daemon; it logs one line, retries with backoff, and its measurements go to its on-disk spill queue
(spill.py, under `[collector] state_dir`, bounded by `spill_max_bytes`) meanwhile, in order. The sink
replays the spill before it takes new data again, and a restarted reaper replays what is on disk. Only
when the spill bound is reached (or the disk is full) are measurements dropped: counted, logged once per
episode, and exposed. What a sink refuses for its content is set aside in `rejected/` (rejected.py),
never retried. No other sink and no source is slowed.

Modules: fanout (Outlet, FanOut), runner (SinkRunner, the Sink protocol), spill, rejected, preflight
(`reaper check`'s sink checks), and one module per sink: jsonfile, postgres, prometheus; encode (values).
"""

from __future__ import annotations

from reaper.sinks.fanout import FanOut, Outlet
from reaper.sinks.runner import MAX_WRITE_BATCH, RETRY_MAX_SECONDS, Sink, SinkRunner, run_sink, write_with_retry

__all__ = ["MAX_WRITE_BATCH", "RETRY_MAX_SECONDS", "FanOut", "Outlet", "Sink", "SinkRunner", "run_sink",
           "write_with_retry"]
