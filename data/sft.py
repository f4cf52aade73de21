"""Supervised fine-tuning data: conversations -> masked token rows, packed or length-sorted.

A conversation becomes an :class:`SFTExample` (token ids and a 0/1 loss mask from the
chat template: assistant replies and their end-of-turn token only). Batches are dicts
of LongTensors ``[B, S]``:

- ``input_ids``; ``labels``: ``labels[t] = ids[t+1]`` when token t+1 is in the same
  document and trained on, else ``IGNORE_INDEX`` (-100, what ``F.cross_entropy``
  skips); ``position_ids``: restart at 0 for every document; ``doc_ids``: the
  document each token belongs to inside its row, -1 for padding. Passing
  ``position_ids`` and ``doc_ids`` to the model keeps attention inside each document,
  so a packed row computes exactly what the documents would alone.

:func:`pack_examples` packs short documents into rows of ``seq_len`` tokens
(first-fit decreasing: few rows, little padding). :func:`length_sorted_batches`
instead groups documents of similar length and pads each batch only to its own
longest member. Either way the batch order is shuffled by ``seed``, so runs are
reproducible.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from data.chat import ChatTemplate

IGNORE_INDEX = -100
PAD_DOC = -1
logger = logging.getLogger(__name__)


@dataclass
class SFTExample:
    ids: list
    loss_mask: list

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_conversations(conversations: Iterable[Sequence[dict]], template: ChatTemplate, max_len: int) -> list:
    """Render each conversation; longer ones are cut to ``max_len`` tokens (their tail loses supervision)."""
    examples, cut = [], 0
    for conv in conversations:
        rendered = template.render(conv)
        if len(rendered.ids) > max_len:
            cut += 1
        examples.append(SFTExample(rendered.ids[:max_len], rendered.loss_mask[:max_len]))
    if cut:
        logger.warning("%d of %d conversations were longer than %d tokens and were truncated", cut, len(examples), max_len)
    return examples


def iter_conversations(path: Union[str, Path], key: str = "messages") -> Iterator[list]:
    """Stream ``{"messages": [{"role", "content"}, ...]}`` JSONL; bad lines are logged with their number and skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line).get(key)
                if not isinstance(messages, list) or not messages:
                    raise ValueError(f"field '{key}' must be a non-empty list of messages")
            except (json.JSONDecodeError, AttributeError, ValueError) as e:
                logger.warning("%s:%d: %s (line skipped)", path, line_no, e)
                continue
            yield messages


def _row(examples: Sequence[SFTExample], length: int) -> dict:
    """One row of ``length`` slots holding ``examples`` back to back, then padding."""
    ids, labels, pos, docs = [], [], [], []
    for d, ex in enumerate(examples):
        n = len(ex)
        ids += ex.ids
        labels += [ex.ids[t + 1] if ex.loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        pos += range(n)
        docs += [d] * n
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit a row of {length}")
    pad = length - len(ids)
    return {
        "input_ids": ids + [0] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": pos + [0] * pad,
        "doc_ids": docs + [PAD_DOC] * pad,
    }


def collate(rows: Sequence[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}


def pack_examples(examples: Sequence[SFTExample], seq_len: int) -> list:
    """First-fit decreasing: lists of example indices whose lengths sum to at most ``seq_len``."""
    too_long = [i for i, ex in enumerate(examples) if len(ex) > seq_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples exceed seq_len={seq_len} (first: #{too_long[0]} with {len(examples[too_long[0]])} tokens); "
            "tokenize with max_len=seq_len or raise seq_len"
        )
    bins: list = []
    room: list = []
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i)):
        n = len(examples[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    return bins


def length_sorted_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list:
    """Indices sorted by length, cut into batches of ``batch_size``, batch order shuffled by ``seed``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def build_sft_batches(
    examples: Sequence[SFTExample],
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    pack: bool = True,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list:
    """Batches (dicts of ``[B, S]`` LongTensors, see module docstring) for one data-parallel rank.

    ``pack=True``: rows of exactly ``seq_len`` slots holding several documents each.
    ``pack=False``: one document per row, length-sorted, padded to the batch's longest.
    Rank r gets batches r, r + dp_size, ...; trailing batches that not every rank
    could get are dropped so all ranks run the same number of steps.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if pack:
        rows = pack_examples(examples, seq_len)
        random.Random(seed).shuffle(rows)
        groups = [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
        batches = [collate([_row([examples[i] for i in row], seq_len) for row in group]) for group in groups]
    else:
        batches = []
        for group in length_sorted_batches([len(ex) for ex in examples], micro_batch_size, seed):
            longest = max(len(examples[i]) for i in group)
            batches.append(collate([_row([examples[i]], longest) for i in group]))
    usable = len(batches) - len(batches) % dp_size
    return batches[dp_rank:usable:dp_size]


def conversations_from(source: Optional[Union[str, Path]], num: int = 512, seed: int = 0) -> list:
    """Conversations from a JSONL file, or ``num`` generated worked-solution tasks when ``source`` is None."""
    if source is None:
        from data.tasks import generate_sft

        return generate_sft(num, seed)
    return list(iter_conversations(source))

