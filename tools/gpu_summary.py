#!/usr/bin/env python
"""Summarise a GPU check run (scripts/gpu_check.sh): pytest's JUnit XML plus the figures the checks wrote.

    python tools/gpu_summary.py --junit OUT/junit.xml --results OUT/results.json --out OUT

writes ``OUT/summary.json`` (environment, one entry per test with its outcome, time and skip or failure reason,
and the recorded figures) and ``OUT/summary.txt`` (the same as readable tables), and prints the text.
Exit status 0 even when tests failed: the summary reports them; the check's own exit status says pass or fail.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional


def read_junit(path: Path) -> list[dict]:
    """One dict per test case: ``name``, ``outcome`` (passed, failed, error, skipped), ``seconds``, ``message``."""
    if not path.is_file():
        return []
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip()
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        tests.append({"name": f"{module}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0.0), 2), "message": message})
    return tests


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return "" if value is None else str(value)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def summarise(junit: Path, results: Path, setup: Optional[dict] = None) -> dict:
    data = json.loads(results.read_text()) if results.is_file() else {"environment": {}, "checks": {}}
    tests = read_junit(junit)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"setup": setup or {}, "environment": data.get("environment", {}), "counts": counts, "tests": tests,
            "checks": data.get("checks", {}), "junit": str(junit), "results": str(results)}


def render(summary: dict) -> str:
    parts = ["GPU check summary", ""]
    env = {**summary["setup"], **summary["environment"]}
    if env:
        parts += [table([[k, _cell(v)] for k, v in sorted(env.items())], ["environment", "value"]), ""]
    c = summary["counts"]
    parts.append(f"tests: {c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped")
    if summary["tests"]:
        rows = [[t["name"], t["outcome"], f"{t['seconds']:.1f}", t["message"].splitlines()[0][:90] if t["message"]
                 else ""] for t in summary["tests"]]
        parts += ["", table(rows, ["test", "outcome", "s", "reason"])]
    else:
        parts += ["", "no test results (pytest did not run or wrote no JUnit XML)"]
    if summary["checks"]:
        rows = []
        for check, figures in sorted(summary["checks"].items()):
            for key, value in sorted(figures.items()):
                if key != "log_tail":
                    rows.append([check, key, _cell(value)])
        parts += ["", table(rows, ["check", "figure", "value"])]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True, help="pytest --junitxml file")
    parser.add_argument("--results", type=Path, required=True, help="figures written by tests/gpu")
    parser.add_argument("--out", type=Path, required=True, help="directory for summary.json and summary.txt")
    parser.add_argument("--setup", action="append", default=[], metavar="KEY=VALUE",
                        help="facts of the set-up to include (repeatable)")
    parser.add_argument("--exit-status", type=int, default=None, help="pytest's exit status, recorded")
    args = parser.parse_args(argv)
    setup = dict(item.split("=", 1) for item in args.setup)
    if args.exit_status is not None:
        setup["pytest_exit_status"] = args.exit_status
    summary = summarise(args.junit, args.results, setup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    text = render(summary)
    (args.out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
