"""Draw a `report.Report`: the three figures as PNG bytes (matplotlib, Agg) and one self-contained HTML page.

The figures are `matplotlib.figure.Figure`s on their own Agg canvas, never pyplot's, so no display, GUI
backend or global state is involved. The page embeds them as data URIs and names nothing outside itself
(no script, font, style sheet or link), and its Content-Security-Policy lets it load images from data URIs
only, so it opens from disk, offline, exactly as it was written.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from rloopd.report import Report, best_record

COLORS = [f"C{i}" for i in range(10)]
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas: no pyplot, no global backend switched under a caller's feet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def curves_png(report: Report) -> bytes:
    """Best-so-far metric per step: per condition the median line, the 25-75 % band, and the single best run
    dashed with a star at its best value."""
    from matplotlib.ticker import MaxNLocator

    s = report.summary
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    for i, (cond, records) in enumerate(report.conditions.items()):
        color, bands = _color(i), s["conditions"][cond]["curve"]
        steps = [b["step"] for b in bands]
        ax.fill_between(steps, [b["q1"] for b in bands], [b["q3"] for b in bands], color=color, alpha=0.2, lw=0)
        ax.plot(steps, [b["median"] for b in bands], color=color, lw=2, label=f"{cond} (n={len(records)})")
        best = best_record(records)
        if best is not None:
            pts = [(step, v) for step, v in enumerate(best.curve) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.2, ls="--")
            ax.plot([best.best_step], [best.final_best], marker="*", ms=16, color=color, mec="black", mew=0.8,
                    ls="none")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(f"best-so-far {s['metric']} ({'lower' if s['direction'] == 'minimize' else 'higher'} is better)")
    ax.set_title("median (line), 25-75 % (band), best run (dashed, star at its best)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)


def runs_png(report: Report) -> bytes:
    """Box plots per condition, one dot per run: accepted-change %, restarts, valid experiments (with the
    theoretical maximum for the window as a dashed line where it is defined)."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    conds = list(report.conditions)
    fig = _figure(max(10.0, 3.2 * len(conds) + 4), 4.4)
    axes = fig.subplots(1, 3)
    panels = [("accepted changes (%)", lambda r: r.accepted_pct), ("restarts", lambda r: r.restarts),
              ("valid experiments", lambda r: r.valid)]
    rng = np.random.default_rng(0)  # the dots' jitter: the same report draws the same picture
    positions = list(range(1, len(conds) + 1))
    for ax, (title, value) in zip(axes, panels, strict=True):
        data = [[value(r) for r in report.conditions[c]] for c in conds]
        ax.boxplot(data, positions=positions, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for i, (pos, vals) in enumerate(zip(positions, data, strict=True)):
            ax.plot(pos + rng.uniform(-0.12, 0.12, len(vals)), vals, "o", color=_color(i), alpha=0.8, ms=5)
        ax.set_xticks(positions)
        labels = [c.replace(" · ", "\n") for c in conds]  # a generated name, one part a line
        ax.set_xticklabels(labels, rotation=20 if max(len(x) for c in labels for x in c.split("\n")) > 8 else 0)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if title == "accepted changes (%)":
            ax.set_ylim(-5, 105)
        else:  # counts: whole numbers, from 0, with room above the highest (or the theoretical maximum)
            tops = [max(v, default=0) for v in data] + [report.summary["conditions"][c]["theoretical_max"] or 0
                                                        for c in conds]
            ax.set_ylim(-0.5, max(max(tops), 1) * 1.08 + 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[2]
    drawn = False
    for pos, cond in zip(positions, conds, strict=True):
        top = report.summary["conditions"][cond]["theoretical_max"]
        if top is not None:
            ax.hlines(top, pos - 0.35, pos + 0.35, colors="black", linestyles="--",
                      label=None if drawn else "theoretical max")
            drawn = True
    if drawn:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.set_xlabel("no theoretical max:\nstep budget or no window", fontsize=8)
    return _png(fig)


def idea_order(report: Report) -> list[str]:
    """Categories by mean improvement over all conditions (largest first), those that never paid off last."""
    gains: dict[str, list[float]] = {}
    for records in report.conditions.values():
        for r in records:
            for cat, c in r.categories.items():
                gains.setdefault(cat, []).extend(g for g in c["improvements"] if g is not None)
    return sorted(gains, key=lambda c: (not gains[c], -(sum(gains[c]) / len(gains[c])) if gains[c] else 0, c))


def ideas_png(report: Report) -> bytes:
    """Per category and condition, the share of runs in which the category improved on the best, annotated
    with the mean improvement of its accepted experiments."""
    s = report.summary
    cats = idea_order(report)
    conds = list(report.conditions)
    fig = _figure(max(7.0, 1.1 * len(cats) * max(1, len(conds)) / 1.5 + 3), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(conds))
    for i, cond in enumerate(conds):
        ideas = s["conditions"][cond]["ideas"]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(cats))]
        heights = [100.0 * ideas[c]["share"] if c in ideas else 0.0 for c in cats]
        ax.bar(xs, heights, width=width * 0.95, color=_color(i), label=cond)
        for x, h, c in zip(xs, heights, cats, strict=True):
            gain = ideas.get(c, {}).get("mean_improvement")
            if h > 0 and gain is not None:
                ax.annotate(f"{gain:.3g}", (x, h), xytext=(0, 3), textcoords="offset points", ha="center",
                            fontsize=8)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20 if cats and max(map(len, cats)) > 10 else 0)
    ax.set_ylim(0, 112)
    ax.set_ylabel("runs it improved the best in (%)")
    ax.set_title(f"ideas that paid off (label: mean {s['metric']} improvement per accepted change)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if not cats:
        ax.text(0.5, 0.5, "no experiments", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


# --- the page -------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 6) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _spread(d: dict[str, Any]) -> str:
    if d["median"] is None:
        return "—"
    return f"{_fmt(d['median'], 4)} [{_fmt(d['q1'], 4)}, {_fmt(d['q3'], 4)}]"


SUMMARY_HEAD = ["condition", "agent", "program", "memory", "search space", "runs", "median final best", "IQR",
                "best run", "accepted %", "restarts", "valid experiments", "theoretical max"]


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The summary table (`SUMMARY_HEAD`), one row of text per condition (the page's, and `rloopd report`'s
    own). A condition's agent, program, memory policy and search space are what its runs were made with."""
    rows = []
    for cond, c in summary["conditions"].items():
        best = c["best_run"]
        rows.append([cond, *(c.get(k) or "—" for k in ("agent", "program", "memory_policy", "search_space")),
                     str(len(c["runs"])), _fmt(c["median_final_best"]), _fmt(c["iqr"], 4),
                     "—" if best is None else f"{best['name']}: {_fmt(best['value'])} (step {best['step']})",
                     _spread(c["accepted_pct"]), _spread(c["restarts"]), _spread(c["valid_experiments"]),
                     _fmt(c["theoretical_max"])])
    return rows


def lineage_text(row: dict[str, Any]) -> str:
    if not row["lineage"]:
        return "new run"
    return " → ".join(f"{x.get('name') or x['run']} ({x['run'][:12]}) @ step {x['step']}" for x in row["lineage"]) \
        + f" → {row['name']}"


def html_page(report: Report, images: dict[str, bytes]) -> str:
    """The report as one HTML document with the figures inline."""
    s = report.summary
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>rloopd report{esc(': ' + s['batch']) if s['batch'] else ''}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;height:auto}"
        "figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}.q{font-size:1.2em;font-style:italic}"
        "code{font-size:.9em}</style></head><body>",
        "<h1>rloopd report</h1>",
        f"<p class=\"q\">{esc(s['question']) if s['question'] else 'No question was given.'}</p>",
        f"<p>Metric <code>{esc(s['metric'])}</code> ({esc(s['direction'])}); "
        + (f"batch <code>{esc(s['batch'])}</code>; " if s["batch"] else "")
        + f"{len(s['runs'])} runs in {len(s['conditions'])} conditions; read from the event log up to seq "
        f"{s['log_seq']}.</p>",
        "<h2>Summary</h2>",
        "<p>Per condition: what its runs were made with (agent, program, memory policy, search space: a "
        "preset's name, else the editable globs and regions), and over its runs the final best (median, IQR), "
        "the best run, and median [25 %, 75 %] of the accepted-change rate, the restarts and the valid "
        "experiments per run.</p>",
        _table(SUMMARY_HEAD, summary_rows(s)),
    ]
    if s["comparisons"]:
        parts += [f"<h2>Against the baseline ({esc(s['baseline'])})</h2>",
                  f"<p>Difference of the {esc(s['statistic'])} final best (condition − baseline), its "
                  f"{int(s['bootstrap']['confidence'] * 100)} % bootstrap interval ({s['bootstrap']['resamples']} "
                  f"resamples, seed {s['bootstrap']['seed']}), and the two-sided Mann-Whitney U test.</p>",
                  _table(["condition", "difference", "95 % interval", "U", "p"],
                         [[c["condition"], _fmt(c["difference"]), f"[{_fmt(c['ci'][0])}, {_fmt(c['ci'][1])}]",
                           _fmt(c["u"]), _fmt(c["p_value"], 4)] for c in s["comparisons"]])]
    captions = {
        "curves.png": "Best-so-far metric per step: median over the runs that reached the step (line), "
                      "25-75 % (band), and the single best run (dashed) with a star at its best value.",
        "runs.png": "Per run (dots) and condition (boxes): accepted changes over experiments, restarts (sessions "
                    "opened after the agent ended one), and valid experiments against the theoretical maximum "
                    "for the window (dashed, where the budget is a time budget).",
        "ideas.png": "Per idea category: the share of runs in which an accepted experiment of that category "
                     "improved on the best, labelled with the mean improvement per accepted change.",
    }
    parts.append("<h2>Figures</h2>")
    for name, data in images.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{esc(name)}" data-name="{esc(name)}">'
                     f"<figcaption>{esc(name)}: {esc(captions.get(name, ''))}</figcaption></figure>")
    parts += ["<h2>Runs</h2>", _table(
        ["run", "name", "condition", "agent", "memory", "search space", "final best (step)", "experiments",
         "valid", "accepted %", "restarts", "lineage"],
        [[r["run"], r["name"], r["condition"], r["agent"], r["memory_policy"], r["search_space"],
          f"{_fmt(r['final_best'])} ({_fmt(r['best_step'])})",
          str(r["experiments"]), str(r["valid"]), f"{r['accepted_pct']:.1f}", str(r["restarts"]), lineage_text(r)]
         for r in s["runs"]])]
    if s["skipped"]:
        parts += ["<h2>Not yet reported</h2>", _table(["run", "name", "condition", "why"],
                                                       [[x["run"], x["name"], x["condition"], x["reason"]]
                                                        for x in s["skipped"]])]
    parts += ["<details><summary>summary.json</summary><pre>"
              + esc(json.dumps(s, indent=1, ensure_ascii=False)) + "</pre></details>", "</body></html>"]
    return "\n".join(parts) + "\n"
