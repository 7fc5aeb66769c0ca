"""Write the performance numbers in README.md and docs/performance.md from
bench/results.json.

In both files the part between ``<!-- performance -->`` and ``<!-- /performance -->``
is generated, never edited by hand. The README gets the summary: the machine and the
date, how to reproduce, a Markdown table of every row (ours against the seed policy,
round robin and the SGLang router where those apply) and a short legend.
docs/performance.md gets the same table with the full legend (how the SGLang router
was run), what the comparisons showed, and each row where ours misses its target or
is behind a comparison, with the reason the benchmark itself recorded.

    .venv/bin/python bench/report.py            # rewrite both sections
    .venv/bin/python bench/report.py --check    # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "README.md"
DOC = ROOT / "docs" / "performance.md"
DOC_LINK = "docs/performance.md"  # the README's link to DOC
BEGIN = "<!-- performance -->"
END = "<!-- /performance -->"
MARK = "⚠"

COMPARISONS = (
    ("seed_policy", "seed policy"),
    ("round_robin", "round robin"),
    ("sglang_router", "sglang-router"),
)
COLUMNS = ("scenario", "metric", "ours", "seed policy", "round robin", "sglang-router", "target")


def fmt(value: Any) -> str:
    """A number as a person reads it: thousands separated, about three significant
    digits below 100; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def fmt_target(target: str | None) -> str:
    """``">= 10000"`` as ``">= 10,000"``; no target as a dash."""
    if not target:
        return "—"
    op, _, number = target.strip().partition(" ")
    value = float(number)
    return f"{op} {fmt(int(value) if value.is_integer() else value)}"


def _meets(value: float, target: str) -> bool:
    op, _, number = target.strip().partition(" ")
    bound = float(number)
    return {
        ">=": value >= bound,
        ">": value > bound,
        "<=": value <= bound,
        "<": value < bound,
    }[op]


def problems(r: dict[str, Any]) -> list[str]:
    """What is wrong with a row: a failed benchmark, a missed target, a comparison
    that beats ours. Empty when the row is fine."""
    ours = r.get("ours")
    if ours is None:
        return ["no result"]
    found = []
    target = r.get("target")
    if target and not _meets(float(ours), target):
        found.append(f"misses its target {target} {r.get('unit', '')}".rstrip())
    better = r.get("better")
    for key, label in COMPARISONS:
        other = r.get(key)
        if other is None or better not in ("higher", "lower"):
            continue
        behind = ours < other if better == "higher" else ours > other
        if behind:
            found.append(f"behind {label} ({fmt(other)}; {better} is better)")
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _peer_legend(peer: dict[str, Any] | None) -> str:
    """The legend's sentence on the SGLang router column."""
    if not peer:
        return "*sglang-router*: the SGLang router; not run yet."
    if peer.get("install_error") or not peer.get("version"):
        why = peer.get("install_error") or "not installed"
        return f"*sglang-router*: the SGLang router, not measured in this run: {why}."
    d = peer.get("defaults") or {}
    settings = []
    if "retry_max_retries" in d:
        settings.append(
            f"up to {d['retry_max_retries']} attempts per request with backoff from "
            f"{d.get('retry_initial_backoff_ms')} ms"
        )
    if "cb_failure_threshold" in d:
        settings.append(
            f"a circuit breaker opening after {d['cb_failure_threshold']} failures for "
            f"{d.get('cb_timeout_duration_secs')} s"
        )
    if "health_check_interval_secs" in d:
        settings.append(
            f"a /health check every {d['health_check_interval_secs']} s (timeout "
            f"{d.get('health_check_timeout_secs')} s, {d.get('health_failure_threshold')} "
            "failures to eject)"
        )
    if "request_timeout_secs" in d:
        settings.append(f"a {d['request_timeout_secs']} s request timeout")
    if "balance_abs_threshold" in d:
        settings.append(
            f"cache_aware load balancing from {d['balance_abs_threshold']} extra requests in "
            f"flight (and {d.get('balance_rel_threshold')}x)"
        )
    told = "; ".join(settings) if settings else "its defaults"
    return (
        f"*sglang-router*: the SGLang router (`{peer.get('package', 'sglang-router')}` "
        f"{peer['version']} from PyPI, a benchmark dependency that `make bench` installs), "
        "on loopback in front of the same kind of fleet (the daemon supervising simulated "
        f"servers), launched as `{peer.get('launch', 'python -m sglang_router.launch_router')}`"
        f" with every other setting at its default: {told}. Ours is `ms_client.ModelServer` "
        "with the daemon at the contract's defaults."
    )


def _peer_short(peer: dict[str, Any] | None) -> str:
    """The README legend's words on the SGLang router column."""
    if not peer:
        return "*sglang-router*: the SGLang router, not run yet."
    if peer.get("install_error") or not peer.get("version"):
        return "*sglang-router*: the SGLang router, not measured in this run."
    return (
        f"*sglang-router*: the SGLang router (`{peer.get('package', 'sglang-router')}` "
        f"{peer['version']}) at its defaults, in front of the same kind of fleet."
    )


def _head(results: dict[str, Any]) -> list[str]:
    """What was measured, where and when, and how to measure it again."""
    return [
        "Servers here are simulated SGLang servers (`python -m supervisord_ms.sim`) on "
        "simulated GPUs (the `file:` GPU view): the numbers measure the supervisor, the API "
        "and the selection policies, not SGLang or a model.",
        "",
        f"Machine: {results.get('machine', 'unknown')}. Date: {results.get('date', 'unknown')}. "
        "Reproduce: `make bench` (every row, with its raw samples, is in "
        "`bench/results.json`).",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """Every row, ours marked where it misses its target or is behind a comparison."""
    lines = [
        "| " + " | ".join(COLUMNS) + " | unit |",
        "|---|---|---:|---:|---:|---:|---|---|",  # words left, numbers right
    ]
    for r in rows:
        ours = fmt(r.get("ours"))
        if problems(r):
            ours = f"{ours} {MARK}"
        cells = [
            r.get("scenario", ""),
            r.get("metric", ""),
            ours,
            fmt(r.get("seed_policy")),
            fmt(r.get("round_robin")),
            fmt(r.get("sglang_router")),
            fmt_target(r.get("target")),
            r.get("unit", ""),
        ]
        lines.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return lines


SEED_LEGEND = (
    "*seed policy*: the seed's rules (the fastest latest sample, no memory or margin; "
    "re-select on one request slower than 2x the latency at selection) replayed on the "
    "same trace. *round robin*: requests dealt in turn."
)


def render_readme(results: dict[str, Any]) -> str:
    """The README's summary (markers excluded): the rows with a target and a short
    legend that sends the reader to docs/performance.md for every row and the rest."""
    rows = results.get("rows", [])
    targeted = [r for r in rows if r.get("target")]
    rest = [r for r in rows if not r.get("target")]
    lines = [
        *_head(results),
        "",
        "The rows with a target:",
        "",
        *_table(targeted),
        "",
        f"{len(rest)} more rows ({sum(1 for r in rest if problems(r))} marked {MARK}) "
        f"compare ours with round robin, the seed's policy and sglang-router: "
        f"[{DOC_LINK}]({DOC_LINK}).",
        "",
    ]
    legend = (
        "— : does not apply. *seed policy*: the seed's rules replayed on the same trace. "
        "*round robin*: requests dealt in turn. " + _peer_short(results.get("sglang_router"))
    )
    if any(problems(r) for r in rows):
        legend += (
            f" {MARK}: misses its target or is behind a comparison. "
            f"[{DOC_LINK}]({DOC_LINK}) gives the reason for each {MARK}, how each "
            "comparison was run, and what the comparisons showed."
        )
    else:
        legend += f" How each comparison was run, and what it showed: [{DOC_LINK}]({DOC_LINK})."
    lines.append(legend)
    return "\n".join(lines)


def render_doc(results: dict[str, Any]) -> str:
    """docs/performance.md's generated part (markers excluded): the table, the full
    legend, what the comparisons showed, and why each marked row is marked."""
    rows = results.get("rows", [])
    lines = [
        *_head(results),
        "",
        *_table(rows),
        "",
        "— : does not apply. " + SEED_LEGEND + " " + _peer_legend(results.get("sglang_router")),
    ]
    remarks = [r for r in rows if r.get("remark")]
    if remarks:
        lines += ["", "### What the comparisons showed", ""]
        for r in remarks:
            lines.append(f"- **{r.get('scenario')}** — {_cell(str(r['remark']))}")
    flagged = [(r, problems(r)) for r in rows]
    flagged = [(r, issues) for r, issues in flagged if issues]
    if flagged:
        lines += ["", f"### {MARK} Rows that miss their target or are behind a comparison", ""]
        for r, issues in flagged:
            why = r.get("note") or "the benchmark gave no reason"
            lines.append(
                f"- **{r.get('scenario')}** — {r.get('metric')}: ours {fmt(r.get('ours'))} "
                f"{r.get('unit', '')}, {'; '.join(issues)}. Why: {why}"
            )
    return "\n".join(lines)


def render_text(rows: list[dict[str, Any]]) -> str:
    """A plain table for the terminal (run.py prints it)."""
    head = ("scenario", "metric", "ours", "seed", "rr", "router", "target", "unit", "")
    body = [
        (
            r.get("scenario", ""),
            r.get("metric", ""),
            fmt(r.get("ours")),
            fmt(r.get("seed_policy")),
            fmt(r.get("round_robin")),
            fmt(r.get("sglang_router")),
            fmt_target(r.get("target")),
            r.get("unit", ""),
            MARK if problems(r) else "",
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    widths[1] = min(widths[1], 70)

    def line(cells: tuple) -> str:
        out = []
        for i, c in enumerate(cells):
            text = str(c)
            if len(text) > widths[i]:
                text = text[: widths[i] - 1] + "…"
            out.append(text.ljust(widths[i]) if i < 2 or i >= 6 else text.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(head), *(line(b) for b in body)])


def updated_section(text: str, section: str, name: str = "README") -> str:
    """``text`` with the part between the markers replaced by ``section``."""
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{name} has no {BEGIN} ... {END} section")
    return text[: start + len(BEGIN)] + "\n" + section + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a generated section is out of date"
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    status = 0
    for path, render in ((args.readme, render_readme), (args.doc, render_doc)):
        text = path.read_text(encoding="utf-8")
        new = updated_section(text, render(results), str(path))
        if args.check:
            if new != text:
                print(f"{path}: performance section differs from {args.results}")
                status = 1
            else:
                print(f"{path}: performance section matches {args.results}")
        elif new != text:
            path.write_text(new, encoding="utf-8")
            print(f"{path}: performance section rewritten from {args.results}")
        else:
            print(f"{path}: performance section already up to date")
    return status


if __name__ == "__main__":
    sys.exit(main())
