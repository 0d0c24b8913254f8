"""Render an :class:`AuditReport`: a terminal table, and a standalone HTML page with PNG plots.

The HTML embeds every plot as a ``data:image/png;base64`` URI (matplotlib's Agg canvas, no pyplot,
no global backend change) and escapes every string taken from the corpus, so a hostile member
name cannot inject markup.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from .problems import PROBLEM_KINDS, AuditReport

MAX_TEXT_ROWS_PER_KIND = 50


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _card_line(card: dict[str, Any] | None) -> str:
    if card is None:
        return "unreadable or missing"
    cond = card["conditioning"]
    cond_text = cond["kind"] + (f" ({cond['num_classes']} classes)" if cond.get("num_classes") else "")
    stages = ",".join(str(s) for s in card["stages"]) if card.get("stages") else "-"
    g = card["solver"]["guidance"]
    g_text = f"{g['min']}..{g['max']}" if isinstance(g, dict) else f"{g}"
    return (f"schema {card['schema_version']} | teacher {card['teacher']['kind']} "
            f"{card['teacher']['fingerprint'][:12]} | {card['solver']['name']} {card['solver']['num_steps']} steps, "
            f"guidance {g_text} | K={len(card['saved_sigmas'])} states of {card['sample_shape']} {card['dtype']} | "
            f"{cond_text} | stages {stages} | {card['num_trajectories']} trajectories, shard_size {card['shard_size']}")


def format_text(report: AuditReport) -> str:
    """The human report: summary, problems table (one full line per problem), statistics, result."""
    out: list[str] = []
    out.append(f"trajflow audit {report.url}")
    if report.fatal:
        out.append(f"  CANNOT AUDIT: {report.fatal_reason}")
        out.append("RESULT: the corpus cannot be read (exit 2)")
        return "\n".join(out) + "\n"
    stats = report.stats
    checks = report.checks
    shards = stats.get("shards", {})
    samples = stats.get("samples", {})
    out.append(f"  card      {_card_line(report.card)}")
    source = "per manifest.parquet" if stats.get("source") == "manifest" else "per the commit records, not finalized"
    out.append(f"  records   {report.num_shards} shards, {report.num_samples} samples, "
               f"{_bytes(shards.get('bytes_total'))} ({source}); {stats.get('objects', {}).get('count', 0)} objects "
               "under the root")
    deep = (f"deep: {samples.get('deep_checked', 0)} of {samples.get('in_tars', 0)} samples decoded"
            if checks.get("deep") else "not deep (samples not decoded)")
    replay = stats.get("replay")
    replay_text = f"replay: {replay['replayed']} samples" if replay and replay.get("available") else (
        "replay: unavailable" if replay else "no replay")
    out.append(f"  checked   {shards.get('count', 0)} shards read in full (size, sha256, tar members, keys, seeds); "
               f"{deep}; {replay_text}; {report.seconds:.1f}s")
    out.append("")
    if report.problems:
        out.append(f"PROBLEMS ({len(report.problems)})")
        kind_w = max(len("KIND"), *(len(p.kind) for p in report.problems))
        shard_w = max(len("SHARD"), *(len(p.shard or "-") for p in report.problems))
        out.append(f"  {'KIND':<{kind_w}}  {'SHARD':<{shard_w}}  DETAIL")
        shown: dict[str, int] = {}
        hidden = 0
        for p in report.problems:
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] > MAX_TEXT_ROWS_PER_KIND:
                hidden += 1
                continue
            out.append(f"  {p.kind:<{kind_w}}  {p.shard or '-':<{shard_w}}  {p.detail}")
        if hidden:
            out.append(f"  … {hidden} more (at most {MAX_TEXT_ROWS_PER_KIND} rows per kind here; --json lists all)")
        out.append("")
    else:
        out.append("PROBLEMS: none")
        out.append("")
    out.extend(_stats_text(stats))
    if report.notes:
        out.append("NOTES")
        out.extend(f"  - {n}" for n in report.notes)
        out.append("")
    if report.ok:
        out.append("RESULT: clean (exit 0)")
    else:
        n_shards = len({p.shard for p in report.problems if p.shard})
        kinds = ", ".join(f"{k} x{sum(1 for p in report.problems if p.kind == k)}"
                          for k in PROBLEM_KINDS if any(p.kind == k for p in report.problems))
        out.append(f"RESULT: {len(report.problems)} problem(s) in {n_shards} shard(s) and the corpus records "
                   f"[{kinds}] (exit 1)")
    return "\n".join(out) + "\n"


def _stats_text(stats: dict[str, Any]) -> list[str]:
    out = ["STATISTICS"]
    sh = stats.get("shards", {})
    if sh.get("count"):
        out.append(f"  shard sizes        min {_bytes(sh['bytes_min'])}, median {_bytes(sh['bytes_p50'])}, "
                   f"max {_bytes(sh['bytes_max'])}; {sh['samples_min']}..{sh['samples_max']} samples per shard")
    cond = stats.get("conditions", {})
    hist = cond.get("histogram") or {}
    if hist:
        total = sum(hist.values())
        top = max(hist.values())
        out.append(f"  conditions         {cond.get('kind')}: {cond.get('distinct')} distinct over {total} samples")
        for k, v in list(hist.items())[:20]:
            bar = "#" * max(1, round(30 * v / top))
            out.append(f"    {k:>12} {v:>8}  {bar}")
        if len(hist) > 20:
            out.append(f"    … {len(hist) - 20} more")
    g = stats.get("guidance", {})
    if g.get("count"):
        out.append(f"  guidance           min {_fmt(g['min'])}, mean {_fmt(g['mean'])}, max {_fmt(g['max'])}")
    norms = stats.get("norms_per_sigma") or []
    if norms:
        out.append("  norms per sigma    RMS of each saved state (per element)")
        out.append(f"    {'sigma':>8} {'mean':>9} {'std':>9} {'min':>9} {'max':>9}")
        for row in norms:
            out.append(f"    {row['sigma']:>8.4f} {row['mean']:>9.4f} {row['std']:>9.4f} {row['min']:>9.4f} "
                       f"{row['max']:>9.4f}")
    straight = stats.get("straightness") or []
    if straight:
        out.append("  straightness       per window: deviation of intermediate states from the straight segment")
        out.append("                     (relative to its length; mean / p95 / max) and path-length ratio (1 = straight)")
        for stage in straight:
            rows = stage["per_window"]
            if all(w["deviation_mean"] is None for w in rows):
                out.append(f"    stage {stage['windows']} windows: one saved interval per window, no intermediate states "
                           "(straight by construction)")
                continue
            out.append(f"    stage {stage['windows']} windows")
            for w in rows:
                span = f"{w['sigma_start']:.3f}->{w['sigma_end']:.3f}"
                if w["deviation_mean"] is None:
                    dev = "no intermediate saved states"
                else:
                    dev = (f"deviation {w['deviation_mean']:.4f} / {_fmt(w['deviation_p95'], 3)} / "
                           f"{w['deviation_max']:.4f}")
                out.append(f"      window {w['window']:>2} sigma {span}  {dev}; length ratio "
                           f"{_fmt(w['length_ratio_mean'], 5)}")
    rp = stats.get("replay")
    if rp:
        if rp.get("available"):
            verdict = "authentic and reproducible" if rp.get("authentic") else "NOT reproducible (see problems)"
            out.append(f"  replay             {rp['replayed']} samples re-solved on {rp['device']}: max deviation "
                       f"{_fmt(rp['max_deviation'], 3)} (tolerance {rp['tolerance']:g} for {rp['dtype']}): {verdict}")
        else:
            out.append(f"  replay             unavailable: {rp.get('reason')}")
    out.append("")
    return out


# --- HTML ------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plots(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, PNG data URI) for every plot the statistics allow."""
    from matplotlib.figure import Figure

    out: list[tuple[str, str]] = []
    straight = [s for s in stats.get("straightness") or [] if any(w["deviation_mean"] is not None
                                                                  for w in s["per_window"])]
    if straight:
        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        for stage in straight:
            rows = stage["per_window"][::-1]  # ascending sigma for stairs
            edges = [rows[0]["sigma_end"]] + [w["sigma_start"] for w in rows]
            line = ax.stairs([w["deviation_mean"] or 0.0 for w in rows], edges, lw=2,
                             label=f"{stage['windows']} windows: mean")
            ax.stairs([w["deviation_p95"] or 0.0 for w in rows], edges, ls="--", color=line.get_edgecolor(),
                      label=f"{stage['windows']} windows: p95")
        ax.invert_xaxis()
        ax.set_xlabel("sigma (1 = noise, 0 = data); each step is one window")
        ax.set_ylabel("deviation / segment length")
        ax.set_title("straightness per window")
        ax.legend(fontsize=8)
        out.append(("Straightness per window", _png(fig)))
    norms = stats.get("norms_per_sigma") or []
    if norms:
        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        s = [r["sigma"] for r in norms]
        m = [r["mean"] for r in norms]
        ax.plot(s, m, marker="o", label="mean")
        ax.fill_between(s, [r["mean"] - r["std"] for r in norms], [r["mean"] + r["std"] for r in norms], alpha=0.25,
                        label="±1 std")
        ax.plot(s, [r["min"] for r in norms], ls=":", c="gray", label="min/max")
        ax.plot(s, [r["max"] for r in norms], ls=":", c="gray")
        ax.invert_xaxis()
        ax.set_xlabel("sigma (1 = noise, 0 = data)")
        ax.set_ylabel("RMS of state")
        ax.set_title("norms per saved sigma")
        ax.legend()
        out.append(("Norms per sigma", _png(fig)))
    sh = stats.get("shards", {})
    if sh.get("count"):
        fig = Figure(figsize=(7, 2.8))
        ax = fig.add_subplot()
        edges, counts = sh["histogram"]["edges"], sh["histogram"]["counts"]
        ax.stairs(counts, [e / 1024 for e in edges], fill=True)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_xlabel("shard size (KiB)")
        ax.set_ylabel("shards")
        ax.set_title("shard size distribution")
        out.append(("Shard sizes", _png(fig)))
    hist = (stats.get("conditions") or {}).get("histogram") or {}
    if hist:
        fig = Figure(figsize=(7, 2.8))
        ax = fig.add_subplot()
        keys = list(hist)[:60]
        ax.bar(range(len(keys)), [hist[k] for k in keys])
        ax.set_xticks(range(len(keys)), keys, rotation=90 if len(keys) > 12 else 0, fontsize=7)
        ax.set_ylabel("samples")
        ax.set_title("conditions")
        out.append(("Conditions", _png(fig)))
    g = stats.get("guidance") or {}
    if g.get("count") and g.get("histogram"):
        fig = Figure(figsize=(7, 2.5))
        ax = fig.add_subplot()
        ax.stairs(g["histogram"]["counts"], g["histogram"]["edges"], fill=True)
        ax.set_xlabel("guidance scale")
        ax.set_ylabel("samples")
        ax.set_title("guidance")
        out.append(("Guidance", _png(fig)))
    rp = stats.get("replay") or {}
    if rp.get("available") and rp.get("samples"):
        fig = Figure(figsize=(7, 2.8))
        ax = fig.add_subplot()
        rows = rp["samples"]
        devs = [max(r["max_deviation"], 1e-12) for r in rows]
        ax.bar(range(len(rows)), devs, color=["tab:green" if r["ok"] else "tab:red" for r in rows])
        ax.axhline(rp["tolerance"], color="k", ls="--", label=f"tolerance {rp['tolerance']:g}")
        ax.set_yscale("log")
        if len(rows) <= 32:
            ax.set_xticks(range(len(rows)), [r["key"] for r in rows], rotation=90, fontsize=6)
        else:
            ax.set_xlabel(f"{len(rows)} replayed samples, by index")
        ax.set_ylabel("max |replay - stored| / scale")
        ax.set_title("teacher replay")
        ax.legend()
        out.append(("Teacher replay", _png(fig)))
    return out


def format_html(report: AuditReport) -> str:
    e = html.escape
    status = "clean" if report.ok else ("cannot be read" if report.fatal else f"{len(report.problems)} problem(s)")
    color = "#1a7f37" if report.ok else "#cf222e"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>trajflow audit {e(report.url)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;"
        "vertical-align:top}th{background:#f3f3f3}code{font-size:12px}.st{font-weight:bold;color:" + color + "}"
        "img{max-width:100%;border:1px solid #eee;margin:6px 0}</style></head><body>",
        f"<h1>trajflow audit</h1><p><code>{e(report.url)}</code></p>",
        f"<p class='st'>{e(status)} (exit {report.exit_status})</p>",
    ]
    if report.fatal:
        parts.append(f"<p>{e(report.fatal_reason or '')}</p></body></html>")
        return "\n".join(parts)
    parts.append(f"<p>Card: {e(_card_line(report.card))}</p>")
    parts.append(f"<p>{report.num_shards} shards, {report.num_samples} samples; checks: "
                 f"<code>{e(str(report.checks))}</code>; {report.seconds:.1f}s</p>")
    parts.append("<h2>Problems</h2>")
    if report.problems:
        parts.append("<table><tr><th>kind</th><th>shard</th><th>detail</th><th>path</th></tr>")
        for p in report.problems:
            parts.append(f"<tr><td title='{e(PROBLEM_KINDS[p.kind])}'><code>{e(p.kind)}</code></td>"
                         f"<td>{e(p.shard or '-')}</td><td>{e(p.detail)}</td><td><code>{e(p.path or '')}</code></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Statistics</h2><pre>" + e("\n".join(_stats_text(report.stats)[1:])) + "</pre>")
    for title, uri in plots(report.stats):
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='{uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: AuditReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_html(report))
