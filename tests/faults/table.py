"""Render the fault suite's figures (bench/results/faults.json, written by ``make faults``)
as the README's "Reliability" section.

    python -m tests.faults.table                 # print the section
    python -m tests.faults.table --write README.md   # replace it in the README (before Benchmarks)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "faults.json"
HEADING = "## Reliability"
NEXT = "## Benchmarks"

INTRO = """\
`make faults` runs `tests/faults/` on a stack of its own: the six processes on embedded
Postgres, Redis and NATS that the suite starts itself, so it can kill and restart every one of
them. Each case runs under load and checks the outcome a user relies on; `make test` runs the
same cases at 2 % of the load (`FAULTS_SCALE=0.02`) so CI stays short. What is checked:

- **`kill -9` of each process mid-stream**, under its own load. A client sends events the
  careful way (a batch not answered `202` is sent again with the same event ids). Then every
  accepted event is counted exactly once, no customer is missing from the audience index,
  every member of a batch run has one contact in the history, and the SMS provider gets a
  message twice only if dispatch marked that message `in_doubt` (it was on the wire when
  dispatch died).
- **NATS, Redis and Postgres restarted under load.** Every process recovers by itself (the
  same process ids before and after) and nothing accepted is lost. While a dependency is
  down, answers are `503` problem+json with `Retry-After`, never `500`: pooled Postgres
  connections are pre-pinged, Redis commands are retried on a fresh connection, and one rule
  (`shared.db.is_transient`: connection errors, SQLSTATE classes 08, 53 and 57P) decides what
  is a 503 and what a consumer naks. Afterwards a batch run goes through the whole flow again.
- **A poison message on every consumer** (every subject a durable consumer reads) goes to
  its dead letter (`dlq.<consumer>`), and each consumer's ack floor moves past it.
- **Slow-loris and oversize requests at the gateway.** Headers that do not finish within
  `KAIROS_REQUEST_HEADER_TIMEOUT_S` (10 s; 5 s in the suite) get `408`, as does a body that
  keeps the server waiting over `KAIROS_REQUEST_BODY_IDLE_S` (10 s) for one chunk or, after
  `KAIROS_REQUEST_BODY_TIMEOUT_S` (60 s; 10 s in the suite) of waiting, averages under
  16 KiB/s (a large upload at a real rate is never cut short). A refused connection closes
  lingering, so the answer is not lost to a reset. A body over the limit gets `413` whether
  announced or chunked; headers over 64 kB get `431`. The gateway's memory (RSS) is measured before, during
  and after.
- **Two replicas of every process** (`decision#2` and so on): each batch page is sent once,
  each delayed trigger's timer fires once, and a contact cap of one SMS an hour holds while
  both gateways and both decision replicas take six triggering events per customer at once.
"""


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) if v else "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _outcome(c: dict[str, Any]) -> str:
    """The figures that matter for this case, in words."""
    name = c["case"]
    if name.startswith("kill -9"):
        parts = [f"lost {_fmt(c.get('lost', 0))}", f"counted twice {_fmt(c.get('duplicates', 0))}"]
        if c.get("in_doubt") not in (None, "n/a"):
            parts = [
                f"contacts lost {_fmt(c.get('lost', 0))}",
                f"provider duplicates {_fmt(c.get('duplicates', 0))}",
                f"marked in doubt {_fmt(c['in_doubt'])}",
                f"duplicates not in doubt {_fmt(c.get('duplicates_not_in_doubt', 0))}",
            ]
        parts.append(f"ready again in {_fmt(c.get('ready_s'))} s")
        if c.get("stalled_s"):
            parts.append(f"longest a batch waited for its 202 {_fmt(c['stalled_s'])} s")
        return "; ".join(parts)
    if name.startswith("restart"):
        errors = {
            k: v
            for k, v in c.get("answers", {}).items()
            if k.rpartition(":")[2].startswith("5") and k.rpartition(":")[2] != "503"
        }
        unavailable = sum(v for k, v in c.get("answers", {}).items() if k.endswith("503"))
        return (
            f"lost {_fmt(c.get('lost'))}; processes restarted: "
            f"{_fmt(c.get('restarted_processes'))}; server down {_fmt(c.get('server_down_s'))} s;"
            f" longest a batch waited for its 202 {_fmt(c.get('stalled_s'))} s; 503s {unavailable}, other"
            f" 5xx {sum(errors.values())}; run afterwards reached {_fmt(c.get('probe_reached'))}"
        )
    if name.startswith("poison"):
        return (
            f"dead-lettered {c['dead_lettered']} of {c['consumers']} consumers; stuck "
            f"{_fmt(c.get('stuck', []))}; events lost afterwards {_fmt(c.get('lost'))}"
        )
    if name.startswith("two replicas"):
        return (
            f"run: {_fmt(c['run_dispatched'])} of {_fmt(c['run_members'])} sent, duplicates "
            f"{_fmt(c['run_duplicates'])}; timers fired {_fmt(c['timers_fired'])}, twice "
            f"{_fmt(c['timers_twice'])}; most SMS to one capped customer "
            f"{_fmt(c['cap_max_per_customer'])}"
        )
    rss = c.get("rss_mb", {})
    return f"answers {_fmt(c.get('answers'))}; gateway RSS MB {_fmt(rss)}"


ORDER = ("kill -9", "restart", "poison", "slow-loris", "oversize", "two replicas")
PROCESS_ORDER = ("gateway", "profile", "selection", "decision", "dispatch", "feedback")


def _rank(case: dict[str, Any]) -> tuple[int, int]:
    name = str(case["case"])
    kind = next((i for i, k in enumerate(ORDER) if name.startswith(k)), len(ORDER))
    sub = next((i for i, p in enumerate(PROCESS_ORDER) if name.endswith(p)), 0)
    return kind, sub


def render(doc: dict[str, Any]) -> str:
    loads = doc["loads"]
    rows = "\n".join(
        f"| {c['case']} | {c.get('load', '')} | {_outcome(c)} |"
        for c in sorted(doc["cases"], key=_rank)
    )
    note = f"\n{doc['note']}\n" if doc.get("note") else ""
    return (
        f"{HEADING}\n\n{INTRO}\n"
        f"Figures of `{doc['command']}` ({doc['when']}, {doc['machine']}, load average at the"
        f" end {', '.join(str(x) for x in doc['loadavg_end'])}; loads: {loads['events']:,}"
        f" events, a {loads['batch']:,}-member batch, {loads['messages']:,} messages):\n\n"
        "| case | load | outcome |\n|---|---|---|\n"
        f"{rows}\n{note}\n"
        "Regenerate this section with `python -m tests.faults.table --write README.md`.\n"
    )


def write(readme: Path, section: str) -> None:
    text = readme.read_text()
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^{re.escape(NEXT)}\n)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        at = text.index(f"{NEXT}\n")
        text = text[:at] + section + "\n" + text[at:]
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--write", type=Path, help="replace the section in this README")
    args = ap.parse_args()
    section = render(json.loads(args.results.read_text()))
    if args.write:
        write(args.write, section)
    else:
        print(section)  # noqa: T201


if __name__ == "__main__":
    main()
