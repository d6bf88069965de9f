"""Options of k2-rl's SFT and RL stages, the `chat` dataset and the `rubric_critic` reward.

Import-light on purpose (pydantic only): plugin registration reads these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ChatDataOptions(BaseModel):
    """The `chat` dataset: conversations packed into rows, loss on assistant tokens only."""

    model_config = _FROZEN

    uri: str | None = Field(
        None,
        description="fsspec URI or glob of JSON Lines / Parquet files of "
        "{'messages': [...], 'tools': [...]} (the synthesis pipelines' output works as is).",
    )
    builtin: Literal["math"] | None = Field(
        None, description="Also use a built-in set: 'math' = worked arithmetic solutions."
    )
    builtin_n: int = Field(
        2000, gt=0, description="Conversations of the built-in set (train split)."
    )
    difficulty: tuple[int, int] = Field((1, 2), description="Digits range of built-in problems.")
    kinds: tuple[str, ...] = Field(("addition",), description="Kinds of built-in math problems.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer folder URI (None: the init checkpoint's, filled in by the stage).",
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of file conversations held out as val."
    )
    shuffle: bool = Field(True, description="Visit packed rows in a seeded permutation per epoch.")
    pack: bool = Field(True, description="Pack several conversations per row (else one per row).")


class SftOptions(BaseModel):
    """The `sft` section (plugins.sft): where the weights start."""

    model_config = _FROZEN

    init: str = Field(
        ..., description="URI of the checkpoint to fine-tune (pre-train step_N or a saved model)."
    )


class TaskOptions(BaseModel):
    """One RL task: where its prompts come from and how its responses are scored."""

    model_config = _FROZEN

    name: str = Field(..., description="Task name (metrics are logged per task).")
    source: Literal["math", "code", "jsonl"] = Field(
        "math",
        description="math: built-in arithmetic; code: generated Python exercises; "
        "jsonl: records from `uri`.",
    )
    uri: str | None = Field(None, description="JSON Lines of task records (source jsonl).")
    reward: str = Field("math", description="`reward` slot implementation scoring this task.")
    reward_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of that reward."
    )
    weight: float = Field(1.0, gt=0, description="Share of prompts drawn from this task.")
    budget: int | None = Field(
        None, gt=0, description="Token budget of a response (None: rl.default_budget)."
    )
    difficulty: tuple[int, int] = Field((1, 2), description="Digits range (source math).")
    kinds: tuple[str, ...] = Field(("addition",), description="Problem kinds (source math).")


class CriticLoopOptions(BaseModel):
    """The rubric critic's closed loop inside `k2 rl`."""

    model_config = _FROZEN

    enabled: bool = Field(
        False, description="Check the critic on verifiable prompts and fine-tune it."
    )
    reward_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the `rubric_critic` reward used as the critic.",
    )
    lr: float = Field(1e-4, gt=0, description="Learning rate of the critic's SFT steps.")
    every: int = Field(1, gt=0, description="Iterations between critic checks.")


class OpenAIEngineOptions(BaseModel):
    """plugins.rl.openai: rollouts from a running OpenAI-compatible engine (engine=openai).

    Rollouts go through its /v1/completions with prompts as token ids and per-token raw
    log-probabilities (k2 serve; vLLM with --logprobs-mode raw_logprobs; SGLang). After each
    update the trainer writes the weights under `weights_dir` and asks the engine to load them
    (POST /update_weights_from_disk; vLLM: /collective_rpc reload_weights), then checks a few
    log-probabilities against its own.
    """

    model_config = _FROZEN

    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="The engine's OpenAI API "
        "base URL (ending in /v1; the weight route is at its root).",
    )
    model: str | None = Field(
        None,
        description="Model name to request (None: the first one "
        "the engine lists under /v1/models).",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the engine's API key "
        "(sent as a Bearer token; k2 serve needs it for weight updates); "
        "None: no key.",
    )
    concurrency: int = Field(16, gt=0, description="Requests in flight at most (one sample each).")
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds one request may take (and a "
        "weight load, and the drain before an update).",
    )
    retries: int = Field(
        2,
        ge=0,
        description="Retries of a sample whose request failed (connection "
        "error, timeout, 408/429/5xx); after them it is excluded from its group "
        "and counted (rollout/failed_samples).",
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry (doubles).")
    max_consecutive_failures: int = Field(
        32,
        gt=0,
        description="Samples failing in a row (each after its retries) that fail the "
        "run with one line: the engine is down rather than flaky.",
    )
    weight_update: Literal["k2", "k2-push", "sglang", "vllm"] = Field(
        "k2",
        description="How the engine gets a new policy version: k2 = `k2 serve` loads the "
        "k2 checkpoint written under weights_dir (it must lie under one of the server's "
        "--weights-root); k2-push = the bucketed, checksummed weight push "
        "(k2_core.weight_push) to `k2 serve --push-port` at push_address, authenticated by the "
        "API key, nothing written to disk; sglang = SGLang's /update_weights_from_disk on an HF "
        "export (untested here); vllm = vLLM's development route (server started with "
        "VLLM_SERVER_DEV_MODE=1): "
        "POST /collective_rpc reload_weights from an HF export with its tokenizer. On MoE "
        "models (K2's) vLLM 0.32's CPU reload serves wrong weights, so the check fails and "
        "`restart_command` is the fallback (docs/vllm.md).",
    )
    push_address: str | None = Field(
        None,
        description="weight_update=k2-push: HOST:PORT of the server's push listener "
        "(`k2 serve --push-port`).",
    )
    push_bucket_mb: float = Field(
        64.0, gt=0, description="weight_update=k2-push: MiB per checksummed bucket."
    )
    restart_command: str | None = Field(
        None,
        description="weight_update=vllm: shell command run when vLLM refuses a reload "
        "or fails the check after it, with {model_path} replaced by the new version's HF folder "
        "(quoted); it must leave the engine at base_url serving that folder. k2 then waits up "
        "to restart_timeout_s for /v1/models and checks again. None: the update fails with "
        "one line.",
    )
    restart_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Seconds restart_command and the restarted engine's start may take together.",
    )
    weights_dir: str | None = Field(
        None,
        description="Where each new version's weights are written, as a URI the engine can "
        "read (None: {run dir}/engine-weights).",
    )
    keep_weights: int = Field(
        2,
        ge=1,
        description="Versions kept under weights_dir (older ones "
        "are deleted after a successful update).",
    )
    check_prompts: int = Field(
        2, ge=1, description="Prompts of the log-probability check after each weight load."
    )
    check_tokens: int = Field(8, ge=1, description="Greedy tokens per check prompt.")
    logprob_tolerance: float = Field(
        1e-3,
        gt=0,
        description="Largest |engine - trainer| log-probability the check accepts "
        "(float32 on both sides agrees to ~1e-5; a bf16 GPU engine needs ~5e-2).",
    )


class RlOptions(BaseModel):
    """The `rl` section (plugins.rl): rollouts, the K1.5 objective, budgets, PTX, sync."""

    model_config = _FROZEN

    init: str = Field(..., description="URI of the policy checkpoint (an SFT run's step_N).")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder URI (None: the checkpoint's)."
    )
    tasks: tuple[TaskOptions, ...] = Field(
        (TaskOptions(name="math"),), description="Tasks and their rewards."
    )
    k: int = Field(8, ge=2, description="Samples per prompt (K).")
    prompts_per_iter: int = Field(8, gt=0, description="Groups in flight per iteration.")
    algorithm: str = Field("k15", description="`rl_algorithm` slot implementation (the objective).")
    algorithm_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of that algorithm (k15: tau)."
    )
    temperature_start: float = Field(
        1.0, gt=0, description="Sampling temperature at the first iteration."
    )
    temperature_end: float = Field(
        0.7, gt=0, description="Sampling temperature at the last iteration."
    )
    temperature_schedule: Literal["linear", "cosine", "exponential", "constant"] = Field(
        "cosine", description="Shape of the temperature decay."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    default_budget: int = Field(96, gt=0, description="Token budget of tasks without their own.")
    over_budget_penalty: float = Field(
        -0.5, description="Reward of a response truncated at its budget."
    )
    partial_rollout: bool = Field(
        True, description="Pause long responses at segment_tokens and resume."
    )
    segment_tokens: int = Field(
        48, gt=0, description="Tokens a response may grow by per iteration."
    )
    max_version_lag: int = Field(
        2, ge=0, description="Refuse rollouts sampled more than this many policy versions ago."
    )
    ptx_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the PTX loss on batches of the run's `data` section "
        "(e.g. the `chat` dataset of curated SFT data), mixed into each update.",
    )
    micro_batch_size: int = Field(16, gt=0, description="Responses per training forward.")
    max_batch_size: int = Field(64, gt=0, description="Engine batch size.")
    engine: Literal["colocated", "process", "openai"] = Field(
        "colocated",
        description="Where the rollout engine runs: colocated = in the trainer "
        "process (weights copied in memory); process = a spawned child process that gets the "
        "weights by a bucketed torch.distributed (gloo) broadcast after every update; openai = "
        "a running OpenAI-compatible server (k2 serve, vLLM, SGLang; see `openai`).",
    )
    rollout_engines: Literal["rank", "node"] = Field(
        "rank",
        description="Under a distributed backend (engine=colocated): rank = every data "
        "rank holds an engine and generates its share of each iteration's samples; node = one "
        "engine per node (local rank 0) generates the node's share, the other ranks hold none. "
        "Every engine gets each new version by the sharded weight push (k2_rl.weight_push).",
    )
    push_host: str = Field(
        "127.0.0.1",
        description="Under a distributed backend: the address each engine listens "
        "on for the weight push (on several nodes, the node's address on the cluster network; "
        "the push is not authenticated, so a trusted network only).",
    )
    openai: OpenAIEngineOptions = Field(
        default_factory=OpenAIEngineOptions,
        description="engine=openai: the server and its updates.",
    )
    engine_timeout_s: float = Field(
        600.0,
        gt=0,
        description="engine=process: seconds to wait for the engine process to "
        "start, answer a generate or load a weight push before the run fails (under a "
        "distributed backend: the weight push's timeout).",
    )
    sync_bucket_mb: float = Field(
        32.0,
        gt=0,
        description="engine=process, or under a distributed backend: MiB per "
        "bucket of a weight push.",
    )
    eval_prompts: int = Field(64, ge=0, description="Held-out prompts for greedy pass@1 (0: none).")
    critic: CriticLoopOptions = Field(
        default_factory=CriticLoopOptions, description="The rubric critic's closed loop."
    )
    seed_offset: int = Field(
        0,
        description="Added to train.seed for the prompt stream and the "
        "sampling seeds (e.g. to draw RL prompts the SFT data did not hold).",
    )
    allow_weak_isolation: bool = Field(
        False,
        description="Let a `code` reward run without namespaces (isolation 'rlimits', or "
        "'auto' on a machine without root and unshare); refused otherwise.",
    )


class K15Options(BaseModel):
    """The K1.5 objective (`rl_algorithm` k15)."""

    model_config = _FROZEN

    tau: float = Field(0.05, ge=0, description="Weight of log(pi/pi_old) inside the square.")


class RubricCriticOptions(BaseModel):
    """The `rubric_critic` reward: pairwise comparisons of the K responses against rubrics."""

    model_config = _FROZEN

    critic: str | None = Field(
        None,
        description="k2 checkpoint URI of the critic (None: the policy itself, set by `k2 rl`).",
    )
    generator: str | None = Field(
        None, description="A `generator` slot implementation to use as the critic instead."
    )
    generator_options: dict[str, Any] = Field(default_factory=dict, description="Its options.")
    core_rubrics: tuple[str, ...] = Field(
        (
            "The response answers the question that was asked.",
            "The final answer is correct and clearly stated.",
            "The reasoning is clear and free of errors.",
        ),
        description="Core rubrics applied to every task.",
    )
    prescriptive_rubrics: tuple[str, ...] = Field(
        ("Do not pad the answer with filler.",),
        description="Prescriptive rubrics (rules the response must follow).",
    )
    scoring: Literal["win_rate", "bradley_terry"] = Field(
        "bradley_terry", description="How pairwise wins become scores."
    )
    both_orders: bool = Field(True, description="Judge each pair in both orders (position bias).")
    max_tokens: int = Field(8, gt=0, description="Tokens the critic may write for a verdict.")
