"""Where a Snakemake run's time went: wall time, job-minutes and thread-minutes per rule.

Reads the log Snakemake writes (``.snakemake/log/<date>.snakemake.log``, or the captured output
of ``make demo``) and prints, per rule, the jobs, their job-minutes (wall time of each job,
summed) and thread-minutes (job-minutes times the job's threads), largest first, with the run's
wall time from the first job's start to the last job's end. On a machine with ``--cores N`` a
run whose jobs get the threads they declare can take no less than its thread-minutes / N: the
figure says whether a shorter run needs less work or a better schedule (with these thread
counts; a job on two threads does not use them twice as well as on one). A log holding several
invocations (a rerun appended to the same file) counts each one's jobs; a retried job counts its
last attempt.

    python benchmarks/demo_timeline.py .snakemake/log/2026-12-07T015901.167521.snakemake.log
"""

import argparse
import re
import sys
from datetime import datetime

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_THREADS = re.compile(r"^\s+threads: (\d+)$")
_FINISHED = re.compile(r"^Finished job(?:id:)? (\d+)")
_NEW_RUN = "Building DAG of jobs..."


def parse_jobs(lines):
    """``{(invocation, jobid): {"rule", "start", "end", "threads"}}`` from a Snakemake log's lines
    (jobs that never finished keep ``end`` None). A job's start is the time stamp above its
    ``rule`` block, its end the stamp above its ``Finished job`` line; job ids restart with each
    invocation ("Building DAG of jobs...")."""
    jobs, stamp, current, run = {}, None, None, 0
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith(_NEW_RUN):
            run += 1
            current = None
            continue
        m = _STAMP.match(line)
        if m:
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
            current = None
            continue
        m = _START.match(line)
        if m and stamp is not None:
            current = {"rule": m.group(1), "start": stamp, "end": None, "threads": 1}
            continue
        if current is not None:
            m = _JOBID.match(line)
            if m:
                jobs[(run, int(m.group(1)))] = current
                continue
            m = _THREADS.match(line)
            if m:
                current["threads"] = int(m.group(1))
                continue
            if not line.startswith(" "):
                current = None
        m = _FINISHED.match(line)
        if m and stamp is not None and (run, int(m.group(1))) in jobs:
            jobs[(run, int(m.group(1)))]["end"] = stamp
    return jobs


def summarise(jobs):
    """Per rule: jobs, job-minutes, thread-minutes (largest first), and the run's totals."""
    done = [j for j in jobs.values() if j["end"] is not None]
    per = {}
    for j in done:
        minutes = (j["end"] - j["start"]).total_seconds() / 60
        row = per.setdefault(j["rule"], {"rule": j["rule"], "jobs": 0, "job_min": 0.0, "thread_min": 0.0})
        row["jobs"] += 1
        row["job_min"] += minutes
        row["thread_min"] += minutes * j["threads"]
    rows = sorted(per.values(), key=lambda r: -r["thread_min"])
    wall = ((max(j["end"] for j in done) - min(j["start"] for j in done)).total_seconds() / 60) if done else 0.0
    totals = {"jobs": len(done), "unfinished": len(jobs) - len(done), "wall_min": wall,
              "job_min": sum(r["job_min"] for r in rows), "thread_min": sum(r["thread_min"] for r in rows)}
    return rows, totals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="a Snakemake log (.snakemake/log/*.snakemake.log or the run's captured output)")
    ap.add_argument("--cores", type=int, default=2, help="the run's --cores (for the lower bound)")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as f:
        rows, t = summarise(parse_jobs(f))
    if not t["jobs"]:
        sys.exit(f"{args.log}: no finished Snakemake job found (is it a Snakemake log?)")
    print(f"{t['jobs']} jobs finished ({t['unfinished']} unfinished), wall {t['wall_min']:.1f} min, "
          f"{t['job_min']:.1f} job-minutes, {t['thread_min']:.1f} thread-minutes: at {args.cores} cores "
          f"no less than {t['thread_min'] / args.cores:.1f} min of wall time")
    print(f"{'rule':40s} {'jobs':>5s} {'job-min':>8s} {'thread-min':>10s}")
    for r in rows:
        print(f"{r['rule']:40s} {r['jobs']:5d} {r['job_min']:8.1f} {r['thread_min']:10.1f}")


if __name__ == "__main__":
    main()
