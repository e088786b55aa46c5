"""Rules for layers transformers defines itself (Conv1D, family RMSNorms) equal the float64
batch-of-1 reference, take their native path (not the torch.func fallback), and are registered
only once transformers is imported."""

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")

from dpkit.grad_sample import GradientEngine  # noqa: E402
from tests.grad_sample.reference import clipped_sum, per_example_grads  # noqa: E402


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


class Block(nn.Module):
    """layer -> tanh -> Linear: the layer sees (B, T, d) inputs; 2-D inputs with ``flat``."""

    def __init__(self, layer, width, flat=False):
        super().__init__()
        self.layer, self.head, self.flat = layer, nn.Linear(width, 2), flat

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x[:, 0] if self.flat else x)))


def _loss(m, inp):
    return (m(inp[0]) - inp[1]).pow(2).sum()


def _check(model, x, mode, layer_name="layer", rtol=1e-7, atol=1e-10):
    with torch.no_grad():
        y = torch.randn_like(model(x))
    B = x.shape[0]
    ref = per_example_grads(model, (x, y), _loss)
    clip = 0.5 * torch.sqrt(sum(v.reshape(B, -1).pow(2).sum(1) for v in ref.values())).median().item()
    expected = clipped_sum(ref, clip)
    engine = GradientEngine(model, max_grad_norm=clip, mode=mode, loss_reduction="sum")
    _loss(model, (x, y)).backward()
    assert engine.accumulate() == B
    for p in model.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)], rtol=rtol, atol=atol)
    return engine.paths[layer_name]


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("T,expected_bk_path", [(3, "ghost"), (40, "instantiate")])
def test_gpt2_conv1d_linear_view(T, expected_bk_path, mode):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = Block(Conv1D(24, 20), 24)  # nf=24 outputs, nx=20 inputs; p·d = 480: ghost iff 2T² ≤ 480
    with torch.no_grad():
        model.layer.bias.normal_()
    path = _check(model, torch.randn(4, T, 20), mode)
    assert path == (expected_bk_path if mode == "bk" else "instantiate")
    if mode == "bk":  # book-keeping backward: autograd's non-private weight gradient is skipped
        assert model.layer.weight.grad is None and model.layer.bias.grad is None


def _norm_classes():
    from dpkit.integrations.transformers import ELEMENTWISE_SCALE_CLASSES

    for qualified in ELEMENTWISE_SCALE_CLASSES:
        module, _, cls = qualified.rpartition(".")
        yield pytest.param(module, cls, id=cls)


@pytest.mark.parametrize("mode", ["bk", "per_sample"])
@pytest.mark.parametrize("module_name,class_name", _norm_classes())
def test_family_rmsnorm_elementwise_rule(module_name, class_name, mode):
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        pytest.skip(f"{module_name}.{class_name} is not in this transformers version")
    torch.manual_seed(1)
    norm = cls(6)
    with torch.no_grad():
        norm.weight.normal_()
    # the layers normalise in float32 whatever the model dtype (Gemma also scales in float32, so
    # autograd's own weight gradient is a float32 product): float32 tolerances
    path = _check(Block(norm, 6), torch.randn(5, 4, 6) * 3, mode, rtol=2e-5, atol=1e-7)
    assert path == "per_sample"


def test_rules_register_only_after_transformers_import():
    code = ("import sys, torch.nn as nn, dpkit; from dpkit.grad_sample import GradientEngine; "
            "GradientEngine(nn.Linear(2, 2), max_grad_norm=1.0); "
            "assert 'transformers' not in sys.modules and 'dpkit.integrations.transformers' not in sys.modules; "
            "from transformers.pytorch_utils import Conv1D; "
            "from dpkit.grad_sample.layers import rule_for; "
            "from dpkit.integrations.transformers import Conv1DRule; "
            "assert isinstance(rule_for(Conv1D(3, 2)), Conv1DRule)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
