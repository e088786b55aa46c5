"""`dpkit epsilon/calibrate --mechanism ...`: each mechanism equals its Python API (or an independent
reference) on the same settings, and bad combinations get one line naming the flag, exit 2."""

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as DpaPLD

from dpkit.accountants import dpsgd_event, make_accountant
from dpkit.cli import main


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
