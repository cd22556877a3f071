"""Quantizers against examples worked by hand (FORMATS §1), and the straight-through estimator."""

import torch
import torch.nn.functional as F

from bitnet158 import quant
from bitnet158.layers import BitLinear


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- ternary (absmean) ---------------------------------------------------------------------

def test_ternary_small_matrix_by_hand():
    # mean|W| = (0.5 + 1.5 + 0 + 1) / 4 = 0.75;  W/s = [0.67, -2, 0, 1.33] -> round -> clip
    codes, s = quant.absmean_ternary(T([[0.5, -1.5], [0.0, 1.0]]))
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1], [0, 1]]
    assert float(s) == 0.75


def test_ternary_ties_round_half_to_even():
    # mean|W| = 0.5;  W/s = [0.5, 1.5, -0.5, -1.5] -> [0, 2, -0, -2] -> clip -> [0, 1, 0, -1]
    codes, s = quant.absmean_ternary(T([[0.25, 0.75, -0.25, -0.75]]))
    assert float(s) == 0.5
    assert codes.tolist() == [[0, 1, 0, -1]]


def test_ternary_all_zero_uses_clamped_scale():
    codes, s = quant.absmean_ternary(torch.zeros(3, 4))
    assert codes.abs().sum() == 0
    assert float(s) == torch.tensor(1e-5).item()


def test_ternary_row_of_one_value():
    codes, s = quant.absmean_ternary(T([[-0.2, -0.2, -0.2, -0.2]]))
    assert codes.tolist() == [[-1, -1, -1, -1]]
    assert float(s) == torch.tensor(0.2).item()


def test_ternary_is_ternary_with_zeros_on_gaussian_weights():
    codes, _ = quant.absmean_ternary(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    zero_share = (codes == 0).float().mean().item()
    # |z| < 0.5 * E|z| = 0.399 for a standard normal: P = 0.31
    assert 0.28 < zero_share < 0.34


def test_ternary_statistic_in_fp32_for_bf16_input():
    w = T([[0.5, -1.5], [0.0, 1.0]]).bfloat16()
    codes, s = quant.absmean_ternary(w)
    assert s.dtype == torch.float32 and float(s) == 0.75 and codes.tolist() == [[1, -1], [0, 1]]


# ---- binary (BitNet b1) --------------------------------------------------------------------

def test_binary_by_hand():
    # mean W = 0.5; W - mean = [0.5, -2.5, 2.5, -0.5]; beta = mean|W| = 6/4 of the uncentred W
    codes, s = quant.sign_binary(T([[1.0, -2.0], [3.0, 0.0]]))
    assert codes.tolist() == [[1, -1], [1, -1]]
    assert float(s) == 1.5


def test_binary_zero_maps_to_minus_one():
    # mean = 2; centred = [-1, 0, 1]: the paper's Sign sends 0 to -1 (torch.sign would give 0)
    codes, s = quant.sign_binary(T([[1.0, 2.0, 3.0]]))
    assert codes.tolist() == [[-1, -1, 1]]
    assert float(s) == 2.0
    codes, _ = quant.sign_binary(torch.zeros(2, 2))
    assert codes.tolist() == [[-1, -1], [-1, -1]]


# ---- activations (absmax int8) -------------------------------------------------------------

def test_int8_per_token_by_hand():
    x = T([[1.0, -0.5, 0.25, 0.0],      # *127: [127, -63.5, 31.75, 0]   -> -63.5 ties to -64
           [-2.0, 1.0, 0.5, 3.0],       # *127/3: [-84.67, 42.33, 21.17, 127]
           [0.7, 0.7, 0.7, 0.7],        # a row of one value
           [0.0, 0.0, 0.0, 0.0]])       # all zero: clamped absmax, codes 0
    codes, s = quant.absmax_int8_per_token(x)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[127, -64, 32, 0], [-85, 42, 21, 127], [127, 127, 127, 127], [0, 0, 0, 0]]
    assert s.shape == (4, 1)
    expected = torch.tensor([1.0, 3.0, 0.7, 1e-5]) / 127.0
    assert torch.equal(s.flatten(), expected)


def test_int8_ties_round_half_to_even():
    codes, _ = quant.absmax_int8_per_token(T([[127.0, 0.5, 1.5, 2.5, -2.5]]))
    assert codes.tolist() == [[127, 0, 2, 2, -2]]


def test_int8_per_tensor_variant_by_hand():
    # one absmax (4) for the whole tensor: *127/4 = [31.75, 63.5, 127, -15.875]
    codes, s = quant.absmax_int8_per_tensor(T([[1.0, 2.0], [4.0, -0.5]]))
    assert codes.tolist() == [[32, 64], [127, -16]]
    assert s.dim() == 0 and float(s) == torch.tensor(4.0 / 127.0).item()  # fp32


def test_int8_codes_stay_in_symmetric_range():
    codes, _ = quant.absmax_int8_per_token(torch.randn(64, 100) * 1000)
    assert codes.min() >= -127 and codes.max() <= 127


# ---- straight-through estimator ------------------------------------------------------------

def test_ste_forward_is_exactly_q_and_gradient_is_identity():
    v = torch.randn(5, requires_grad=True)
    q = torch.round(v.detach())
    out = quant.ste(v, q)
    assert torch.equal(out, q)
    (out * torch.arange(5.0)).sum().backward()
    assert torch.equal(v.grad, torch.arange(5.0))


def test_bitlinear_weight_gradient_equals_plain_linear_at_quantized_weight():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, mode="b158")
    x = torch.randn(3, 16, requires_grad=True)
    upstream = torch.randn(3, 8)
    (layer(x) * upstream).sum().backward()

    # the reference: a plain linear layer evaluated at the quantized weight and activations
    wq = quant.fake_quant(quant.absmean_ternary, layer.weight).clone().requires_grad_(True)
    xq = quant.fake_quant(quant.absmax_int8_per_token, x).clone().requires_grad_(True)
    (F.linear(xq, wq) * upstream).sum().backward()
    assert torch.equal(layer.weight.grad, wq.grad)
    assert torch.equal(x.grad, xq.grad)


def test_lambda_and_noise_ends_are_exact():
    v = torch.randn(6, 6)
    q = quant.fake_quant(quant.absmean_ternary, v)
    assert torch.equal(quant.lambda_mix(v, q, 0.0), v)
    assert torch.equal(quant.lambda_mix(v, q, 1.0), q)
    assert torch.equal(quant.noise_mix(v, q, 0.0), v)
    assert torch.equal(quant.noise_mix(v, q, 1.0), q)
    half = quant.noise_mix(v, q, 0.5, generator=torch.Generator().manual_seed(0))
    assert ((half == q) | (half == v)).all() and not torch.equal(half, v) and not torch.equal(half, q)
