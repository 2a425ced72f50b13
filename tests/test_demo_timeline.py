"""benchmarks/demo_timeline.py on a constructed Snakemake log: job-minutes and thread-minutes
per rule as computed by hand, unfinished jobs left out, both Snakemake's finish-line formats."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_timeline", REPO / "benchmarks" / "demo_timeline.py")
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)

LOG = """\
Building DAG of jobs...
Job stats:
job                   count
train_label_vae           1

[Mon Dec  7 01:00:00 2026]
localrule preprocess_subject:
    input: a.nii.gz
    jobid: 3
    wildcards: subject=demo001
    resources: tmpdir=/tmp
Shell command: None
Select jobs to execute...
2026-12-07 01:00:01,000 INFO brainsynth: a line a script wrote
[Mon Dec  7 01:00:00 2026]
rule train_label_vae:
    jobid: 7
    threads: 2
    resources: tmpdir=/tmp, runtime=60
[Mon Dec  7 01:03:00 2026]
Finished jobid: 3 (Rule: preprocess_subject)
1 of 4 steps (25%) done

[Mon Dec  7 01:03:00 2026]
localrule preprocess_subject:
    jobid: 4
    wildcards: subject=demo002
[Mon Dec  7 01:04:30 2026]
Finished job 4.
[Mon Dec  7 01:10:00 2026]
Finished jobid: 7 (Rule: train_label_vae)
[Mon Dec  7 01:10:00 2026]
localrule plan_nnunet:
    jobid: 9
"""


def test_timeline_per_rule_by_hand(tmp_path):
    jobs = timeline.parse_jobs(LOG.splitlines(keepends=True))
    assert set(jobs) == {3, 4, 7, 9}
    assert jobs[7]["threads"] == 2 and jobs[3]["threads"] == 1
    assert jobs[9]["end"] is None  # started, never finished
    rows, totals = timeline.summarise(jobs)
    by_rule = {r["rule"]: r for r in rows}
    assert rows[0]["rule"] == "train_label_vae"  # largest thread-minutes first
    assert by_rule["train_label_vae"]["job_min"] == pytest.approx(10.0)
    assert by_rule["train_label_vae"]["thread_min"] == pytest.approx(20.0)
    assert by_rule["preprocess_subject"]["jobs"] == 2
    assert by_rule["preprocess_subject"]["job_min"] == pytest.approx(3.0 + 1.5)
    assert "plan_nnunet" not in by_rule
    assert totals == {"jobs": 3, "unfinished": 1, "wall_min": pytest.approx(10.0),
                      "job_min": pytest.approx(14.5), "thread_min": pytest.approx(24.5)}


def test_timeline_command_line(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    timeline.main([str(log), "--cores", "2"])
    out = capsys.readouterr().out
    assert "3 jobs finished (1 unfinished), wall 10.0 min, 14.5 job-minutes, 24.5 thread-minutes" in out
    assert "no less than 12.2 min" in out
    (tmp_path / "empty.log").write_text("Building DAG of jobs...\n")
    with pytest.raises(SystemExit, match="no finished Snakemake job"):
        timeline.main([str(tmp_path / "empty.log")])
