"""Typed configuration: dataclasses, YAML loading, ``--set`` overrides, validation.

A run is described by one :class:`Config` with sections ``model`` (with ``model.moe``),
``parallel``, ``train``, ``rl``, ``rollout``, ``rewards`` and ``data``. Values come from, in order:
the dataclass defaults, a preset (``configs/<name>.yaml``) or a YAML file, then
``--set section.field=value`` overrides. Every error is a :class:`ConfigError` whose
message names the field, the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class MoEConfig:
    """Mixture-of-experts block (Qwen3-MoE semantics by default)."""

    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 128  # per routed expert
    num_shared_experts: int = 0
    shared_ffn_size: int = 0  # per shared expert
    score_function: str = "softmax"  # softmax (Qwen3-MoE) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    num_groups: int = 1  # group-limited routing: experts split in groups ...
    top_groups: int = 1  # ... and only the best top_groups groups are eligible
    aux_loss_coef: float = 1e-3
    aux_loss_type: str = "micro_batch"  # micro_batch | sequence | none
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # > 0 enables aux-loss-free balancing (sigmoid or softmax)
    capacity_factor: Optional[float] = None  # None = dropless
    dispatcher: str = "alltoall"  # alltoall | allgather
    kernel_backend: str = "auto"  # auto | torch | triton | inductor (see moe/kernels/__init__.py)
    router_dtype: str = "float32"
    # benchmarks and the dry run only: slots go round robin over the ep ranks and experts, so every expert gets the
    # same load (Megatron's moe_router_force_load_balancing); the weights stay the router's scores of those experts
    router_force_balance: bool = False


@dataclass
class ModelConfig:
    """Decoder-only GPT-MoE (RMSNorm, RoPE, GQA with optional QK-norm, SwiGLU)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    qk_norm: bool = True
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    num_dense_layers: int = 0  # leading layers with a dense SwiGLU MLP instead of MoE
    dense_ffn_size: int = 512
    tie_embeddings: bool = False
    value_head: bool = False  # scalar head for the critic / reward model
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ParallelConfig:
    """Parallel layout. ``dp`` is the dense data-parallel size; 0 derives it from the world size.

    world = tp * cp * dp * pp; experts are sharded over ep * etp and replicated over
    edp = tp * cp * dp / (ep * etp) (Megatron-core's expert rank generator).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 0
    cp: int = 1
    sequence_parallel: bool = False
    virtual_pp: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    pp_layers: Optional[list] = None  # layers per stage, e.g. [3, 4, 4, 3]; None = even
    pp_schedule: str = "1f1b"  # 1f1b | interleaved | gpipe
    zero1: bool = True  # shard fp32 master weights and Adam state over dp
    overlap_grad_reduce: bool = True
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # where this rank's tensors live: auto (cuda:LOCAL_RANK under nccl, cpu under gloo, cuda in one process
    # when a GPU is visible) | cpu | cuda | cuda:N
    device: str = "auto"


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8  # = micro_batch_size * grad_accum * dp
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # RL steps (PPO actor / critic, value pretraining): pack whole sequences into micro-batch rows of at most this
    # many tokens, balanced over dp (rl.packing); None = rows padded to the longest, train.micro_batch_size per micro-batch
    max_tokens_per_micro_batch: Optional[int] = None
    # parameters and activations: auto (bf16 on cuda, fp32 elsewhere) | fp32 | bf16. Under bf16 the optimizer keeps
    # fp32 master weights and Adam moments; router, norms, softmax and log-prob math run in fp32
    precision: str = "auto"
    grad_reduce_in_fp32: bool = True  # data-parallel gradient reduction in fp32 (false: in the parameters' dtype)
    log_interval: int = 10
    save_interval: int = 100  # steps between checkpoints (RL: PPO / value-pretraining steps); 0 = only at the end
    async_save: bool = False  # interval checkpoints written by a background thread while training goes on
    save_dir: str = "runs/default"
    load_dir: Optional[str] = None
    progress: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = guess from the device


@dataclass
class DataConfig:
    tokenizer: str = "bundled"  # bundled | bytes | path to a sentencepiece .model | HF tokenizer dir
    train_data: list = field(default_factory=lambda: ["bundled"])  # paths (prefixes) or "bundled"
    weights: Optional[list] = None  # blending weights, one per train_data entry
    text_field: str = "text"
    prompts: Optional[str] = None  # RL prompt JSONL; None = generated tasks
    # generated verifiable tasks (data/tasks.py) for RL prompts, SFT worked solutions and held-out evaluation
    task_families: list = field(default_factory=lambda: ["arithmetic", "linear_equation", "program"])
    task_difficulty: list = field(default_factory=lambda: [1, 2])  # [lowest, highest], each in 1..5
    # the system turn of generated tasks (RL prompts, SFT worked solutions, held-out evaluation): None = data.tasks.SYSTEM_PROMPT,
    # "" = no system turn (a byte-level model spends most of each row on it)
    system_prompt: Optional[str] = None
    # SFT on generated tasks: true = the worked solution, false = only its final step ("The answer is 52."): a tiny model
    # that must copy the operands into a worked line learns the task later than one that answers at once
    worked_solutions: bool = True
    # generated RL prompts (no data.prompts): None = rl.steps x rl.prompts_per_step, so no PPO step sees a prompt again
    # (a pool that repeats is learnt by heart: the training reward rises while held-out accuracy does not)
    num_tasks: Optional[int] = None
    num_workers: int = 2


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    samples_per_prompt: int = 4
    kv_cache_budget_mb: float = 256.0
    # native engine: run decode steps through torch.compile (one process per model replica only: tp = pp = ep = etp = cp = 1,
    # other layouts decode eagerly). Off by default: the first rollout pays the compilation (10-30 s a graph on a 2-core CPU, which
    # needs a C++ compiler), which only long RL runs earn back. See rl/rollout/engine.py.
    compile: bool = False
    # native engine: the precision it samples at. auto (the trained parameters' dtype: bf16 under train.precision=bf16, fp32 under
    # fp32, sampling with the trained weights themselves) | fp32 | bf16; another dtype than the training parameters' makes the engine hold a
    # copy of the weights at it (refreshed once per generate call) and the PPO step recompute the behaviour log-probs with the
    # training forward (the rollout's are kept for rl.tis_cap). bf16 halves the bytes of weights and KV cache each decode step
    # reads; on a CPU without bf16 arithmetic (no AVX512-BF16 / AMX) its GEMMs multiply the bf16 numbers as fp32
    # (megatron_seed/gemm.py), about as fast as fp32 there: it pays on a GPU or a CPU with bf16; see rl/rollout/precision.py
    dtype: str = "auto"
    engine: str = "native"  # native | external (vLLM / SGLang adapter)
    external_url: Optional[str] = None  # engine=external: base URL of the completions server, e.g. http://host:8000
    external_model: str = "default"  # engine=external: the model name the server serves
    external_weights_dir: Optional[str] = None  # engine=external: a directory the trainer writes and the server reads


@dataclass
class RLConfig:
    gamma: float = 1.0
    lambda_value: float = 1.0
    lambda_policy: float = 0.95
    length_adaptive: bool = True
    length_alpha: float = 0.05
    whiten_advantages: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None  # e.g. 3.0; None = off
    # truncated importance sampling (e.g. 2.0; None = off): the policy loss of each token times
    # min(pi_train_old / pi_rollout, tis_cap) when the behaviour log-probs come from another engine or precision
    # (external engine, rollout.dtype other than the training dtype); inactive (weights 1) when they agree exactly
    tis_cap: Optional[float] = None
    loss_agg: str = "token"  # token | sequence
    value_clip: Optional[float] = 0.2
    lm_loss_coef: float = 0.1  # mu: positive-example NLL weight
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    prompts_per_step: int = 8
    steps: int = 20
    critic_lr: float = 1e-3
    actor_lr: float = 1e-4
    # optimizer steps of linear learning-rate warm-up of the actor and the critic: their Adam moments start empty, so the
    # first updates move every weight by about the full learning rate and can undo the SFT start in one PPO step
    warmup_steps: int = 0
    value_pretrain_steps: int = 20  # at most; stops earlier on a plateau
    value_pretrain_patience: int = 5  # steps without improvement of value loss or explained variance
    value_pretrain_min_delta: float = 1e-3  # smallest change that counts as an improvement
    overlong_penalty: float = 0.0
    filter_zero_variance: bool = False  # DAPO dynamic sampling: groups whose n rewards are all equal are left out of the update
    # routing replay (R3): off | rollout (the actor's training forwards use the experts the rollout recorded for each token)
    routing_replay: str = "off"
    # PPO steps between measurements of the rollout/training mismatch (the mismatch/* metrics, from the first PPO step on; 0 =
    # never): with the rollout's own behaviour log-probs (fp32 in-process rollout) each costs one more actor forward of the batch
    mismatch_interval: int = 1
    adaptation_rule: str = "learnability"  # learnability | reward | uniform
    adaptation_min_weight: float = 0.05
    adaptation_max_weight: float = 0.8
    adaptation_rate: float = 0.5
    adaptation_ema: float = 0.8  # smoothing of the per-domain signals (0 = latest step only)
    eval_prompts: int = 64  # generated held-out prompts scored against their ground truth (0 = no evaluation)
    eval_samples: int = 4  # k of the held-out pass@k (0 = greedy only)
    eval_interval: int = 10  # PPO steps between held-out evaluations (always before PPO and at the end)
    log_samples_interval: int = 5  # PPO steps between printing a few sampled responses with their rewards; 0 = never
    log_samples: int = 2  # responses printed each time


@dataclass
class RewardsConfig:
    """Reward scorers behind the router (see rl/rewards/factory.py): which exist and their limits."""

    workers: int = 4  # samples the router scores at once
    math_timeout_s: float = 5.0  # CPU seconds one math check may use (worker start-up not counted)
    math_workers: int = 2  # math verification processes
    # all: 1 only if every test passes (Seed / DAPO); fraction: the share passed, which pays a constant program
    # on tasks with few distinct outputs (a YES/NO task: half the tests)
    code_mode: str = "all"
    code_workers: int = 2  # sandboxes running at once
    sandbox_cpu_s: int = 2  # CPU seconds per test case (interpreter start-up not counted)
    sandbox_wall_s: float = 5.0  # wall clock per test case while the program is not runnable (sleeping, blocked)
    sandbox_memory_mb: int = 512
    isolation: str = "auto"  # auto | bubblewrap | rlimits-only
    llm_judge: str = "none"  # none | url (OpenAI-compatible server) | policy (our own policy, passed in by the RL trainer)
    judge_url: Optional[str] = None  # llm_judge=url: API root, e.g. http://host:8000/v1
    judge_model: str = "default"
    judge_thinking: bool = True  # Seed-Thinking-Verifier prompt (reason, then "Final verdict"); false = direct YES/NO
    judge_timeout_s: float = 60.0
    reward_model: Optional[str] = None  # pairwise reward-model checkpoint (megatron-seed train-rm --save) for chat prompts
    reward_model_tokenizer: Optional[str] = None  # its tokenizer: "bytes" or a data.tokenizer spec; None = data.tokenizer


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``megatron-seed sft`` and the RL run's warm-up phase); see megatron_seed/train/sft.py."""

    steps: int = 0  # optimizer steps; 0 = no SFT phase in an RL run
    lr: float = 3e-3  # peak; cosine decay to lr / 10
    warmup_steps: int = 10
    examples: int = 2000  # generated worked solutions when sft.data is None
    data: Optional[str] = None  # {"messages": [...]} JSONL; None = generated tasks of data.task_families
    # the RL run's SFT phase: stop once greedy accuracy on sft.eval_prompts validation prompts (the first RL prompts, left
    # out of SFT; never the held-out ones) reaches it, checked every sft.eval_interval steps; None = all sft.steps. PPO
    # needs a partly right start (groups with mixed rewards), and when a tiny model learns a task is a matter of its seed
    stop_accuracy: Optional[float] = None
    eval_interval: int = 10
    eval_prompts: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r} ({type(value).__name__}); write {path}=true or {path}=false")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: expected an integer, got {value!r} ({type(value).__name__}); fix: give a whole number")
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"{path}: expected a number, got {value!r} ({type(value).__name__})")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
    if tp is list and not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {value!r} ({type(value).__name__}); write it as [a, b]")
    return value


def _merge(obj: Any, updates: dict, prefix: str) -> None:
    """Apply a nested dict of updates to a dataclass in place, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid fields: {', '.join(names)}"
            raise ConfigError(f"{path}: unknown config key; {hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of fields, got {value!r}")
            _merge(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _parse_override(item: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` with the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value, e.g. model.num_layers=4")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {name!r} not found; available presets: {', '.join(names)}")
    return path


def load_config(
    preset: Optional[str] = None,
    path: Optional[str] = None,
    overrides: Optional[list] = None,
    validate: bool = True,
) -> Config:
    """Build a Config from defaults, then a preset or YAML file, then ``--set`` overrides."""
    cfg = Config()
    for source in ([preset_path(preset)] if preset else []) + ([Path(path)] if path else []):
        with open(source) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        _merge(cfg, data, "")
    for item in overrides or []:
        _merge(cfg, _parse_override(item), "")
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    """The Config a ``Config.to_dict()`` came from (e.g. the one stored in a checkpoint's meta)."""
    cfg = Config()
    _merge(cfg, data, "")
    if validate:
        validate_config(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive(path: str, value: Any) -> None:
    _require(value > 0, f"{path}={value}: must be > 0")


def _one_of(path: str, value: str, choices: tuple) -> None:
    _require(value in choices, f"{path}={value!r}: must be one of {', '.join(choices)}")


def validate_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    _require(
        m.num_attention_heads % m.num_kv_heads == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
        "fix: choose num_kv_heads that divides num_attention_heads",
    )
    _require(
        0 <= m.num_dense_layers <= m.num_layers,
        f"model.num_dense_layers={m.num_dense_layers}: must be between 0 and model.num_layers={m.num_layers}",
    )
    _require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim}: rotary embeddings need an even head_dim")
    moe = m.moe
    if m.num_dense_layers < m.num_layers:
        _positive("model.moe.num_experts", moe.num_experts)
        _positive("model.moe.ffn_size", moe.ffn_size)
        _require(
            1 <= moe.top_k <= moe.num_experts,
            f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}; fix: lower top_k or add experts",
        )
        _require(
            moe.num_experts % moe.num_groups == 0,
            f"model.moe.num_groups={moe.num_groups} does not divide model.moe.num_experts={moe.num_experts}",
        )
        _require(
            1 <= moe.top_groups <= moe.num_groups,
            f"model.moe.top_groups={moe.top_groups} must be between 1 and model.moe.num_groups={moe.num_groups}",
        )
        _require(
            moe.top_k <= moe.top_groups * (moe.num_experts // moe.num_groups),
            f"model.moe.top_k={moe.top_k} exceeds the experts in the top {moe.top_groups} groups "
            f"({moe.top_groups} x {moe.num_experts // moe.num_groups}); fix: raise top_groups or lower top_k",
        )
    _require(moe.num_shared_experts >= 0, f"model.moe.num_shared_experts={moe.num_shared_experts}: must be >= 0")
    if moe.num_shared_experts:
        _positive("model.moe.shared_ffn_size", moe.shared_ffn_size)
    _one_of("model.moe.score_function", moe.score_function, ("softmax", "sigmoid"))
    _one_of("model.moe.aux_loss_type", moe.aux_loss_type, ("micro_batch", "sequence", "none"))
    _one_of("model.moe.dispatcher", moe.dispatcher, ("alltoall", "allgather"))
    _one_of("model.moe.kernel_backend", moe.kernel_backend, ("auto", "torch", "triton", "inductor"))
    _require(moe.aux_loss_coef >= 0, f"model.moe.aux_loss_coef={moe.aux_loss_coef}: must be >= 0")
    _require(moe.z_loss_coef >= 0, f"model.moe.z_loss_coef={moe.z_loss_coef}: must be >= 0")
    if moe.capacity_factor is not None:
        _positive("model.moe.capacity_factor", moe.capacity_factor)


def validate_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    for name in ("tp", "pp", "ep", "etp", "cp", "virtual_pp"):
        _positive(f"parallel.{name}", getattr(p, name))
    _require(p.dp >= 0, f"parallel.dp={p.dp}: must be >= 0 (0 derives it from the world size)")
    _one_of("parallel.pp_schedule", p.pp_schedule, ("1f1b", "interleaved", "gpipe"))
    _one_of("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    _require(
        p.device in ("auto", "cpu", "cuda") or (p.device.startswith("cuda:") and p.device[5:].isdigit()),
        f"parallel.device={p.device!r}: must be auto, cpu, cuda or cuda:N",
    )
    _require(
        not (p.backend == "nccl" and p.device == "cpu"),
        "parallel.device=cpu with parallel.backend=nccl: NCCL reduces CUDA tensors only; fix: parallel.device=auto or parallel.backend=gloo",
    )
    _require(
        m.num_attention_heads % p.tp == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}; fix: pick tp dividing the head count",
    )
    _require(
        m.num_kv_heads % p.tp == 0 or p.tp % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} and parallel.tp={p.tp}: one must divide the other so kv heads can be split or replicated",
    )
    _require(m.vocab_size % p.tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}; fix: pad the vocabulary")
    if m.num_dense_layers < m.num_layers:
        _require(
            m.moe.num_experts % p.ep == 0,
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={p.ep}; fix: pick ep dividing the expert count",
        )
        _require(
            m.moe.ffn_size % p.etp == 0,
            f"model.moe.ffn_size={m.moe.ffn_size} is not divisible by parallel.etp={p.etp}",
        )
    chunks = p.pp * p.virtual_pp
    if p.pp_layers is not None:
        _require(
            len(p.pp_layers) == chunks,
            f"parallel.pp_layers has {len(p.pp_layers)} entries; it needs pp * virtual_pp = {chunks}",
        )
        _require(
            sum(p.pp_layers) == m.num_layers and all(n >= 1 for n in p.pp_layers),
            f"parallel.pp_layers={p.pp_layers} must be positive and sum to model.num_layers={m.num_layers}",
        )
    else:
        _require(
            m.num_layers >= chunks,
            f"parallel.pp={p.pp} x parallel.virtual_pp={p.virtual_pp} = {chunks} stages but model.num_layers={m.num_layers}; "
            "fix: lower pp/virtual_pp or add layers",
        )
    if p.virtual_pp > 1:
        _require(p.pp > 1, f"parallel.virtual_pp={p.virtual_pp} needs parallel.pp > 1")
    if p.sequence_parallel:
        _require(p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")


def validate_rewards(w: RewardsConfig) -> None:
    for name in ("workers", "math_timeout_s", "math_workers", "code_workers", "sandbox_cpu_s", "sandbox_wall_s",
                 "sandbox_memory_mb", "judge_timeout_s"):
        _positive(f"rewards.{name}", getattr(w, name))
    _one_of("rewards.code_mode", w.code_mode, ("fraction", "all"))
    _one_of("rewards.isolation", w.isolation, ("auto", "bubblewrap", "rlimits-only"))
    _one_of("rewards.llm_judge", w.llm_judge, ("none", "url", "policy"))
    if w.llm_judge == "url":
        _require(bool(w.judge_url) and str(w.judge_url).startswith(("http://", "https://")),
                 f"rewards.llm_judge=url needs rewards.judge_url=http(s)://host:port/v1 (got {w.judge_url!r}); "
                 "fix: set it, or use rewards.llm_judge=policy (our own policy judges) or none")
    elif w.judge_url:
        _require(False, f"rewards.judge_url={w.judge_url!r} is set but rewards.llm_judge={w.llm_judge!r}; "
                 "fix: set rewards.llm_judge=url, or drop judge_url")
    if w.reward_model is not None:
        _require(Path(w.reward_model).is_file(), f"rewards.reward_model={w.reward_model!r}: no such file; "
                 "fix: give the path written by `megatron-seed train-rm --save`")


def validate_config(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    t = cfg.train
    for name in ("steps", "micro_batch_size", "global_batch_size", "seq_len", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    _require(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr}: must be between 0 and train.lr={t.lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    _require(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; fix: raise max_seq_len or shorten seq_len",
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}",
    )
    _one_of("train.precision", t.precision, ("auto", "fp32", "bf16"))
    if t.max_tokens_per_micro_batch is not None:
        _require(isinstance(t.max_tokens_per_micro_batch, int) and t.max_tokens_per_micro_batch > 0,
                 f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch!r}: must be a positive number of tokens "
                 "(at least the longest prompt + rollout.max_new_tokens), or null to pad rows instead of packing")
        _require(cfg.rl.loss_agg == "token",
                 f"rl.loss_agg={cfg.rl.loss_agg!r} with train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch}: packed "
                 "rows hold several responses and the sequence mean is taken per row; fix: rl.loss_agg=token (Seed's "
                 "token-level loss) or train.max_tokens_per_micro_batch=null")
    p = cfg.parallel
    if p.cp > 1:  # context parallel cuts each sequence into 2 cp chunks, each split again over tp
        multiple = 2 * p.cp * p.tp
        _require(t.seq_len % multiple == 0,
                 f"train.seq_len={t.seq_len} is not divisible by 2 x parallel.cp={p.cp} x parallel.tp={p.tp} = {multiple}; "
                 f"fix: make train.seq_len a multiple of {multiple} or change parallel.cp")
        _require(cfg.rl.loss_agg == "token",
                 f"rl.loss_agg={cfg.rl.loss_agg!r} with parallel.cp={p.cp}: the sequence mean needs each whole response on "
                 "one rank; fix: rl.loss_agg=token (Seed's token-level loss) or parallel.cp=1")
    r = cfg.rl
    _require(0 <= r.gamma <= 1, f"rl.gamma={r.gamma}: must be in [0, 1]")
    for name in ("lambda_value", "lambda_policy"):
        _require(0 <= getattr(r, name) <= 1, f"rl.{name}={getattr(r, name)}: must be in [0, 1]")
    _require(r.length_alpha > 0, f"rl.length_alpha={r.length_alpha}: must be > 0")
    _require(0 < r.eps_low < 1, f"rl.eps_low={r.eps_low}: must be in (0, 1)")
    _require(r.eps_high > 0, f"rl.eps_high={r.eps_high}: must be > 0")
    if r.dual_clip is not None:
        _require(r.dual_clip > 1, f"rl.dual_clip={r.dual_clip}: must be > 1 (it bounds the loss at dual_clip * |A|)")
    if r.tis_cap is not None:
        _require(r.tis_cap > 1, f"rl.tis_cap={r.tis_cap}: must be > 1 (it caps the weight pi_train_old / pi_rollout; 1 would cut "
                 "every token the rollout over-sampled); fix: e.g. rl.tis_cap=2.0, or null to turn truncated importance sampling off")
    _one_of("rl.loss_agg", r.loss_agg, ("token", "sequence"))
    _one_of("rl.routing_replay", r.routing_replay, ("off", "rollout"))
    _require(r.mismatch_interval >= 0, f"rl.mismatch_interval={r.mismatch_interval}: must be >= 0 (PPO steps between mismatch "
             "measurements; 0 = never)")
    _require(r.routing_replay == "off" or cfg.model.num_dense_layers < cfg.model.num_layers,
             f"rl.routing_replay={r.routing_replay!r} on a dense model (model.num_dense_layers={cfg.model.num_dense_layers} = "
             f"model.num_layers): there are no expert routes to replay; fix: rl.routing_replay=off or an MoE model")
    _require(r.routing_replay == "off" or cfg.rollout.engine == "native",
             f"rl.routing_replay={r.routing_replay!r} with rollout.engine={cfg.rollout.engine!r}: only the in-process engine records the "
             "experts it chose; fix: rl.routing_replay=off or rollout.engine=native")
    _one_of("rl.adaptation_rule", r.adaptation_rule, ("learnability", "reward", "uniform"))
    _require(0 <= r.adaptation_rate <= 1, f"rl.adaptation_rate={r.adaptation_rate}: must be in [0, 1]")
    _require(0 <= r.adaptation_ema < 1, f"rl.adaptation_ema={r.adaptation_ema}: must be in [0, 1)")
    _require(
        0 <= r.adaptation_min_weight <= r.adaptation_max_weight <= 1,
        f"rl.adaptation_min_weight={r.adaptation_min_weight} / rl.adaptation_max_weight={r.adaptation_max_weight}: need 0 <= min <= max <= 1",
    )
    s = cfg.sft
    _require(s.steps >= 0, f"sft.steps={s.steps}: must be >= 0 (0 = no SFT)")
    _require(s.lr > 0, f"sft.lr={s.lr}: must be > 0")
    _require(s.warmup_steps >= 0, f"sft.warmup_steps={s.warmup_steps}: must be >= 0")
    _require(s.examples >= 1, f"sft.examples={s.examples}: must be >= 1")
    _require(s.stop_accuracy is None or 0 < s.stop_accuracy <= 1, f"sft.stop_accuracy={s.stop_accuracy}: must be in (0, 1] or null")
    _positive("sft.eval_interval", s.eval_interval)
    _positive("sft.eval_prompts", s.eval_prompts)
    d = cfg.data
    # the family names are checked by data.tasks (a higher layer) when the tasks are generated
    _require(bool(d.task_families) and all(isinstance(f, str) for f in d.task_families),
             f"data.task_families={d.task_families}: must be a non-empty list of task family names, e.g. [addition]")
    _require(len(d.task_difficulty) == 2 and all(isinstance(v, int) and 1 <= v <= 5 for v in d.task_difficulty)
             and d.task_difficulty[0] <= d.task_difficulty[1],
             f"data.task_difficulty={d.task_difficulty}: must be [low, high] with 1 <= low <= high <= 5")
    _require(d.num_tasks is None or d.num_tasks >= 1, f"data.num_tasks={d.num_tasks}: must be >= 1 (or null: rl.steps x rl.prompts_per_step)")
    for name in ("steps", "warmup_steps", "value_pretrain_steps", "eval_prompts", "eval_samples", "eval_interval", "log_samples_interval", "log_samples"):
        _require(getattr(r, name) >= 0, f"rl.{name}={getattr(r, name)}: must be >= 0")
    for name in ("ppo_epochs", "mini_batches", "prompts_per_step"):
        _positive(f"rl.{name}", getattr(r, name))
    rows = r.prompts_per_step * cfg.rollout.samples_per_prompt
    _require(rows % r.mini_batches == 0, f"rl.prompts_per_step x rollout.samples_per_prompt = {rows} rows per PPO step is not divisible by "
             f"rl.mini_batches={r.mini_batches}; fix: make the rows a multiple of the mini-batches")
    _require(t.save_interval >= 0, f"train.save_interval={t.save_interval}: must be >= 0 (0 = only at the end)")
    ro = cfg.rollout
    _require(ro.temperature >= 0, f"rollout.temperature={ro.temperature}: must be >= 0 (0 = greedy)")
    _require(0 < ro.top_p <= 1, f"rollout.top_p={ro.top_p}: must be in (0, 1]")
    _require(ro.top_k >= 0, f"rollout.top_k={ro.top_k}: must be >= 0 (0 = off)")
    _positive("rollout.max_new_tokens", ro.max_new_tokens)
    _positive("rollout.samples_per_prompt", ro.samples_per_prompt)
    _one_of("rollout.engine", ro.engine, ("native", "external"))
    _require(isinstance(ro.compile, bool), f"rollout.compile={ro.compile!r}: must be true or false")
    _one_of("rollout.dtype", ro.dtype, ("auto", "fp32", "bf16"))
    _require(ro.engine == "native" or ro.dtype in ("auto", "fp32"),
             f"rollout.dtype={ro.dtype!r} with rollout.engine={ro.engine!r}: the dtype is the native engine's; an external server "
             "runs at the precision it was started with; fix: rollout.dtype=auto, or rollout.engine=native")
    if ro.engine == "external":
        _require(bool(ro.external_url), "rollout.engine=external needs rollout.external_url (the vLLM / SGLang server, e.g. http://host:8000); "
                 "fix: set it, or use rollout.engine=native")
        _require(bool(ro.external_weights_dir), "rollout.engine=external needs rollout.external_weights_dir: a directory the trainer writes "
                 "the policy's weights to after each update and the server reloads them from")
    validate_rewards(cfg.rewards)
    if cfg.data.weights is not None:
        _require(
            len(cfg.data.weights) == len(cfg.data.train_data),
            f"data.weights has {len(cfg.data.weights)} entries but data.train_data has {len(cfg.data.train_data)}",
        )
