"""The core figures of two revisions side by side, in one run: did a change move them?

    python -m bench.revisions --base <rev>               # the working tree against <rev>
    python -m bench.revisions --base <rev> --head <rev>  # two commits
    python -m bench.revisions --base <rev> --rounds 5

Each revision is checked out in a temporary git worktree (the working tree is used as it
is when no ``--head`` is given: leave it alone meanwhile). Each round runs
``python -m bench.core --quick`` once for the base and once for the head, in turn, each
in its own tree (its own ``reliable``; the same harness if ``bench/`` did not change);
the report gives the median of each figure per side and their ratio (head / base).
Results go to ``bench/results/revisions.json``. PostgreSQL: ``BENCH_POSTGRES_URL`` (as
for ``bench.core``) with ``_revisions_base`` and ``_revisions_head`` appended to its
database name, one scratch database per side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/reliable_bench"
)
FIGURES = [
    ("enqueue", "jobs/s", lambda r: r["enqueue"]["reliable"]),
    ("drain", "jobs/s", lambda r: r["drain"]["reliable"]),
    ("wake-up p50", "ms", lambda r: r["wakeup"]["reliable_p50"]),
]


def run_core(tree: Path, database: str) -> dict[str, Any]:
    # Each side has a PostgreSQL database of its own: their schemas may differ.
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_POSTGRES_URL": database}
    subprocess.run(
        [sys.executable, "-m", "bench.core", "--quick"],
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, Any] = json.loads(
        (tree / "bench" / "results" / "core-quick.json").read_text()
    )["results"]
    return results


def checkout(revision: str, where: Path, trees: list[Path]) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), revision],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    trees.append(where)
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.revisions", description=__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--head", default=None, help="default: the working tree")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    parser_head = args.head
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="reliable-revisions-") as scratch:
        trees: list[Path] = []
        base = checkout(args.base, Path(scratch) / "base", trees)
        head = checkout(parser_head, Path(scratch) / "head", trees) if parser_head else ROOT
        try:
            for round_number in range(args.rounds):
                print(f"round {round_number + 1} of {args.rounds}", file=sys.stderr, flush=True)
                runs["base"].append(run_core(base, f"{POSTGRES}_revisions_base"))
                runs["head"].append(run_core(head, f"{POSTGRES}_revisions_head"))
        finally:
            for tree in trees:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
                )
    report: dict[str, Any] = {
        "base": args.base,
        "head": args.head or "working tree",
        "rounds": args.rounds,
        "figures": {},
    }
    print(f"{'database':<11} {'figure':<20} {'base':>10} {'head':>10} {'head / base':>12}")
    for database in runs["head"][0]:
        for name, unit, read in FIGURES:
            before = statistics.median(read(run[database]) for run in runs["base"])
            after = statistics.median(read(run[database]) for run in runs["head"])
            ratio = after / before if before else float("nan")
            label = f"{name}, {unit}"
            report["figures"][f"{database} {name}"] = {
                "unit": unit,
                "base": before,
                "head": after,
                "ratio": ratio,
                "base_runs": [read(run[database]) for run in runs["base"]],
                "head_runs": [read(run[database]) for run in runs["head"]],
            }
            print(f"{database:<11} {label:<20} {before:>10,.1f} {after:>10,.1f} {ratio:>12.3f}")
    out = ROOT / "bench" / "results" / "revisions.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
