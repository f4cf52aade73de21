"""What a rollout returns: padded token batches ready for the trainer, plus per-row facts.

Shapes: ``B`` rows (prompts x samples), ``S = P + R`` columns: the prompts are
left-padded to ``P`` columns, so every response starts at column ``P`` and is
right-padded to the longest response ``R``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class RolloutBatch:
    """Generated sequences; every ``_BS`` tensor is aligned with ``tokens_BS``.

    * ``tokens_BS``: prompt + response ids, ``pad_id`` where ``attention_mask_BS`` is False.
    * ``position_ids_BS``: the positions the tokens were generated at (0 at each prompt's
      first real token); pass them with ``attention_mask_BS`` as ``padding_mask_BS`` to the
      trainer's forward so it sees exactly what the sampler saw.
    * ``response_mask_BS``: the sampled tokens (including the stop token that ended a row).
    * ``log_probs_BS``: at response positions, ``log pi(token_s | tokens_<s)`` under the
      unfiltered policy at the sampling temperature (what ``vocab_parallel_log_probs`` recomputes from the
      tempered logits at position ``s - 1``); 0 elsewhere.
    * ``values_BS``: with a critic, ``V(state before token s)`` = the critic's output at
      position ``s - 1``, at response positions; 0 elsewhere. None without a critic.
    * ``prompt_index_B``: which input prompt each row continues (rows of one prompt are
      adjacent, ``n`` per prompt); ``finish_reasons[b]`` is ``"stop"`` or ``"length"``.
    * ``routes_BSLA``: with an MoE policy on the in-process engine, the experts each of the
      ``L`` MoE layers chose for the token at each column when it was fed to the policy
      (``[B, S, L, top_k]``, one-based ids, int8 or int16 past 127 experts, on the rollout's
      device); 0 where no token was fed: padding and each row's last response token.
    """

    tokens_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    response_mask_BS: torch.Tensor
    log_probs_BS: torch.Tensor
    values_BS: Optional[torch.Tensor]
    prompt_lengths_B: torch.Tensor
    response_lengths_B: torch.Tensor
    prompt_index_B: torch.Tensor
    finish_reasons: list = field(default_factory=list)
    routes_BSLA: Optional[torch.Tensor] = None

    @property
    def prompt_width(self) -> int:
        """``P``: the column where every response starts."""
        return self.tokens_BS.shape[1] - self.response_width

    @property
    def response_width(self) -> int:
        return int(self.response_lengths_B.max()) if self.response_lengths_B.numel() else 0

    @property
    def truncated_B(self) -> torch.Tensor:
        """Rows cut off by ``max_new_tokens`` (GAE bootstraps their last value)."""
        return torch.tensor([r == FINISH_LENGTH for r in self.finish_reasons], dtype=torch.bool)

    def responses(self) -> list:
        """The response ids of each row (the stop token included when one ended it)."""
        P = self.prompt_width
        return [self.tokens_BS[b, P:P + int(n)].tolist() for b, n in enumerate(self.response_lengths_B)]

    def prompts(self) -> list:
        P = self.prompt_width
        return [self.tokens_BS[b, P - int(n):P].tolist() for b, n in enumerate(self.prompt_lengths_B)]


def assemble(
    prompts: list,
    responses: list,
    log_probs: list,
    values: Optional[list],
    finish_reasons: list,
    prompt_index: list,
    pad_id: int,
) -> RolloutBatch:
    """Pad per-row lists (``prompts[b]``, ``responses[b]`` ...) into a :class:`RolloutBatch`."""
    B = len(prompts)
    P = max((len(p) for p in prompts), default=0)
    R = max((len(r) for r in responses), default=0)
    tokens = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros(B, P + R, dtype=torch.bool)
    response_mask = torch.zeros(B, P + R, dtype=torch.bool)
    lp = torch.zeros(B, P + R)
    vals = torch.zeros(B, P + R) if values is not None else None
    for b in range(B):
        p, r = prompts[b], responses[b]
        tokens[b, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        tokens[b, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
        attention[b, P - len(p):P + len(r)] = True
        response_mask[b, P:P + len(r)] = True
        lp[b, P:P + len(r)] = torch.as_tensor(log_probs[b], dtype=torch.float32)
        if vals is not None:
            vals[b, P:P + len(r)] = torch.as_tensor(values[b], dtype=torch.float32)
    positions = (attention.long().cumsum(dim=1) - 1).clamp(min=0)
    return RolloutBatch(
        tokens_BS=tokens,
        attention_mask_BS=attention,
        position_ids_BS=positions,
        response_mask_BS=response_mask,
        log_probs_BS=lp,
        values_BS=vals,
        prompt_lengths_B=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        response_lengths_B=torch.tensor([len(r) for r in responses], dtype=torch.long),
        prompt_index_B=torch.tensor(prompt_index, dtype=torch.long),
        finish_reasons=list(finish_reasons),
    )
