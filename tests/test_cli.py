"""The `keras-bptt plan` command: its table, its figures, its errors."""

import subprocess
import sys

import pytest

from keras_bptt import cli
from keras_bptt.planning import planner

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _rows(output):
    return {line.split()[0]: line.split() for line in output.splitlines()[2:]
            if line.split() and line.split()[0] in planner.SCHEMES}


def test_plan_table_matches_the_planner(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "1000", "--budget", "5%",
                          "--alpha", "3", "--backward-ratio", "1.5")
    assert status == 0
    assert "budget 5% = 149.9 slots (standard BPTT: 2998 slots)" in out
    rows = _rows(out)
    assert set(rows) == set(planner.SCHEMES)
    msm = planner.make_plan(1000, 149.9, "msm", alpha=3)
    assert rows["msm"][1:] == [
        str(msm.cost), f"{msm.cost_per_step:.3f}", f"{msm.peak_memory:g}",
        f"{100 * msm.peak_memory / 2998:.1f}%", f"{msm.predicted_time_ratio(1.5):.3f}",
    ]
    assert " ".join(rows["store_all"][1:]) == "does not fit: needs 2998 slots"
    assert "auto picks msm" in out


def test_plot_and_schedule_files(capsys, tmp_path):
    curves, schedule = tmp_path / "curves.png", tmp_path / "schedule.png"
    status, out, _ = _run(capsys, "plan", "--length", "200", "--budget", "20",
                          "--alpha", "2", "--plot", str(curves),
                          "--schedule", str(schedule), "--scheme", "hsm")
    assert status == 0 and "selected hsm" in out
    for path in (curves, schedule):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_byte_budget_needs_hidden_bytes(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "100", "--budget", "64KiB",
                          "--hidden-bytes", "1024")
    assert status == 0 and "= 64 slots" in out
    status, _, err = _run(capsys, "plan", "--length", "100", "--budget", "64KiB")
    assert status == 2 and "needs the byte size of one hidden state" in err


@pytest.mark.parametrize(
    "budget, message",
    [("0.0001%", "smallest fraction that works is 0.334%"),
     ("lots", "Cannot read 'lots' as a memory budget")],
)
def test_bad_budgets_exit_with_a_message(capsys, budget, message):
    status, _, err = _run(capsys, "plan", "--length", "300", "--budget", budget)
    assert status == 2
    assert message in err


def test_segment_option_reaches_chen(capsys):
    _, out, _ = _run(capsys, "plan", "--length", "1000", "--segment", "32")
    assert _rows(out)["chen_sqrt_hidden"][1] == "2960"


def test_no_command_prints_help(capsys):
    status, out, _ = _run(capsys)
    assert status == 2 and "plan" in out


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "keras_bptt", "plan", "--length", "50", "--budget", "10%"],
        capture_output=True, text=True, check=True,
    )
    assert "auto picks" in result.stdout


def test_plan_help_lists_the_budget_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "'5%'" in capsys.readouterr().out
