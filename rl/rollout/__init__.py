"""Rollouts: KV-cache generation on the trained weights (:mod:`rl.rollout.engine`), sampling
controls and behaviour log-probs (:mod:`rl.rollout.sampling`), the weights it samples with at
``rollout.dtype`` (:mod:`rl.rollout.precision`), the experts it routed each token to
(:mod:`rl.rollout.routes`, for routing replay), the batch it returns
(:mod:`rl.rollout.outputs`) and an adapter for external inference servers
(:mod:`rl.rollout.external`)."""
from rl.rollout.engine import RolloutEngine, local_prompts
from rl.rollout.external import ExternalEngine, HTTPCompletionsEngine
from rl.rollout.outputs import RolloutBatch
from rl.rollout.sampling import SamplingParams

__all__ = ["ExternalEngine", "HTTPCompletionsEngine", "RolloutBatch", "RolloutEngine", "SamplingParams", "local_prompts"]
