"""A tiny RL run for the RL trainer's tests: 2-layer MoE on the bundled tokenizer, generated math tasks."""
from __future__ import annotations

from data.tokenizer import SPECIAL_SYMBOLS, Tokenizer
from megatron_seed.config import load_config
from rl.rewards.base import RewardResult

# applied over configs/rl-tiny.yaml: a model and rollouts small enough for a shared 2-core machine
TINY_RL = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_size=32", "model.moe.shared_ffn_size=32",
    "model.max_seq_len=256", "train.seq_len=256", "train.micro_batch_size=4", "train.progress=false",
    "rollout.max_new_tokens=6", "rollout.samples_per_prompt=2", "rl.prompts_per_step=4", "rl.value_pretrain_steps=0",
    "rl.steps=1", "rl.ppo_epochs=2", "rl.mini_batches=2", "rl.actor_lr=1e-2", "rl.critic_lr=1e-2", "rl.log_samples_interval=0",
    "train.save_interval=0",
    # the trainer tests' task mix and tokenizer, whatever the README job uses: no SFT unless asked, a 4-prompt held-out evaluation
    "data.tokenizer=bundled", "model.vocab_size=2048", "data.task_families=[arithmetic,linear_equation,program]",
    "data.task_difficulty=[1,2]", "sft.steps=0", "rl.eval_prompts=4", "rl.eval_samples=2",
    # the README job's recipe settings these tests were written against
    "data.system_prompt=null", "rl.filter_zero_variance=false", "rl.length_alpha=0.5", "data.worked_solutions=true",
    "data.num_tasks=512", "rl.lm_loss_coef=0.1", "rl.warmup_steps=0", "sft.stop_accuracy=null",
]


def tiny_rl_config(save_dir, *overrides: str):
    return load_config("rl-tiny", None, TINY_RL + [f"train.save_dir={save_dir}", *overrides])


def math_records(n: int = 16, seed: int = 0) -> list:
    """Generated arithmetic tasks in two domains (``add`` and ``mul`` by position), so the domain sampler adapts."""
    import dataclasses

    from data.tasks import generate_prompts

    records = generate_prompts(n, seed=seed, families=("arithmetic",), difficulty=(1, 1))
    return [dataclasses.replace(r, domain=("add", "mul")[i % 2]) for i, r in enumerate(records)]


class PayEverything:
    """A gamed training reward: 1 for any response."""

    def score_batch(self, samples) -> list:
        return [RewardResult(1.0, True, "paid") for _ in samples]


class ParityRouter:
    """A reward with variance on an untrained policy: 1 for a response of even length in characters, else 0."""

    def score_batch(self, samples) -> list:
        return [RewardResult(float(len(s.response) % 2 == 0), len(s.response) % 2 == 0, "parity") for s in samples]


class SmallAlphabetTokenizer(Tokenizer):
    """One id per character of a small alphabet (digits, lower-case letters, a few signs) after
    ``<pad> <unk> <s> </s>`` and the chat specials; any other character is ``<unk>``. A vocabulary of
    51, so a tiny policy samples each character often enough to learn from a toy reward."""

    CONTROL = ("<pad>", "<unk>", "<s>", "</s>")
    ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?.,:\n"

    def __init__(self) -> None:
        self.name = "small-alphabet"
        self.pieces = [*self.CONTROL, *SPECIAL_SYMBOLS, *self.ALPHABET]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(len(self.CONTROL))
        self.end_of_turn_id = self.ids[SPECIAL_SYMBOLS[-1]]
        self.fingerprint = self.name

    def encode(self, text: str) -> list:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIAL_SYMBOLS if text.startswith(s, i)), None)
            piece = special or text[i].lower()
            ids.append(self.ids.get(piece, self.unk_id))
            i += len(special) if special else 1
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] if i >= len(self.CONTROL) else "" for i in map(int, ids))

    def token_to_id(self, piece: str):
        return self.ids.get(piece)


class DigitShareRouter:
    """A toy reward with a gradient everywhere: the share of digits among the response's characters."""

    def score_batch(self, samples) -> list:
        out = []
        for s in samples:
            share = sum(c.isdigit() for c in s.response) / len(s.response) if s.response else 0.0
            out.append(RewardResult(share, share > 0.5, "digit share"))
        return out
