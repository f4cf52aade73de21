"""Shared pieces of the rollout tests: tiny models and the no-cache greedy reference."""
import torch

from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import vocab_parallel_log_probs
from rl.rollout.sampling import tempered
from tests.model_utils import tiny_model

SEED = 7
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33, 34]]


def single_model(**changes) -> GPTModel:
    model = GPTModel(tiny_model(**changes), ParallelState.single())
    model.init_weights(seed=SEED)
    return model


@torch.no_grad()
def greedy_reference(model: GPTModel, prompt: list, max_new: int, stop_ids: list) -> list:
    """Step-by-step greedy decoding that recomputes the whole sequence every step (no cache, no padding)."""
    ids = list(prompt)
    out = []
    for _ in range(max_new):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def stop_token_for(model: GPTModel, prompt: list, step: int, max_new: int) -> int:
    """A token the greedy reference emits at ``step`` for ``prompt``: as a stop id it ends that row early."""
    return greedy_reference(model, prompt, max_new, [])[step]


@torch.no_grad()
def trainer_log_probs(model: GPTModel, batch, ps: ParallelState, temperature: float = 1.0) -> torch.Tensor:
    """What the PPO trainer recomputes: log p(token_s) from the full-sequence logits at s - 1, at the sampling temperature."""
    logits = tempered(model(batch.tokens_BS, position_ids_BS=batch.position_ids_BS, padding_mask_BS=batch.attention_mask_BS), temperature)
    lp = torch.zeros(batch.tokens_BS.shape)
    lp[:, 1:] = vocab_parallel_log_probs(logits[:, :-1], batch.tokens_BS[:, 1:], ps)
    return lp
