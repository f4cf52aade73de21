"""Pairwise reward model: Bradley-Terry loss, learning a synthetic preference, win-rate scoring, JSONL I/O."""
import json
import random

import pytest
import torch

from megatron_seed.config import Config, ConfigError, ModelConfig, MoEConfig
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.rewards.base import ScoringSample
from rl.rewards.pairwise_rm import (PAIRWISE_LOSS, ByteEncoder, PairwiseRMScorer, PreferencePair, RewardModel, evaluate,
                                    load_pairs, pair_batch, rm_trainer_config, train_reward_model)

LETTERS = "abcdefgh"


def tiny_config():
    return ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                       head_dim=8, max_seq_len=32, value_head=True,
                       moe=MoEConfig(num_experts=4, top_k=2, ffn_size=32))


def synthetic_pairs(n, seed):
    """The prompt names a letter; the chosen response answers with it, the rejected one with another letter."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        right, wrong = rng.sample(LETTERS, 2)
        pairs.append(PreferencePair(f"Q: say {right}", f"A: {right}", f"A: {wrong}"))
    return pairs


def rm_trainer(steps, pairs_per_step, lr=3e-3):
    cfg = Config(model=tiny_config())
    cfg.train.steps, cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay, cfg.train.micro_batch_size = steps, lr, 0.0, 0.0, 8
    cfg = rm_trainer_config(cfg, pairs_per_step)
    trainer = Trainer(cfg, ParallelState.single())
    return trainer, RewardModel(cfg.model, ByteEncoder(), gpt=trainer.chunks[0])


def test_bradley_terry_loss_and_accuracy():
    # rows (chosen, rejected) with scores (2, 0) and (0, 1): margins 2 and -1, over 2 pairs of the global batch
    values_BS = torch.tensor([[2.0], [0.0], [0.0], [1.0]])
    loss, shares = PAIRWISE_LOSS.build({"pairs": 2.0}, ParallelState.single())(values_BS, {"last_B": torch.zeros(4, dtype=torch.long)})
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(2.0)) - torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert torch.allclose(loss, expected) and shares["accuracy"].item() == 0.5
    assert PAIRWISE_LOSS.units({"input_ids_BS": values_BS})["pairs"].item() == 2


def test_score_is_value_at_last_real_token():
    torch.manual_seed(0)
    model = RewardModel(tiny_config(), ByteEncoder(), seed=1)
    batched = model(["Q: x", "Q: longer prompt"], ["A: y", "A: zz"])
    alone = model(["Q: x"], ["A: y"])  # no padding
    assert torch.allclose(batched[0], alone[0], atol=1e-5)  # right padding does not change the score


@pytest.mark.timeout(200)
def test_learns_synthetic_preference(one_thread):
    torch.manual_seed(0)
    trainer, model = rm_trainer(steps=50, pairs_per_step=16)  # held-out accuracy passes 0.9 by step 20
    train, held_out = synthetic_pairs(512, seed=1), synthetic_pairs(200, seed=2)
    before = evaluate(trainer, model, held_out)
    history = train_reward_model(trainer, model, train, eval_pairs=held_out, eval_every=25)
    after = history[-1]
    assert after["eval_accuracy"] >= 0.9, history
    assert after["eval_loss"] < before["loss"]

    scorer = PairwiseRMScorer(model)
    group = ["A: c", "A: a", "A: f"]
    rewards = [scorer.score(ScoringSample(response=r, prompt="Q: say c", group=group)).reward for r in group]
    assert rewards[0] == max(rewards) and rewards[0] > 0.5
    vs_reference = scorer.score(ScoringSample(response="A: d", prompt="Q: say c", reference="A: c"))
    assert vs_reference.reward < 0.5 and not vs_reference.correct and "1 comparisons" in vs_reference.reason


def test_scorer_needs_something_to_compare_with():
    scorer = PairwiseRMScorer(RewardModel(tiny_config(), ByteEncoder()))
    with pytest.raises(ValueError, match="group"):
        scorer.score(ScoringSample(response="A: a", prompt="Q"))


def test_bad_config_and_data_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="value_head"):
        RewardModel(ModelConfig(vocab_size=257), ByteEncoder())
    with pytest.raises(ValueError, match="vocab_size"):
        RewardModel(ModelConfig(vocab_size=128, value_head=True), ByteEncoder())
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="pairs.jsonl:2"):
        load_pairs(str(path))


@pytest.mark.timeout(120)
def test_train_rm_cli(tmp_path, one_thread, capsys):
    from megatron_seed.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(vars(p)) + "\n" for p in synthetic_pairs(40, seed=3)))
    out = tmp_path / "rm.pt"
    sets = ["model.vocab_size=257", "model.hidden_size=32", "model.head_dim=8", "model.num_layers=1",
            "model.max_seq_len=32", "train.seq_len=32", "model.moe.ffn_size=32", "model.moe.num_experts=4"]
    argv = ["train-rm", "--data", str(data), "--tokenizer", "bytes", "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--save", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "36 training pairs, 4 held out" in printed and "eval acc" in printed
    saved = torch.load(out, weights_only=False)
    assert saved["model_config"]["value_head"] is True and saved["state_dict"]


def _rm_steps(rank, world, parallel):
    """Three reward-model steps of 8 pairs under ``parallel``: (loss, accuracy, grad norm) per step."""
    from megatron_seed.config import ParallelConfig

    cfg = Config(model=tiny_config())
    cfg.model.vocab_size = 258  # a multiple of tp: the embedding is split over the vocabulary
    cfg.train.steps, cfg.train.micro_batch_size, cfg.train.adam_eps = 3, 2, 1e-4
    cfg.parallel = ParallelConfig(**parallel)
    cfg = rm_trainer_config(cfg, 8)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    trainer = Trainer(cfg, ps)
    model = RewardModel(cfg.model, ByteEncoder(), gpt=trainer.chunks[0])
    history = []
    train_reward_model(trainer, model, synthetic_pairs(24, seed=4), eval_every=1, log=history.append)
    return [(r["loss"], r["accuracy"], r["grad_norm"]) for r in history] if trainer.is_logging_rank else None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel", [{"dp": 2}, {"tp": 2, "sequence_parallel": True}], ids=["dp2", "tp2_sp"])
def test_reward_model_trains_the_same_under_dp_and_tp(parallel, one_thread):
    from megatron_seed.parallel.spawn import run_distributed

    want = _rm_steps(0, 1, {})
    got = [r for r in run_distributed(_rm_steps, 2, parallel) if r is not None]
    assert len(got) == 1 and len(want) == 3
    for (loss, acc, grad_norm), (want_loss, want_acc, want_norm) in zip(got[0], want):
        assert loss == pytest.approx(want_loss, rel=1e-5) and acc == want_acc
        assert grad_norm == pytest.approx(want_norm, rel=1e-5)  # Adam would hide a gradient off by a constant factor


def test_reward_model_trainer_needs_a_value_head():
    cfg = Config(model=tiny_config())
    cfg.model.value_head = False
    trainer = Trainer(cfg, ParallelState.single())
    with pytest.raises(ConfigError, match="value_head"):
        train_reward_model(trainer, RewardModel(tiny_config(), ByteEncoder()), synthetic_pairs(4, seed=0))
