"""GPT-MoE model: shapes, causality, aux loss, KV cache, padding and packing masks, inference fast paths."""
import pytest
import torch

from megatron_seed.model.gpt import GPTModel
from megatron_seed.model.layers import apply_rotary, rms_norm, rotary_cos_sin
from megatron_seed.parallel.state import ParallelState
from tests.model_utils import tiny_model
from tests.numerics import assert_close_rel


def build(**changes) -> GPTModel:
    model = GPTModel(tiny_model(**changes), ParallelState.single())
    model.init_weights(seed=7)
    return model


def test_shapes_and_value_head():
    ids = torch.randint(0, 64, (3, 10))
    assert build()(ids).shape == (3, 10, 64)
    assert build(value_head=True)(ids).shape == (3, 10)


def test_last_position_only_is_the_last_column_of_the_full_output():
    ids = torch.randint(0, 64, (3, 10))
    for model in (build(), build(value_head=True)):
        with torch.no_grad():
            full, last = model(ids), model(ids, last_position_only=True)
        assert last.shape[1] == 1
        assert_close_rel(last, full[:, -1:], 1e-5)


def test_future_tokens_never_change_earlier_logits():
    model = build()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 64, (2, 5))
    a, b = model(ids), model(changed)
    assert_close_rel(a[:, :7], b[:, :7], 1e-5)
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
    assert_close_rel(torch.cat(steps, dim=1), full, 1e-5)


def test_left_padding_is_invisible():
    model = build()
    ids = torch.randint(1, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    pos = torch.clamp(torch.arange(9) - 3, min=0).unsqueeze(0)
    out = model(padded, position_ids_BS=pos, padding_mask_BS=mask)
    assert_close_rel(out[:, 3:], model(ids), 1e-5)


def test_packed_documents_do_not_attend_across():
    model = build()
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    out = model(packed, position_ids_BS=pos, doc_ids_BS=doc)
    assert_close_rel(out[:, :5], model(a), 1e-5)
    assert_close_rel(out[:, 5:], model(b), 1e-5)


def test_cache_continued_by_multi_token_chunks_equals_full_forward():
    model = build()
    ids = torch.randint(0, 64, (2, 10))
    cache = model.allocate_kv_cache(batch=2, capacity=12)
    steps = [model(ids[:, :4], kv_cache=cache), model(ids[:, 4:7], kv_cache=cache), model(ids[:, 7:8], kv_cache=cache), model(ids[:, 8:], kv_cache=cache)]
    assert_close_rel(torch.cat(steps, dim=1), model(ids), 1e-5)


@torch.no_grad()
def test_decode_attention_equals_sdpa_on_a_padded_cache():
    """The one-token matmul path (additive bias) against SDPA with the boolean mask, same cache."""
    model = build()
    prompt = torch.randint(1, 64, (2, 6))
    padding = torch.tensor([[False, False] + [True] * 4, [True] * 6])
    outs = []
    for pad_decode in (False, True):  # a padding mask on a one-token step takes the SDPA path
        cache = model.allocate_kv_cache(batch=2, capacity=10)
        model(prompt, position_ids_BS=(padding.long().cumsum(1) - 1).clamp(min=0), padding_mask_BS=padding, kv_cache=cache)
        step = [model(prompt[:, t:t + 1], kv_cache=cache, padding_mask_BS=torch.ones(2, 1, dtype=torch.bool) if pad_decode else None)
                for t in range(3)]
        outs.append(torch.cat(step, dim=1))
    assert_close_rel(outs[0], outs[1], 1e-5)


def test_fused_projections_match_and_are_dropped_after():
    model = build()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids)
        with model.fused_projections():
            fused = model(ids)
            attn = model.layers["0"].self_attn
            assert attn.qkv_weight is not None
            with torch.enable_grad():  # a forward recording gradients ignores the copies
                model(ids).sum().backward()
    assert_close_rel(fused, ref, 1e-5)
    assert attn.qkv_weight is None and attn.qk_norm_weight is None
    assert attn.q_proj.weight.grad is not None and attn.k_proj.weight.grad is not None


def test_rms_norm_and_rotary_equal_the_reference_formulas():
    x = torch.randn(3, 5, 4, 8)
    w = torch.randn(8)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref, rtol=1e-6, atol=1e-6)
    pos = torch.arange(5).expand(3, 5)
    cos, sin = rotary_cos_sin(pos, 8, 10000.0)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angle = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()
    assert torch.equal(apply_rotary(x, cos, sin), expected)


def test_packed_documents_with_a_cache_are_rejected():
    model = build()
    cache = model.allocate_kv_cache(batch=1, capacity=8)
    with pytest.raises(ValueError, match="doc_ids_BS"):
        model(torch.randint(0, 64, (1, 4)), doc_ids_BS=torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    assert cache.length == 0 and bool(torch.isinf(cache.bias_BL).all())  # left untouched
