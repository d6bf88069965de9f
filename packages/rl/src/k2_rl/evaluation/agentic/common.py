"""What the three agentic commands share: endpoint checks, generator specs from the command
line, and logging a report to mlflow."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from k2_core.errors import ConfigError

from .client import normalize_base_url


def check_endpoint(
    base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", flag: str = "--base-url"
) -> None:
    """ConfigError (one line, exit 2) when the endpoint is not an http(s) URL, cannot be
    reached, or does not list `model` in GET /models (when it lists any)."""
    import httpx

    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{flag}: must be an http(s) URL (got {base_url!r})")
    url = normalize_base_url(base_url) + "/models"
    key = os.environ.get(api_key_env) or None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise ConfigError(f"{flag}: cannot reach {url} ({type(e).__name__})") from None
    if r.status_code in (401, 403):
        raise ConfigError(
            f"{flag}: {url} refused the API key (HTTP {r.status_code}); set ${api_key_env}"
        )
    if r.status_code != 200:
        return  # some gateways do not serve /models: the requests themselves will tell
    try:
        ids = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError):
        return
    if ids and model not in ids:
        raise ConfigError(f"--model: {url} serves {ids}, not {model!r}")


def generator_spec(
    text: str | None, base_url: str, model: str, flag: str, max_tokens: int = 512
) -> Any:
    """A GeneratorSpec from a command-line value: None -> the endpoint under test itself;
    `http(s)://HOST[/v1][#MODEL]` -> the openai generator there; `k2:PATH` -> a k2
    checkpoint in this process."""
    from k2_data.pipeline import GeneratorSpec

    common = {
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "allow_truncated": True,
        "max_retries": 2,
        "backoff": 0.2,
    }
    if text is None:
        return GeneratorSpec(
            name="openai",
            options={"base_url": normalize_base_url(base_url), "model": model, **common},
        )
    if text.startswith(("http://", "https://")):
        url, _, name = text.partition("#")
        opts: dict[str, Any] = {"base_url": normalize_base_url(url), **common}
        if name:
            opts["model"] = name
        return GeneratorSpec(name="openai", options=opts)
    if text.startswith("k2:") and len(text) > 3:
        return GeneratorSpec(
            name="k2",
            options={"checkpoint": text[3:], "temperature": 0.0, "max_tokens": max_tokens},
        )
    raise ConfigError(f"{flag}: give http(s)://HOST/v1[#MODEL] or k2:CHECKPOINT (got {text!r})")


def options_or_exit(model: type, values: dict[str, Any]) -> Any:
    """`model(**values)`, or ConfigError naming the flag of the first bad value."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        raise ConfigError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {v})")
    return v


def add_endpoint_args(p: Any, required: bool = True) -> None:
    """--base-url, --model, --api-key-env, and the output/tracking flags."""
    p.add_argument(
        "--base-url",
        required=required,
        help="OpenAI-compatible endpoint (k2 serve, vLLM, SGLang): http://HOST:PORT/v1",
    )
    p.add_argument("--model", required=required, help="model name the endpoint serves")
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the endpoint's key (default OPENAI_API_KEY)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", default=None, help="also write the JSON report to this file")
    p.add_argument("--no-track", action="store_true", help="do not log to mlflow")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="mlflow store (default $MLFLOW_TRACKING_URI, else runs/<command>/mlflow.db)",
    )


def log_report(
    command: str,
    report: dict[str, Any],
    metrics: dict[str, float],
    params: dict[str, Any],
    tracking_uri: str | None,
    files: list[str] = (),
) -> dict[str, Any] | None:
    """One mlflow run of experiment `k2-<command>`: params, metrics, the report as
    `report.json` and `files` as artifacts; where it went, or None (with a warning) when the
    store fails: the evaluation's result is printed either way."""
    import logging

    try:
        from k2_core.tracking import flatten
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        root = Path("runs") / command
        uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or "sqlite:///" + str(root.resolve() / "mlflow.db")
        )
        if uri.startswith("sqlite:///"):  # artifacts beside the database
            root = Path(uri[len("sqlite:///") :]).parent
            root.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        name = f"k2-{command}"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            loc = (root.resolve() / "artifacts").as_uri() if uri.startswith("sqlite:") else None
            exp_id = client.create_experiment(name, artifact_location=loc)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=f"{command}-{params.get('model', '')}")
        rid = run.info.run_id
        client.log_batch(
            rid,
            params=[Param(k, v[:6000]) for k, v in sorted(flatten(params).items())][:100],
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
        )
        client.log_dict(rid, report, "report.json")
        for f in files:
            client.log_artifact(rid, f)
        client.set_terminated(rid, "FINISHED")
        return {"tracking_uri": uri, "run_id": rid}
    except Exception as e:  # tracking must not cost the user the evaluation
        print(
            f"k2 {command}: warning: not logged to mlflow ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return None


def emit(report: dict[str, Any], text: str, args: Any) -> None:
    """Print the table (or JSON) and write --report."""
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str) if args.json else text)


class RoleGenerators:
    """The generators playing the roles of an evaluation (user, tool simulator, judge,
    attacker) in one process: one per distinct spec, shared by the roles that name it."""

    def __init__(self, roles: dict[str, Any]):
        from k2_data.pipeline import build_generator

        made: dict[str, Any] = {}
        self.gens: dict[str, Any] = {}
        for role, spec in roles.items():
            key = spec.model_dump_json()
            if key not in made:
                made[key] = build_generator(spec, f"--{role}")
            self.gens[role] = made[key]
        self._all = list(made.values())

    def stats(self) -> dict[str, int]:
        """Usage of the generators."""
        out: Counter[str] = Counter()
        for g in self._all:
            out.update({k: int(v) for k, v in dict(getattr(g, "usage", {})).items()})
        return dict(out)

    async def aclose(self) -> None:
        """Close the generators."""
        for g in self._all:
            await g.aclose()
