"""The command lines of `k2 eval-toolcall`, `k2 eval-agent` and `k2 redteam` (arguments only:
the evaluation modules load in `run`, so `k2 --help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from k2_core.command import Command

from .common import add_endpoint_args, positive_int


def _toolcall_run(args: argparse.Namespace) -> int:
    from k2_core.errors import ConfigError

    from .common import check_endpoint, emit, log_report
    from .suite import HAND_SPECS, generate_suite, load_suite, specs_from_synth_tools, write_suite
    from .toolcall import ToolcallOptions, format_report, run_toolcall

    if args.write_suite:
        specs = specs_from_synth_tools(args.specs) if args.specs else HAND_SPECS
        cases = generate_suite(specs, seed=args.seed)
        write_suite(cases, args.write_suite)
        print(f"wrote {len(cases)} cases over {len(specs)} tools to {args.write_suite}")
        return 0
    if not args.base_url or not args.model:
        raise ConfigError("--base-url and --model are required (or --write-suite FILE)")
    if args.min_valid is not None and not 0 <= args.min_valid <= 1:
        raise ConfigError(f"--min-valid: must be within [0, 1] (got {args.min_valid})")
    cases = load_suite(args.suite)
    check_endpoint(args.base_url, args.model, args.api_key_env)
    opts = ToolcallOptions(
        stream=args.stream,
        concurrency=args.concurrency,
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        limit=args.limit,
    )
    rep = run_toolcall(cases, args.base_url, args.model, opts, args.api_key_env)
    rep["suite"] = args.suite
    if not args.no_track:
        metrics = {
            "valid_rate": rep["valid_rate"],
            "requests_per_s": rep["requests_per_s"],
            **{f"rate/{k}": v for k, v in rep["rates"].items()},
            **{f"feature/{k}/valid_rate": v["valid_rate"] for k, v in rep["by_feature"].items()},
        }
        for k in ("called_when_required", "silent_when_forbidden"):
            if rep[k] is not None:
                metrics[k] = rep[k]
        rep["tracking"] = log_report(
            "eval-toolcall",
            rep,
            metrics,
            {
                "model": args.model,
                "base_url": args.base_url,
                "suite": args.suite,
                **opts.model_dump(),
            },
            args.tracking_uri,
        )
    emit(rep, format_report(rep), args)
    if args.min_valid is not None and rep["valid_rate"] < args.min_valid:
        print(
            f"k2 eval-toolcall: valid rate {rep['valid_rate']:.3f} is below --min-valid "
            f"{args.min_valid}"
        )
        return 1
    return 0


def eval_toolcall_command(*, options: Any) -> Command:
    """Tool-call conformance of an OpenAI-compatible endpoint: schema-valid calls, K2 envelope
    parsing, streamed == non-streamed (table, JSON, mlflow)."""

    def add(p: argparse.ArgumentParser) -> None:
        add_endpoint_args(p, required=False)
        p.add_argument(
            "--suite",
            default="builtin",
            help="JSONL suite of cases (default: the built-in one, 70 cases)",
        )
        p.add_argument(
            "--concurrency", type=positive_int, default=8, help="requests in flight (default 8)"
        )
        p.add_argument(
            "--stream",
            action="store_true",
            help="stream every case too; the reassembled stream must equal the non-streamed answer",
        )
        p.add_argument(
            "--min-valid",
            type=float,
            default=None,
            help="exit 1 when the valid rate is below this (0..1)",
        )
        p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
        p.add_argument("--seed", type=int, default=0, help="request seed (default 0)")
        p.add_argument(
            "--max-tokens",
            type=positive_int,
            default=256,
            help="completion limit per request (default 256)",
        )
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument("--limit", type=positive_int, default=None, help="the first N cases")
        p.add_argument(
            "--write-suite",
            default=None,
            metavar="FILE",
            help="generate a suite from tool specs into FILE and exit",
        )
        p.add_argument(
            "--specs",
            default=None,
            help="with --write-suite: k2 synth-tools agents.json or tools JSONL "
            "(default: the hand-written specs)",
        )

    return Command(eval_toolcall_command.__doc__ or "", add, _toolcall_run)


def _agent_run(args: argparse.Namespace) -> int:
    from .agent import AgentOptions, format_report, load_tasks, run_eval_agent
    from .common import check_endpoint, emit, generator_spec, log_report, options_or_exit

    tasks = load_tasks(args.tasks)
    opts = options_or_exit(
        AgentOptions,
        {
            "max_turns": args.max_turns,
            "max_tokens": args.max_tokens,
            "max_seconds": args.max_seconds,
            "max_tokens_per_turn": args.max_tokens_per_turn,
            "temperature": args.temperature,
            "seed": args.seed,
            "limit": args.limit,
            "judge_threshold": args.judge_threshold,
            "timeout_s": args.timeout,
        },
    )
    m = args.sim_max_tokens
    roles = {
        "user": generator_spec(args.user, args.base_url, args.model, "--user", m),
        "tool": generator_spec(args.tool_sim, args.base_url, args.model, "--tool-sim", m),
        "judge": generator_spec(args.judge, args.base_url, args.model, "--judge", m),
    }
    check_endpoint(args.base_url, args.model, args.api_key_env)
    rep = run_eval_agent(
        tasks,
        args.base_url,
        args.model,
        opts,
        roles,
        args.out,
        concurrency=args.concurrency,
        api_key_env=args.api_key_env,
    )
    rep["tasks"] = args.tasks or "builtin"
    if not args.no_track:
        keys = (
            "success_rate",
            "calls_per_episode",
            "invalid_call_rate",
            "turns_per_episode",
            "tokens_per_episode",
            "tokens_per_episode_max",
            "seconds_per_episode",
            "unjudged",
            "episodes",
            "tool_sim_errors",
        )
        metrics = {k: rep[k] for k in keys}
        if rep["success_rate_judged"] is not None:
            metrics["success_rate_judged"] = rep["success_rate_judged"]
        metrics.update({f"outcome/{k}": v for k, v in rep["outcomes"].items()})
        files = [str(p) for p in Path(rep["out"], "data").glob("*.jsonl")]
        rep["tracking"] = log_report(
            "eval-agent",
            rep,
            metrics,
            {
                "model": args.model,
                "base_url": args.base_url,
                "tasks": rep["tasks"],
                "out": rep["out"],
                **opts.model_dump(),
                "roles": rep["roles"],
            },
            args.tracking_uri,
            files,
        )
    emit(rep, format_report(rep), args)
    return 0 if rep["complete"] else 1


def eval_agent_command(*, options: Any) -> Command:
    """Multi-turn tool use in simulated environments: synth-tools tasks, simulated user and
    tools, rubric judge; success, calls, invalid calls, turns, tokens (resumable)."""

    def add(p: argparse.ArgumentParser) -> None:
        add_endpoint_args(p)
        p.add_argument(
            "--tasks",
            default=None,
            help="JSONL of tasks as k2 synth-tools writes them (OUT/tasks/data/*.jsonl); "
            "default: the 8 built-in tasks",
        )
        p.add_argument(
            "--limit", type=positive_int, default=None, help="a seed-stable sample of N tasks"
        )
        p.add_argument(
            "--max-turns",
            type=positive_int,
            default=8,
            help="answers of the model per episode (default 8)",
        )
        p.add_argument(
            "--max-tokens",
            type=positive_int,
            default=4096,
            help="completion tokens of the model per episode (default 4096)",
        )
        p.add_argument(
            "--max-seconds", type=float, default=300.0, help="seconds per episode (default 300)"
        )
        p.add_argument(
            "--max-tokens-per-turn",
            type=positive_int,
            default=512,
            help="completion limit per answer (default 512)",
        )
        p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
        p.add_argument("--seed", type=int, default=0, help="sample, persona and request seed")
        p.add_argument(
            "--user",
            default=None,
            metavar="GEN",
            help="simulated user: http(s)://HOST/v1[#MODEL] or k2:CHECKPOINT "
            "(default: the endpoint under test)",
        )
        p.add_argument(
            "--tool-sim",
            default=None,
            metavar="GEN",
            help="tool environment's world model (same forms; default: the endpoint)",
        )
        p.add_argument(
            "--judge",
            default=None,
            metavar="GEN",
            help="rubric judge (same forms; default: the endpoint, i.e. self-judged)",
        )
        p.add_argument(
            "--sim-max-tokens",
            type=positive_int,
            default=512,
            help="completion limit of the user, tool and judge calls (default 512)",
        )
        p.add_argument(
            "--judge-threshold",
            type=float,
            default=0.7,
            help="minimum judge score of a success (default 0.7)",
        )
        p.add_argument(
            "--concurrency", type=positive_int, default=4, help="episodes in flight (default 4)"
        )
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument(
            "--out",
            default=None,
            help="run folder (default runs/eval-agent/MODEL-HASH; rerun to resume)",
        )

    return Command(eval_agent_command.__doc__ or "", add, _agent_run)


def _split(text: str, known: dict[str, str], flag: str) -> list[str]:
    from k2_core.errors import ConfigError

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise ConfigError(f"{flag}: unknown {bad or text!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _redteam_run(args: argparse.Namespace) -> int:
    from .common import check_endpoint, emit, generator_spec, log_report, options_or_exit
    from .redteam import PLUGINS, STRATEGIES, RedteamOptions, format_report, run_redteam

    opts = options_or_exit(
        RedteamOptions,
        {
            "plugins": _split(args.plugins, PLUGINS, "--plugins"),
            "strategies": _split(args.strategies, STRATEGIES, "--strategies"),
            "attempts": args.attempts,
            "rounds": args.rounds,
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "timeout_s": args.timeout,
        },
    )
    m = args.sim_max_tokens
    roles = {
        "attacker": generator_spec(args.attacker, args.base_url, args.model, "--attacker", m),
        "judge": generator_spec(args.judge, args.base_url, args.model, "--judge", m),
    }
    check_endpoint(args.base_url, args.model, args.api_key_env)
    rep = run_redteam(
        args.base_url,
        args.model,
        opts,
        roles,
        args.out,
        concurrency=args.concurrency,
        api_key_env=args.api_key_env,
    )
    if not args.no_track and rep["complete"]:
        metrics: dict[str, float] = {
            "attempts": rep["attempts"],
            **{f"results/{k}": v for k, v in rep["results"].items()},
        }
        if rep["pass_rate"] is not None:
            metrics["pass_rate"] = rep["pass_rate"]
        for key, c in rep["pairs"].items():
            if c["pass_rate"] is not None:
                metrics[f"pass_rate/{key}"] = c["pass_rate"]
        files = [str(p) for p in Path(rep["transcripts"]).glob("*.jsonl")]
        rep["tracking"] = log_report(
            "redteam",
            rep,
            metrics,
            {
                "model": args.model,
                "base_url": args.base_url,
                "out": rep["out"],
                **opts.model_dump(),
                "roles": rep["roles"],
            },
            args.tracking_uri,
            files,
        )
    emit(rep, format_report(rep), args)
    return 0 if rep["complete"] else 1


def redteam_command(*, options: Any) -> Command:
    """Red-team an endpoint: harmful-content, privacy, security and criminal plugins x basic,
    prompt-injection, iterative-jailbreak and crescendo strategies; pass rate per pair."""

    def add(p: argparse.ArgumentParser) -> None:
        from .redteam import PLUGINS, STRATEGIES

        add_endpoint_args(p)
        p.add_argument(
            "--plugins",
            default=",".join(PLUGINS),
            help=f"comma-separated (default {','.join(PLUGINS)})",
        )
        p.add_argument(
            "--strategies",
            default=",".join(STRATEGIES),
            help=f"comma-separated (default {','.join(STRATEGIES)})",
        )
        p.add_argument(
            "--attempts",
            type=positive_int,
            default=4,
            help="seed prompts per plugin = attempts per pair (default 4)",
        )
        p.add_argument(
            "--attacker",
            default=None,
            metavar="GEN",
            help="attacker: http(s)://HOST/v1[#MODEL] or k2:CHECKPOINT "
            "(default: the endpoint under test)",
        )
        p.add_argument(
            "--judge",
            default=None,
            metavar="GEN",
            help="rubric judge (same forms; default: the endpoint, i.e. self-judged)",
        )
        p.add_argument(
            "--rounds",
            type=positive_int,
            default=3,
            help="iterative_jailbreak rewrites at most (default 3)",
        )
        p.add_argument("--turns", type=positive_int, default=3, help="crescendo turns (default 3)")
        p.add_argument(
            "--max-tokens",
            type=positive_int,
            default=256,
            help="target completion limit per answer (default 256)",
        )
        p.add_argument(
            "--sim-max-tokens",
            type=positive_int,
            default=512,
            help="completion limit of the attacker and judge calls (default 512)",
        )
        p.add_argument("--temperature", type=float, default=0.0, help="target temperature")
        p.add_argument("--seed", type=int, default=0, help="request seed (default 0)")
        p.add_argument(
            "--concurrency", type=positive_int, default=4, help="attempts in flight (default 4)"
        )
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument(
            "--out",
            default=None,
            help="run folder (default runs/redteam/MODEL-HASH; rerun to resume)",
        )

    return Command(redteam_command.__doc__ or "", add, _redteam_run)
