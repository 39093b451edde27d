"""The one CSV/TSV cell escape (liqe_dist.tables): text that a spreadsheet would run as a formula
gets a leading ', numbers never, and read_cell gives every text back exactly."""

from __future__ import annotations

import csv

import numpy as np

from liqe_dist.tables import csv_writer, read_cell, safe_cell, tsv_line, write_csv

TEXTS = ["=1+1", "+x", "-x", "@SUM(A1)", "\tx", "\rx", "'quoted", "''", "plain", "", "a=b", "-"]


def test_text_that_could_start_a_formula_is_escaped_and_reads_back():
    for text in TEXTS:
        cell = safe_cell(text)
        assert cell.startswith("'") == (text[:1] in ("=", "+", "-", "@", "\t", "\r", "'")), text
        assert read_cell(cell) == text


def test_numbers_are_never_escaped():
    for number in (-0.5, -3, 0, 2.5, np.float64(-1.25), np.int64(-7), float("nan"), True):
        assert safe_cell(number) is number


def test_writers_escape_every_text_cell(tmp_path):
    rows = [{"name": t, "score": -0.5, "n": -2} for t in TEXTS]
    write_csv(tmp_path / "t.csv", rows)
    back = list(csv.DictReader(open(tmp_path / "t.csv", newline="")))
    assert [read_cell(r["name"]) for r in back] == TEXTS
    assert {(r["score"], r["n"]) for r in back} == {("-0.5", "-2")}
    with open(tmp_path / "h.csv", "w", newline="") as f:
        csv_writer(f).writerows([["=head", "ok"], [-1.5, "@x"]])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["'=head,ok", "-1.5,'@x"]
    write_csv(tmp_path / "empty.csv", [], ["a", "b"])
    assert (tmp_path / "empty.csv").read_bytes() == b"a,b\r\n"
    assert tsv_line("=x", "a\tb", -1) == "'=x\ta\\tb\t-1\n"
