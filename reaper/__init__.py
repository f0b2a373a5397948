"""reaper: a PostgreSQL metrics collector daemon on trio structured concurrency."""

__version__ = "0.1.0"
