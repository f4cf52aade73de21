"""Which layers each pipeline stage (and virtual stage) holds."""
from __future__ import annotations

from typing import Optional


def split_layers(num_layers: int, num_chunks: int, pp_layers: Optional[list] = None) -> list:
    """Layer ids of each of ``num_chunks`` consecutive model chunks.

    ``pp_layers`` gives the count per chunk (uneven first/last stage allowed); by
    default layers are spread evenly, the remainder going to the middle chunks so the
    first stage (embedding) and the last (head and loss) stay light.
    """
    if pp_layers is not None:
        counts = list(pp_layers)
    else:
        base, extra = divmod(num_layers, num_chunks)
        counts = [base] * num_chunks
        middle = list(range(1, num_chunks - 1)) or list(range(num_chunks))
        for i in range(extra):
            counts[middle[i % len(middle)]] += 1
    if sum(counts) != num_layers or len(counts) != num_chunks or min(counts) < 1:
        raise ValueError(f"layer split {counts} does not cover {num_layers} layers in {num_chunks} chunks")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_chunks(num_layers: int, pp: int, virtual_pp: int, pp_rank: int, pp_layers: Optional[list] = None) -> list:
    """Layer ids of the model chunks held by ``pp_rank``.

    With virtual stages (interleaved 1F1B) chunk ``v`` of rank ``r`` is global chunk
    ``v * pp + r``, as in Megatron: rank 0 holds chunks 0 and pp, and so on.
    """
    chunks = split_layers(num_layers, pp * virtual_pp, pp_layers)
    return [chunks[v * pp + pp_rank] for v in range(virtual_pp)]
