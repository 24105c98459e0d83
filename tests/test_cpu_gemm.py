"""vlmlab.cpu_gemm under pin(): torch's CPU GEMMs are numpy's OpenBLAS products, bit for bit, forward and backward."""
import numpy as np
import pytest
import torch

from vlmlab import cpu_gemm


def _rand(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_pin_routes_gemms_to_openblas_haswell():
    assert cpu_gemm.installed() and cpu_gemm.corename() == "haswell"  # conftest pinned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_op_is_numpys_product_bit_for_bit(dtype):
    a, b, bias = _rand(300, 129, dtype=dtype), _rand(129, 65, dtype=dtype), _rand(65, dtype=dtype)
    want = a.numpy() @ b.numpy()
    assert np.array_equal(torch.mm(a, b).numpy(), want)
    a_cols = a.t().contiguous().t()  # column-major, as a backward's transposed operands: passed to BLAS as they are
    assert np.array_equal(torch.mm(a_cols, b).numpy(), np.asfortranarray(a.numpy()) @ b.numpy())
    assert np.array_equal(torch.addmm(bias, a, b).numpy(), want + bias.numpy())
    assert np.array_equal(torch.addmm(bias, a, b, beta=0.5, alpha=2.0).numpy(), want * 2.0 + bias.numpy() * 0.5)
    x, y = _rand(4, 37, 64, dtype=dtype), _rand(4, 64, 33, dtype=dtype)
    assert np.array_equal(torch.bmm(x, y).numpy(), x.numpy() @ y.numpy())
    c = _rand(4, 37, 33, dtype=dtype)
    assert np.array_equal(torch.baddbmm(c, x, y).numpy(), x.numpy() @ y.numpy() + c.numpy())


def test_linear_forward_and_backward_go_through_it():
    lin = torch.nn.Linear(96, 288)
    x = _rand(2304, 96).requires_grad_()
    y = lin(x)
    assert np.array_equal(y.detach().numpy(), x.detach().numpy() @ lin.weight.detach().numpy().T + lin.bias.detach().numpy())
    g = _rand(2304, 288)
    y.backward(g)
    assert np.array_equal(x.grad.numpy(), g.numpy() @ lin.weight.detach().numpy())
    assert np.array_equal(lin.weight.grad.numpy(), g.numpy().T @ x.detach().numpy())


def test_close_to_mkl_and_other_dtypes_fall_back():
    a, b = _rand(512, 512), _rand(512, 512)
    mkl = torch.ops.aten.mm.out(a, b, out=torch.empty(512, 512))  # ATen's own kernel (MKL, COMPATIBLE)
    assert torch.allclose(torch.mm(a, b), mkl, atol=1e-4)
    assert torch.mm(a.bfloat16(), b.bfloat16()).dtype == torch.bfloat16  # not ours: ATen's kernel
    assert torch.equal(torch.mm(torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)),
                       torch.full((2, 2), 3))
    half = torch.addmm(_rand(8).bfloat16(), _rand(4, 16).bfloat16(), _rand(16, 8).bfloat16())
    assert half.dtype == torch.bfloat16 and half.shape == (4, 8)


def test_cpu_attention_takes_the_math_path():
    q = _rand(2, 2, 16, 8)
    if torch.cuda.is_available():
        pytest.skip("CUDA hosts keep SDPA's flash backend")
    assert not torch.backends.cuda.flash_sdp_enabled()
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ref = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ q
    assert torch.allclose(out, ref, atol=1e-6)
