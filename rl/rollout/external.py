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

from megatron_seed.config import ModelConfig
from rl.rollout.outputs import FINISH_LENGTH, FINISH_STOP, RolloutBatch, assemble
from rl.rollout.sampling import SamplingParams

Transport = Callable[[str, dict], dict]  # (url, JSON payload) -> JSON reply


class ExternalEngineError(RuntimeError):
    """The server's reply is not what the adapter expects (or the request failed)."""


@runtime_checkable
class ExternalEngine(Protocol):
    """What the RL loop needs from any rollout engine other than the in-process one."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, max_new_tokens: int
    ) -> RolloutBatch:
        """``n`` continuations of every prompt, rows prompt-major, as a RolloutBatch (values None)."""

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
    ):
        self.base_url, self.model_name, self.model_cfg = base_url.rstrip("/"), model_name, model_cfg
        self.stop_ids, self.pad_id = [int(i) for i in stop_ids], int(pad_id)
        self.weights_dir, self.reload_path, self.transport = weights_dir, reload_path, transport

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

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, max_new_tokens: int) -> RolloutBatch:
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
