"""``megatron-seed rl`` with ``rollout.engine=external``: rollouts from an HTTP completions server, weights synced to it."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_seed.config import ConfigError, load_config
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train import checkpoint
from rl.rl_trainer import RLTrainer
from tests.test_rollout_external import FakeServer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 2


def serve(handler_fn) -> ThreadingHTTPServer:
    """A local HTTP server answering POSTs with ``handler_fn(url, json) -> json``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps(handler_fn(f"http://{self.headers['Host']}{self.path}", payload)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def external_config(tmp_path, url: str, *extra: str):
    return load_config("rl-tiny", None, [
        f"rl.steps={STEPS}", "rl.value_pretrain_steps=0", "rl.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8", "rollout.engine=external",
        f"rollout.external_url={url}", f"rollout.external_weights_dir={tmp_path / 'weights'}", f"train.save_dir={tmp_path / 'run'}",
        "train.save_interval=0", "rl.log_samples_interval=0", "sft.steps=0", "rl.eval_prompts=0",
        "rl.filter_zero_variance=false",  # every step updates, so every step syncs the server's weights
        *extra,
    ])


@pytest.mark.timeout(240)
def test_rl_generates_on_the_server_and_syncs_weights_after_every_step(tmp_path):
    probe = external_config(tmp_path, "http://unused")
    fake = FakeServer(GPTModel(probe.model, ParallelState.single()))  # random weights until the first sync
    http = serve(fake)
    try:
        cfg = external_config(tmp_path, f"http://127.0.0.1:{http.server_address[1]}")
        assert not RLTrainer.from_config(cfg).fit()["stopped"]
    finally:
        http.shutdown()
    kinds = [url.rsplit("/", 1)[-1] for url, _ in fake.requests]
    # a sync before the first rollout, then one rollout and one sync per PPO step
    assert kinds == ["update_weights_from_disk"] + ["completions", "update_weights_from_disk"] * STEPS
    assert all(p["n"] == 2 and p["max_tokens"] == 8 for url, p in fake.requests if url.endswith("completions"))
    saved = checkpoint.open_checkpoint(str(tmp_path / "run" / "actor"))
    for name, tensor in fake.model.state_dict().items():  # the server now holds the trained policy
        torch.testing.assert_close(tensor, saved.read_full(f"model/{name}"), rtol=0, atol=0, msg=name)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and "ppo/actor/pg_loss" in json.loads(lines[-1])


def test_external_engine_needs_its_server_and_weights_dir():
    with pytest.raises(ConfigError, match="rollout.external_url"):
        load_config("tiny", None, ["rollout.engine=external"])
    with pytest.raises(ConfigError, match="rollout.external_weights_dir"):
        load_config("tiny", None, ["rollout.engine=external", "rollout.external_url=http://h:8000"])
