"""History mechanics without a search: a torn last row, an old-format header, the writer lock."""

import csv
import os
import subprocess
import sys

import pytest

from bo_search.search.history import COLUMNS, FORMAT_VERSION, HistoryLock, HistoryRow, HistoryWriter, read_history
from bo_search.types import LayerQuant, QuantPlan, UserError


def _rows(n):
    plan = QuantPlan({"model.layers.0.mlp.up_proj": LayerQuant(4, 64)}).dumps()
    return [
        HistoryRow(trial_index=i, status="completed", source="seed", cal_PPL=10.0 + i, nll=2.3, model_size=0.1, quant_config=plan)
        for i in range(n)
    ]


def _write(path, rows):
    w = HistoryWriter(path)
    for r in rows:
        w.append(r)
    w.close()


def test_torn_last_row_is_set_aside_and_complete_rows_kept(tmp_path, capsys):
    h = tmp_path / "h.csv"
    _write(h, _rows(4))
    text = h.read_text()
    cut = text.rstrip("\n").rfind("\n") + 1 + 40  # 40 characters into the last row: a write cut off
    h.write_text(text[:cut])
    loaded = read_history(h, strict=True, repair_tail=True)
    assert [r.trial_index for r in loaded.rows] == [0, 1, 2]
    side = tmp_path / "h.csv.torn-1"
    assert side.read_text() == text[text.rstrip("\n").rfind("\n") + 1 : cut]
    err = capsys.readouterr().err
    assert "cut off mid-write" in err and str(side) in err and err.strip().count("\n") == 0
    assert h.read_text() == text[: text.rstrip("\n").rfind("\n") + 1]  # every complete row, byte for byte
    # a second torn tail gets a new side file, the first is never overwritten
    h.write_text(h.read_text() + "3,compl")
    read_history(h, strict=True, repair_tail=True)
    assert (tmp_path / "h.csv.torn-2").read_text() == "3,compl" and side.exists()


def test_corrupt_row_in_the_middle_is_still_an_error(tmp_path):
    h = tmp_path / "h.csv"
    _write(h, _rows(3))
    lines = h.read_text().splitlines(keepends=True)
    lines[2] = "1,completed,seed,{broken\n"
    h.write_text("".join(lines))
    before = h.read_text()
    with pytest.raises(UserError, match="line 3 is corrupt"):
        read_history(h, strict=True, repair_tail=True)
    assert h.read_text() == before and not list(tmp_path.glob("*.torn-*"))


def test_last_row_without_its_newline_is_kept(tmp_path):
    h = tmp_path / "h.csv"
    _write(h, _rows(2))
    h.write_text(h.read_text().rstrip("\n"))
    assert len(read_history(h, strict=True, repair_tail=True).rows) == 2
    assert h.read_text().endswith("\n") and not list(tmp_path.glob("*.torn-*"))


def test_old_format_is_read_and_upgraded_in_place(tmp_path, capsys):
    h = tmp_path / "old.csv"
    old_cols = [c for c in COLUMNS if c not in ("goal", "limit_metric", "limit")]
    with open(h, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_cols)
        w.writeheader()
        for r in _rows(2):
            d = {k: ("" if v is None else v) for k, v in r.__dict__.items() if k in old_cols}
            d["format"] = "bo_search.history/1"
            w.writerow(d)
    assert [r.cal_PPL for r in read_history(h).rows] == [10.0, 11.0]  # read as the old version
    w = HistoryWriter(h)  # a resumed search opens it for appending: the header is upgraded first
    w.append(_rows(3)[2])
    w.close()
    assert "upgraded to " + FORMAT_VERSION in capsys.readouterr().out
    with open(h, newline="") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    rows = read_history(h).rows
    assert [r.trial_index for r in rows] == [0, 1, 2] and rows[0].format == "bo_search.history/1" and rows[2].format == FORMAT_VERSION


def test_one_writer_per_history(tmp_path):
    h = tmp_path / "h.csv"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from bo_search.search.history import HistoryLock; import time; HistoryLock({str(h)!r}).acquire(); print('ok', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(UserError, match=rf"in use by another search \(process {holder.pid},"):
            HistoryLock(h).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is recovered
    assert (tmp_path / "h.csv.lock").exists()
    lock = HistoryLock(h).acquire()
    assert (tmp_path / "h.csv.lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not (tmp_path / "h.csv.lock").exists()
