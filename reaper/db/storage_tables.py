"""The metric tables the storage creates empty up front (pure data, used by reaper/db/storage_schema.py)."""

from __future__ import annotations

#: built-in change-tracking tables created empty up front (dashboards query them before any change happens)
CHANGE_TABLES = ("sproc_changes", "table_changes", "index_changes", "privilege_changes", "object_changes",
                 "configuration_changes")

#: every metric table of the shipped catalogue (storage names; the change-detection *_hashes working sets
#: left out), created empty up front like the change tables: pgwatch's dashboards read tables of metrics a
#: preset may not collect (`settings` in the health check) or that returned no rows yet (`archiver`,
#: `replication`, `replication_slots` on a server without archiving or replicas). pgwatch creates a table
#: only for a metric a source activates, so such a panel fails there with "relation does not exist"; here it
#: shows no data. tests/test_dashboard_shapes.py keeps this list equal to the catalogue's tables.
METRIC_TABLES = (
    "archiver", "archiver_pending_count", "autovacuum_scores", "backends", "backup_age_pgbackrest", "backup_age_walg",
    "bgwriter", "blocking_locks", "buffercache_by_db", "buffercache_by_type", "change_events", "checkpointer",
    "cpu_load", "database_conflicts", "datfrozenxid", "db_size", "db_stats", "index_stats", "instance_up",
    "invalid_indexes", "kpi", "locks", "locks_mode", "logical_subscriptions", "pgbouncer_clients", "pgbouncer_stats",
    "pgpool_processes", "pgpool_stats", "postgres_role", "psutil_cpu", "psutil_disk", "psutil_disk_io_total",
    "psutil_mem", "recommendations", "recovery", "replication", "replication_slot_stats", "replication_slots",
    "sequence_health", "server_log_event_counts", "settings", "settings_num", "smart_health_per_disk", "sproc_stats",
    "stat_activity", "stat_io", "stat_lock", "stat_ssl", "stat_statements", "stat_statements_calls",
    "subscription_stats", "table_bloat_approx_stattuple", "table_bloat_approx_summary",
    "table_bloat_approx_summary_sql", "table_io_stats", "table_stats", "unused_indexes", "vmstat", "wait_events",
    "wal", "wal_receiver", "wal_size", "wal_stats",
)

#: tables pgwatch's v12 dashboards read for metrics reaper does not collect (nor pgwatch's own catalogue, for
#: the two realtime ones): the index overview's btree bloat panel, the stat activity (realtime) and realtime
#: plans dashboards, the global health's "offline nodes" (configured_dbs) and JIT panels and the health
#: check's JIT panel (stat_statements_jit), and the Patroni overview (pgwatch scrapes Patroni's Prometheus
#: endpoint into patroni_*). Created empty (schema migration 2) so such a panel shows no data instead of
#: failing with "relation does not exist".
DASHBOARD_TABLES = (
    "btree_bloat", "stat_activity_realtime", "show_plans_realtime", "configured_dbs", "stat_statements_jit",
    "patroni_primary", "patroni_cluster_unlocked", "patroni_is_paused", "patroni_pending_restart",
    "patroni_postgres_running", "patroni_standby_leader", "patroni_postgres_timeline", "patroni_xlog_location",
    "patroni_xlog_received_location", "patroni_xlog_replayed_location", "patroni_dcs_last_seen",
)
