"""History mechanics without a search: a torn last row, an old-format header, the writer lock."""

import csv
import logging
import os
import subprocess
import sys
import time

import pytest

from bo_search.search.history import COLUMNS, FORMAT_VERSION, HistoryLock, HistoryRow, HistoryWriter, read_history
from bo_search.types import LayerQuant, QuantPlan, UserError


def _rows(n):
    plan = QuantPlan({"model.layers.0.mlp.up_proj": LayerQuant(4, 64)}).dumps()
    return [
        HistoryRow(trial_index=i, status="completed", source="seed", cal_PPL=10.0 + i, nll=2.3, model_size=0.1, quant_config=plan)
        for i in range(n)
    ]


def _warnings(caplog):
    """bo_search.search.history's warnings: what the user sees on stderr (setup_logging shows bo_search's
    warnings; its info lines only with --verbose)."""
    return [r.getMessage() for r in caplog.records if r.name == "bo_search.search.history" and r.levelno >= logging.WARNING]


def _write(path, rows):
    w = HistoryWriter(path)
    for r in rows:
        w.append(r)
    w.close()


def test_torn_last_row_is_set_aside_and_complete_rows_kept(tmp_path, caplog):
    h = tmp_path / "h.csv"
    _write(h, _rows(4))
    text = h.read_text()
    cut = text.rstrip("\n").rfind("\n") + 1 + 40  # 40 characters into the last row: a write cut off
    h.write_text(text[:cut])
    loaded = read_history(h, strict=True, repair_tail=True)
    assert [r.trial_index for r in loaded.rows] == [0, 1, 2]
    side = tmp_path / "h.csv.torn-1"
    assert side.read_text() == text[text.rstrip("\n").rfind("\n") + 1 : cut]
    [err] = _warnings(caplog)
    assert "cut off mid-write" in err and str(side) in err and "\n" not in err
    assert h.read_text() == text[: text.rstrip("\n").rfind("\n") + 1]  # every complete row, byte for byte
    # a second torn tail gets a new side file, the first is never overwritten
    h.write_text(h.read_text() + "3,compl")
    read_history(h, strict=True, repair_tail=True)
    assert (tmp_path / "h.csv.torn-2").read_text() == "3,compl" and side.exists()
    # a cut inside a multi-byte character: the bytes are set aside as they were
    h.write_bytes(h.read_bytes() + "3,failed,seed,caf\u00e9".encode()[:-1])
    read_history(h, strict=True, repair_tail=True)
    assert (tmp_path / "h.csv.torn-3").read_bytes() == "3,failed,seed,caf\u00e9".encode()[:-1]
    assert len(read_history(h).rows) == 3


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


def test_old_format_is_read_and_upgraded_in_place(tmp_path, caplog):
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
    assert any("upgraded to " + FORMAT_VERSION in m for m in _warnings(caplog))
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


def test_complete_corrupt_last_line_is_corruption_not_a_torn_row(tmp_path):
    """Only a last line without its newline can be a row cut off mid-write; a complete one that does
    not parse is an error, and the file is left as it is."""
    h = tmp_path / "h.csv"
    _write(h, _rows(3))
    lines = h.read_text().splitlines(keepends=True)
    lines[-1] = "2,completed,seed,{broken\r\n"
    h.write_text("".join(lines))
    before = h.read_bytes()
    with pytest.raises(UserError, match="line 4 is corrupt"):
        read_history(h, strict=True, repair_tail=True)
    assert h.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


@pytest.mark.parametrize(
    "content",
    [
        b"trial_index,cal_PPL\n0,7.9\n",  # another tool's CSV (issue 31: its last line was moved aside)
        b"trial_index,cal_PPL\n0,7.9\n1,8.1",  # ... ending without a newline, like a torn row
        b"trial_index,status,quant_config,from_the_future\n0,completed,{},1\n1,compl",  # a newer bo_search's
        b"trial_index,status\n0,\xe9t\xe9",  # not UTF-8
    ],
)
def test_a_file_that_is_not_our_history_is_refused_untouched(tmp_path, content):
    h = tmp_path / "foreign.csv"
    h.write_bytes(content)
    with pytest.raises(UserError, match="not a bo_search history|does not know"):
        read_history(h, strict=True, repair_tail=True)
    assert h.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.csv"]  # no side file, no temp file


def test_plans_of_thousands_of_layers_round_trip(tmp_path):
    """The csv module's default field limit (131,072 characters) is a plan of about 1,650 layers."""
    plan = QuantPlan({f"model.layers.{i // 7}.mlp.proj_{i % 7}": LayerQuant(4, 64) for i in range(3000)})
    assert len(plan.dumps()) > 131072
    h = tmp_path / "h.csv"
    row = HistoryRow(trial_index=0, status="completed", source="seed", cal_PPL=10.0, nll=2.3, model_size=0.1, quant_config=plan.dumps())
    _write(h, [row])
    [back] = read_history(h, strict=True, repair_tail=True).rows
    assert back.plan == plan


def test_a_full_disk_is_one_line(tmp_path):
    h = tmp_path / "h.csv"
    h.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(UserError, match=r"cannot write the history .*No space left on device.*resume") as err:
        HistoryWriter(h)
    assert "\n" not in str(err.value)


def make_read_only(path):
    """Read-only even for root (an immutable file); skips where that cannot be set."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a file read-only for root here: {r.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_history_is_found_before_any_work(tmp_path):
    from bo_search.search.history import check_writable

    h = tmp_path / "h.csv"
    _write(h, _rows(1))
    undo = make_read_only(h)
    try:
        with pytest.raises(UserError, match="cannot write the history"):
            check_writable(h)
    finally:
        undo()
    check_writable(h)  # writable again: no error
    check_writable(tmp_path / "new.csv")
    assert not (tmp_path / "new.csv").exists()  # checking never creates the file


_RACER = """
import os, sys, time
from pathlib import Path
from bo_search.search.history import HistoryLock
from bo_search.types import UserError
gate = Path(sys.argv[2])
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():  # every racer is ready: they all try at once
    time.sleep(0.001)
try:
    HistoryLock(sys.argv[1]).acquire()
    print("won", flush=True)
    while not (gate / "release").exists():  # hold it until every loser has answered
        time.sleep(0.01)
except UserError as err:
    print("lost", err, flush=True)
"""


def _race(history, gate, n=6):
    """``n`` processes take the lock of ``history`` at the same instant; (pid, answer) of each."""
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(history), str(gate)], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        deadline = time.time() + 120
        while len(list(gate.glob("ready-*"))) < n:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a racer did not start"
            time.sleep(0.01)
        (gate / "go").touch()
        answers = [(p.pid, p.stdout.readline().strip()) for p in procs]
    finally:
        (gate / "release").touch()
        for p in procs:
            p.communicate(timeout=60)
    return answers


@pytest.mark.parametrize("left_behind", ["nothing", "a dead process's lock", "an empty lock"])
def test_lock_taken_by_exactly_one_of_several_at_once(tmp_path, left_behind):
    """A free lock, a stale one (its holder gone: no flock, a dead pid) and an empty one (as the old
    two-step writer could leave): exactly one racer wins, every other names the winner's pid."""
    h = tmp_path / "h.csv"
    if left_behind == "a dead process's lock":
        dead = subprocess.Popen(["true"])
        dead.wait()
        (tmp_path / "h.csv.lock").write_text(f"{dead.pid}\n")
    elif left_behind == "an empty lock":
        (tmp_path / "h.csv.lock").write_text("")
    results = _race(h, tmp_path.parent / f"{tmp_path.name}-gate")
    winners = [pid for pid, out in results if out == "won"]
    assert len(winners) == 1, results
    for pid, out in results:
        if pid != winners[0]:
            assert out.startswith("lost") and f"in use by another search (process {winners[0]}," in out, out
    assert not (tmp_path / "h.csv.lock").exists()  # the winner released it at exit
    assert list(tmp_path.iterdir()) == []  # and no temporary file is left behind


def test_a_failing_close_still_releases_what_follows(tmp_path):
    """The search's clean-up closes the history, stops the workers and releases the lock, each even
    when one before it fails (issue 31: a full disk made close() skip the rest)."""
    from bo_search.search.runner import _close

    h = tmp_path / "h.csv"
    w = HistoryWriter(h)
    w._fh.close()
    w._fh = open("/dev/full", "a")  # noqa: SIM115  (the disk filled up: the last flush on close fails)
    w._fh.write("a buffered row\n")
    lock = HistoryLock(h).acquire()
    with pytest.raises(UserError, match="No space left on device"):
        _close(w, None, lock)
    assert not lock.held and not (tmp_path / "h.csv.lock").exists()
