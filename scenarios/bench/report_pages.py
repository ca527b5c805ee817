"""The report's pages: the plain-language verdict, the PNG plots, Markdown and HTML.

Everything here reads the figures scenarios.bench.report measured (the
``data`` dict that also goes to data.json) and measures nothing itself.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scenarios.bench import parts as bench_parts
from scenarios.bench.contenders import PHASES
from scenarios.bench.section import Section

# -- one look per strategy -------------------------------------------------------------------

#: Each strategy's (colour, line style) in every plot. Related strategies share a colour
#: family and differ in style; a name not listed gets a stable one from :func:`style_of`.
STYLES: dict[str, tuple[str, str]] = {
    "2pc": ("#1f77b4", "-"),
    "outbox-status": ("#ff7f0e", "-"),
    "outbox-last-id": ("#ff7f0e", "--"),
    "cdc": ("#2ca02c", "-"),
    "cdc-fanout": ("#2ca02c", "--"),
    "naive": ("#d62728", "-"),
    "naive-send-first": ("#d62728", "--"),
    "batch": ("#9467bd", "-"),
    "thread": ("#8c564b", "-"),
    "thread-sync": ("#8c564b", "--"),
    "consumer-2pc": ("#1f77b4", "--"),
    "consumer-inbox": ("#ff7f0e", ":"),
}

#: What a strategy not in STYLES draws from: colours none of the above uses, and styles.
FALLBACK_COLOURS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
FALLBACK_STYLES = ("-", "--", "-.", ":")


def style_of(name: str) -> tuple[str, str]:
    """(colour, line style) of strategy ``name``: the same in every plot and every run.

    Unknown names hash (not Python's salted hash) into the fallback colours and styles.
    """
    if name in STYLES:
        return STYLES[name]
    import zlib

    code = zlib.crc32(name.encode())
    colour = FALLBACK_COLOURS[code % len(FALLBACK_COLOURS)]
    return colour, FALLBACK_STYLES[(code // len(FALLBACK_COLOURS)) % len(FALLBACK_STYLES)]


# -- the verdict ---------------------------------------------------------------------------


def _p(data: Mapping[str, Any], name: str, key: str, field: str) -> float | None:
    value = data.get(name, {}).get(key, {}).get(field)
    return None if value is None else float(value)


def verdict(strategies: Mapping[str, Any], crashes: Mapping[str, Any]) -> list[dict[str, str]]:
    """Plain-language findings, each with the figures behind it."""
    rows: list[dict[str, str]] = []
    base = "outbox-status" if "outbox-status" in strategies else None
    if "2pc" in strategies and base:
        d50 = _diff(strategies, "2pc", base, "p50")
        d99 = _diff(strategies, "2pc", base, "p99")
        if d50 is not None and d99 is not None:
            rows.append(
                {
                    "finding": f"2PC {_adds(d50)} at p50 and {_adds(d99)} at p99 to the "
                    f"client's commit, compared with the outbox's local commit ({base})",
                    "figures": _latency_pair(strategies, "2pc")
                    + f" vs {_latency_pair(strategies, base)}",
                }
            )
    for name in strategies:
        conv = strategies[name].get("convergence_ms_c1") or {}
        if conv:
            rows.append(
                {
                    "finding": f"{name} makes B lag behind the client's commit by "
                    f"{conv['p50']:.1f} ms at p50 and {conv['p99']:.1f} ms at p99 "
                    "(concurrency 1)",
                    "figures": f"under load (all runs): p99 "
                    f"{strategies[name]['convergence_ms_all'].get('p99', 0):.0f} ms, max "
                    f"{strategies[name]['convergence_ms_all'].get('max', 0):.0f} ms",
                }
            )
    if "2pc" in strategies:
        rows.append(
            {
                "finding": "with 2PC, B holds the credit and the message is on the queue when "
                "the commit returns: no lag",
                "figures": "convergence 0 by construction",
            }
        )
    best = {
        name: max((r["throughput_per_s"] for r in d["throughput"].values()), default=0.0)
        for name, d in strategies.items()
    }
    if best:
        rows.append(
            {
                "finding": "peak throughput (closed loop, best concurrency): "
                + ", ".join(f"{n} {v:.0f}/s" for n, v in sorted(best.items(), key=lambda x: -x[1])),
                "figures": "transfers committed per second by the client",
            }
        )
    if best.get("2pc") and best.get("outbox-status"):
        curve = {int(c): r["throughput_per_s"] for c, r in strategies["2pc"]["throughput"].items()}
        rising = [curve[c] for c in sorted(curve) if c <= 8]
        rows.append(
            {
                "finding": f"2PC's peak is {best['2pc'] / best['outbox-status']:.2f} x "
                "outbox-status's (target >= 0.6); from concurrency 1 to 8 its throughput "
                + ("rises" if rising == sorted(rising) else "does not rise steadily")
                + ": "
                + ", ".join(f"{c}: {curve[c]:.0f}/s" for c in sorted(curve) if c <= 8),
                "figures": "the same run, closed loop",
            }
        )
    costs = {n: d.get("cost", {}) for n, d in strategies.items()}
    if costs:
        rows.append(
            {
                "finding": "WAL written per transfer (A + B, relays and consumer included): "
                + ", ".join(
                    f"{n} {c.get('wal_bytes_per_transfer_total', 0) / 1024:.1f} KiB"
                    for n, c in costs.items()
                ),
                "figures": "WAL insert position deltas / committed transfers",
            }
        )
    bad = {n: sum(p["anomalies"] for p in points.values()) for n, points in crashes.items()}
    if bad:
        broken = [f"{n} ({v})" for n, v in bad.items() if v]
        clean = [n for n, v in bad.items() if not v]
        rows.append(
            {
                "finding": "under injected crashes, "
                + (f"transfers left inconsistent: {', '.join(broken)}" if broken else "")
                + ("; " if broken and clean else "")
                + (f"none left inconsistent by {', '.join(clean)}" if clean else ""),
                "figures": "A, B and the queue (or inbox) compared after convergence",
            }
        )
    return rows


def _adds(ms: float) -> str:
    return f"adds {ms:.1f} ms" if ms >= 0 else f"takes {-ms:.1f} ms less"


def _diff(data: Mapping[str, Any], a: str, b: str, key: str) -> float | None:
    x = _p(data, a, "commit_latency_ms", key)
    y = _p(data, b, "commit_latency_ms", key)
    return None if x is None or y is None else x - y


def _latency_pair(data: Mapping[str, Any], name: str) -> str:
    lat = data.get(name, {}).get("commit_latency_ms", {})
    return f"{name} p50 {lat.get('p50', 0):.2f} / p99 {lat.get('p99', 0):.2f} ms"


# -- plots -----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nines_axis(ax: Any) -> None:
    """Percentile axis spaced by 'number of nines' (50, 90, 99, 99.9, ...)."""
    import math

    ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99]
    ax.set_xticks([-math.log10(1 - q / 100) for q in ticks])
    ax.set_xticklabels([f"{q:g}" for q in ticks])
    ax.set_xlabel("percentile")


def _cdf_xy(cdf: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    import math

    xs = [-math.log10(max(1 - q / 100, 1e-6)) for q, _ in cdf]
    return xs, [v for _, v in cdf]


def make_plots(out: Path, data: Mapping[str, Any]) -> dict[str, str]:
    """Write the PNG plots into ``out``; return {plot name: file name}."""
    plt = _pyplot()
    strategies: Mapping[str, Any] = data["strategies"]
    files: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        xs, ys = _cdf_xy(d.get("commit_latency_cdf", []))
        colour, style = style_of(name)
        ax.plot(xs, ys, label=name, color=colour, linestyle=style)
    _nines_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("client commit latency (ms, log)")
    ax.set_title("Client-visible commit latency, concurrency 1")
    ax.legend()
    ax.grid(alpha=0.3)
    files["latency"] = _save(fig, out, "latency.png")

    relayed = {n: d for n, d in strategies.items() if d.get("convergence_cdf")}
    if relayed:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, d in relayed.items():
            xs, ys = _cdf_xy(d["convergence_cdf"])
            colour, style = style_of(name)
            ax.plot(xs, ys, label=name, color=colour, linestyle=style)
        _nines_axis(ax)
        ax.set_yscale("log")
        ax.set_ylabel("client commit -> B credited (ms, log)")
        ax.set_title("Convergence latency, concurrency 1 (2PC and naive: 0)")
        ax.legend()
        ax.grid(alpha=0.3)
        files["convergence"] = _save(fig, out, "convergence.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        points = sorted((int(c), r["throughput_per_s"]) for c, r in d["throughput"].items())
        colour, style = style_of(name)
        ax.plot(
            [c for c, _ in points],
            [t for _, t in points],
            marker="o",
            label=name,
            color=colour,
            linestyle=style,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("committed transfers / s")
    ax.set_title("Throughput against concurrency (closed loop)")
    ax.legend()
    ax.grid(alpha=0.3)
    files["throughput"] = _save(fig, out, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        loads = sorted(
            (float(r), row["latency_ms"].get("p99", float("nan")), row["latency_ms"].get("p50"))
            for r, row in d["open_loop"].items()
        )
        colour, style = style_of(name)
        ax.plot(
            [r for r, _, _ in loads],
            [p99 for _, p99, _ in loads],
            marker="o",
            color=colour,
            linestyle=style,
            label=f"{name} p99",
        )
        ax.plot(  # the same colour and style, thinner, with small markers
            [r for r, _, _ in loads],
            [p50 for _, _, p50 in loads],
            marker=".",
            color=colour,
            linestyle=style,
            linewidth=0.8,
            label=f"{name} p50",
        )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (transfers / s)")
    ax.set_ylabel("latency from intended start (ms, log)")
    ax.set_title("Latency against offered load (open loop)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    files["open_loop"] = _save(fig, out, "open_loop.png")

    phases = data.get("phases_2pc") or {}
    if phases:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = list(phases)
        left = [0.0] * len(labels)
        for phase in PHASES:
            widths = [phases[c].get(phase, {}).get("mean", 0.0) for c in labels]
            ax.barh([f"concurrency {c}" for c in labels], widths, left=left, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("mean ms per committed transfer")
        ax.set_title("2PC transfer: where the time goes")
        ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        files["phases"] = _save(fig, out, "phases.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(strategies)
    wal_a = [
        strategies[n].get("cost", {}).get("wal_bytes_per_transfer", {}).get("a", 0) for n in names
    ]
    wal_b = [
        strategies[n].get("cost", {}).get("wal_bytes_per_transfer", {}).get("b", 0) for n in names
    ]
    ax.bar(names, wal_a, label="A")
    ax.bar(names, wal_b, bottom=wal_a, label="B")
    ax.set_ylabel("WAL bytes per transfer")
    ax.set_title("Write-ahead log written per transfer")
    ax.legend()
    files["wal"] = _save(fig, out, "wal.png")
    return files


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


# -- rendering -------------------------------------------------------------------------------


def _text(part: Section, column: int) -> bool:
    return column in part.text_columns


def _f(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def sections(data: Mapping[str, Any], plots: Mapping[str, str]) -> list[Section]:
    """The report's sections, rendered alike to Markdown and HTML."""
    strategies: Mapping[str, Any] = data["strategies"]
    out = [
        Section(
            "Verdict",
            ["finding", "behind it"],
            [[v["finding"], v["figures"]] for v in data["verdict"]],
            text_columns=(0, 1),
        )
    ]
    rows = []
    for name, d in strategies.items():
        lat, spread = d["commit_latency_ms"], d["commit_latency_spread"]
        rows.append(
            [name, _f(lat.get("count"))]
            + [_f(lat.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")]
            + [
                f"{_f(spread['p50'].get('min'))}-{_f(spread['p50'].get('max'))}",
                f"{_f(spread['p99'].get('min'))}-{_f(spread['p99'].get('max'))}",
            ]
        )
    out.append(
        Section(
            "Client-visible commit latency at concurrency 1 (ms)",
            ["strategy", "n", "p50", "p90", "p99", "p99.9", "max", "p50 range", "p99 range"],
            rows,
            note=f"{data['plan']['repeats']} runs of {data['plan']['latency_count']} transfers "
            "each; the ranges are the lowest and highest of the runs' own percentiles.",
            plot=plots.get("latency"),
        )
    )
    rows = []
    for name, d in strategies.items():
        c1, every = d.get("convergence_ms_c1") or {}, d.get("convergence_ms_all") or {}
        if not c1:
            rows.append([name, "0", "0", "0", "0", "0", d.get("convergence_note", "")])
            continue
        rows.append(
            [name]
            + [_f(c1.get(k)) for k in ("p50", "p99", "max")]
            + [_f(every.get(k)) for k in ("p99", "max")]
            + [f"{d['not_converged']} not converged"]
        )
    out.append(
        Section(
            "Convergence latency (ms): client commit -> B credited, message consumed",
            ["strategy", "p50 (c=1)", "p99 (c=1)", "max (c=1)", "p99 (all runs)", "max (all)", ""],
            rows,
            note="'all runs' includes the throughput and open-loop runs, where relays lag "
            "behind bursts. Relays and consumer run as separate processes.",
            plot=plots.get("convergence"),
            text_columns=(0, 6),
        )
    )
    concurrencies = data["plan"]["concurrencies"]
    out.append(
        Section(
            "Throughput against concurrency (committed transfers/s, closed loop)",
            ["strategy", *[str(c) for c in concurrencies], "p99 ms at max"],
            [
                [name]
                + [_f(d["throughput"][str(c)]["throughput_per_s"], 0) for c in concurrencies]
                + [_f(d["throughput"][str(max(concurrencies))]["latency_ms"].get("p99"))]
                for name, d in strategies.items()
            ],
            note=f"{data['plan']['seconds']} s per point, run in "
            f"{data['plan'].get('slices', 1)} slices alternating the concurrencies.",
            plot=plots.get("throughput"),
        )
    )
    rates = data["plan"]["rates"]
    out.append(
        Section(
            "Latency against offered load (open loop): p50 / p99 ms, achieved/s",
            ["strategy", *[f"{r:g}/s" for r in rates]],
            [
                [name]
                + [
                    f"{_f(d['open_loop'][f'{r:g}']['latency_ms'].get('p50'))} / "
                    f"{_f(d['open_loop'][f'{r:g}']['latency_ms'].get('p99'))}, "
                    f"{_f(d['open_loop'][f'{r:g}']['throughput_per_s'], 0)}"
                    for r in rates
                ]
                for name, d in strategies.items()
            ],
            note="Each latency is measured from the transfer's intended start, so a stall "
            "shows in every transfer scheduled behind it.",
            plot=plots.get("open_loop"),
        )
    )
    phases = data.get("phases_2pc") or {}
    if phases:
        out.append(
            Section(
                "2PC latency by phase (p50 / p99 ms)",
                ["concurrency", "total", *PHASES],
                [
                    [c, f"{_f(p['total'].get('p50'))} / {_f(p['total'].get('p99'))}"]
                    + [
                        f"{_f(p.get(ph, {}).get('p50'))} / {_f(p.get(ph, {}).get('p99'))}"
                        for ph in PHASES
                    ]
                    for c, p in phases.items()
                ],
                note="work: the SQL and the SENDs; prepare: PREPARE TRANSACTION on A and B in "
                "parallel; commit_point: the marker and the broker's COMMIT receipt; "
                "decision_log: the (lazy) COMMIT record; phase2: COMMIT PREPARED in parallel.",
                plot=plots.get("phases"),
            )
        )
    out.append(
        Section(
            "Cost per transfer",
            ["strategy", "WAL A (bytes)", "WAL B (bytes)", "forced log writes", "messages", ""],
            [
                [
                    name,
                    _f(d["cost"].get("wal_bytes_per_transfer", {}).get("a")),
                    _f(d["cost"].get("wal_bytes_per_transfer", {}).get("b")),
                    _f(d["cost"].get("forced_log_writes_per_transfer"), 4),
                    _f(d["cost"].get("messages_per_transfer"), 3),
                    d["cost"].get("messages_note", ""),
                ]
                for name, d in strategies.items()
                if d.get("cost")
            ],
            note="WAL from the insert position of A and B over the whole measurement (relays' "
            "and consumer's writes included, checkpoints' full-page images too).",
            plot=plots.get("wal"),
            text_columns=(0, 5),
        )
    )
    crash_rows = []
    for name, points in data["crashes"].items():
        for point, c in points.items():
            crash_rows.append(
                [
                    name,
                    point,
                    c["how"],
                    _f(c["transfers"]),
                    _f(c["crashed"]),
                    _f(c["not_converged"]),
                    _f(c["anomalies"]),
                    ", ".join(c["examples"][:3]),
                ]
            )
    out.append(
        Section(
            "Anomalies under injected crashes (after recovery and convergence)",
            [
                "strategy",
                "crash point",
                "how",
                "transfers",
                "crashed",
                "not converged",
                "anomalies",
                "examples",
            ],
            crash_rows,
            text_columns=(0, 1, 2, 7),
            note="An anomaly is a transfer whose debit in A, credit in B and message "
            "(queue, or the consumer's inbox) disagree, or money not conserved ('money').",
        )
    )
    if data.get("consumers"):
        out.append(
            Section(
                "Consuming: the inbox consumer against the 2pc consumer",
                ["consumer", "messages", "msg/s", "WAL bytes/msg on B", "p50 ms", "p99 ms", "max"],
                [
                    [f"--mode {c['mode']}", _f(c["count"]), _f(c["throughput_per_s"], 1)]
                    + [_f(c["wal_bytes_per_message"], 1)]
                    + [_f(c["latency_ms"].get(k)) for k in ("p50", "p99", "max")]
                    for c in data["consumers"]
                ],
                note="'twopc consumer' in each mode over the same credit commands: the "
                "throughput from a stored backlog until B holds it all, B's WAL bytes over "
                "that phase per message, and the latency of one command at a time to an "
                "idle consumer (send to B's row visible). 'twopc bench --consumers' runs "
                "this section alone.",
            )
        )
    for name, result in (data.get("parts") or {}).items():
        out += bench_parts.part(name).sections(result)
    machine = data["machine"]
    out.append(
        Section(
            "Machine and versions",
            ["what", "value"],
            [
                ["CPU", f"{machine['cpu']} ({machine['cores']} cores), {machine['memory']}"],
                ["OS / Python", f"{machine['os']} / Python {machine['python']}"],
                ["PostgreSQL", ", ".join(f"{k} {v}" for k, v in machine["postgresql"].items())],
                ["ActiveMQ", f"{machine['activemq']}; {machine['activemq_journal']}"],
                ["packages", ", ".join(f"{k} {v}" for k, v in machine["packages"].items())],
                ["git commit", machine["git_commit"]],
                [
                    "load average (1 min) before / after",
                    f"{machine['load_average'][0]:.2f} / {data['load_after'][0]:.2f}",
                ],
            ],
            text_columns=(0, 1),
            note="The machine is shared: a load average above the core count means other "
            "work ran during the measurement; compare the spread columns before trusting "
            "a small difference.",
        )
    )
    return out


def render_markdown(data: Mapping[str, Any], parts: Sequence[Section]) -> str:
    lines = [
        "# twopc: 2PC against the outbox, CDC and the naive dual write",
        "",
        f"Command: `{data['command']}` — {data['started_iso']}, {data['seconds']:.0f} s"
        + (" (quick run: few samples, wide spread)" if data["quick"] else ""),
        "",
        "Raw data: [data.json](data.json), HDR histograms: [histograms.hlog](histograms.hlog).",
    ]
    for part in parts:
        lines += section_markdown(part)
    return "\n".join(lines) + "\n"


def section_markdown(part: Section) -> list[str]:
    """One section as Markdown lines: its heading, table, note and plot."""
    lines = ["", f"## {part.title}", ""]
    lines.append("| " + " | ".join(part.headers) + " |")
    lines.append(
        "|" + "".join(" :--- |" if _text(part, i) else " ---: |" for i in range(len(part.headers)))
    )
    for row in part.rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    if part.note:
        lines += ["", part.note]
    if part.plot:
        lines += ["", f"![{part.title}]({part.plot})"]
    return lines


def part_markdown(name: str, result: Mapping[str, Any], command: str) -> str:
    """``twopc bench NAME`` of a further part (scenarios.bench.parts): its sections alone."""
    lines = [f"# twopc bench {name}", "", f"Command: `{command}`"]
    for section in bench_parts.part(name).sections(result):
        lines += section_markdown(section)
    return "\n".join(lines) + "\n"


def render_html(data: Mapping[str, Any], parts: Sequence[Section]) -> str:
    e = html.escape
    body = [
        "<h1>twopc: 2PC against the outbox, CDC and the naive dual write</h1>",
        f"<p>Command: <code>{e(data['command'])}</code> — {e(data['started_iso'])}, "
        f"{data['seconds']:.0f} s{' (quick run)' if data['quick'] else ''}</p>",
        '<p>Raw data: <a href="data.json">data.json</a>, HDR histograms: '
        '<a href="histograms.hlog">histograms.hlog</a></p>',
    ]
    for part in parts:
        body.append(f"<h2>{e(part.title)}</h2>")

        def cls(i: int, part: Section = part) -> str:
            return " class=text" if _text(part, i) else ""

        body.append(
            "<table><tr>"
            + "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(part.headers))
            + "</tr>"
        )
        for row in part.rows:
            body.append(
                "<tr>" + "".join(f"<td{cls(i)}>{e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
            )
        body.append("</table>")
        if part.note:
            body.append(f"<p class=note>{e(part.note)}</p>")
        if part.plot:
            body.append(f'<img src="{e(part.plot)}" alt="{e(part.title)}">')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .5em;text-align:right}td.text,th.text{text-align:left}"
        ".note{color:#555;font-size:.9em}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>twopc report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
