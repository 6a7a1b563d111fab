"""The default test suite's time at two commits, test for test.

    python -m benchmarks.suite_time OLD_COMMIT [NEW_COMMIT] [--files GLOB] [--out benchmarks/results/suite_time]

Checks both commits out into temporary worktrees and runs their default suites (`pytest -m "not
slow"`, the default selection; older commits kept it in scripts/test.sh) one test file at a time, alternating the commits file by file
(the order rotated each file), with this interpreter and each worktree alone on PYTHONPATH. Load that
comes and goes then falls on both sides alike. Reported: the total time of the tests both commits
have (same node id), each side's own total, the slowest tests of each and the shared tests whose time
changed most (every shared test's pair of times is in the JSON). A test present at one commit only
is counted apart. `--files` restricts the run to the test files matching a glob (e.g.
'tests/fluxjax/test_sharding.py').
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]


def durations(junit: Path) -> dict[str, float]:
    """node id -> seconds (setup + call + teardown, as pytest's junit report counts a test case)."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        path = case.get("classname", "").replace(".", "/")
        out[f"{path}.py::{case.get('name')}"] = float(case.get("time", 0.0))
    return out


def run_file(tree: Path, test_file: str, junit: Path) -> tuple[float, dict[str, float], int]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", test_file], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, durations(junit) if junit.exists() else {}, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite_time", description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--files", default="tests/*/test_*.py", help="glob of the test files to run (default: all)")
    ap.add_argument("--out", default=str(common.RESULTS_DIR / "suite_time"))
    args = ap.parse_args(argv)
    args.old, args.new = (subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True,
                                         capture_output=True, text=True).stdout.strip() for rev in (args.old, args.new))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for side, rev in (("old", args.old), ("new", args.new)):
            trees[side] = Path(tmp) / side
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[side]), rev], check=True)
        try:
            files = {s: sorted(str(p.relative_to(t)) for p in t.glob(args.files)) for s, t in trees.items()}
            all_files = sorted(set(files["old"]) | set(files["new"]))
            wall = {"old": 0.0, "new": 0.0}
            tests = {"old": {}, "new": {}}
            failures = {"old": [], "new": []}
            for i, f in enumerate(all_files):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for side in order:
                    if f not in files[side]:
                        continue
                    w, d, rc = run_file(trees[side], f, Path(tmp) / f"{side}-{i}.xml")
                    wall[side] += w
                    tests[side].update(d)
                    if rc not in (0, 5):
                        failures[side].append(f)
                print(f"[{i + 1}/{len(all_files)}] {f}: " + ", ".join(
                    f"{s} {sum(v for k, v in tests[s].items() if k.startswith(f + '::')):.1f} s" for s in order), flush=True)
        finally:
            for t in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(t)], check=False)
    common_ids = sorted(set(tests["old"]) & set(tests["new"]))
    shared = {s: sum(tests[s][k] for k in common_ids) for s in tests}
    record = {"old": args.old, "new": args.new, "load_before": load_before, "load_after": os.getloadavg(),
              "environment": common.environment(), "files_wall_s": wall,
              "tests": {s: len(tests[s]) for s in tests}, "shared_tests": len(common_ids),
              "shared_tests_s": shared, "ratio_shared_new_over_old": shared["new"] / shared["old"] if shared["old"] else None,
              "total_tests_s": {s: sum(tests[s].values()) for s in tests}, "failures": failures,
              "slowest": {s: sorted(tests[s].items(), key=lambda kv: -kv[1])[:15] for s in tests},
              "shared_per_test_s": {k: [tests["old"][k], tests["new"][k]] for k in common_ids}}
    changed = sorted(common_ids, key=lambda k: -abs(tests["new"][k] - tests["old"][k]))[:15]
    md = [f"# Default suite time: {args.old} -> {args.new}", "",
          f"Load average before {load_before[0]:.2f}, after {record['load_after'][0]:.2f}; "
          f"{record['environment']['cpu']}, {record['environment']['cpu_count']} CPUs. Files ({args.files}) alternated "
          "between the commits.", "",
          common.markdown_table(["", "old", "new", "new / old"], [
              ["tests run", record["tests"]["old"], record["tests"]["new"], ""],
              [f"the {len(common_ids)} tests both have (s)", f"{shared['old']:.0f}", f"{shared['new']:.0f}",
               f"{record['ratio_shared_new_over_old']:.2f}" if record["ratio_shared_new_over_old"] else "-"],
              ["all tests (s)", f"{record['total_tests_s']['old']:.0f}", f"{record['total_tests_s']['new']:.0f}", ""],
              ["pytest processes, wall (s)", f"{wall['old']:.0f}", f"{wall['new']:.0f}", ""]])]
    md += ["", "Shared tests whose time changed most:", "", common.markdown_table(
        ["test", "old (s)", "new (s)"], [[k, f"{tests['old'][k]:.1f}", f"{tests['new'][k]:.1f}"] for k in changed])]
    if failures["old"] or failures["new"]:
        md += ["", f"Files with failures: old {failures['old']}, new {failures['new']}"]
    common.write_report(args.out, record, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
