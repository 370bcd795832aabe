"""bench/common.py's result files: rows keep their columns when a later row brings a new one."""
import csv
import sys

import pytest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import append_csv  # noqa: E402


def test_append_csv_widens_the_header(tmp_path):
    path = tmp_path / "r.csv"
    append_csv(str(path), [{"date": "d1", "tokens_per_s": "1.0"}])
    append_csv(str(path), [{"date": "d2", "tokens_per_s": "2.0"}])
    append_csv(str(path), [{"date": "d3", "tokens_per_s": "3.0", "iteration_memory_mib": "62"}])
    append_csv(str(path), [{"date": "d4", "iteration_memory_mib": "7"}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["date", "tokens_per_s", "iteration_memory_mib"]
    assert [(r["date"], r["tokens_per_s"], r["iteration_memory_mib"]) for r in rows] == [
        ("d1", "1.0", ""), ("d2", "2.0", ""), ("d3", "3.0", "62"), ("d4", "", "7")]
    assert not path.with_suffix(".tmp").exists()



def test_append_csv_refuses_a_misaligned_file(tmp_path):
    for text in ("a,b\n1,2,3\n", "a,b,c\n1,2\n"):
        path = tmp_path / "bad.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match="bad.csv:2"):
            append_csv(str(path), [{"a": "4", "b": "5", "d": "6"}])
        assert path.read_text() == text
