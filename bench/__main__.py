"""``python -m bench [--quick] [--only drift,burst,...] [--write-results]``.

Runs each figure in its own child process, prints one table (every figure beside its baseline
measured in the same run, and the ratio) and, with ``--write-results``, rewrites
bench/RESULTS.md with the table, the command, the machine and each figure's notes.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import DEFAULT, FIGURES
from bench.common import REPO, Result, compile_bytecode, machine, markdown_table, text_table

RESULTS = REPO / "bench" / "RESULTS.md"
# Everything from this heading on in RESULTS.md is kept when the table is rewritten.
KEPT = "## History and diagnosis"
# Lines of a failed figure's standard error kept in its note.
FAILURE_LINES = 15


def _child(name: str, quick: bool, out: Path) -> None:
    module_name, function = FIGURES[name].split(":")
    module = importlib.import_module(f"bench.{module_name}")
    result: Result = getattr(module, function)(quick)
    out.write_text(json.dumps(result.to_json()))


def _run_figure(name: str, quick: bool) -> Result:
    with tempfile.TemporaryDirectory(prefix="nanobot-bench-out-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--child", name, "--out", str(out)]
        if quick:
            cmd.append("--quick")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        started = time.monotonic()
        # The child's standard error is copied through as it comes, and its last lines kept:
        # a figure that fails says why in RESULTS.md, not only on a terminal long closed.
        tail: collections.deque[str] = collections.deque(maxlen=FAILURE_LINES)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())
        returncode = proc.wait()
        elapsed = time.monotonic() - started
        if returncode != 0 or not out.exists():
            result = Result(name)
            result.notes.append(
                f"**{name} failed** (exit code {returncode}); the last lines of its standard "
                "error:\n\n```\n" + "\n".join(tail) + "\n```"
            )
            return result
        result = Result.from_json(json.loads(out.read_text()))
        result.settings["wall_s"] = round(elapsed, 1)
        return result


def _write_results(
    results: list[Result], command: str, started: datetime, before: dict[str, str]
) -> None:
    rows = [r for res in results for r in res.rows]
    after = machine()
    if after["nanobot commit"] != before["nanobot commit"]:
        before["nanobot commit"] += f" (at the end of the run: {after['nanobot commit']})"
    kept = ""
    if RESULTS.exists() and KEPT in (old := RESULTS.read_text()):
        kept = old[old.index(KEPT) :]
    lines = [
        "# Benchmark results",
        "",
        "The latest table written by `python -m bench --write-results`. Each figure runs in its "
        "own process; every value is compared with its baseline measured in the same run, on "
        "fresh SQLite files in a temporary directory. Absolute times on a shared 2-core machine "
        "are noisy; the ratios are what count. See bench/README.md for what each figure means.",
        "",
        f"Command: `{command}`  ",
        f"Run: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| machine | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in before.items()],
        "",
        "## Table",
        "",
        markdown_table(rows),
        "",
        "## Settings",
        "",
        *[f"- {res.figure}: `{json.dumps(res.settings)}`" for res in results],
        "",
    ]
    for res in results:
        if res.notes:
            lines += [f"## Notes: {res.figure}", "", *[n + "\n" for n in res.notes]]
    text = "\n".join(lines).rstrip() + "\n"
    RESULTS.write_text(text + ("\n" + kept if kept else ""))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller settings, each < 1 min")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(FIGURES)}")
    parser.add_argument("--all", action="store_true", help="every figure, in-process ones too")
    parser.add_argument("--write-results", action="store_true", help="rewrite bench/RESULTS.md")
    parser.add_argument("--verbose", action="store_true", help="print every figure's notes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.quick, Path(args.out))
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(
        FIGURES if args.all else DEFAULT
    )
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    started = datetime.now(UTC)
    before = machine()
    compile_bytecode()
    results = []
    for name in names:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        res = _run_figure(name, args.quick)
        print(f"== {name}: {res.settings.get('wall_s', '?')} s", file=sys.stderr, flush=True)
        results.append(res)
    print(text_table([r for res in results for r in res.rows]))
    for res in results:
        for note in res.notes:
            if note.startswith("**") or "--verbose" in sys.argv:
                print(f"[{res.figure}] {note}")
    if args.write_results:
        command = "python -m bench" + " ".join(["", *sys.argv[1:]])
        _write_results(results, command, started, before)
        print(f"wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
