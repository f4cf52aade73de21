"""megatron_seed.gemm: bf16 inference GEMMs on a CPU without bf16 arithmetic are the fp32 product of the bf16 numbers
rounded once (what a native bf16 GEMM gives); with gradients, in fp32 and on a CPU with bf16 arithmetic they are torch's own."""
import torch
import torch.nn.functional as F

from megatron_seed import gemm


def test_bf16_inference_gemms_are_the_fp32_product_rounded_once():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 3, 64).bfloat16(), torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    a, m = torch.randn(2, 4, 3, 64).bfloat16(), torch.randn(2, 4, 64, 7).bfloat16()
    with torch.no_grad():
        got_linear, got_matmul = gemm.linear(x, w, b), gemm.matmul(a, m)
        if gemm.NATIVE_LOW_PRECISION_GEMM:  # this CPU multiplies bf16 itself
            assert torch.equal(got_linear, F.linear(x, w, b)) and torch.equal(got_matmul, torch.matmul(a, m))
        else:
            assert torch.equal(got_linear, F.linear(x.float(), w.float(), b.float()).bfloat16())
            assert torch.equal(got_matmul, torch.matmul(a.float(), m.float()).bfloat16())
    assert got_linear.dtype == got_matmul.dtype == torch.bfloat16


def test_training_and_fp32_gemms_are_torchs_own():
    torch.manual_seed(1)
    x, w = torch.randn(4, 32).bfloat16(), torch.randn(16, 32).bfloat16().requires_grad_()
    out = gemm.linear(x, w)  # grad mode on: torch's bf16 GEMM, and a gradient to w
    assert torch.equal(out, F.linear(x, w))
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16
    x32, w32 = torch.randn(4, 32), torch.randn(16, 32)
    with torch.no_grad():
        assert not gemm.upcasts(w32) and torch.equal(gemm.linear(x32, w32), F.linear(x32, w32))
