"""Convolution per-example norms and clipped sums on every path of the per-shape choice
(ghost norm through im2col, instantiation through the conv kernel or through im2col + GEMM) equal
float64 batch-of-1 references, for 1-, 2- and 3-D convolutions with stride, dilation, groups and
padding; the GroupNorm rule's fast formula and its cancellation guard likewise."""

import pytest
import torch
import torch.nn as nn

from dpkit.grad_sample import GradientEngine
from dpkit.grad_sample.contributions import ConvWeightGrad, LinearWeightGrad
from dpkit.grad_sample.layers import ConvRule, GroupNormRule, InstanceNormRule
from tests.grad_sample.reference import clipped_sum, per_example_grads

pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py

CONVS = {
    "conv1d_stride_pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 11)),
    "conv1d_dilation_groups": (lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2, bias=False), (4, 4, 12)),
    "conv2d_stride_dil_groups_pad": (lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2),
                                     (3, 4, 9, 9)),
    "conv2d_rect_kernel_asym_pad": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(1, 0)), (4, 3, 7, 8)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1), (3, 4, 6, 6)),
    "conv3d_stride_dil_pad": (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), dilation=(2, 1, 1),
                                                padding=(1, 1, 0)), (3, 2, 5, 6, 4)),
}
PATHS = [(True, "conv"), (False, "conv"), (False, "gemm")]


def _reference(conv, x, g):
    """(B, *weight.shape) per-example weight gradients of Σ_i ⟨conv(x_i), g_i⟩, one example at a time."""
    return per_example_grads(conv, (x, g), lambda m, inp: (m(inp[0]) * inp[1]).sum())[id(conv.weight)]


def _view(conv, x, g):
    return lambda: LinearWeightGrad(*(lambda v: (v.a, v.g, v.weight_shape))(ConvRule().view(conv, x, g)))


@pytest.mark.parametrize("ghost,kernel", PATHS)
@pytest.mark.parametrize("case", sorted(CONVS))
def test_forced_path_matches_batch_of_one_reference(case, ghost, kernel):
    torch.manual_seed(0)
    make, shape = CONVS[case]
    conv = make()
    x = torch.randn(*shape)
    g = torch.randn_like(conv(x))
    ref = _reference(conv, x, g)
    B = x.shape[0]
    contrib = ConvWeightGrad(x, g, conv, _view(conv, x, g), ghost=ghost, kernel=kernel)
    assert contrib.path == ("ghost" if ghost else "instantiate")
    torch.testing.assert_close(contrib.norm_sq(), ref.reshape(B, -1).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    c = torch.rand(B)
    torch.testing.assert_close(contrib.clipped_sum(c), torch.einsum("b...,b->...", ref, c),
                               rtol=1e-10, atol=1e-12)
    if not ghost:
        torch.testing.assert_close(contrib.instantiate(), ref, rtol=1e-10, atol=1e-12)


def test_unknown_kernel_is_refused_by_name():
    conv = nn.Conv1d(2, 2, 3)
    x = torch.randn(2, 2, 5)
    with pytest.raises(ValueError, match="kernel must be 'conv' or 'gemm'"):
        ConvWeightGrad(x, conv(x), conv, None, kernel="fft")


# automatic choice: ghost iff T·(d+p) < d·p (T output positions, d = C_in/K·prod(k), p = C_out/K);
# GEMM instantiation iff fewer than 8 input channels per group
AUTO = {
    "ghost": (lambda: nn.Conv2d(16, 16, 3, padding=1), (4, 16, 3, 3), "ghost", "conv"),  # T=9: 9·160 < 2304
    "instantiate_conv": (lambda: nn.Conv2d(8, 4, 3, padding=1), (4, 8, 8, 8), "instantiate", "conv"),
    "instantiate_gemm": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (4, 3, 8, 8), "instantiate", "gemm"),
    "ghost_conv3d_groups": (lambda: nn.Conv3d(32, 32, 2, groups=2), (3, 32, 3, 3, 3), "ghost", "conv"),
    "instantiate_conv1d_dilated": (lambda: nn.Conv1d(2, 4, 3, dilation=3, padding=2), (5, 2, 20),
                                   "instantiate", "gemm"),
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", sorted(AUTO))
def test_engine_choice_per_shape_matches_reference(case, reduction):
    torch.manual_seed(1)
    make, shape, path, kernel = AUTO[case]
    conv = make()
    x = torch.randn(*shape)
    g = torch.randn_like(conv(x))
    B = x.shape[0]
    chosen = ConvWeightGrad(x, g, conv, None)
    assert (chosen.path, chosen.kernel) == (path, kernel)
    ref = per_example_grads(conv, (x, g), lambda m, inp: (m(inp[0]) * inp[1]).sum())
    norms = torch.sqrt(sum(v.reshape(B, -1).pow(2).sum(1) for v in ref.values()))
    clip = 0.5 * norms.median().item()  # clipping active for about half the examples
    expected = clipped_sum(ref, clip)
    engine = GradientEngine(conv, max_grad_norm=clip, mode="bk", loss_reduction=reduction)
    loss = (conv(x) * g).sum()
    (loss / B if reduction == "mean" else loss).backward()
    assert engine.accumulate() == B
    assert engine.paths[""] == path
    for p in conv.parameters():
        torch.testing.assert_close(engine.clipped_sum(p), expected[id(p)], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm,rule", [(lambda: nn.GroupNorm(2, 6), GroupNormRule()),
                                       (lambda: nn.InstanceNorm2d(6, affine=True), InstanceNormRule())])
def test_group_norm_rule_fast_formula_and_cancellation_guard(norm, rule):
    """Fast formula rstd·(Σg·x − μΣg): float64 reference in float32; with |μ|/σ above the limit
    the rule forms x̂ (its result is then the generic rule's, bit for bit)."""
    torch.manual_seed(2)
    norm = norm().float()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    g = torch.randn(4, 6, 8, 8).float()
    x = torch.randn(4, 6, 8, 8).float().relu()  # post-ReLU activations: |μ|/σ ≈ 0.6
    got = rule.per_sample_grads(norm, x, g)
    ref_model = norm.double()
    ref = per_example_grads(ref_model, (x.double(), g.double()), lambda m, inp: (m(inp[0]) * inp[1]).sum())
    torch.testing.assert_close(got["weight"].double(), ref[id(ref_model.weight)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["bias"].double(), ref[id(ref_model.bias)], rtol=1e-5, atol=1e-5)
    norm = norm.float()
    shifted = x + 100.0  # |μ|/σ ≈ 180 > max_mean_over_std
    got = rule.per_sample_grads(norm, shifted, g)
    generic = super(GroupNormRule, rule).per_sample_grads(norm, shifted, g)
    assert torch.equal(got["weight"], generic["weight"]) and torch.equal(got["bias"], generic["bias"])
