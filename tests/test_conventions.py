"""Snakemake ecosystem conventions: `snakemake --lint` is clean, the Snakefiles are formatted
with snakefmt, and config/README.md documents every configuration key (fast: no job runs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_support import REPO, run_snakemake

SNAKEFMT = str(Path(sys.executable).parent / "snakefmt")
LINT_CLEAN = "Congratulations, your workflow is in a good condition!"
CONFIG_README = REPO / "config" / "README.md"

# Dicts whose keys are names the user chooses, not configuration keys: their entries are not
# listed one by one in config/README.md. A placeholder: the entries' own keys are documented
# under that placeholder (`demo.sites.<site>.role`); None: the dict itself is documented.
FREE_FORM = {
    "labels.classes": None,
    "labels.lesion_types": None,
    "label_maps": None,
    "demo.sites": "<site>",
    "synthesis.style_sets": None,
    "segmentation.recipes": "<arm>",
    "segmentation.task_definitions": "<task>",
    "segmentation.task_definitions.<task>.classes": None,
    "segmentation.nnunet.plans_overrides": None,
}


def lint_issues(output):
    """The `Lints for ...` headings of a `snakemake --lint` output; None when the output does
    not say the workflow is clean either (lint did not run)."""
    issues = re.findall(r"^Lints for .+$", output, re.M)
    if not issues and LINT_CLEAN not in output:
        return None
    return issues


def config_key_paths(node, prefix=""):
    """Dotted paths of the keys of a config mapping, free-form dicts (FREE_FORM) collapsed."""
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if not isinstance(value, dict):
            continue
        if path in FREE_FORM:
            placeholder = FREE_FORM[path]
            if placeholder is not None:
                for entry in value.values():
                    if isinstance(entry, dict):
                        paths += config_key_paths(entry, f"{path}.{placeholder}.")
            continue
        paths += config_key_paths(value, f"{path}.")
    return sorted(set(paths))


def schema_key_paths(schema, prefix=""):
    """Dotted paths of the properties of a JSON schema, free-form dicts (FREE_FORM) collapsed."""
    paths = []
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        if path in FREE_FORM:
            placeholder = FREE_FORM[path]
            entry = sub.get("additionalProperties")
            if placeholder is not None and isinstance(entry, dict):
                paths += schema_key_paths(entry, f"{path}.{placeholder}.")
            continue
        paths += schema_key_paths(sub, f"{path}.")
    return sorted(set(paths))


def undocumented(paths, text):
    """Key paths not written as `path` (in backticks) in ``text``."""
    return [p for p in paths if f"`{p}`" not in text]


# ------------------------------------------------------------------ snakemake --lint


def test_snakemake_lint_reports_nothing(tmp_path):
    code, out = run_snakemake(tmp_path, "--lint", timeout=300)
    issues = lint_issues(out)
    assert issues is not None, f"snakemake --lint did not run:\n{out[-3000:]}"
    assert not issues, "snakemake --lint:\n" + out[-6000:]
    assert code == 0, out[-3000:]


def test_lint_check_fails_on_a_workflow_with_lints(tmp_path):
    """The parsing above notices lints: a rule without log and conda environment has two."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text('rule a:\n    output:\n        "a.txt"\n    shell:\n        "touch {output}"\n')
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--lint", "-s", str(snakefile),
                           "--directory", str(tmp_path)], capture_output=True, text=True, timeout=300)
    issues = lint_issues(proc.stdout + proc.stderr)
    assert issues == [f"Lints for rule a (line 1, {snakefile}):"], proc.stdout + proc.stderr
    assert proc.returncode != 0


# ------------------------------------------------------------------ snakefmt


def run_snakefmt(*args, cwd=REPO):
    assert Path(SNAKEFMT).exists(), f"{SNAKEFMT} missing: install envs/requirements.lock (make install)"
    return subprocess.run([SNAKEFMT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_snakefiles_are_snakefmt_formatted():
    # run from the repository root: snakefmt reads [tool.snakefmt] of pyproject.toml
    proc = run_snakefmt("--check", "Snakefile", "workflow/rules")
    assert proc.returncode == 0, (
        "snakefmt --check failed (fix: .venv/bin/snakefmt Snakefile workflow/rules):\n"
        + proc.stdout + proc.stderr
    )
    checked = re.search(r"(\d+) file\(s\) would be left unchanged", proc.stdout + proc.stderr)
    n_files = 1 + len(list((REPO / "workflow" / "rules").glob("*.smk")))
    assert checked and int(checked.group(1)) == n_files, proc.stdout + proc.stderr


def test_snakefmt_check_fails_on_unformatted_rules(tmp_path):
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "bad.smk").write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    proc = run_snakefmt("--check", "bad.smk", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr


# ------------------------------------------------------------------ config/README.md


@pytest.mark.parametrize("source,key_paths,expected", [
    ("config.yaml", config_key_paths, ["preprocessing.skull_strip.min_dice", "demo.sites.<site>.role"]),
    ("schemas/config.schema.yaml", schema_key_paths,
     ["ingest_root", "segmentation.recipes.<arm>.style_set"]),
])
def test_config_readme_documents_every_key(source, key_paths, expected):
    paths = key_paths(yaml.safe_load((REPO / "config" / source).read_text()))
    assert set(expected) <= set(paths)
    missing = undocumented(paths, CONFIG_README.read_text())
    assert not missing, f"config/README.md does not list (as `key.path`): {missing}"


def test_config_readme_documents_every_sample_sheet_column():
    schema = yaml.safe_load((REPO / "config" / "schemas" / "subjects.schema.yaml").read_text())
    missing = undocumented(list(schema["properties"]) + ["role"], CONFIG_README.read_text())
    assert not missing, f"config/README.md (Sample sheet) does not list: {missing}"


def test_key_check_notices_an_undocumented_key():
    paths = config_key_paths({"preprocessing": {"n4": {"shrink_factor": 4}, "qc": {"x": 1}},
                              "demo": {"sites": {"s1": {"role": "r"}}}})
    assert paths == ["demo", "demo.sites", "demo.sites.<site>.role", "preprocessing", "preprocessing.n4",
                     "preprocessing.n4.shrink_factor", "preprocessing.qc", "preprocessing.qc.x"]
    text = "`preprocessing` `preprocessing.n4` `preprocessing.n4.shrink_factor` `demo` `demo.sites`"
    assert undocumented(paths, text) == ["demo.sites.<site>.role", "preprocessing.qc", "preprocessing.qc.x"]


def test_workflow_catalog_file():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    usage = catalog["usage"]
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    assert usage["software-stack-deployment"]["conda"] is True
    assert usage["report"] is True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
