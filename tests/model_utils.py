"""Tiny model configs shared by the tests."""
import dataclasses

from megatron_seed.config import Config, MoEConfig, ModelConfig, TrainConfig


def tiny_model(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                       max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16, num_shared_experts=1, shared_ffn_size=16))
    return dataclasses.replace(base, **changes)


def tiny_config(model: ModelConfig = None, **train_changes) -> Config:
    train = dataclasses.replace(TrainConfig(steps=4, micro_batch_size=2, global_batch_size=4, seq_len=16, lr=1e-2,
                                            min_lr=1e-3, warmup_steps=1, log_interval=1, progress=False), **train_changes)
    return Config(model=model or tiny_model(), train=train)
