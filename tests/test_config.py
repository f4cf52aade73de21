"""Config loading, overrides and validation messages (each names the field)."""
import pytest

from megatron_seed.config import ConfigError, ParallelConfig, load_config
from megatron_seed.parallel.state import Layout, LayoutError, orthogonal_groups, rank_map


def test_presets_load():
    for name in ("tiny", "small", "seed-200b-a20b"):
        cfg = load_config(name)
        assert cfg.model.num_layers > 0


def test_overrides_apply_and_parse_types():
    cfg = load_config("tiny", overrides=["model.num_layers=3", "model.moe.top_k=1", "train.lr=1e-3", "parallel.pp_layers=[1, 2]"], validate=False)
    assert cfg.model.num_layers == 3 and cfg.model.moe.top_k == 1 and cfg.train.lr == 1e-3
    assert cfg.parallel.pp_layers == [1, 2]


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.num_layerz=3", "model.num_layerz"),
        ("model.num_layers=two", "model.num_layers"),
        ("model.num_kv_heads=3", "model.num_kv_heads"),
        ("model.moe.top_k=9", "model.moe.top_k"),
        ("train.min_lr=1.0", "train.min_lr"),
        ("rl.eps_low=1.5", "rl.eps_low"),
        ("model.moe.score_function=relu", "model.moe.score_function"),
        ("train.seq_len=100000", "train.seq_len"),
        ("parallel.tp=3", "parallel.tp"),
        ("model.qk_norm=maybe", "model.qk_norm"),
    ],
)
def test_validation_names_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert field in str(err.value)


def test_unknown_key_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config("tiny", overrides=["model.hiden_size=64"])


def test_pp_larger_than_layers_is_rejected():
    with pytest.raises(ConfigError, match="parallel.pp=8 .* model.num_layers=4"):
        load_config("tiny", overrides=["parallel.pp=8"])


def test_ep_not_dividing_experts_is_rejected():
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by parallel.ep=3"):
        load_config("tiny", overrides=["parallel.ep=3"])


def test_world_size_not_divisible_by_layout():
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\*cp\*pp = 4\*1\*1 = 4"):
        Layout.from_config(ParallelConfig(tp=4), world=6)


def test_expert_layout_must_fit_stage():
    with pytest.raises(LayoutError, match="ep\\*etp = 4\\*1 = 4 does not divide the 2 ranks"):
        Layout.from_config(ParallelConfig(tp=1, pp=2, ep=4), world=4)


def test_megatron_rank_order():
    layout = Layout.from_config(ParallelConfig(tp=2, pp=2), world=8)  # dp = 2
    # tp fastest, then dp, then pp: tp groups are consecutive pairs
    assert orthogonal_groups(layout.dense_sizes, [True, False, False, False]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert orthogonal_groups(layout.dense_sizes, [False, False, True, False]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert orthogonal_groups(layout.dense_sizes, [False, False, False, True]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    table = rank_map(layout)
    assert len(table.splitlines()) == 2 + 8


def test_expert_groups_reread_stage_ranks():
    layout = Layout.from_config(ParallelConfig(ep=2), world=4)  # dense dp=4, edp=2
    assert layout.edp == 2
    assert orthogonal_groups(layout.expert_sizes, [False, True, False, False]) == [[0, 1], [2, 3]]
    assert orthogonal_groups(layout.expert_sizes, [False, False, True, False]) == [[0, 2], [1, 3]]
