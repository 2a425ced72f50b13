"""benchmarks/demo_timeline.py on a constructed Snakemake log: job-minutes and thread-minutes
per rule as computed by hand, unfinished jobs left out, both Snakemake finish-line formats, a
second invocation in the same log whose job ids start again."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_timeline", REPO / "benchmarks" / "demo_timeline.py")
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)

# --cores 2: the two-thread VAE alone 01:00-01:10, then two one-thread jobs side by side; a
# second invocation reruns one job under the same id 3
LOG = """\
Building DAG of jobs...
Job stats:
job                   count
train_label_vae           1

[Mon Dec  7 01:00:00 2026]
rule train_label_vae:
    jobid: 7
    reason: Missing output files
    priority: 10
    threads: 2
    resources: tmpdir=/tmp, runtime=60
Shell command: None
2026-12-07 01:00:01,000 INFO brainsynth: a line a script wrote
[Mon Dec  7 01:10:00 2026]
Finished jobid: 7 (Rule: train_label_vae)
1 of 5 steps (20%) done

[Mon Dec  7 01:10:00 2026]
localrule preprocess_subject:
    input: a.nii.gz
    jobid: 3
    wildcards: subject=demo001
    resources: tmpdir=/tmp
Shell command: None
[Mon Dec  7 01:10:00 2026]
localrule preprocess_subject:
    jobid: 4
    wildcards: subject=demo002
[Mon Dec  7 01:11:00 2026]
Finished job 4.
[Mon Dec  7 01:13:00 2026]
Finished jobid: 3 (Rule: preprocess_subject)
[Mon Dec  7 01:13:00 2026]
localrule plan_nnunet:
    jobid: 9
Building DAG of jobs...
[Mon Dec  7 01:20:00 2026]
localrule plan_nnunet:
    jobid: 3
[Mon Dec  7 01:22:00 2026]
Finished jobid: 3 (Rule: plan_nnunet)
"""


def test_timeline_per_rule_by_hand():
    jobs = timeline.parse_jobs(LOG.splitlines(keepends=True))
    assert set(jobs) == {(1, 3), (1, 4), (1, 7), (1, 9), (2, 3)}
    assert jobs[(1, 7)]["threads"] == 2 and jobs[(1, 3)]["threads"] == 1
    assert jobs[(1, 9)]["end"] is None  # started, never finished
    assert jobs[(1, 3)]["rule"] == "preprocess_subject" and jobs[(2, 3)]["rule"] == "plan_nnunet"
    rows, totals = timeline.summarise(jobs)
    by_rule = {r["rule"]: r for r in rows}
    assert rows[0]["rule"] == "train_label_vae"  # largest thread-minutes first
    assert by_rule["train_label_vae"]["job_min"] == pytest.approx(10.0)
    assert by_rule["train_label_vae"]["thread_min"] == pytest.approx(20.0)
    assert by_rule["preprocess_subject"]["jobs"] == 2
    assert by_rule["preprocess_subject"]["job_min"] == pytest.approx(3.0 + 1.0)
    assert by_rule["plan_nnunet"]["jobs"] == 1 and by_rule["plan_nnunet"]["job_min"] == pytest.approx(2.0)
    assert totals == {"jobs": 4, "unfinished": 1, "wall_min": pytest.approx(22.0),
                      "job_min": pytest.approx(16.0), "thread_min": pytest.approx(26.0)}


def test_timeline_command_line(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    timeline.main([str(log), "--cores", "2"])
    out = capsys.readouterr().out
    assert "4 jobs finished (1 unfinished), wall 22.0 min, 16.0 job-minutes, 26.0 thread-minutes" in out
    assert "no less than 13.0 min" in out
    (tmp_path / "empty.log").write_text("Building DAG of jobs...\n")
    with pytest.raises(SystemExit, match="no finished Snakemake job"):
        timeline.main([str(tmp_path / "empty.log")])
