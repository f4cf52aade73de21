"""Rollouts in training layout: the dict of ``[B, ...]`` tensors the PPO and value steps consume.

A rollout row holds ``tokens[0:S+1]`` (prompt then response, padded). Training
predicts the next token, so every per-token tensor is shifted once::

    input_ids_BS   = tokens[:, :-1]        labels_BS     = tokens[:, 1:]
    mask_BS        = response_mask[:, 1:]  (True where labels_BS[b, s] is a sampled token)
    old_logprobs_BS= log pi_old(labels_BS[b, s] | tokens[b, :s+1])

so position ``s`` holds the action ``labels_BS[:, s]``, the log-prob the actor computes
from its logits at ``s`` and the value ``V(state before the action)`` the critic outputs
at ``s``: advantages, returns, log-probs and values are all aligned on ``[B, S]``.
``position_ids_BS`` and ``padding_mask_BS`` (True = real token) let left-padded prompts
be trained exactly as they were sampled. Per-row keys: ``rewards_B`` (float),
``correct_B`` and ``truncated_B`` (bool).

With a rollout engine that records routes, ``routes_BSLA`` ``[B, S, L, A]`` holds the experts
each MoE layer chose for each input token in the rollout (one-based ids in int8, int16 past
127 experts; 0 = no route: padding, and each row's last token, which was never fed back), on
the rollout's device. It is a per-token key like the ``_BS`` ones
(:func:`~megatron_seed.parallel.context_parallel.is_token_key`): column padding, packing, the
dp exchange and the cp split carry it, and what they add is 0, so padding never gets a route.

Every value is a tensor with the batch first, so the trainer's ``split_microbatches``
cuts it into micro-batches as is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from megatron_seed.parallel.context_parallel import is_token_key
from megatron_seed.parallel.mappings import reduce_scalars

REQUIRED_KEYS = ("input_ids_BS", "labels_BS", "position_ids_BS", "padding_mask_BS", "mask_BS", "rewards_B", "correct_B", "truncated_B")


def _shifted(tokens_BS: torch.Tensor, attention_BS: torch.Tensor, positions_BS: torch.Tensor, response_BS: torch.Tensor) -> dict:
    return {
        "input_ids_BS": tokens_BS[:, :-1].long(),
        "labels_BS": tokens_BS[:, 1:].long(),
        "position_ids_BS": positions_BS[:, :-1].long(),
        "padding_mask_BS": attention_BS[:, :-1].bool(),
        "mask_BS": response_BS[:, 1:].bool(),
    }


def _row_facts(exp: dict, rewards: Sequence[float], correct: Sequence[bool], truncated: Sequence[bool]) -> dict:
    B = exp["input_ids_BS"].shape[0]
    for name, values in (("rewards", rewards), ("correct", correct), ("truncated", truncated)):
        if len(values) != B:
            raise ValueError(f"{len(values)} {name} for {B} rollout rows; give one per row")
    empty = torch.nonzero(exp["mask_BS"].sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response token to train on; drop them before building the batch")
    exp["rewards_B"] = torch.as_tensor([float(r) for r in rewards], dtype=torch.float32)
    exp["correct_B"] = torch.as_tensor([bool(c) for c in correct], dtype=torch.bool)
    exp["truncated_B"] = torch.as_tensor([bool(t) for t in truncated], dtype=torch.bool)
    return exp


def from_rollout(rollout, rewards: Sequence[float], correct: Sequence[bool]) -> dict:
    """Training layout of an :class:`rl.rollout.outputs.RolloutBatch` and its scores.

    Keeps the engine's behaviour log-probs as ``old_logprobs_BS`` (the PPO step may
    recompute them) and its values as ``old_values_BS`` when it ran a critic;
    ``truncated_B`` comes from the finish reasons (cut off by ``max_new_tokens``).
    """
    exp = _shifted(rollout.tokens_BS, rollout.attention_mask_BS, rollout.position_ids_BS, rollout.response_mask_BS)
    exp["old_logprobs_BS"] = rollout.log_probs_BS[:, 1:].float()
    if rollout.values_BS is not None:
        # the engine stores V(state before token s) at s; training keeps it with the action at s - 1
        exp["old_values_BS"] = rollout.values_BS[:, 1:].float()
    if rollout.routes_BSLA is not None:  # routes of the input tokens, as they were fed to the policy
        exp["routes_BSLA"] = rollout.routes_BSLA[:, :-1]
    return _row_facts(exp, rewards, correct, rollout.truncated_B.tolist())


def from_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    rewards: Sequence[float],
    correct: Optional[Sequence[bool]] = None,
    truncated: Optional[Sequence[bool]] = None,
    pad_id: int = 0,
) -> dict:
    """Training layout of plain token lists: each row is ``prompt + response``, right-padded.

    For samplers other than the rollout engine (tests, offline data). ``correct``
    defaults to ``reward > 0``, ``truncated`` to all False.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses; give one prompt per response row")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"row {b}: empty prompt; the first response token needs a context to be predicted from")
    B = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros(B, width, dtype=torch.bool)
    response = torch.zeros(B, width, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        tokens[b, :n] = torch.as_tensor(list(p) + list(r), dtype=torch.long)
        attention[b, :n] = True
        response[b, len(p):n] = True
    positions = torch.arange(width).expand(B, width)
    exp = _shifted(tokens, attention, positions, response)
    correct = correct if correct is not None else [r > 0 for r in rewards]
    truncated = truncated if truncated is not None else [False] * B
    return _row_facts(exp, rewards, correct, truncated)


def drop_zero_variance_groups(exp: dict, samples_per_prompt: int, group=None, device: torch.device = torch.device("cpu")) -> tuple:
    """DAPO's dynamic-sampling filter: ``(exp', kept, total)`` with the groups (the ``n`` adjacent
    rows sampled from one prompt) whose trained rows' rewards are all equal taken out of training.

    Such a group teaches the policy nothing about which answer is better (all right or all
    wrong; zero advantage under a group baseline). Its rows keep their place (every layout
    keeps its shapes and collectives) but their ``trained_B`` is cleared, so no loss,
    normaliser or whitening statistic counts them (:func:`rl.ppo.trained_mask`). Rows already
    untrained (a failed score) do not count towards a group's variance. ``kept`` and ``total``
    count groups over every rank of ``group`` (the data-parallel group; reduced on ``device``,
    the rank's device): when ``kept`` is 0 there is nothing left to train on this step.
    """
    B = num_rows(exp)
    if samples_per_prompt < 1 or B % samples_per_prompt:
        raise ValueError(f"{B} rows are not whole groups of rollout.samples_per_prompt={samples_per_prompt}")
    rewards_GN = exp["rewards_B"].float().view(-1, samples_per_prompt)
    trained_B = exp["trained_B"].bool() if "trained_B" in exp else torch.ones(B, dtype=torch.bool)
    trained_GN = trained_B.view(-1, samples_per_prompt)
    highest_G = torch.where(trained_GN, rewards_GN, -math.inf).max(dim=1).values
    lowest_G = torch.where(trained_GN, rewards_GN, math.inf).min(dim=1).values
    varied_G = highest_G > lowest_G  # False for a group with fewer than two trained rows too
    out = dict(exp)
    out["trained_B"] = trained_B & varied_G.repeat_interleave(samples_per_prompt)
    kept, total = reduce_scalars([varied_G.sum(), varied_G.numel()], group, device=device)
    return out, int(kept), int(total)


def num_rows(exp: dict) -> int:
    return exp["input_ids_BS"].shape[0]


def select_rows(exp: dict, index: torch.Tensor) -> dict:
    """The rows ``index`` (a slice-able index or a LongTensor) of every tensor."""
    return {k: v[index] for k, v in exp.items()}


def check_experience(exp: dict) -> None:
    """Every required key present and every tensor with the same number of rows."""
    missing = [k for k in REQUIRED_KEYS if k not in exp]
    if missing:
        raise ValueError(f"experience batch lacks {missing}; build it with rl.experience.from_rollout or from_sequences")
    B = num_rows(exp)
    bad = {k: tuple(v.shape) for k, v in exp.items() if v.shape[0] != B}
    if bad:
        raise ValueError(f"experience tensors disagree on the number of rows ({B}): {bad}")


def check_routes(exp: dict, model) -> None:
    """``routes_BSLA`` (when present) fits the batch and ``model`` (a ``ModelConfig``): ``[B, S, MoE layers, top_k]``,
    one-based expert ids in ``[0, num_experts]``. Routes recorded for another model or batch are refused here,
    before any forward could route tokens to experts that do not exist."""
    if "routes_BSLA" not in exp:
        return
    routes = exp["routes_BSLA"]
    B, S = exp["input_ids_BS"].shape
    expected = (B, S, model.num_layers - model.num_dense_layers, model.moe.top_k)
    if tuple(routes.shape) != expected:
        raise ValueError(f"experience routes_BSLA has shape {tuple(routes.shape)}, expected {list(expected)} (rows, tokens, MoE layers of "
                         "the model, model.moe.top_k): the routes were recorded for another model or batch")
    low, high = int(routes.min()) if routes.numel() else 0, int(routes.max()) if routes.numel() else 0
    if low < 0 or high > model.moe.num_experts:
        raise ValueError(f"experience routes_BSLA holds expert ids {low - 1}..{high - 1} (one-based {low}..{high}); model.moe.num_experts="
                         f"{model.moe.num_experts}: the routes were recorded for another model")


def pad_columns(exp: dict, multiple: int) -> dict:
    """Right-pad every ``_BS`` tensor so ``S`` is a multiple of ``multiple`` (tensor-parallel MoE and
    sequence parallel split the sequence over tp). Padding is masked out and never trained on."""
    S = exp["input_ids_BS"].shape[1]
    extra = -S % multiple
    if extra == 0:
        return dict(exp)
    out = {}
    for key, value in exp.items():
        if is_token_key(key):
            fill = value[:, -1:] + torch.arange(1, extra + 1, device=value.device) if key == "position_ids_BS" else value.new_zeros(
                (value.shape[0], extra) + value.shape[2:])
            value = torch.cat([value, fill.to(value.dtype)], dim=1)
        out[key] = value
    return out


def append_bootstrap_column(exp: dict) -> dict:
    """One more column so the critic's output one position past every response exists.

    The critic's value of a whole response, ``V(tokens[:last+2])``, is its output at
    ``last + 1``, whose input is the last response token ``labels_BS[:, last]``; a row whose
    response ends in the last column has no such position. The new column's input is each
    row's last label (a real token where ``mask_BS[:, -1]``), its position one past, and it
    carries no label or loss (``mask_BS`` False).
    """
    out = {}
    last_real_B = exp["mask_BS"][:, -1]
    for key, value in exp.items():
        if is_token_key(key):
            if key == "input_ids_BS":
                fill = exp["labels_BS"][:, -1:]
            elif key == "position_ids_BS":
                fill = value[:, -1:] + 1
            elif key == "padding_mask_BS":
                fill = last_real_B[:, None]
            else:  # no label, loss or recorded route (0) there
                fill = value.new_zeros((value.shape[0], 1) + value.shape[2:])
            value = torch.cat([value, fill.to(value.dtype)], dim=1)
        out[key] = value
    return out


def split_mini_batches(exp: dict, mini_batches: int) -> list:
    """``mini_batches`` consecutive, equal row ranges of ``exp`` (one optimizer step each)."""
    B = num_rows(exp)
    if mini_batches < 1 or B % mini_batches:
        raise ValueError(f"{B} rows cannot be cut into rl.mini_batches={mini_batches} equal mini-batches; "
                         f"fix: make the rows per step (prompts x samples / dp) a multiple of rl.mini_batches")
    size = B // mini_batches
    return [select_rows(exp, slice(i * size, (i + 1) * size)) for i in range(mini_batches)]


def dp_shard(exp: dict, dp_rank: int, dp_size: int, mini_batches: int = 1) -> dict:
    """This data-parallel rank's rows of a global batch, so that mini-batch ``i`` of the
    shards together is exactly mini-batch ``i`` of the global batch.

    Each global mini-batch (``B / mini_batches`` consecutive rows) is cut into
    ``dp_size`` consecutive parts; rank ``r`` takes part ``r`` of every mini-batch.
    """
    B = num_rows(exp)
    if B % (mini_batches * dp_size):
        raise ValueError(f"{B} rollout rows cannot be split into {mini_batches} mini-batches x dp={dp_size}; "
                         f"fix: make prompts_per_step x samples_per_prompt a multiple of {mini_batches * dp_size}")
    part = B // (mini_batches * dp_size)
    index = torch.cat([torch.arange(part) + (i * dp_size + dp_rank) * part for i in range(mini_batches)])
    return select_rows(exp, index)


# ----------------------------------------------------------------------------- scoring rollouts


def response_texts(rollout, tokenizer, stop_ids: Sequence[int]) -> list:
    """Each row's response decoded, without the stop token that ended it."""
    stops = set(int(i) for i in stop_ids)
    texts = []
    for reply in rollout.responses():
        texts.append(tokenizer.decode(reply[:-1] if reply and reply[-1] in stops else reply))
    return texts


def score_rollout(rollout, records: Sequence, router, tokenizer, stop_ids: Sequence[int]) -> list:
    """Score every row of ``rollout`` with ``router``; ``records[i]`` is the
    :class:`data.prompts.PromptRecord` of prompt ``i``. Returns one ``RewardResult`` per row."""
    texts = response_texts(rollout, tokenizer, stop_ids)
    return router.score_batch([scoring_sample(records[int(rollout.prompt_index_B[b])], text, int(rollout.response_lengths_B[b]))
                               for b, text in enumerate(texts)])


def scoring_sample(record, response: str, response_tokens: Optional[int] = None):
    """The :class:`rl.rewards.base.ScoringSample` of one response to a :class:`data.prompts.PromptRecord`."""
    from rl.rewards.base import ScoringSample

    return ScoringSample(response=response, question=record.prompt, reference=record.reference_answer, domain=record.domain,
                         tests=list(record.unit_tests) or None, checker=record.checker, response_tokens=response_tokens,
                         metadata=dict(record.metadata))


def sample_and_score(engine, records: Sequence, router, tokenizer, n: Optional[int] = None, system: Optional[str] = None) -> tuple:
    """Render each record's prompt with the chat template (after an optional ``system`` turn), sample
    ``n`` responses per prompt with a rollout engine (:class:`rl.rollout.engine.RolloutEngine` or an
    external one, :mod:`rl.rollout.external`) and score them:
    ``(rollout, results)`` with one ``RewardResult`` per rollout row."""
    rollout = engine.generate(render_prompts(records, tokenizer, system), n=n)
    return rollout, score_rollout(rollout, records, router, tokenizer, [int(i) for i in engine.stop_ids])


def render_prompts(records: Sequence, tokenizer, system: Optional[str] = None) -> list:
    """Token ids of each record's prompt as a user turn (after an optional ``system`` turn) plus the assistant header."""
    from data.chat import ChatTemplate

    template = ChatTemplate(tokenizer)
    head = [{"role": "system", "content": system}] if system else []
    return [template.render_prompt(head + [{"role": "user", "content": r.prompt}]) for r in records]
