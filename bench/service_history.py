"""Figures ``history`` and ``pgwrites``: what the service's runs leave in the database.

``history``: 200 tasks at 0.5 s on the service (SQLite) with ``cron.history_max_rows=50`` (so
that the limit is reached within the run; everything else default, the hourly cleanup
included) for 60 s (quick: 45 s). Sampled every 2 s from outside: the most rows any task has
in ``task_runs``, and the sizes of the SQLite file and of its WAL. Bounded: the most rows never
exceed the limit plus the trim margin (:func:`nanobot.cron.retention.margin_for`); plateau: the
database file grows by less than 10 % from the first sample where a task holds limit + margin
rows (each task's rows then cycle between the two) to the last. The WAL, which checkpoints
truncate, swings by megabytes from one sample to the next: its largest size is reported beside.

``pgwrites``: 200 tasks at 1 s on the service (PostgreSQL), for 30 s after a 5 s warm-up
(quick: 10 s), autovacuum off on the service's tables so that dead rows stay countable. Per
run in the window: bytes of dead rows left in each table (``pgstattuple``'s ``dead_tuple_len``,
the table's TOAST table included) and bytes of WAL records that touch the service's tables and
indexes (``pg_walinspect``; commit records, which name no relation, are left out). The server
is shared: nothing else writes these relations, but WAL totals of the whole server are not
comparable between runs and are not used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.common import Result, bench_home, epoch_to_dt, insert_stored_tasks
from bench.proc import ServiceProcess, admin_engine, nanobot_db, pg_available, pg_schema
from bench.tasks import read_stamps


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def run(quick: bool) -> Result:
    try:
        from nanobot.cron.retention import margin_for
    except ImportError:  # nanobot before continuous trimming (the "before" of RESULTS.md)

        def margin_for(max_rows: int) -> int:
            return max(10, max_rows // 10)

    res = Result("history")
    count, interval, max_rows = 200, 0.5, 50
    window = 45.0 if quick else 60.0
    bound = max_rows + margin_for(max_rows)
    res.settings = {
        "tasks": count,
        "interval_s": interval,
        "history_max_rows": max_rows,
        "window_s": window,
    }
    # (seconds, most rows of one task, bytes of nanobot.db, bytes of its WAL)
    samples: list[tuple[float, int, int, int]] = []
    with bench_home("history") as base:
        home = base / "service"
        home.mkdir()
        engine = nanobot_db(f"sqlite:///{home / 'nanobot.db'}")
        service = ServiceProcess(home, NANOBOT_CRON__HISTORY_MAX_ROWS=str(max_rows))
        with service:
            service.start()
            service.wait_status("/healthz", 200)
            anchor0 = time.time() + 3
            insert_stored_tasks(
                engine,
                [f"t{i:06d}" for i in range(count)],
                task_class="bench.tasks:StampFile",
                interval=interval,
                kwargs_of=lambda i: {
                    "interval": interval,
                    "path": str(home / "stamps.txt"),
                    "anchor": anchor0 + interval * i / count,
                },
                anchor_of=lambda i: epoch_to_dt(anchor0 + interval * i / count),
            )
            start = time.time()
            while (now := time.time()) < start + window:
                with engine.connect() as conn:
                    most = conn.execute(
                        text(
                            "SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM task_runs "
                            "GROUP BY task_name) AS per_task"
                        )
                    ).scalar_one()
                samples.append(
                    (
                        now - start,
                        int(most),
                        _file_bytes(home / "nanobot.db"),
                        _file_bytes(home / "nanobot.db-wal"),
                    )
                )
                time.sleep(2.0)
            service.stop()
        runs = len(read_stamps(home / "stamps.txt"))
        with engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM task_runs")).scalar_one()
        engine.dispose()
    most = max(s[1] for s in samples)
    # Each task's rows go from the limit up to the limit + margin, when a trim takes them back
    # to the limit. Once some task reached limit + margin, every task is within a few rows of
    # it: from then on the database file must stop growing (free pages of trimmed rows are
    # reused). The WAL is not part of it: its size swings by megabytes between checkpoints
    # (each one truncates it to nanobot's journal_size_limit), whatever the history holds.
    full = [s for s in samples if s[1] >= bound]
    growth = (full[-1][2] - full[0][2]) / full[0][2] if len(full) >= 3 else None
    res.add(
        f"most task_runs rows of one task at any sample ({runs} runs, limit {max_rows})",
        most,
        "rows",
        "limit + margin",
        bound,
        f"<= {bound}",
        most <= bound,
    )
    res.add(
        f"SQLite file growth once a task reached limit + margin ({len(full)} samples)",
        None if growth is None else 100 * growth,
        "%",
        target="< +10 %",
        met=growth is not None and growth < 0.10,
    )
    res.add("SQLite file at the end", samples[-1][2] / 1e6, "MB")
    res.add("SQLite WAL, largest at any sample", max(s[3] for s in samples) / 1e6, "MB")
    res.notes.append(
        "Samples (seconds, most rows of one task, bytes of nanobot.db, bytes of its WAL): "
        + ", ".join(f"({t:.0f}, {m}, {b}, {w})" for t, m, b, w in samples)
        + f". task_runs rows at the end: {total}; without trimming: {runs}."
    )
    return res


def _relations(conn: Any, schema: str) -> dict[str, list[int]]:
    """filenodes of each table of ``schema``, its indexes, TOAST table and TOAST index."""
    rows = conn.execute(
        text(
            """
            SELECT t.relname AS table_name, pg_relation_filenode(r.oid) AS node
            FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
            JOIN pg_class r ON r.oid = t.oid
                OR r.oid = t.reltoastrelid
                OR r.oid IN (SELECT indexrelid FROM pg_index
                             WHERE indrelid IN (t.oid, t.reltoastrelid))
            WHERE n.nspname = :s AND t.relkind = 'r'
            """
        ),
        {"s": schema},
    ).all()
    result: dict[str, list[int]] = {}
    for table, node in rows:
        if node is not None:
            result.setdefault(table, []).append(int(node))
    return result


def _dead_rows(conn: Any, schema: str) -> dict[str, tuple[int, int]]:
    """Row versions each table (and its TOAST table) made dead so far: ``(table, toast)``.

    Every UPDATE and DELETE leaves the old version of its row behind until vacuum; page pruning
    may reclaim some early, so dead rows are counted as they are made, from the statistics
    (``n_tup_upd + n_tup_del``), not by looking for them later.
    """
    rows = conn.execute(
        text(
            """
            SELECT t.relname,
                   coalesce(s.n_tup_upd + s.n_tup_del, 0),
                   coalesce((SELECT ts.n_tup_upd + ts.n_tup_del FROM pg_stat_all_tables ts
                             WHERE ts.relid = t.reltoastrelid), 0)
            FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
            LEFT JOIN pg_stat_all_tables s ON s.relid = t.oid
            WHERE n.nspname = :s AND t.relkind = 'r'
            """
        ),
        {"s": schema},
    ).all()
    return {str(name): (int(dead), int(toast)) for name, dead, toast in rows}


def _row_widths(conn: Any, schema: str) -> dict[str, tuple[float, float]]:
    """Average bytes of a live row version of each table and of its TOAST table (pgstattuple)."""
    rows = conn.execute(
        text(
            """
            SELECT t.relname,
                   (SELECT CASE WHEN p.tuple_count > 0 THEN p.tuple_len::float / p.tuple_count
                           ELSE 0 END FROM pgstattuple(t.oid) p),
                   coalesce((SELECT CASE WHEN p.tuple_count > 0
                                    THEN p.tuple_len::float / p.tuple_count ELSE 0 END
                             FROM pgstattuple(t.reltoastrelid) p WHERE t.reltoastrelid <> 0), 0)
            FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE n.nspname = :s AND t.relkind = 'r'
            """
        ),
        {"s": schema},
    ).all()
    return {str(name): (float(width), float(toast)) for name, width, toast in rows}


def run_pgwrites(quick: bool) -> Result:
    res = Result("pgwrites")
    if not pg_available():
        res.notes.append("**pgwrites skipped**: PostgreSQL does not answer.")
        return res
    count, interval, warmup = 200, 1.0, 5.0
    window = 10.0 if quick else 30.0
    res.settings = {"tasks": count, "interval_s": interval, "window_s": window}
    admin = admin_engine()
    with admin.connect() as conn:
        for extension in ("pgstattuple", "pg_walinspect"):
            conn.execute(text(f"CREATE EXTENSION IF NOT EXISTS {extension}"))
    with bench_home("pgwrites") as base, pg_schema() as url:
        schema = url.rsplit("%3D", 1)[1]
        home = base / "service"
        home.mkdir()
        stamp = home / "stamps.txt"
        engine = nanobot_db(url)
        with admin.connect() as conn:
            for table in conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
            ).scalars():
                conn.execute(
                    text(
                        f'ALTER TABLE "{schema}"."{table}" SET (autovacuum_enabled = false, '
                        "toast.autovacuum_enabled = false)"
                    )
                )
        service = ServiceProcess(home, url)
        with service:
            service.start()
            service.wait_status("/healthz", 200)
            anchor0 = time.time() + 3
            insert_stored_tasks(
                engine,
                [f"t{i:06d}" for i in range(count)],
                task_class="bench.tasks:StampFile",
                interval=interval,
                kwargs_of=lambda i: {
                    "interval": interval,
                    "path": str(stamp),
                    "anchor": anchor0 + interval * i / count,
                },
                anchor_of=lambda i: epoch_to_dt(anchor0 + interval * i / count),
            )
            time.sleep(max(0.0, anchor0 + warmup - time.time()))
            with admin.connect() as conn:
                dead0 = _dead_rows(conn, schema)
                lsn0 = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
            start = time.time()
            time.sleep(window)
            end = time.time()
            with admin.connect() as conn:
                lsn1 = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
            service.stop()
            # The service's backends report their statistics when they end (at the latest).
            time.sleep(1.0)
            with admin.connect() as conn:
                dead1 = _dead_rows(conn, schema)
                widths = _row_widths(conn, schema)
                nodes = _relations(conn, schema)
        runs = sum(1 for t, _ in read_stamps(stamp) if start <= t < end)
        with admin.connect() as conn:
            wal = {}
            for table, table_nodes in nodes.items():
                patterns = [f"% rel %/{node} %" for node in table_nodes]
                wal[table] = int(
                    conn.execute(
                        text(
                            "SELECT coalesce(sum(record_length), 0) "
                            "FROM pg_get_wal_records_info(:a, :b) WHERE block_ref LIKE ANY(:p)"
                        ),
                        {"a": lsn0, "b": lsn1, "p": patterns},
                    ).scalar_one()
                )
        engine.dispose()
    admin.dispose()
    per_run_dead: dict[str, float] = {}
    for table, (rows1, toast1) in dead1.items():
        rows0, toast0 = dead0.get(table, (0, 0))
        width, toast_width = widths.get(table, (0.0, 0.0))
        made = (rows1 - rows0) * width + (toast1 - toast0) * toast_width
        if runs:
            per_run_dead[table] = made / runs
    per_run_wal = {t: b / runs for t, b in wal.items()} if runs else {}
    res.add(f"dead-row bytes per run, all tables ({runs} runs)", sum(per_run_dead.values()), "B")
    for table in sorted(per_run_dead, key=lambda t: -per_run_dead[t]):
        if per_run_dead[table] >= 1:
            width, toast_width = widths[table]
            res.add(
                f"dead-row bytes per run, {table} (row {width:.0f} B, TOAST chunk "
                f"{toast_width:.0f} B)",
                per_run_dead[table],
                "B",
            )
    res.add("WAL bytes per run touching the service's relations", sum(per_run_wal.values()), "B")
    for table in sorted(per_run_wal, key=lambda t: -per_run_wal[t]):
        if per_run_wal[table] >= 1:
            res.add(f"WAL bytes per run, {table} (+ its indexes, TOAST)", per_run_wal[table], "B")
    return res
