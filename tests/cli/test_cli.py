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


def test_byte_budget_with_hidden_bytes(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "100", "--budget", "64KiB",
                          "--hidden-bytes", "1024")
    assert status == 0
    assert "budget 64KiB = 64 slots of 1024 bytes = 65.54 kB" in out  # 2**16 B


def test_byte_budget_from_the_cell_shape(capsys):
    # The command of the issue: no --input-dim, so no alpha.
    status, out, _ = _run(capsys, "plan", "--length", "1000", "--budget", "256MB",
                          "--cell", "lstm", "--units", "256", "--batch", "32")
    assert status == 0
    hidden = 32 * 256 * 2 * 4  # h and c: 256 float32 each, 32 samples
    assert f"one hidden state (h and c) = {hidden} bytes" in out
    assert "alpha unknown (give --input-dim or --alpha)" in out
    assert f"budget 256MB = {256e6 / hidden:g} slots of {hidden} bytes = 256 MB" in out
    rows = _rows(out)
    assert set(rows) == set(planner.SCHEMES)
    slots = 256e6 / hidden
    for scheme in planner.SCHEMES:
        if scheme in planner.HIDDEN_STATE_SCHEMES:
            assert rows[scheme][1] == str(planner.plan_cost(scheme, 1000, slots))
            assert rows[scheme][4] == "-"  # % of an unknown BPTT memory
        else:
            assert " ".join(rows[scheme][1:]) == (
                "not planned: it stores internal states, which needs alpha: "
                "give --input-dim or --alpha")
    auto = planner.make_plan(1000, slots, "auto", internal_states_supported=False)
    assert f"auto picks {auto.scheme} (of the schemes that store hidden states only)" in out


def test_input_dim_gives_alpha_and_every_scheme(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "1000", "--budget", "24MB",
                          "--cell", "gru", "--units", "128", "--batch", "16",
                          "--input-dim", "64")
    assert status == 0
    hidden = 16 * 128 * 4
    # x, h_prev, the gates' pre-activations (2u), the candidate's input and
    # recurrent projections (u each), over h (u).
    alpha = (64 + 128 + 2 * 128 + 128 + 128) / 128
    full = 1 + 999 * alpha
    assert f"one hidden state (h) = {hidden} bytes, alpha = {alpha:g} (input dim 64)" in out
    assert (f"alpha={alpha:g}, budget 24MB = {24e6 / hidden:g} slots of {hidden} "
            f"bytes = 24 MB (standard BPTT: {full:g} slots") in out
    rows = _rows(out)
    msm = planner.make_plan(1000, 24e6 / hidden, "msm", alpha=alpha)
    assert rows["msm"][1] == str(msm.cost)
    assert rows["msm"][4] == f"{100 * msm.peak_memory / full:.1f}%"
    auto = planner.make_plan(1000, 24e6 / hidden, "auto", alpha=alpha)
    assert out.splitlines()[-1] == f"auto picks {auto.scheme}"


def test_explicit_alpha_overrides_the_derived_one(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "100", "--budget", "5%",
                          "--cell", "simple", "--units", "64", "--input-dim", "64",
                          "--alpha", "2.5")
    assert status == 0
    assert "alpha = 2.5 (--alpha; the cell's: 3)" in out  # (64 + 64 + 64) / 64
    assert f"budget 5% = {0.05 * (1 + 99 * 2.5):g} slots" in out


def test_half_precision_plans_hidden_state_schemes_only(capsys):
    status, out, _ = _run(capsys, "plan", "--length", "500", "--budget", "1MiB",
                          "--cell", "lstm", "--units", "64", "--batch", "8",
                          "--input-dim", "16", "--dtype", "float16")
    assert status == 0
    assert f"= {8 * 64 * 2 * 2} bytes, alpha unknown (the layer stores no internal" in out
    rows = _rows(out)
    assert " ".join(rows["msm"][1:]) == (
        "not planned: the layer stores no internal states in float16")
    assert rows["hsm"][1] == str(planner.plan_cost("hsm", 500, 2**20 / 2048))
    status, _, err = _run(capsys, "plan", "--length", "500", "--budget", "5%",
                          "--cell", "lstm", "--units", "64", "--dtype", "bfloat16")
    assert status == 2
    assert "a fraction budget (5%) is of standard BPTT's memory, which needs alpha" in err
    assert err.rstrip().endswith("give --alpha")


@pytest.mark.parametrize(
    "flags, message",
    [([], "a byte budget (256MB) needs the size of one hidden state: give --cell, "
          "--units and --batch (and --dtype, default float32), or --hidden-bytes"),
     (["--cell", "lstm", "--units", "256"],
      "a byte budget (256MB) needs the size of one hidden state: give --batch "
      "too (or --hidden-bytes instead of --cell and --units)"),
     (["--units", "256", "--batch", "32"], "give --cell too"),
     (["--cell", "gru", "--batch", "32"], "give --units too"),
     (["--hidden-bytes", "1024", "--cell", "lstm"],
      "--hidden-bytes and --cell both give the size of one hidden state"),
     (["--cell", "lstm", "--units", "256", "--batch", "32", "--scheme", "ism"],
      "--scheme ism is not planned: it stores internal states, which needs "
      "alpha: give --input-dim or --alpha"),
     (["--cell", "lstm", "--units", "0"], "expected a positive integer, got '0'"),
     (["--hidden-bytes", "0"], "expected a positive number, got '0'")],
)
def test_missing_model_flags_are_named(capsys, flags, message):
    argv = ["plan", "--length", "1000", "--budget", "256MB", *flags]
    try:
        status = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2 and message in err
    for python_name in ("hidden_bytes", "None", "Budget."):
        assert python_name not in err


def test_cell_flags_without_a_cell_are_rejected(capsys):
    status, _, err = _run(capsys, "plan", "--length", "10", "--units", "8")
    assert status == 2
    assert "--units describes a cell: give --cell too (lstm, gru, simple)" in err


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


def test_plan_help_lists_the_budget_forms_the_command_line_takes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for form in ("int", "0.05 or 5%", "256MB", "1.5GiB", "unlimited"):
        assert form in help_text
    assert "Budget." not in help_text and "None" not in help_text
    assert "default: derived from --cell, --units and --input-dim" in help_text


def test_every_budget_form_of_the_help_is_read(capsys):
    for budget in ("200", "0.05", "5%", "256MB", "1.5GiB", "512KiB", "1e9B",
                   "unlimited"):
        status, _, err = _run(capsys, "plan", "--length", "100", "--budget", budget,
                              "--hidden-bytes", "1024")
        assert status == 0, (budget, err)
