"""`k2 synth-tools`: spec validation, real tools, and the three stages against a real endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from k2_data.pipeline import read_outputs
from k2_data.synth_tools import SpecError, SynthToolsConfig, run_synth_tools, tool, validate_spec
from k2_data.synth_tools.specs import check_arguments
from synth_fake_llm import FakeEndpoint

K2 = str(Path(sys.executable).parent / "k2")


def convert_units(
    value: float, unit: Literal["km", "mi"], digits: Annotated[int, "decimal places"] = 2
) -> float:
    """Convert a distance between kilometres and miles.

    Longer explanation that is not part of the description.
    """
    return round(value * 0.621371 if unit == "km" else value / 0.621371, digits)


def test_validate_spec_accepts_wrapped_and_bare_and_names_the_fault():
    params = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    bare = validate_spec({"name": "search", "description": "Search.", "parameters": params})
    assert validate_spec(bare) == bare and bare["type"] == "function"
    cases = [
        ({"name": "bad name", "description": "d", "parameters": params}, "bad_name"),
        ({"name": "f", "description": " ", "parameters": params}, "no_description"),
        ({"name": "f", "description": "d", "parameters": {"type": "array"}}, "bad_schema"),
        (
            {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
            },
            "bad_schema",
        ),
        (
            {"name": "f", "description": "d", "parameters": {**params, "required": ["z"]}},
            "bad_schema",
        ),
    ]
    for spec, reason in cases:
        with pytest.raises(SpecError) as e:
            validate_spec(spec)
        assert e.value.reason == reason
    assert check_arguments(bare, {"q": "x"}) is None
    assert "required" in check_arguments(bare, {})


def test_tool_decorator_builds_spec_from_signature():
    tool(convert_units)
    from k2_data.synth_tools import real_tools

    spec = real_tools()["convert_units"].spec["function"]
    assert spec["description"] == "Convert a distance between kilometres and miles."
    p = spec["parameters"]
    assert p["required"] == ["value", "unit"]
    assert p["properties"] == {
        "value": {"type": "number"},
        "unit": {"enum": ["km", "mi"]},
        "digits": {"type": "integer", "description": "decimal places"},
    }


@pytest.fixture
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.stop()


def synth_cfg(tmp_path, ep, **kw):
    base = {
        "seed_domains": ["library"],
        "n_subdomains": 2,
        "tools_per_subdomain": 4,
        "tasks_per_agent": 2,
        "real_tools": ["test_synth_tools:convert_units"],
        "generator": {"options": {"base_url": ep.base_url, "model": "fake-llm"}},
        "pipeline": {
            "out": str(tmp_path / "out"),
            "shard_size": 2,
            "tracking": False,
            "progress": False,
        },
    }
    return SynthToolsConfig.model_validate({**base, **kw})


def test_end_to_end_specs_agents_tasks_trajectories(tmp_path, endpoint):
    cfg = synth_cfg(tmp_path, endpoint)
    s = run_synth_tools(cfg)
    assert s.complete, s.line()
    t = s.tools
    # per sub-domain: 2 valid, 1 duplicate name, 1 invalid name; plus the real tool
    assert t["n_tools"] == 5 and t["n_real"] == 1 and t["duplicates"] == 2
    assert t["invalid"] == {"bad_name": 2} and t["n_agents"] == 3
    assert s.stages["tasks"].records == 6
    # the "records" agent's second task is impossible: the judge fails it
    assert s.stages["trajectories"].rejected == {"judge_failed": 1}
    recs = read_outputs(str(tmp_path / "out" / "trajectories"))
    assert len(recs) == 5
    sim = next(r for r in recs if r["provenance"]["tool_env"] == "simulated")
    roles = [m["role"] for m in sim["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call = sim["messages"][2]["tool_calls"][0]
    assert call["id"].startswith("functions.") and json.loads(call["function"]["arguments"])
    tool_msg = sim["messages"][3]
    assert tool_msg["tool_call_id"] == call["id"]
    assert json.loads(tool_msg["content"])["call_no"] == 1  # the world model's state
    assert sim["tools"] and sim["judge"]["passed"] and sim["provenance"]["task"]["checkpoints"]
    real = next(r for r in recs if r["provenance"]["tool_env"] == "real")
    args = json.loads(real["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert args == {"value": 7, "unit": "km", "digits": 7}
    result = json.loads(real["messages"][3]["content"])
    assert result == {"result": convert_units(**args)}  # executed for real


def test_rerun_after_failures_completes_each_stage(tmp_path, endpoint):
    endpoint.llm.always_fail_marker = "simulate the backend"  # the tool simulator is down
    cfg = synth_cfg(
        tmp_path,
        endpoint,
        real_tools=[],
        generator={
            "options": {
                "base_url": endpoint.base_url,
                "model": "fake-llm",
                "max_retries": 1,
                "backoff": 0.0,
            }
        },
    )
    s = run_synth_tools(cfg)
    assert not s.complete and s.stages["trajectories"].failed == {"server_error": 4}
    endpoint.llm.always_fail_marker = None
    s2 = run_synth_tools(cfg)
    assert s2.complete and s2.stages["trajectories"].items_this_run == 4
    assert s2.stages["tools"].items_this_run == 0 and s2.stages["tasks"].items_this_run == 0
    ids = [r["id"] for r in read_outputs(str(tmp_path / "out" / "trajectories"))]
    assert len(ids) == len(set(ids)) == 3


@pytest.mark.slow  # two `k2` processes: ~10 s on an idle box, 40 s on a loaded one
def test_cli_runs_and_reports(tmp_path, endpoint):
    cfg = {
        "seed_domains": ["garden"],
        "n_subdomains": 1,
        "tasks_per_agent": 1,
        "generator": {"options": {"base_url": endpoint.base_url}},
        "pipeline": {"out": str(tmp_path / "out"), "tracking": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [K2, "synth-tools", str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "SFT dataset:" in r.stdout and "trajectories/data/*.jsonl" in r.stdout
    bad = subprocess.run(
        [K2, "synth-tools", str(tmp_path / "c.yaml"), "real_tools=[nope:x]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "real_tools: cannot import 'nope:x'" in bad.stderr
