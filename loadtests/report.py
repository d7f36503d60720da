"""The benchmark's outputs: Markdown tables on stdout, results.json, latency.png.

Sections: load, latency and its floors (each system over the round trip that bounds
it), throughput, CPU, memory (side by side with Redis); bulk load (issue 3) and
freshness and updates (issue 4), kvstore alone but for Redis's reads under updates
(issue 17); the mixed-dtype get, the asyncio
reads and the served example (issue 18); the cluster step (15), the replica step
and the kill -9 soak (16); each with its targets printed beside the measurements. The
first line names the versions measured (redis-py, hiredis, redis-server, uvloop,
grpcio).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.aio_reads import render_async_reads
from loadtests.cluster_bench import render_cluster
from loadtests.floors import FLOOR_OF
from loadtests.kill_soak import render_soak
from loadtests.machine import versions_line
from loadtests.mixed import render_mixed
from loadtests.replica_bench import render_replicas
from loadtests.serving import render_serving

__all__ = ["plot", "render", "write_json"]

SYSTEMS = ["kvstore", "redis-packed", "redis-hash"]
REDIS = ["redis-packed", "redis-hash"]
COLORS = {"kvstore": "tab:blue", "redis-packed": "tab:orange", "redis-hash": "tab:green"}
#: Targets of issue 3 (bulk load): end-to-end rows/s per core, and times Redis's load rate.
TARGET_LOAD_ROWS_PER_CORE_S = 1_000_000
TARGET_LOAD_VS_REDIS = 5.0


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded to line up in a terminal."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _si(x: float) -> str:
    """A rate with a k/M suffix: 1234567 -> 1.23M."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f} B"


def render(results: dict[str, Any]) -> str:
    """Every table of a run as text (Markdown tables, ready for the README)."""
    m = results["machine"]
    s = results["settings"]
    parts = [
        f"machine: {m['nproc']} cores ({m['cpu_model']}), shared by the servers and the "
        f"load generator; {m['date']}",
        f"versions: {versions_line(m)}",
        f"table: {s['rows']:,} rows x (32 float32 + float32[64]), int64 keys; "
        "uniform random existing keys",
        "",
        "load, rows/s (kvstore: bulk load from a zstd Parquet file on disk until queryable; "
        "Redis: pipelined writes, client encoding included):",
        _table(
            ["system", "rows/s", "seconds"],
            [
                [name, f"{v['rows_per_s']:,.0f}", f"{v['seconds']:.1f}"]
                for name, v in results["load"].items()
            ],
        ),
        "",
        "latency, one client, ms (p50 = median of all samples; ratio > 1 = kvstore slower); "
        "other work on the machine meanwhile: "
        + ", ".join(f"{x:.2f}" for x in results["latency"]["other_cpu_cores_per_round"])
        + " cores by round:",
    ]
    lat = results["latency"]
    rows = []
    for b in lat["kvstore"]:
        kv = lat["kvstore"][b]
        row = [b]
        for name in SYSTEMS:
            row += [_ms(lat[name][b]["p50_ms"]), _ms(lat[name][b]["p99_ms"])]
        for name in REDIS:
            row += [
                _ratio(kv["p50_ms"], lat[name][b]["p50_ms"]),
                _ratio(kv["p99_ms"], lat[name][b]["p99_ms"]),
            ]
        row.append(str(kv["count"]))
        rows.append(row)
    header = ["batch"]
    for name in SYSTEMS:
        header += [f"{name} p50", "p99"]
    header += ["kv/packed p50", "p99", "kv/hash p50", "p99", "samples"]
    parts += [_table(header, rows), ""]
    if lat.get("floors"):
        parts += [render_floors(lat), ""]

    tp = results["throughput"]
    parts.append(
        "throughput, keys/s (batches/s), median of rounds; ratio > 1 = kvstore faster; "
        f"concurrency = {results['settings']['clients']}:"
    )
    rows, cpu_rows = [], []
    for cell, kv in tp["kvstore"].items():
        row = [str(kv["concurrency"]), str(kv["batch_size"])]
        cpu_row = list(row)
        for name in SYSTEMS:
            c = tp[name][cell]
            row.append(f"{_si(c['keys_per_s'])} ({_si(c['batches_per_s'])})")
            cpu_row.append(
                f"{c['client_cpu_cores']:.2f} / {c['server_cpu_cores']:.2f} / "
                f"{c['other_cpu_cores']:.2f} (p99 {_ms(c['p99_ms'])})"
            )
        for name in REDIS:
            row.append(_ratio(kv["keys_per_s"], tp[name][cell]["keys_per_s"]))
        rows.append(row)
        cpu_rows.append(cpu_row)
    parts += [
        _table(["conc", "batch", *SYSTEMS, "kv/packed", "kv/hash"], rows),
        "",
        "CPU under load, cores used by load generator / server / anything else on the "
        "machine (1.00 = one core busy), and call latency p99 ms:",
        _table(["conc", "batch", *SYSTEMS], cpu_rows),
        "",
    ]

    mem = results["memory"]
    kv = mem["kvstore"]
    rows = [
        [
            "kvstore",
            f"RSS {_bytes(kv['rss_bytes'])} + disk {_bytes(kv['disk_bytes'])}",
            f"{kv['rss_above_empty_per_row']:.0f} (private "
            f"{kv.get('rss_anon_above_empty_per_row', float('nan')):.0f} + mapped files "
            f"{kv.get('rss_file_above_empty_per_row', float('nan')):.0f})",
            f"{kv['disk_per_row']:.0f}",
            f"{kv['total_per_row']:.0f}",
        ]
    ]
    for name in REDIS:
        r = mem[name]
        rows.append(
            [
                f"{name} ({r['encoding']})",
                f"used_memory {_bytes(r['used_memory_bytes'])}",
                f"{r['used_memory_above_empty_per_row']:.0f}",
                "-",
                f"{r['used_memory_per_row']:.0f}",
            ]
        )
    parts += [
        "memory at the end, bytes per row (raw data: 8 B key + 384 B values); RAM is "
        "above the empty server's; kvstore's RSS is its private memory (RssAnon: heap, "
        "block cache, memtables) plus the pages of the memory-mapped base files its reads "
        "touched (RssFile: page cache the kernel can drop):",
        _table(["system", "total", "RAM B/row", "disk B/row", "total B/row (RAM + disk)"], rows),
    ]
    if "bulk_load" in results:
        parts += ["", render_bulk_load(results)]
    if "updates" in results:
        parts += ["", render_updates(results["updates"])]
    if "mixed_dtypes" in results:
        parts += ["", render_mixed(results["mixed_dtypes"])]
    if "async_reads" in results:
        parts += ["", render_async_reads(results["async_reads"])]
    if "serving" in results:
        parts += ["", render_serving(results["serving"])]
    if "cluster" in results:
        parts += ["", render_cluster(results["cluster"])]
    if "replicas" in results:
        parts += ["", render_replicas(results["replicas"])]
    if "kill_soak" in results:
        parts += ["", render_soak(results["kill_soak"])]
    return "\n".join(parts)


def render_floors(lat: dict[str, Any]) -> str:
    """The floors measured in the latency rounds, and each system's latency over its floor."""
    floors = lat["floors"]
    rows = [
        [
            name,
            f.get("what", ""),
            _ms(f["p50_ms"]),
            _ms(f["p99_ms"]),
            ", ".join(_ms(x) for x in f["round_p50_ms"]),
            str(f["count"]),
        ]
        for name, f in floors.items()
    ]
    parts = [
        "floors, one client, ms (measured in the same rounds, before the systems at each "
        "batch size; all batch sizes pooled):",
        _table(["floor", "what", "p50", "p99", "p50 by round", "samples"], rows),
        "",
    ]
    ratios = lat.get("floor_ratios", {})
    systems = [name for name in FLOOR_OF if name in ratios]
    header, rows = ["batch"], []
    for name in systems:
        header += [f"{name} p50", f"/ {FLOOR_OF[name]}", "p99", f"/ {FLOOR_OF[name]}"]
    for b in lat[systems[0]] if systems else []:
        row = [b]
        for name in systems:
            cell, ratio = lat[name][b], ratios[name][b]
            row += [
                _ms(cell["p50_ms"]),
                f"{ratio['p50']:.2f}x",
                _ms(cell["p99_ms"]),
                f"{ratio['p99']:.2f}x",
            ]
        rows.append(row)
    parts += [
        "latency over its floor (p50 / the floor's p50, p99 / its p99; 1.00x = at the floor):",
        _table(header, rows),
    ]
    if {"uvloop-echo", "redis-ping"} <= floors.keys() and "1" in lat.get("redis-packed", {}):
        echo, ping = floors["uvloop-echo"]["p50_ms"], floors["redis-ping"]["p50_ms"]
        if "1" in lat.get("kvstore", {}):
            kv1, redis1 = lat["kvstore"]["1"]["p50_ms"], lat["redis-packed"]["1"]["p50_ms"]
            parts.append(
                f"1 key, p50: kvstore / redis-packed {kv1 / redis1:.2f}x; the floors' ratio, "
                f"echo / PING, {echo / ping:.2f}x (what kvstore / Redis would be if each "
                "answered at its floor)"
            )
    return "\n".join(parts)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render_bulk_load(results: dict[str, Any]) -> str:
    """The bulk-load table (issue 3) and its targets."""
    bl = results["bulk_load"]
    redis_rate = results["load"]["redis-packed"]["rows_per_s"]
    rows = []
    for r in bl["runs"]:
        rows.append(
            [
                f"{r['rows']:,}",
                f"{r['parquet']['bytes'] / 1e6:,.0f}",
                f"{r['seconds']:.1f}",
                f"{_si(r['rows_per_s'])}",
                f"{r['parquet_mb_per_s']:.0f}",
                f"{r['loader_cpu_s']:.1f} + {r['node_cpu_s']:.1f}",
                f"{_si(r['rows_per_cpu_s'])}",
                f"{r['rows_per_s'] / redis_rate:.2f}x",
                f"{r['disk_bytes_per_row']:.0f} / {r['parquet_bytes_per_row']:.0f}",
                _bytes(r["loader_peak_rss_bytes"]),
            ]
        )
    header = [
        "rows",
        "Parquet MB",
        "seconds",
        "rows/s",
        "MB/s",
        "CPU s loader + node",
        "rows per CPU-s",
        "vs redis-packed load",
        "disk / Parquet B/row",
        "loader peak RSS",
    ]
    main = bl["runs"][0]
    best_per_core = max(r["rows_per_cpu_s"] for r in bl["runs"])
    return "\n".join(
        [
            "bulk load, Parquet (zstd) on disk -> queryable, kvstore.ingest.bulk.load in a child "
            f"process, 8 shards; redis-packed loaded {_si(redis_rate)} rows/s in this run:",
            _table(header, rows),
            f"targets: >= {_si(TARGET_LOAD_ROWS_PER_CORE_S)} rows/s per core end to end: "
            f"{_si(best_per_core)} rows per CPU-second at best ({_met(best_per_core >= 1e6)}, "
            f"{best_per_core / 1e6:.2f}x of it); >= {TARGET_LOAD_VS_REDIS:.0f}x Redis's load rate: "
            f"{main['rows_per_s'] / redis_rate:.2f}x "
            f"({_met(main['rows_per_s'] >= TARGET_LOAD_VS_REDIS * redis_rate)})",
        ]
    )


def render_updates(u: dict[str, Any]) -> str:
    """The freshness and updates table (issue 4) and its targets."""
    f, un, st, rd = u["freshness"], u["unary"], u["stream"], u["reads_under_updates"]
    rows = [
        [
            f"freshness (send -> visible to another process), {f['updates']} updates",
            f"p50 {_ms(f['p50_ms'])}, p99 {_ms(f['p99_ms'])} ms",
            f"p99 <= {f['target_p99_ms']:.0f} ms",
            _met(f["p99_ms"] <= f["target_p99_ms"]),
        ],
        [
            "  its parts: write ack (1 row) / one poll (1-key get)",
            f"p50 {_ms(f['write_ack_p50_ms'])} / {_ms(f['poll_rtt_p50_ms'])} ms",
            "",
            "",
        ],
        [
            f"updates, unary (client.write, {u['batch_rows']} rows x {len(u['features'])} "
            "features per call)",
            f"{_si(un['rows_per_s'])} rows/s (node {un['node_cpu_cores']:.2f} cores)",
            "",
            "",
        ],
        [
            f"updates, streaming (update_stream, {u['batch_rows']}-row batches, "
            f"max_in_flight {st['max_in_flight']})",
            f"{_si(st['rows_per_s'])} rows/s (node {st['node_cpu_cores']:.2f} cores)",
            f">= {_si(st['target_rows_per_s'])} rows/s",
            _met(st["rows_per_s"] >= st["target_rows_per_s"]),
        ],
        [
            f"{rd['read_batch']}-key get, no updates",
            f"p50 {_ms(rd['no_updates']['p50_ms'])}, p99 {_ms(rd['no_updates']['p99_ms'])} ms",
            "",
            "",
        ],
        [
            f"{rd['read_batch']}-key get, updates streaming at "
            f"{_si(rd['updates']['rows_per_s'])} rows/s (half the max)",
            f"p50 {_ms(rd['under_updates']['p50_ms'])}, p99 "
            f"{_ms(rd['under_updates']['p99_ms'])} ms ({rd['p99_ratio']:.2f}x the p99)",
            f"p99 <= {rd['target_p99_ratio']}x idle",
            _met(rd["p99_ratio"] <= rd["target_p99_ratio"]),
        ],
    ]
    if "redis_reads_under_updates" in u:
        rows += _redis_update_rows(u["redis_reads_under_updates"], rd)
    return "\n".join(
        [
            "freshness and updates (kvstore; updates set "
            f"{', '.join(u['features'])} of existing keys of the bulk-loaded table, "
            "event time now):",
            _table(["measurement", "measured", "target", ""], rows),
        ]
    )


def _redis_update_rows(rr: dict[str, Any], rd: dict[str, Any]) -> list[list[str]]:
    """Redis's reads under updates (``rr``), the floor beside kvstore's (``rd``)."""
    top, idle, busy = rr["max_stream"], rr["no_updates"], rr["under_updates"]

    def cores(r: dict[str, Any]) -> str:
        before, after = r["no_updates"], r["under_updates"]
        return f"{before['machine_busy_cores']:.2f} -> {after['machine_busy_cores']:.2f}"

    return [
        [
            f"Redis (hash) updates, pipelines of 1000 HSETs of 4 fields, "
            f"{top['max_in_flight']} in flight",
            f"{_si(top['rows_per_s'])} rows/s (redis-server {top['redis_cpu_cores']:.2f} cores)",
            "",
            "",
        ],
        [
            f"Redis {rr['read_batch']}-key read (pipelined HGETALL), no updates",
            f"p50 {_ms(idle['p50_ms'])}, p99 {_ms(idle['p99_ms'])} ms",
            "",
            "",
        ],
        [
            f"Redis {rr['read_batch']}-key read, updates at {_si(rr['updates']['rows_per_s'])} "
            "rows/s (half its max)",
            f"p50 {_ms(busy['p50_ms'])}, p99 {_ms(busy['p99_ms'])} ms "
            f"({rr['p99_ratio']:.2f}x the p99; kvstore {rd['p99_ratio']:.2f}x)",
            "the peer, same rig",
            "",
        ],
        [
            "  machine busy cores, no updates -> updates",
            f"kvstore's windows {cores(rd)}, Redis's {cores(rr)}",
            "",
            "",
        ],
    ]


def write_json(results: dict[str, Any], path: Path) -> Path:
    """All raw numbers of the run as JSON at ``path``."""
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Latency by batch size (log-log, p50 solid, p99 dashed) and throughput by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(13, 5))
    lat = results["latency"]
    for name in SYSTEMS:
        sizes = [int(b) for b in lat[name]]
        ax_lat.plot(
            sizes, [v["p50_ms"] for v in lat[name].values()], "-o", color=COLORS[name], label=name
        )
        ax_lat.plot(sizes, [v["p99_ms"] for v in lat[name].values()], "--", color=COLORS[name])
    floor_styles = {"uvloop-echo": ("tab:gray", ":"), "redis-ping": ("tab:red", ":")}
    for name, f in lat.get("floors", {}).items():
        color, style = floor_styles.get(name, ("black", ":"))
        ax_lat.axhline(f["p50_ms"], color=color, linestyle=style, label=f"{name} p50 (floor)")
    ax_lat.set(
        xscale="log",
        yscale="log",
        xticks=sizes,
        xticklabels=[str(b) for b in sizes],
        xlabel="keys per lookup",
        ylabel="latency, ms",
        title="lookup latency, one client (p50 solid, p99 dashed)",
    )
    ax_lat.xaxis.set_minor_formatter(NullFormatter())
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend()

    tp = results["throughput"]
    sizes = sorted({c["batch_size"] for c in tp["kvstore"].values()})
    styles = ["-", "--", "-.", ":"]
    for name in SYSTEMS:
        for i, b in enumerate(sizes):
            cells = sorted(
                (c for c in tp[name].values() if c["batch_size"] == b),
                key=lambda c: c["concurrency"],
            )
            ax_tp.plot(
                [c["concurrency"] for c in cells],
                [c["keys_per_s"] for c in cells],
                styles[i % len(styles)],
                marker="o",
                color=COLORS[name],
                label=f"{name}, batch {b}",
            )
    concurrencies = sorted({c["concurrency"] for c in tp["kvstore"].values()})
    ax_tp.set(
        xscale="log",
        yscale="log",
        xticks=concurrencies,
        xticklabels=[str(c) for c in concurrencies],
        xlabel=f"concurrent clients ({results['settings']['clients']})",
        ylabel="keys/s",
        title="throughput by concurrency",
    )
    ax_tp.xaxis.set_minor_formatter(NullFormatter())
    ax_tp.grid(True, which="both", alpha=0.3)
    ax_tp.legend(fontsize=7, ncol=3)
    m = results["machine"]
    fig.suptitle(
        f"kvstore vs Redis, {results['settings']['rows']:,} rows, "
        f"{m['nproc']} cores shared by server and client ({m['cpu_model']}), {m['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
