"""The Redis client the benchmark measures with: redis-py on hiredis, as Redis's docs advise.

Without hiredis, redis-py parses every reply in Python and Redis looks slower than
it is to a user who installs ``redis[hiredis]``, the client Redis's own documentation
recommends for performance. redis-py falls back to its Python parser without a word
when hiredis is missing or does not import, so every connection the benchmark reads
with is made by ``connect`` and checked: the parser actually selected on it must be
hiredis's, or the run stops with ``HiredisMissing``. Both packages are pinned in the
``dev`` extra (pyproject.toml), which ``make bench`` installs.
"""

from __future__ import annotations

import redis
import redis.utils

__all__ = ["HiredisMissing", "client_versions", "connect", "parser_name", "require_hiredis"]

#: The class name of redis-py's hiredis-backed reply parser.
HIREDIS_PARSER = "_HiredisParser"
#: Seconds a blocking read or write on a connection may take before it fails.
SOCKET_TIMEOUT_S = 60.0


class HiredisMissing(RuntimeError):
    """redis-py does not parse replies with hiredis: the comparison would handicap Redis."""


def require_hiredis() -> None:
    """Raise ``HiredisMissing`` unless redis-py found a working hiredis."""
    if not redis.utils.HIREDIS_AVAILABLE:
        try:
            import hiredis  # noqa: F401
        except ImportError as exc:
            why = f"hiredis does not import ({exc})"
        else:
            why = f"redis-py {redis.__version__} does not accept the installed hiredis"
        raise HiredisMissing(
            f"{why}: redis-py would parse replies in pure Python, which is not how a Redis "
            "user who cares about latency runs it. Install the pinned versions: "
            "`.venv/bin/pip install -e '.[dev]'` (or `make bench`, which does)"
        )


def parser_name(conn: redis.Redis) -> str:
    """The class name of the reply parser that ``conn``'s connections use."""
    pool = conn.connection_pool
    connection = pool.get_connection()
    try:
        return type(connection._parser).__name__
    finally:
        pool.release(connection)


def connect(port: int, host: str = "127.0.0.1") -> redis.Redis:
    """A redis-py client of the server at ``host:port``, checked to parse with hiredis.

    Its own connection pool (one socket per thread that uses it), 60 s socket timeout.
    """
    require_hiredis()
    conn = redis.Redis(host=host, port=port, socket_timeout=SOCKET_TIMEOUT_S)
    parser = parser_name(conn)
    if parser != HIREDIS_PARSER:
        conn.close()
        raise HiredisMissing(
            f"redis-py {redis.__version__} chose the {parser} reply parser, not "
            f"{HIREDIS_PARSER}, although hiredis imports: the comparison would handicap Redis"
        )
    return conn


def client_versions(conn: redis.Redis) -> dict[str, str]:
    """Versions of redis-py and hiredis, and the reply parser ``conn`` actually uses."""
    import hiredis

    return {
        "redis_py": redis.__version__,
        "hiredis": hiredis.__version__,
        "redis_py_parser": parser_name(conn),
    }
