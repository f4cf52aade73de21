"""Optional external rollout engines (vLLM / SGLang servers on their own GPUs).

The default rollout runs in-process on the trained weights (:mod:`rl.rollout.engine`).
A user with an inference server can plug one in through :class:`ExternalEngine`:
``generate`` returns the same :class:`~rl.rollout.outputs.RolloutBatch`, and
``sync_weights`` pushes the trainer's weights after each policy update.

:class:`HTTPCompletionsEngine` speaks the OpenAI-style ``/v1/completions`` API that both
vLLM and SGLang serve, with prompts as token-id lists, ``logprobs=1`` and
``return_tokens_as_token_ids=true`` (vLLM; tokens come back as ``"token_id:<id>"``), and
choices ordered prompt-major (``index = prompt * n + sample``). Weights are synced the
SGLang way: the full state dict is written as a Hugging Face Qwen3-MoE checkpoint into a
directory both sides can read and ``POST /update_weights_from_disk {"model_path": dir}``
tells the server to reload (vLLM has no standard HTTP reload; point ``reload_path`` at
whatever the deployment exposes).

Log-probs caveat: a server returns log-probs from its own kernels and precision (often
bf16) and, unless configured for raw log-probs (vLLM ``logprobs_mode="raw_logprobs"``),
of its processed sampling distribution. They are therefore *not* the trainer's numbers:
recompute the old log-probs with the trainer before PPO so its ratio starts at 1.
"""
from __future__ import annotations

import json
import urllib.request
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch.distributed as dist

from megatron_seed.config import ModelConfig, RolloutConfig
from megatron_seed.parallel.state import ParallelState
from rl.rollout.outputs import FINISH_LENGTH, FINISH_STOP, RolloutBatch, assemble
from rl.rollout.sampling import SamplingParams

Transport = Callable[[str, dict], dict]  # (url, JSON payload) -> JSON reply


class ExternalEngineError(RuntimeError):
    """The server's reply is not what the adapter expects (or the request failed)."""


@runtime_checkable
class ExternalEngine(Protocol):
    """What the RL loop needs from any rollout engine other than the in-process one."""

    stop_ids: Sequence[int]

    def generate(
        self, prompts: Sequence[Sequence[int]], n: Optional[int] = None, sampling: Optional[SamplingParams] = None,
        max_new_tokens: Optional[int] = None,
    ) -> RolloutBatch:
        """``n`` continuations of every prompt, rows prompt-major, as a RolloutBatch (values None);
        unset arguments come from the engine's ``RolloutConfig``."""

    def sync_weights(self, state_dict: dict) -> None:
        """Make the engine generate with these (full, unsharded) weights from now on."""


def post_json(url: str, payload: dict, timeout_s: float = 600.0) -> dict:
    """POST ``payload`` as JSON and decode the JSON reply."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except OSError as e:
        raise ExternalEngineError(f"request to {url} failed: {e}; is the inference server running and reachable?") from e


def _token_id(token: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ExternalEngineError(f"token {token!r} is not 'token_id:<id>'; start the server so it honours return_tokens_as_token_ids")
    return int(token[len("token_id:"):])


class HTTPCompletionsEngine:
    """vLLM/SGLang ``/v1/completions`` adapter; see the module docstring for the protocol."""

    def __init__(
        self,
        base_url: str,
        model_name: str,
        model_cfg: ModelConfig,
        stop_ids: Sequence[int],
        pad_id: int,
        weights_dir: Optional[str] = None,
        reload_path: str = "/update_weights_from_disk",
        transport: Transport = post_json,
        defaults: Optional[RolloutConfig] = None,
    ):
        self.base_url, self.model_name, self.model_cfg = base_url.rstrip("/"), model_name, model_cfg
        self.stop_ids, self.pad_id = [int(i) for i in stop_ids], int(pad_id)
        self.weights_dir, self.reload_path, self.transport = weights_dir, reload_path, transport
        self.defaults = defaults or RolloutConfig()

    @classmethod
    def from_config(cls, rollout: RolloutConfig, model_cfg: ModelConfig, stop_ids: Sequence[int], pad_id: int) -> "HTTPCompletionsEngine":
        """The adapter of ``rollout.engine=external`` (``rollout.external_url`` / ``_model`` / ``_weights_dir``)."""
        return cls(rollout.external_url, rollout.external_model, model_cfg, stop_ids, pad_id, rollout.external_weights_dir,
                   defaults=rollout)

    def request(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, max_new_tokens: int) -> dict:
        """The completions request body (greedy = temperature 0)."""
        return {
            "model": self.model_name,
            "prompt": [list(map(int, p)) for p in prompts],
            "n": n,
            "max_tokens": max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "stop_token_ids": self.stop_ids,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }

    def generate(self, prompts: Sequence[Sequence[int]], n: Optional[int] = None, sampling: Optional[SamplingParams] = None,
                 max_new_tokens: Optional[int] = None) -> RolloutBatch:
        n = self.defaults.samples_per_prompt if n is None else n
        sampling = sampling or SamplingParams.from_config(self.defaults)
        max_new_tokens = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        reply = self.transport(f"{self.base_url}/v1/completions", self.request(prompts, n, sampling, max_new_tokens))
        choices = sorted(reply.get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompts) * n:
            raise ExternalEngineError(f"server returned {len(choices)} choices for {len(prompts)} prompts x n={n}")
        responses, log_probs, finish = [], [], []
        for c in choices:
            lp = c.get("logprobs") or {}
            tokens = [_token_id(t) for t in lp.get("tokens", [])]
            if not tokens:
                raise ExternalEngineError(f"choice {c['index']} has no token log-probs; request logprobs=1")
            reason = c.get("finish_reason")
            if reason not in (FINISH_STOP, FINISH_LENGTH):
                raise ExternalEngineError(f"choice {c['index']}: finish_reason {reason!r}, expected 'stop' or 'length'")
            responses.append(tokens)
            log_probs.append([float(x) for x in lp["token_logprobs"]])
            finish.append(reason)
        rows = range(len(choices))
        return assemble([list(prompts[r // n]) for r in rows], responses, log_probs, None, finish, [r // n for r in rows], self.pad_id)

    def sync_weights(self, state_dict: dict) -> None:
        """Write an HF checkpoint into ``weights_dir`` and ask the server to reload it."""
        from megatron_seed.convert.hf import save_hf_checkpoint

        if self.weights_dir is None:
            raise ExternalEngineError("sync_weights needs weights_dir: a directory the trainer writes and the server reads")
        save_hf_checkpoint(state_dict, self.model_cfg, self.weights_dir)
        reply = self.transport(f"{self.base_url}{self.reload_path}", {"model_path": self.weights_dir})
        if reply.get("success") is False:
            raise ExternalEngineError(f"server refused the weight reload: {reply.get('message', reply)}")


class OneQueryPerReplica:
    """An external engine shared by the model-parallel (tp x pp) ranks of one data-parallel replica.

    Those ranks train on the same rows, so they must see the same rollouts: the replica's
    first rank queries the server and broadcasts the batch to the others (each dp replica
    still sends its own prompts). Weight syncs go through :meth:`sync_weights_from`.
    """

    def __init__(self, engine: ExternalEngine, ps: ParallelState):
        self.engine, self.ps = engine, ps
        self.stop_ids = engine.stop_ids
        self.leader = ps.global_rank("model_parallel", 0) if ps.size("model_parallel") > 1 else ps.rank

    def generate(self, prompts: Sequence[Sequence[int]], n: Optional[int] = None, sampling: Optional[SamplingParams] = None,
                 max_new_tokens: Optional[int] = None) -> RolloutBatch:
        if self.ps.size("model_parallel") == 1:
            return self.engine.generate(prompts, n, sampling, max_new_tokens)
        box = [self.engine.generate(prompts, n, sampling, max_new_tokens) if self.ps.rank == self.leader else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.ps.group("model_parallel"))
        return box[0]

    def sync_weights_from(self, full_state: Optional[dict]) -> None:
        """Collective: rank 0 (which holds ``full_state``, see ``full_state_dict``) pushes it; all wait for the reload."""
        if full_state is not None:
            self.engine.sync_weights(full_state)
        if dist.is_initialized():
            dist.barrier()
