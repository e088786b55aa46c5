"""`dpkit epsilon` / `dpkit calibrate` end to end in a subprocess (text, JSON, errors, plot).

ε values are checked against dp_accounting's PLDAccountant called directly in this process, and
each ``--mechanism`` against its Python API (or an independent reference) on the same settings."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as DpaPLD

from dpkit.accountants import dpsgd_event, make_accountant
from dpkit.cli import main


def _run(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _dpa_eps(sigma, q, steps, delta):
    """dpkit's Python API (what the CLI must print), checked within 0.1% of dp_accounting at 1e-4."""
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


# ---------------------------------------------------------------- --mechanism: each equals its Python API


def _cli(capsys, *args):
    rc = main(list(args) + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_fedavg_equals_per_round_accounting(capsys):
    data = _cli(capsys, "epsilon", "--mechanism", "fedavg", "--num-clients", "1000", "--clients-per-round", "50",
                "--rounds", "200", "--noise-multiplier", "1.0", "--delta", "1e-5")
    acc = make_accountant("pld")
    for _ in range(200):  # DPFedAvg composes step_event = dpsgd_event(z, K/N, 1) once per round
        acc.compose(dpsgd_event(1.0, 50 / 1000, 1))
    assert data["epsilon"] == acc.epsilon(1e-5) and data["mechanism"] == "fedavg"
    assert data["sampling_rate"] == 0.05 and data["steps"] == 200


def test_dicesgd_equals_python_api(capsys):
    pytest.importorskip("torch")
    from dpkit.optim.error_feedback import calibrate_dicesgd_noise, dicesgd_event

    common = ["--sampling-rate", "0.01", "--steps", "500", "--delta", "1e-5", "--clip2", "0.02",
              "--expected-batch-size", "100", "--clip1", "1.5"]
    data = _cli(capsys, "epsilon", "--mechanism", "dicesgd", "--noise-multiplier", "1.2", *common)
    ref = make_accountant("pld").compose(dicesgd_event(1.2, 0.01, 500, clip1=1.5, clip2=0.02,
                                                       expected_batch_size=100)).epsilon(1e-5)
    assert data["epsilon"] == pytest.approx(ref, rel=1e-12) and data["clip2"] == 0.02
    cal = _cli(capsys, "calibrate", "--mechanism", "dicesgd", "--target-epsilon", "3", *common)
    sigma = calibrate_dicesgd_noise(3.0, 1e-5, 0.01, 500, clip1=1.5, clip2=0.02, expected_batch_size=100)
    assert cal["noise_multiplier"] == pytest.approx(sigma, rel=2e-3) and cal["epsilon"] <= 3.0


def test_dicesgd_gradient_bound_equals_python_api(capsys):
    pytest.importorskip("torch")
    from dpkit.optim.dicesgd_bounded import bounded_dicesgd_epsilon, calibrate_bounded_dicesgd_noise

    common = ["--sampling-rate", "0.05", "--steps", "200", "--delta", "1e-5", "--clip2", "0.005",
              "--expected-batch-size", "200", "--gradient-bound", "1.5"]
    data = _cli(capsys, "epsilon", "--mechanism", "dicesgd", "--noise-multiplier", "8", *common)
    ref = bounded_dicesgd_epsilon(8.0, 0.05, 200, 1e-5, clip1=1.0, clip2=0.005, gradient_bound=1.5,
                                  expected_batch_size=200)
    assert data["epsilon"] == pytest.approx(ref, rel=1e-12) and data["gradient_bound"] == 1.5
    assert data["method"]["method"] == "dicesgd-bounded"
    cal = _cli(capsys, "calibrate", "--mechanism", "dicesgd", "--target-epsilon", "4", *common)
    sigma = calibrate_bounded_dicesgd_noise(4.0, 1e-5, 0.05, 200, clip1=1.0, clip2=0.005,
                                            gradient_bound=1.5, expected_batch_size=200)
    assert cal["noise_multiplier"] == pytest.approx(sigma, rel=2e-3) and cal["epsilon"] <= 4.0


def test_bandmf_cyclic_is_dpsgd_over_the_group_steps(capsys):
    """Amplified BandMF (NeurIPS 2023, Thm 4): column-normalised C => DP-SGD with ceil(n/b) steps."""
    data = _cli(capsys, "epsilon", "--mechanism", "bandmf", "--bands", "4", "--sampling-rate", "0.05",
                "--steps", "64", "--noise-multiplier", "1.0", "--delta", "1e-5")
    ref = DpaPLD(value_discretization_interval=1e-4)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 16))
    assert data["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert data["method"]["method"] == "banded" and data["sensitivity"] == pytest.approx(1.0)
    cal = _cli(capsys, "calibrate", "--mechanism", "bandmf", "--bands", "4", "--sampling-rate", "0.05",
               "--steps", "64", "--target-epsilon", "2", "--delta", "1e-5")
    assert cal["epsilon"] <= 2.0 and cal["mechanism"] == "bandmf"


@pytest.mark.parametrize("mechanism, extra", [("tree", []), ("blt", ["--buffers", "3"]), ("bandmf", ["--bands", "4"])])
def test_unamplified_matrix_mechanisms(capsys, mechanism, extra):
    from dpkit.mechanisms.matrix import Participation, sensitivity, strategies

    data = _cli(capsys, "epsilon", "--mechanism", mechanism, *extra, "--participation", "min-separation",
                "--min-separation", "8", "--max-participations", "4", "--steps", "32",
                "--noise-multiplier", "4", "--delta", "1e-6")
    exact = dp_accounting.get_epsilon_gaussian(4.0, 1e-6)   # noise standardised by sens(C)
    assert data["epsilon"] == pytest.approx(exact, rel=1e-6) and data["method"]["method"] == "unamplified"
    strategy = {"tree": lambda: strategies.binary_tree(32), "blt": lambda: strategies.blt(32, 3),
                "bandmf": lambda: strategies.banded(32, 4)}[mechanism]()
    assert data["sensitivity"] == pytest.approx(sensitivity(strategy.encoder(), Participation.min_separation(8, 4)))


@pytest.mark.parametrize("variant, rate", [("centralized", None), ("federated", 0.1)])
def test_admm_equals_python_api(capsys, variant, rate):
    pytest.importorskip("torch")
    from dpkit.admm.accounting import admm_epsilon, calibrate_admm_noise

    sched = ["--steps", "30"] + ([] if rate is None else ["--sampling-rate", str(rate)])
    data = _cli(capsys, "epsilon", "--mechanism", "admm", "--variant", variant, *sched,
                "--noise-multiplier", "40", "--delta", "1e-5")
    assert data["epsilon"] == admm_epsilon(40.0, 30, 1e-5, variant=variant, sampling_rate=rate)
    cal = _cli(capsys, "calibrate", "--mechanism", "admm", "--variant", variant, *sched,
               "--target-epsilon", "5", "--delta", "1e-5")
    assert cal["noise_multiplier"] == calibrate_admm_noise(5.0, 1e-5, 30, variant=variant, sampling_rate=rate,
                                                           rtol=1e-3)


BASE = ["epsilon", "--noise-multiplier", "1", "--delta", "1e-5"]


@pytest.mark.parametrize("args, flag", [
    (BASE + ["--sampling-rate", "0.1", "--steps", "10", "--bands", "2"], "--bands"),
    (BASE + ["--mechanism", "bandmf", "--sampling-rate", "0.1", "--steps", "10"], "--bands"),
    (BASE + ["--mechanism", "bandmf", "--bands", "20", "--sampling-rate", "0.1", "--steps", "10"], "--bands"),
    (BASE + ["--mechanism", "bandmf", "--bands", "2", "--dataset-size", "100", "--batch-size", "10",
             "--epochs", "1"], "--steps"),
    (BASE + ["--mechanism", "tree", "--steps", "10"], "--participation"),
    (BASE + ["--mechanism", "tree", "--steps", "10", "--participation", "min-separation"], "--min-separation"),
    (BASE + ["--mechanism", "tree", "--steps", "10", "--participation", "single", "--min-separation", "2"],
     "--min-separation"),
    (BASE + ["--mechanism", "tree", "--steps", "100000", "--participation", "single"], "--steps"),
    (BASE + ["--mechanism", "blt", "--steps", "10", "--participation", "single", "--buffers", "0"], "--buffers"),
    (BASE + ["--mechanism", "tree", "--steps", "10", "--participation", "single", "--accountant", "rdp"],
     "--accountant"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10"], "--clip2"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10", "--clip2", "1"],
     "--expected-batch-size"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10", "--clip2", "-1",
             "--expected-batch-size", "5"], "--clip2"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10", "--clip2", "1",
             "--expected-batch-size", "5", "--noise-split", "1"], "--noise-split"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10", "--clip2", "1",
             "--expected-batch-size", "5", "--gradient-bound", "0.5"], "--gradient-bound"),
    (BASE + ["--mechanism", "dicesgd", "--sampling-rate", "0.1", "--steps", "10", "--clip2", "1",
             "--expected-batch-size", "5", "--gradient-bound", "2", "--noise-split", "0.5"], "--noise-split"),
    (BASE + ["--sampling-rate", "0.1", "--steps", "10", "--gradient-bound", "2"], "--gradient-bound"),
    (BASE + ["--mechanism", "fedavg", "--num-clients", "100", "--rounds", "10"], "--clients-per-round"),
    (BASE + ["--mechanism", "fedavg", "--num-clients", "100", "--clients-per-round", "200", "--rounds", "10"],
     "--clients-per-round"),
    (BASE + ["--mechanism", "fedavg", "--num-clients", "100", "--clients-per-round", "10", "--rounds", "10",
             "--steps", "5"], "--steps"),
    (BASE + ["--mechanism", "admm", "--sampling-rate", "0.1", "--steps", "10"], "--variant"),
    (BASE + ["--mechanism", "admm", "--variant", "federated", "--steps", "10"], "--sampling-rate"),
    (BASE + ["--mechanism", "admm", "--steps", "10", "--bands", "3"], "--bands"),
    (BASE + ["--mechanism", "sgd", "--steps", "10"], "--mechanism"),
])
def test_bad_mechanism_combinations(capsys, args, flag):
    with pytest.raises(SystemExit) if "sgd" in args else _no_raise():
        rc = main(args)
        assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- dpkit plan
def test_plan_rows_are_feasible_minimal_and_sorted(capsys):
    data = _cli(capsys, "plan", "--dataset-size", "1000", "--target-epsilon", "2", "--delta", "1e-5",
                "--batch-sizes", "50", "200", "--epochs", "1", "5", "--max-grad-norm", "0.5")
    rows = data["rows"]
    assert len(rows) == 4 and data["accountant"] == "rdp"
    ratios = [r["noise_to_signal"] for r in rows]
    assert ratios == sorted(ratios)
    for r in rows:
        assert r["steps"] == math.ceil(r["epochs"] * math.ceil(1000 / r["batch_size"]))
        assert r["noise_to_signal"] == pytest.approx(r["noise_multiplier"] * 0.5 / r["batch_size"])
        eps = lambda s: make_accountant("rdp").compose(  # noqa: E731
            dpsgd_event(s, r["batch_size"] / 1000, r["steps"])).epsilon(1e-5)
        assert eps(r["noise_multiplier"]) <= 2.0 < eps(r["noise_multiplier"] * (1 - 1e-2))


@pytest.mark.parametrize("args, flag", [
    (["--dataset-size", "100", "--target-epsilon", "1", "--delta", "1e-5", "--batch-sizes", "200"], "--batch-sizes"),
    (["--dataset-size", "0", "--target-epsilon", "1", "--delta", "1e-5"], "--dataset-size"),
    (["--dataset-size", "100", "--target-epsilon", "-1", "--delta", "1e-5"], "--target-epsilon"),
    (["--dataset-size", "100", "--target-epsilon", "1", "--delta", "1e-5", "--epochs", "0"], "--epochs"),
])
def test_plan_bad_input(capsys, args, flag):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err


def test_all_accountants_at_a_billion_steps_answer(capsys):
    """Before: prv's fallback did not catch MemoryError (2.76 TiB allocation) -> traceback."""
    data = _cli(capsys, "epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "1e9",
                "--delta", "1e-5", "--accountant", "all")
    rdp = make_accountant("rdp").compose(dpsgd_event(1.0, 0.01, 10**9)).epsilon(1e-5)
    assert data["epsilon"]["prv"] == pytest.approx(rdp, rel=1e-12)   # prv fell back to RDP
    assert data["epsilon"]["pld"] <= rdp + 1e-9 and data["method"]["pld"]["method"] == "rdp"
    assert any("prv" in note and "RDP" in note for note in data["notes"])
