"""Sample sheet loading: schema, duplicates, modality columns, path resolution."""

import os
import re

import pandas as pd
import pytest

from brainsynth.errors import InputError, InputErrors
from brainsynth.sheet import DEFAULT_SCHEMA, SHEET_COLUMNS, load_sheet, write_sheet

HEADER = ["subject", "site", "split", "t1", "t2", "flair", "label"]
MODS = ["t1", "t2", "flair"]


def write_tsv(path, rows, header=HEADER):
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def good_rows():
    return [
        ["s01", "site_a", "train", "img/s01_t1.nii.gz", "img/s01_t2.nii.gz", "img/s01_flair.nii.gz", "img/s01_seg.nii.gz"],
        ["s02", "site_a", "val", "img/s02_t1.nii.gz", "img/s02_t2.nii.gz", "img/s02_flair.nii.gz", ""],
        ["s03", "site_b", "test", "/abs/s03_t1.nii.gz", "/abs/s03_t2.nii.gz", "/abs/s03_flair.nii.gz", ""],
    ]


def problems(exc):
    return [str(e) for e in exc.value.errors]


def test_good_sheet_loads_and_resolves_paths(tmp_path):
    (tmp_path / "sheet").mkdir()
    sheet = write_tsv(tmp_path / "sheet" / "subjects.tsv", good_rows())
    df = load_sheet(sheet, MODS)
    assert list(df.columns[: len(SHEET_COLUMNS)]) == SHEET_COLUMNS
    assert list(df.index) == ["s01", "s02", "s03"]
    assert df.loc["s01", "t1"] == os.path.join(str(tmp_path / "sheet"), "img", "s01_t1.nii.gz")
    assert df.loc["s03", "t1"] == "/abs/s03_t1.nii.gz"
    assert df.loc["s02", "label"] is None
    assert df.loc["s01", "t1ce"] is None and df.loc["s01", "brain_mask"] is None
    assert df.loc["s02", "split"] == "val"


def test_comments_blank_lines_extra_columns_and_case(tmp_path):
    text = ("# my cohort\n"
            "Subject\tSite\tSplit\tT1\tage\n"
            "\n"
            "a1\tx\ttrain\ta1.nii\t42\n")
    (tmp_path / "s.tsv").write_text(text)
    df = load_sheet(tmp_path / "s.tsv", ["t1"])
    assert df.loc["a1", "age"] == "42"
    assert df.loc["a1", "t1"] == str(tmp_path / "a1.nii")


def test_duplicate_subject_names_both_rows(tmp_path):
    rows = good_rows()
    rows[2][0] = "s01"
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    msg = "\n".join(problems(exc))
    assert "'s01'" in msg and "subjects.tsv" in msg and "duplicate" in msg
    assert "rows 1 (line 2) and 3 (line 4)" in msg


def test_bad_split_value(tmp_path):
    rows = good_rows()
    rows[1][2] = "training"
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "'s02'" in msg and "subjects.tsv" in msg and "split" in msg
    assert "'training' is not one of train, val, test" in msg and "row 2" in msg


def test_bad_subject_id(tmp_path):
    rows = good_rows()
    rows[0][0] = "s 01/x"
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "s 01/x" in msg and "not allowed" in msg and "letters, digits" in msg


def test_missing_required_column(tmp_path):
    header = [h for h in HEADER if h != "site"]
    rows = [[c for i, c in enumerate(r) if HEADER[i] != "site"] for r in good_rows()]
    sheet = write_tsv(tmp_path / "subjects.tsv", rows, header)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "'site'" in msg and "missing" in msg and "subjects.tsv" in msg and "add a 'site' column" in msg


def test_empty_required_cell(tmp_path):
    rows = good_rows()
    rows[1][3] = ""
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "'s02'" in msg and "subjects.tsv" in msg and "'t1'" in msg and "empty" in msg


def test_missing_modality_column(tmp_path):
    header = [h for h in HEADER if h != "flair"]
    rows = [[c for i, c in enumerate(r) if HEADER[i] != "flair"] for r in good_rows()]
    sheet = write_tsv(tmp_path / "subjects.tsv", rows, header)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "'flair'" in msg and "subjects.tsv" in msg and "no 'flair' column" in msg
    assert "remove 'flair' from config 'modalities'" in msg
    # Without flair in the config the same sheet is fine.
    assert len(load_sheet(sheet, ["t1", "t2"])) == 3


def test_empty_modality_cell(tmp_path):
    rows = good_rows()
    rows[2][4] = ""
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    (msg,) = problems(exc)
    assert "'s03'" in msg and "'t2'" in msg and "subjects.tsv" in msg and "config 'modalities'" in msg


def test_all_problems_reported_at_once(tmp_path):
    rows = good_rows()
    rows[0][2] = "dev"
    rows[1][1] = ""
    rows[2][0] = "s01"
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    assert len(exc.value.errors) == 3
    assert "3 input problem(s)" in str(exc.value)


def test_ragged_row_and_comma_separated(tmp_path):
    rows = good_rows()
    rows[0] = rows[0] + ["extra"]
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS)
    assert "has 8 fields but the header has 7" in problems(exc)[0]

    csv_sheet = tmp_path / "c.tsv"
    csv_sheet.write_text("subject,site,split,t1\na,b,train,x.nii\n")
    with pytest.raises(InputErrors) as exc:
        load_sheet(csv_sheet, ["t1"])
    assert "comma-separated" in str(exc.value)


def test_missing_sheet_file(tmp_path):
    with pytest.raises(InputError, match="sample sheet not found"):
        load_sheet(tmp_path / "nope.tsv", MODS)


def test_write_sheet_round_trip(tmp_path):
    sheet = write_tsv(tmp_path / "subjects.tsv", good_rows())
    df = load_sheet(sheet, MODS)
    out = write_sheet(df, tmp_path / "out" / "copy.tsv")
    back = load_sheet(out, MODS)
    pd.testing.assert_frame_equal(df, back)
    assert not list((tmp_path / "out").glob(".copy*"))  # no temp file left behind
    assert "\tNone" not in out.read_text()


def test_snakemake_validate_accepts_good_and_rejects_bad(tmp_path):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    sheet = write_tsv(tmp_path / "subjects.tsv", good_rows())
    raw = pd.read_csv(sheet, sep="\t", dtype=str)
    validate(raw, str(DEFAULT_SCHEMA))
    validate(load_sheet(sheet, MODS), str(DEFAULT_SCHEMA))

    rows = good_rows()
    rows[1][2] = "training"
    bad = write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(WorkflowError):
        validate(pd.read_csv(bad, sep="\t", dtype=str), str(DEFAULT_SCHEMA))
    # the row schema requires the id columns; which images a row needs depends on config
    # (site_modalities), so load_sheet checks those
    missing_split = pd.read_csv(sheet, sep="\t", dtype=str).drop(columns=["split"])
    with pytest.raises(WorkflowError):
        validate(missing_split, str(DEFAULT_SCHEMA))


def test_site_modalities_let_a_dataset_deliver_a_subset(tmp_path):
    from brainsynth.sheet import anchor_modality, check_site_modalities, site_modalities_of

    rows = good_rows()
    rows[2][3:5] = ["", ""]            # s03 (site_b): FLAIR only
    rows[1][5] = ""                    # s02 (site_a): no FLAIR, but site_a delivers every modality
    sheet = write_tsv(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputErrors) as exc:
        load_sheet(sheet, MODS, site_modalities={"site_b": ["flair"]})
    msgs = problems(exc)
    assert len(msgs) == 1 and "s02" in msgs[0] and "'flair'" in msgs[0] and "site_modalities" in msgs[0]
    rows[1][5] = "img/s02_flair.nii.gz"
    df = load_sheet(write_tsv(tmp_path / "ok.tsv", rows), MODS, site_modalities={"site_b": ["flair"]})
    assert df.loc["s03", "t1"] is None and df.loc["s03", "flair"] == "/abs/s03_flair.nii.gz"
    # without the entry, the FLAIR-only subject is named for its missing T1 and T2
    with pytest.raises(InputErrors) as exc:
        load_sheet(tmp_path / "ok.tsv", MODS)
    msgs = problems(exc)
    assert len(msgs) == 2 and all("s03" in m for m in msgs)
    assert any("no 't1' image" in m for m in msgs) and any("no 't2' image" in m for m in msgs)
    assert site_modalities_of("site_b", MODS, {"site_b": ["flair", "t1"]}) == ["t1", "flair"]  # run order
    assert site_modalities_of("site_a", MODS, {"site_b": ["flair"]}) == MODS
    assert anchor_modality(["t1", "flair"]) == "t1" and anchor_modality(["flair"]) == "flair"
    check_site_modalities({"site_b": ["flair"]}, MODS, ["site_a", "site_b"])
    for bad, words in (({"site_x": ["t1"]}, "no subject has site 'site_x'"),
                       ({"site_b": []}, "non-empty list"),
                       ({"site_b": ["t1ce"]}, "['t1ce'] are not modalities of the run")):
        with pytest.raises(InputError, match=re.escape(words)) as exc:
            check_site_modalities(bad, MODS, ["site_a", "site_b"])
        assert exc.value.field == f"site_modalities.{next(iter(bad))}"
