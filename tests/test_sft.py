"""``megatron-seed sft``: the command trains on worked solutions and saves a checkpoint RL can start from;
bad data or settings fail with the field and the fix; only assistant tokens are trained on."""
import json
import os

import pytest

from data.chat import ChatTemplate
from data.sft import build_sft_batches, tokenize_conversations
from data.tokenizer import load_tokenizer
from megatron_seed.cli import main
from megatron_seed.train import checkpoint
from megatron_seed.train.sft import trainer_batch

SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.head_dim=8", "model.moe.num_experts=4", "model.moe.ffn_size=32",
         "model.moe.shared_ffn_size=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_len=128",
         "data.task_families=[largest]", "data.task_difficulty=[1,1]", "sft.examples=40", "sft.lr=1e-2", "sft.warmup_steps=1", "train.log_interval=1"]


def _args(tmp_path, *extra: str) -> list:
    out = ["sft", "--preset", "tiny", "--no-progress"]
    for item in SMALL + [f"train.save_dir={tmp_path / 'run'}", *extra]:
        out += ["--set", item]
    return out


@pytest.mark.timeout(240)
def test_sft_command_trains_and_saves_a_checkpoint_rl_can_load(tmp_path, capsys, one_thread):
    assert main(_args(tmp_path, "sft.steps=4")) == 0
    latest = checkpoint.latest_checkpoint(str(tmp_path / "run"))
    assert latest is not None and f"saved {latest}" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines and lines[-1]["step"] == 4 and len(lines) == 4 and lines[-1]["loss"] < lines[0]["loss"]
    # the RL side reads it as a weights-only start
    from megatron_seed.config import load_config
    from megatron_seed.model.build import build_model_chunks
    from megatron_seed.parallel.state import ParallelState

    cfg = load_config("tiny", None, SMALL)
    chunks = build_model_chunks(cfg.model, cfg.parallel, ParallelState.single(), seed=99)
    checkpoint.load_model_weights(chunks, ParallelState.single(), str(tmp_path / "run"))


def test_bad_sft_input_is_refused_with_the_fix(tmp_path, capsys):
    assert main(_args(tmp_path, "sft.steps=0")) == 2
    assert "sft.steps=0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no messages here"}\nnot json\n')
    assert main(_args(tmp_path, "sft.steps=2") + ["--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "no valid conversations" in err
    assert main(_args(tmp_path, "sft.steps=2", "data.task_difficulty=[3,1]")) == 2
    assert "data.task_difficulty" in capsys.readouterr().err
    assert main(_args(tmp_path, "sft.steps=2", "sft.stop_accuracy=0.3")) == 2  # only the RL run's SFT phase evaluates
    assert "sft.stop_accuracy=0.3" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "latest")


def test_only_assistant_replies_are_trained_on():
    tokenizer = load_tokenizer("bundled")
    template = ChatTemplate(tokenizer)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The answer is 5."}]
    examples = tokenize_conversations([conv, conv], template, 64)
    batch = trainer_batch(build_sft_batches(examples, 64, 1, seed=0)[0])
    reply = tokenizer.encode("The answer is 5.") + [tokenizer.end_of_turn_id]
    trained = batch["labels_BS"][batch["loss_mask_BS"] > 0].tolist()
    assert trained == reply + reply  # both packed documents: the reply and its end of turn, nothing of the prompt
    assert (batch["labels_BS"] >= 0).all()
