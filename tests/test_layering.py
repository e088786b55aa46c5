"""The torch-free side (dpkit, dpkit.accountants, the CLI, dpkit.audit) works with torch absent."""

import importlib.util
import json
import subprocess
import sys

# torch is made un-importable BEFORE anything else is imported. A meta-path blocker (exactly what
# an environment without torch looks like) is used rather than `sys.modules["torch"] = None`:
# scipy >= 1.15's array-API helpers look up sys.modules["torch"] and call getattr on it, so the
# None placeholder breaks `import scipy.stats` itself, whatever dpkit does.
SCRIPT = r"""
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
import dpkit, dpkit.accountants
from dpkit.accountants import make_accountant, dpsgd_event, calibrate_noise_multiplier
eps = make_accountant("pld").compose(dpsgd_event(1.0, 0.01, 100)).epsilon(1e-5)
assert 0 < eps < 10, eps
assert calibrate_noise_multiplier(2.0, 1e-5, 0.01, 100) > 0
from dpkit.cli import main
rc = main(["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "100",
           "--delta", "1e-5", "--json"])
assert rc == 0
try:
    main(["--help"])                   # builds every sub-command's parser
except SystemExit as exc:
    assert exc.code == 0, exc.code
if CHECK_AUDIT:
    import dpkit.audit
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH_MODULES", loaded)
"""


def test_torch_free_import_and_cli():
    check_audit = importlib.util.find_spec("dpkit.audit") is not None
    code = SCRIPT.replace("CHECK_AUDIT", repr(check_audit))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["accountant"] == "pld" and "usage: dpkit" in proc.stdout
    assert lines[-1] == "TORCH_MODULES []"
