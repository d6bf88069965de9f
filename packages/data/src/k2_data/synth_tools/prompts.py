"""The prompts of agentic tool-use synthesis; every JSON reply is parsed by `extract_json`."""

from __future__ import annotations

import json
from typing import Any

DESIGNER = "You design tool ecosystems for AI agents. Answer with one JSON object and nothing else."
TASK_WRITER = (
    "You write tasks for evaluating tool-using AI agents. Answer with one JSON object "
    "and nothing else."
)
USER_SIM = (
    "You are role-playing a user talking to an AI assistant. Persona: {persona}\n"
    "Your goal: {task}\nWrite only your next message to the assistant, in character. "
    "When your goal has been fully handled, reply with exactly [DONE]."
)
TOOL_SIM = (
    "You simulate the backend of a software tool. Stay consistent with the state: "
    "results must follow from it, and the new state must record every change. Answer "
    'with one JSON object: {"result": <what the tool returns>, "state": <the full new '
    "state>}."
)
JUDGE = (
    "You grade an assistant's conversation against a rubric. Answer with one JSON object: "
    '{"score": <0..1>, "passed": true|false, "reasons": "<short>"}.'
)
DONE = "[DONE]"

PERSONAS = (
    "a busy small-business owner who writes short, direct messages",
    "a careful retiree who asks for confirmation before anything changes",
    "a student who is new to the topic and explains the need loosely",
    "an operations manager who gives exact identifiers and expects precision",
    "a non-native English speaker who writes simple sentences",
)


def subdomain_messages(domain: str, n: int) -> list[dict[str, str]]:
    """Ask for `n` sub-domains of a seed domain."""
    user = (
        f"Domain: {domain}\nList {n} distinct, concrete sub-domains of this domain in which "
        'software tools are used. Reply with JSON: {"subdomains": ["...", ...]}'
    )
    return [{"role": "system", "content": DESIGNER}, {"role": "user", "content": user}]


def tools_messages(domain: str, sub: str, n: int) -> list[dict[str, str]]:
    """Ask for `n` tool specs of one sub-domain."""
    user = (
        f"Domain: {domain}\nSub-domain: {sub}\nPropose {n} realistic tools (API functions) "
        "an agent could call in this sub-domain. Each has a snake_case name, a description "
        "and JSON Schema parameters of type object. Reply with JSON: "
        '{"tools": [{"name": "...", "description": "...", "parameters": {"type": "object", '
        '"properties": {...}, "required": [...]}}]}'
    )
    return [{"role": "system", "content": DESIGNER}, {"role": "user", "content": user}]


def tasks_messages(agent: dict[str, Any], n: int) -> list[dict[str, str]]:
    """Ask for `n` tasks with rubrics for an agent and its tools."""
    tools = json.dumps([t["function"] for t in agent["tools"]], ensure_ascii=False)
    user = (
        f"Agent: {agent['system_prompt']}\nAgent tools: {tools}\nWrite {n} realistic user "
        "tasks this agent can complete with these tools, each with a rubric. Reply with "
        'JSON: {"tasks": [{"description": "...", "success_criteria": ["..."], '
        '"expected_tools": ["tool names in the order they should be used"], '
        '"checkpoints": ["..."]}]}'
    )
    return [{"role": "system", "content": TASK_WRITER}, {"role": "user", "content": user}]


def user_sim_messages(persona: str, task: str, convo: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The user simulator's view: roles swapped, tool traffic hidden."""
    msgs = [{"role": "system", "content": USER_SIM.format(persona=persona, task=task)}]
    for m in convo:
        if m["role"] == "user":
            msgs.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("content") and not m.get("tool_calls"):
            msgs.append({"role": "user", "content": m["content"]})
    if len(msgs) == 1:
        msgs.append({"role": "user", "content": "Start the conversation."})
    return msgs


def tool_sim_messages(
    spec: dict[str, Any], arguments: Any, state: dict[str, Any]
) -> list[dict[str, str]]:
    """The world model's view of one call: the tool, the current state, the arguments."""
    user = (
        f"<tool>\n{json.dumps(spec['function'], ensure_ascii=False)}\n</tool>\n"
        f"<state>\n{json.dumps(state, ensure_ascii=False)}\n</state>\n"
        f"<call>\n{json.dumps(arguments, ensure_ascii=False)}\n</call>"
    )
    return [{"role": "system", "content": TOOL_SIM}, {"role": "user", "content": user}]


def render_transcript(messages: list[dict[str, Any]]) -> str:
    """A plain-text transcript for the judge."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "tool":
            lines.append(f"TOOL {m.get('name', '')} -> {m['content']}")
        elif m.get("tool_calls"):
            for c in m["tool_calls"]:
                lines.append(
                    f"ASSISTANT calls {c['function']['name']}({c['function']['arguments']})"
                )
            if m.get("content"):
                lines.append(f"ASSISTANT: {m['content']}")
        else:
            lines.append(f"{m['role'].upper()}: {m.get('content') or ''}")
    return "\n".join(lines)


def judge_messages(task: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Ask the judge to score a trajectory against its task's rubric."""
    rubric = {
        k: task[k] for k in ("description", "success_criteria", "expected_tools", "checkpoints")
    }
    user = (
        f"<rubric>\n{json.dumps(rubric, ensure_ascii=False)}\n</rubric>\n"
        f"<transcript>\n{render_transcript(messages)}\n</transcript>\n"
        'Reply with JSON: {"score": ..., "passed": ..., "reasons": ...}'
    )
    return [{"role": "system", "content": JUDGE}, {"role": "user", "content": user}]
