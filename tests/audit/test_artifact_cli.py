"""Artefacts, the audit report, and the `dpkit risk` / `dpkit audit` commands (via subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpkit.audit import (AuditArtifact, audit, bayes_security_mia, load_artifact,
                         one_shot_epsilon, save_artifact)

D = 5000


def _artifact(shift, **overrides):
    rng = np.random.default_rng(0)
    kwargs = dict(canary_scores=rng.normal(shift / np.sqrt(D), 1 / np.sqrt(D), 400),
                  null_scores=rng.normal(0, 1 / np.sqrt(D), 400), dim=D, noise_multiplier=1.0,
                  sampling_rate=0.01, steps=1000, delta=1e-5)
    kwargs.update(overrides)
    return AuditArtifact(**kwargs)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_round_trip(tmp_path, suffix):
    art = _artifact(1.0, threat_model="all_iterates")
    path = tmp_path / f"run{suffix}"
    save_artifact(path, art)
    back = load_artifact(path)
    np.testing.assert_array_equal(back.canary_scores, art.canary_scores)
    np.testing.assert_array_equal(back.null_scores, art.null_scores)
    assert (back.dim, back.noise_multiplier, back.sampling_rate, back.steps, back.delta,
            back.threat_model) == (D, 1.0, 0.01, 1000, 1e-5, "all_iterates")
    no_null = _artifact(1.0, null_scores=None)
    save_artifact(path, no_null)
    assert load_artifact(path).null_scores is None


def test_audit_verdicts_against_independent_claim():
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 1000))
    claim = acc.get_epsilon(1e-5)
    weak = audit(_artifact(0.3))
    assert weak.claimed_epsilon == pytest.approx(claim, rel=1e-3)
    assert weak.verdict == "consistent"
    strong = audit(_artifact(12.0))  # shift of 12 noise stds: ε̂ ≫ 1.8
    assert strong.verdict == "violation"
    assert strong.estimate.epsilon_lower > strong.claimed_epsilon
    # the report's estimate is exactly one_shot_epsilon on the artefact (final model: N(0, 1/d))
    art = _artifact(0.3)
    ref = one_shot_epsilon(art.canary_scores, delta=1e-5, dim=D)
    assert weak.estimate == ref
    # σ = 0 claims ε = ∞: nothing can violate it
    assert audit(_artifact(12.0, noise_multiplier=0.0)).verdict == "consistent"


@pytest.mark.parametrize("content, name", [
    ({"format": "other"}, "format"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2]}, "missing"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2], "noise_multiplier": 1,
      "sampling_rate": 0.1, "steps": 5, "delta": 1e-5, "extra": 1}, "unknown"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2], "noise_multiplier": 1,
      "sampling_rate": 0.1, "steps": 5, "delta": 1e-5}, "null_scores or dim"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2], "noise_multiplier": -1,
      "sampling_rate": 0.1, "steps": 5, "delta": 1e-5, "dim": 3}, "noise_multiplier"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2], "noise_multiplier": 1,
      "sampling_rate": 0.1, "steps": 5, "delta": 2, "dim": 3}, "delta"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1, 0.2], "noise_multiplier": 1,
      "sampling_rate": 0.1, "steps": 5, "delta": 1e-5, "dim": 3,
      "threat_model": "all_iterates"}, "all_iterates"),
    ({"format": "dpkit-audit-v1", "canary_scores": [0.1], "noise_multiplier": 1,
      "sampling_rate": 0.1, "steps": 5, "delta": 1e-5, "dim": 3}, "canary_scores"),
    ([1, 2], "JSON object"),
])
def test_invalid_artefacts(tmp_path, content, name):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=name):
        load_artifact(path)


def test_invalid_paths_and_types(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_artifact(tmp_path / "x.txt")
    with pytest.raises(TypeError, match="artifact"):
        save_artifact(tmp_path / "x.json", {"canary_scores": [1, 2]})
    with pytest.raises(TypeError, match="artifact"):
        audit({"canary_scores": [1, 2]})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_artifact(tmp_path / "broken.json")


def _dpkit(*args):
    return subprocess.run([sys.executable, "-m", "dpkit.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_risk_text_and_json():
    res = _dpkit("risk", "--sampling-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000",
                 "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rows = {r["relation"]: r for r in out["relations"]}
    assert rows["add_remove"]["bayes_security"] == pytest.approx(bayes_security_mia(1.0, 0.01, 1000))
    assert rows["substitution"]["bayes_security_strict"] == pytest.approx(
        bayes_security_mia(1.0, 0.01, 1000, relation="substitution", strict=True))
    assert set(rows["add_remove"]["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    text = _dpkit("risk", "--sampling-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "100",
                  "--fpr", "0.05")
    assert text.returncode == 0 and "substitution" in text.stdout and "TPR@FPR=0.05" in text.stdout


def test_cli_audit_text_json_plot_and_errors(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.npz"
    save_artifact(good, _artifact(0.3))
    save_artifact(bad, _artifact(12.0))
    res = _dpkit("audit", str(good), "--plot", str(tmp_path / "h.png"))
    assert res.returncode == 0, res.stderr
    assert "CONSISTENT" in res.stdout
    assert (tmp_path / "h.png").stat().st_size > 1000
    res = _dpkit("audit", str(bad), "--json")
    assert res.returncode == 1
    out = json.loads(res.stdout)
    assert out["verdict"] == "violation" and out["estimate"]["epsilon_lower"] > out["claimed_epsilon"]
    res = _dpkit("audit", str(tmp_path / "missing.json"))
    assert res.returncode == 2 and "FILE" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("argv, name", [
    (["risk", "--sampling-rate", "0", "--noise-multiplier", "1.0", "--steps", "100"],
     "--sampling-rate"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "100"],
     "--noise-multiplier"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0"], "--steps"),
    (["risk", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "5", "--fpr", "2"],
     "--fpr"),
    (["audit", "{good}", "--confidence", "2"], "confidence"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, name):
    # in-process (dpkit.cli.main) to keep the table fast; the subprocess tests cover the entry point
    from dpkit.cli import main

    good = tmp_path / "good.json"
    save_artifact(good, _artifact(0.3))
    assert main([a.format(good=good) for a in argv]) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1


def test_audit_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dpkit.audit as a\n"
            "for n in a.__all__: getattr(a, n)\n"
            "import dpkit.audit._cli, dpkit.audit._plot\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert res.returncode == 0, res.stderr
