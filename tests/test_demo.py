"""The main job end to end: `dpkit demo` trains privately, reports ε ≤ target and a consistent audit."""

import json
import subprocess
import sys


def test_demo_json_end_to_end():
    out = subprocess.run([sys.executable, "-m", "dpkit.cli", "demo", "--json", "--epochs", "4",
                          "--canaries", "300"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["epsilon"] <= r["target_epsilon"]
    assert r["private_accuracy"] > 0.5 and r["non_private_accuracy"] > 0.8
    assert 0 <= r["membership_advantage_bound"] <= 1
    assert r["audit_epsilon_lower"] <= r["epsilon"] and r["audit_consistent"]


def test_demo_bad_input_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "dpkit.cli", "demo", "--delta", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "delta" in out.stderr
