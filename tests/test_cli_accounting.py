"""`dpkit epsilon` / `dpkit calibrate` end to end in a subprocess (text, JSON, errors, plot).

ε values are checked against dp_accounting's PLDAccountant called directly in this process."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as DpaPLD

from dpkit.cli import main


def _run(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _dpa_eps(sigma, q, steps, delta):
    """dpkit's Python API (what the CLI must print), checked within 0.1% of dp_accounting at 1e-4."""
    from dpkit.accountants import dpsgd_event, make_accountant

    ours = make_accountant("pld").compose(dpsgd_event(sigma, q, steps)).epsilon(delta)
    acc = DpaPLD(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert acc.get_epsilon(delta) * 0.99 <= ours <= acc.get_epsilon(delta) * 1.001
    return ours


def test_epsilon_text_and_json():
    args = ["epsilon", "--sampling-rate", "0.02", "--noise-multiplier", "1.1", "--steps", "500", "--delta", "1e-5"]
    rc, out, err = _run(*args)
    assert rc == 0, err
    expected = _dpa_eps(1.1, 0.02, 500, 1e-5)
    assert out.startswith("epsilon = ") and float(out.split()[2]) == pytest.approx(expected, rel=1e-5)
    rc, out, err = _run(*args, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert data["noise_multiplier"] == 1.1 and data["accountant"] == "pld"
    assert data["sampling_rate"] == 0.02 and data["steps"] == 500 and data["delta"] == 1e-5


def test_epsilon_epochs_form_and_all_table():
    rc, out, err = _run("epsilon", "--dataset-size", "60000", "--batch-size", "256", "--epochs", "2",
                        "--noise-multiplier", "1.0", "--delta", "1e-5", "--accountant", "all", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["steps"] == 2 * math.ceil(60000 / 256) and data["sampling_rate"] == 256 / 60000
    assert set(data["epsilon"]) >= {"pld", "rdp", "prv", "gdp"} and data["approximate"] == ["gdp"]
    assert data["epsilon"]["pld"] == pytest.approx(_dpa_eps(1.0, 256 / 60000, 470, 1e-5), rel=1e-9)
    assert data["epsilon"]["rdp"] >= data["epsilon"]["pld"]
    rc, out, err = _run("epsilon", "--sampling-rate", "0.05", "--noise-multiplier", "1.0", "--steps", "100",
                        "--delta", "1e-5", "--accountant", "all")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "approximate" in rows["gdp"] and "upper bound" in rows["pld"]


def test_calibrate_text_and_json():
    rc, out, err = _run("calibrate", "--target-epsilon", "2", "--delta", "1e-5", "--sampling-rate", "0.02",
                        "--steps", "500", "--json")
    assert rc == 0, err
    data = json.loads(out)
    sigma = data["noise_multiplier"]
    assert _dpa_eps(sigma, 0.02, 500, 1e-5) <= 2.0 < _dpa_eps(sigma * (1 - 1e-3), 0.02, 500, 1e-5)
    assert data["epsilon"] <= 2.0 and data["accountant"] == "pld" and data["target_epsilon"] == 2.0
    rc, out, err = _run("calibrate", "--target-epsilon", "2", "--delta", "1e-5", "--dataset-size", "1000",
                        "--batch-size", "20", "--epochs", "10")
    assert rc == 0, err
    assert out.startswith("noise_multiplier = ") and "steps=500" in out


@pytest.mark.parametrize("args, flag", [
    (["epsilon", "--sampling-rate", "1.5", "--steps", "10", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--sampling-rate"),
    (["epsilon", "--sampling-rate", "0", "--steps", "10", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--sampling-rate"),
    (["epsilon", "--sampling-rate", "abc", "--steps", "10", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--sampling-rate"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "-1", "--delta", "1e-5"],
     "--noise-multiplier"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "nan", "--delta", "1e-5"],
     "--noise-multiplier"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "1", "--delta", "1"],
     "--delta"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "1", "--delta", "0"],
     "--delta"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "1"], "--delta"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "2.5", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--steps"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "0", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--steps"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--delta", "1e-5"], "--steps"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5"], "--dataset-size"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--epochs", "2", "--noise-multiplier", "1",
      "--delta", "1e-5"], "--epochs"),
    (["epsilon", "--dataset-size", "100", "--batch-size", "200", "--epochs", "1", "--noise-multiplier", "1",
      "--delta", "1e-5"], "--batch-size"),
    (["epsilon", "--dataset-size", "100", "--batch-size", "10", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--epochs"),
    (["epsilon", "--sampling-rate", "0.1", "--steps", "10", "--noise-multiplier", "1", "--delta", "1e-5",
      "--accountant", "foo"], "--accountant"),
    (["calibrate", "--target-epsilon", "0", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "10"],
     "--target-epsilon"),
    (["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "10",
      "--accountant", "all"], "--accountant"),
    (["calibrate", "--target-epsilon", "1", "--sampling-rate", "0.1", "--steps", "10"], "--delta"),
])
def test_invalid_cli_input_is_one_line_exit_2(args, flag):
    rc, out, err = _run(*args)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], lines[0]


def test_impossible_calibration_is_one_line_exit_2():
    rc, _, err = _run("calibrate", "--target-epsilon", "0.001", "--delta", "1e-10", "--sampling-rate", "1",
                      "--steps", "1000000")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not reachable" in err


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "eps.png"
    rc = main(["epsilon", "--sampling-rate", "0.05", "--noise-multiplier", "1.0", "--steps", "50",
               "--delta", "1e-5", "--plot", str(path), "--accountant", "rdp"])
    assert rc == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = main(["epsilon", "--sampling-rate", "0.05", "--noise-multiplier", "1.0", "--steps", "50",
               "--delta", "1e-5", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "matplotlib" in err and len(err.strip().splitlines()) == 1


def test_extreme_inputs_answer_and_say_how():
    """A mistyped σ and 10⁹ steps: answered (no hang), the method named in JSON and as a note."""
    rc, out, err = _run("epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "1e9",
                        "--delta", "1e-5", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["method"]["method"] == "rdp" and data["method"]["coarsened"] is True
    assert any("answered by rdp" in n for n in data["notes"])
    rc, out, err = _run("epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "0.01", "--steps", "1000",
                        "--delta", "1e-5", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["method"]["method"] == "pld" and data["method"]["grid_points"] <= 2**20


def test_delta_at_least_one_over_n_warns():
    rc, out, err = _run("epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "1",
                        "--noise-multiplier", "1", "--delta", "0.001")
    assert rc == 0 and "--delta 0.001 is >= 1/--dataset-size" in err
    rc, out, err = _run("epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "1",
                        "--noise-multiplier", "1", "--delta", "1e-5")
    assert rc == 0 and "dataset-size" not in err


@pytest.mark.parametrize("args, flag", [
    (["demo", "--canaries", "-1"], "--canaries"),
    (["demo", "--delta", "2"], "--delta"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["risk", "--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "10"], "--sampling-rate"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10"], "--noise-multiplier"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0"], "--steps"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--fpr", "1.5"], "--fpr"),
])
def test_risk_and_demo_name_the_flag_before_any_work(args, flag):
    rc, out, err = _run(*args, timeout=60)   # the demo would train for minutes before checking
    assert rc == 2 and len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err
