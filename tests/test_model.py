"""GPT-MoE model: shapes, causality, aux loss, KV cache, padding and packing masks."""
import torch

from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from tests.model_utils import tiny_model


def build(**changes) -> GPTModel:
    model = GPTModel(tiny_model(**changes), ParallelState.single())
    model.init_weights(seed=7)
    return model


def test_shapes_and_value_head():
    ids = torch.randint(0, 64, (3, 10))
    assert build()(ids).shape == (3, 10, 64)
    assert build(value_head=True)(ids).shape == (3, 10)


def test_future_tokens_never_change_earlier_logits():
    model = build()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 64, (2, 5))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_aux_loss_reaches_router_gradient_without_caller():
    ids = torch.randint(0, 64, (2, 12))
    for coef, expect_grad in ((1e-2, True), (0.0, False)):
        cfg = tiny_model()
        cfg.moe.aux_loss_coef = coef
        model = GPTModel(cfg, ParallelState.single())
        model.init_weights(seed=7)
        router = [p for n, p in model.named_parameters() if "router" in n]
        (model(ids) * 0).sum().backward()  # the output contributes nothing: only the aux loss can
        has = any(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
        assert has == expect_grad


def test_kv_cache_decoding_equals_full_forward():
    model = build()
    ids = torch.randint(0, 64, (2, 10))
    full = model(ids)
    cache = model.allocate_kv_cache(batch=2, capacity=16)
    steps = [model(ids[:, :6], kv_cache=cache)]
    for t in range(6, 10):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_is_invisible():
    model = build()
    ids = torch.randint(1, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    pos = torch.clamp(torch.arange(9) - 3, min=0).unsqueeze(0)
    out = model(padded, position_ids_BS=pos, padding_mask_BS=mask)
    torch.testing.assert_close(out[:, 3:], model(ids), rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_attend_across():
    model = build()
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    out = model(packed, position_ids_BS=pos, doc_ids_BS=doc)
    torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b), rtol=1e-5, atol=1e-5)
