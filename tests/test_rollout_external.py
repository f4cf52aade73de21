"""External-engine adapter against a fake vLLM-style server (no real vLLM/SGLang here)."""
import dataclasses

import pytest
import torch

from megatron_seed.config import MoEConfig, RolloutConfig
from megatron_seed.convert.hf import load_hf_checkpoint
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from rl.rollout.engine import RolloutEngine
from rl.rollout.external import ExternalEngine, ExternalEngineError, HTTPCompletionsEngine
from rl.rollout.sampling import SamplingParams
from tests.model_utils import tiny_model
from tests.rollout_utils import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = dataclasses.replace(tiny_model(), moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16))  # exportable: no shared experts
STOP = [1]


def model(seed: int) -> GPTModel:
    m = GPTModel(CFG, ParallelState.single())
    m.init_weights(seed)
    return m


class FakeServer:
    """Answers /v1/completions in vLLM's format with our own engine; reloads weights from disk."""

    def __init__(self, weights: GPTModel):
        self.model = weights
        self.requests = []

    def __call__(self, url: str, payload: dict) -> dict:
        self.requests.append((url, payload))
        if url.endswith("/update_weights_from_disk"):
            _, sd = load_hf_checkpoint(payload["model_path"])
            self.model.load_state_dict(sd)
            return {"success": True}
        top_k = payload["top_k"] if payload["top_k"] > 0 else 0
        params = SamplingParams(payload["temperature"], payload["top_p"], top_k)
        engine = RolloutEngine(self.model, ParallelState.single(), RolloutConfig(), stop_ids=payload["stop_token_ids"], pad_id=0, seed=9)
        out = engine.generate(payload["prompt"], n=payload["n"], sampling=params, max_new_tokens=payload["max_tokens"])
        P = out.prompt_width
        choices = []
        for b, (reply, reason) in enumerate(zip(out.responses(), out.finish_reasons)):
            lps = out.log_probs_BS[b, P:P + len(reply)].tolist()
            choices.append({"index": b, "finish_reason": reason, "text": "",
                            "logprobs": {"tokens": [f"token_id:{t}" for t in reply], "token_logprobs": lps}})
        return {"choices": choices[::-1]}  # order must not matter: the adapter sorts by index


def adapter(server, tmp_path=None) -> HTTPCompletionsEngine:
    return HTTPCompletionsEngine("http://fake:8000/", "policy", CFG, STOP, 0, str(tmp_path) if tmp_path else None, transport=server)


def test_adapter_returns_the_servers_rollouts_as_a_batch():
    server = FakeServer(model(1))
    eng = adapter(server)
    assert isinstance(eng, ExternalEngine)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    got = eng.generate(PROMPTS, 2, params, 6)
    want = RolloutEngine(model(1), ParallelState.single(), RolloutConfig(), stop_ids=STOP, pad_id=0, seed=9).generate(
        PROMPTS, n=2, sampling=params, max_new_tokens=6)
    assert got.responses() == want.responses() and got.finish_reasons == want.finish_reasons
    torch.testing.assert_close(got.log_probs_BS, want.log_probs_BS)
    assert got.prompt_index_B.tolist() == want.prompt_index_B.tolist() and got.values_BS is None
    url, body = server.requests[-1]
    assert url == "http://fake:8000/v1/completions" and body["logprobs"] == 1 and body["top_k"] == -1


def test_sync_weights_makes_the_server_generate_with_new_weights(tmp_path):
    server = FakeServer(model(1))
    eng = adapter(server, tmp_path)
    greedy = SamplingParams(temperature=0.0)
    before = eng.generate(PROMPTS, 1, greedy, 8).responses()
    eng.sync_weights(model(2).state_dict())
    after = eng.generate(PROMPTS, 1, greedy, 8).responses()
    want = RolloutEngine(model(2), ParallelState.single(), RolloutConfig(), stop_ids=STOP, pad_id=0).generate(
        PROMPTS, n=1, sampling=greedy, max_new_tokens=8).responses()
    assert after == want and before != after
    assert server.requests[-2][1] == {"model_path": str(tmp_path)}


def test_malformed_replies_are_refused():
    eng = adapter(lambda url, payload: {"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"tokens": ["hi"], "token_logprobs": [0.0]}}]})
    with pytest.raises(ExternalEngineError, match="token_id"):
        eng.generate([[5, 6]], 1, SamplingParams(), 4)
    with pytest.raises(ExternalEngineError, match="choices"):
        eng.generate([[5, 6]], 2, SamplingParams(), 4)
    with pytest.raises(ExternalEngineError, match="weights_dir"):
        adapter(FakeServer(model(1))).sync_weights({})
