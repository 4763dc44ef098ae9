"""How long the README's two commands take: ``make test`` (the fast suite), the whole suite that
``.ci/run`` runs, and ``make quickstart``.

    PYTEST_ARGS=--durations=0 bash .ci/run > ci.log          # every test, each one timed
    .venv/bin/python -m pytest -m "not slow" > fast.log      # optional: what `make test` runs
    python experiments/suite_timing.py --ci-log ci.log [--fast-log fast.log] [--quickstart]
        [--out experiments/results/suite_timing.md]

From ``--ci-log``: pytest's wall time, and each test's setup + call + teardown summed, split by the
``slow`` marker (``pytest --collect-only -m slow``), which ``make test`` deselects. Without
``--fast-log`` the fast suite's figure is the sum of its tests' durations inside the whole run
(collection and shared imports not counted). ``--quickstart`` times ``curriculax quickstart``
(what ``make quickstart`` runs once the environment is installed) in a subprocess.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_DURATION = re.compile(r"\s*([\d.]+)s (setup|call|teardown)\s+(\S+)")
_SUMMARY = re.compile(r"(\d+ (?:failed|passed)[^\n]*?) in ([\d.]+)s")


def test_durations(log: str) -> dict[str, float]:
    """Seconds per test id (setup + call + teardown) from a ``--durations=0`` log."""
    out = collections.Counter()
    for line in log.splitlines():
        m = _DURATION.match(line)
        if m:
            out[m.group(3)] += float(m.group(1))
    return dict(out)


def summary(log: str) -> tuple[str, float]:
    """``("785 passed, 13 skipped", wall seconds)`` from pytest's last summary line."""
    found = _SUMMARY.findall(log)
    if not found:
        raise SystemExit("no pytest summary line ('N passed ... in S s') in the log: pass the "
                         "output of a finished pytest run.")
    counts, wall = found[-1]
    return re.sub(r", \d+ warnings?", "", counts), float(wall)


def slow_ids() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow",
                          "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    return {line for line in out.stdout.split() if "::" in line}


def time_quickstart() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "curriculax.cli", "quickstart", f"--workdir={tmp}/qs"],
                       cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ci-log", required=True, help="pytest output of the whole suite, --durations=0")
    p.add_argument("--fast-log", help="pytest output of `make test` (-m 'not slow')")
    p.add_argument("--quickstart", action="store_true", help="also time `curriculax quickstart`")
    p.add_argument("--slow-ids", help="file of slow test ids (default: collect them with pytest)")
    p.add_argument("--source", default="", help="what the logs ran, e.g. 'fresh clone at abc1234'")
    p.add_argument("--out", default=str(REPO / "experiments/results/suite_timing.md"))
    args = p.parse_args(argv)

    ci_log = Path(args.ci_log).read_text()
    durations = test_durations(ci_log)
    if not durations:
        raise SystemExit(f"{args.ci_log} has no per-test durations: rerun with "
                         f"PYTEST_ARGS=--durations=0.")
    slow = (set(Path(args.slow_ids).read_text().split()) if args.slow_ids else slow_ids())
    fast = {k: v for k, v in durations.items() if k not in slow}
    counts, wall = summary(ci_log)
    rows = [{"command": "`.ci/run` (every test)", "tests": counts, "minutes": wall / 60}]
    if args.fast_log:
        fast_counts, fast_wall = summary(Path(args.fast_log).read_text())
        rows.append({"command": "`make test` (-m 'not slow')", "tests": fast_counts,
                     "minutes": fast_wall / 60})
    # pytest hides durations under 5 ms: the counts are of the tests it timed
    rows.append({"command": "`make test`'s tests inside the `.ci/run` log",
                 "tests": f"{len(fast)} timed", "minutes": sum(fast.values()) / 60})
    rows.append({"command": "slow tests inside the `.ci/run` log",
                 "tests": f"{len(durations) - len(fast)} timed",
                 "minutes": (sum(durations.values()) - sum(fast.values())) / 60})
    if args.quickstart:
        rows.append({"command": "`curriculax quickstart` (what `make quickstart` runs once "
                                "installed)", "tests": "", "minutes": time_quickstart() / 60})
    by_file = collections.Counter()
    for k, v in fast.items():
        by_file[k.split("::")[0]] += v
    files = [{"file": f, "minutes": v / 60} for f, v in by_file.most_common(8)]
    text = (report.header("Test suite and quickstart wall time",
                          {"logs": args.source or args.ci_log})
            + "\n" + report.table(rows, ["command", "tests", "minutes"])
            + "\nThe fast suite's heaviest files (minutes inside the `.ci/run` log):\n\n"
            + report.table(files, ["file", "minutes"]))
    report.write(args.out, text)


if __name__ == "__main__":
    main()
