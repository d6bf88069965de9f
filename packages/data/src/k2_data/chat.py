"""K2's chat and tool-call format: render OpenAI-style messages, parse generated assistant turns.

Every turn is `<|im_{class}|>{name}<|im_middle|>{body}<|im_end|>` (class user, assistant, or
system for everything else); tools are declared first as a `tool_declare` system turn, a
default system prompt is inserted when the conversation has none, and tool calls live inside
the assistant body as `functions.NAME:IDX` sections (K2_REFERENCE.md, "Chat and tool-call
format").
"""

from __future__ import annotations

import json
import re
from typing import Any

IM_END = "<|im_end|>"
IM_MIDDLE = "<|im_middle|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
CALLS_BEGIN = "<|tool_calls_section_begin|>"
CALLS_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
CALL_ARGS = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"

_CLASS = {"user": IM_USER, "assistant": IM_ASSISTANT}
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_ARGS) + r"(.*?)"
                   + re.escape(CALL_END), re.DOTALL)
_CALL_ID = re.compile(r"^functions\.(.+):(\d+)$")


class ChatFormatError(ValueError):
    """A message list that cannot be rendered (unknown role, malformed tool call...)."""


def _text(content: Any) -> str:
    """Message content as text: a string, None, or OpenAI content parts ({type: text, text})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatFormatError(f"only text content parts are supported, got {part!r:.60}")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ChatFormatError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _arguments(fn: dict[str, Any]) -> str:
    """A tool call's arguments as raw JSON text (dicts are serialised)."""
    args = fn.get("arguments", "{}")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _assistant_body(msg: dict[str, Any], call_index: dict[str, tuple[str, int]]) -> str:
    """Text then the tool-call section; records each call id -> (name, idx) for tool results."""
    body = _text(msg.get("content"))
    calls = msg.get("tool_calls") or []
    if not calls:
        return body
    pieces = [body, CALLS_BEGIN]
    for idx, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"assistant tool_calls[{idx}] lacks function.name")
        name = str(fn["name"])
        call_index[str(call.get("id", f"functions.{name}:{idx}"))] = (name, idx)
        pieces.append(f"{CALL_BEGIN}functions.{name}:{idx}{CALL_ARGS}{_arguments(fn)}{CALL_END}")
    pieces.append(CALLS_END)
    return "".join(pieces)


def segments(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces, in order.

    The assistant-output pieces are each assistant turn's body and its closing <|im_end|>:
    what a model learns in SFT (the role headers are not).
    """
    out: list[tuple[str, bool]] = []
    if tools:
        declared = json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
        out.append((f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{declared}{IM_END}", False))
    if not messages or messages[0].get("role") != "system":
        out.append((f"{IM_SYSTEM}system{IM_MIDDLE}{DEFAULT_SYSTEM}{IM_END}", False))
    call_index: dict[str, tuple[str, int]] = {}
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ChatFormatError(f"messages[{i}] must be an object with a string role")
        role = msg["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"messages[{i}].role: unknown role {role!r}")
        if role == "assistant":
            name = msg.get("name") or role
            call_index = {}
            out.append((f"{IM_ASSISTANT}{name}{IM_MIDDLE}", False))
            out.append((_assistant_body(msg, call_index) + IM_END, True))
        elif role == "tool":
            call_id = str(msg.get("tool_call_id") or "")
            fn_name, idx = call_index.get(call_id, (None, None))
            parsed = _CALL_ID.match(call_id)
            if fn_name is None and parsed:
                fn_name, idx = parsed.group(1), int(parsed.group(2))
            if fn_name is None:
                fn_name = msg.get("name")
                idx = 0
            if not fn_name:
                raise ChatFormatError(f"messages[{i}]: a tool result needs a tool_call_id of an "
                                      "earlier call (or a name)")
            name = msg.get("name") or fn_name
            body = f"## Return of functions.{fn_name}:{idx}\n{_text(msg.get('content'))}"
            out.append((f"{IM_SYSTEM}{name}{IM_MIDDLE}{body}{IM_END}", False))
        else:
            name = msg.get("name") or role
            out.append((f"{_CLASS.get(role, IM_SYSTEM)}{name}{IM_MIDDLE}{_text(msg.get('content'))}{IM_END}",
                        False))
    if add_generation_prompt:
        out.append((GENERATION_PROMPT, False))
    return out


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The conversation in K2's chat format (no [BOS]/[EOS])."""
    return "".join(text for text, _ in segments(messages, tools, add_generation_prompt))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of `render(messages, tools)` and a mask, True on the tokens SFT trains on.

    Pieces are encoded one by one; every boundary sits at a special token, so the ids equal
    encoding the whole rendered text.
    """
    ids: list[int] = []
    mask: list[bool] = []
    pieces = segments(messages, tools)
    encoded = tokenizer.encode_batch([t for t, _ in pieces], allow_special=True)
    for (_, train), piece in zip(pieces, encoded, strict=True):
        ids.extend(piece)
        mask.extend([train] * len(piece))
    return ids, mask


def parse_assistant(text: str) -> dict[str, Any]:
    """A generated assistant body -> an OpenAI-style assistant message.

    Tool calls become `tool_calls` ({id, type: function, function: {name, arguments}}) with the
    arguments checked as JSON; malformed or truncated calls are listed under
    `tool_call_errors` ({raw, error}) instead of raising.
    """
    if text.endswith(IM_END):
        text = text[: -len(IM_END)]
    content, sep, section = text.partition(CALLS_BEGIN)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if not sep:
        return msg
    calls: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    body, closed, _ = section.partition(CALLS_END)
    pos = 0
    for m in _CALL.finditer(body):
        between = body[pos:m.start()].strip()
        if between:
            errors.append({"raw": between, "error": "text between tool calls"})
        pos = m.end()
        call_id, args = m.group(1).strip(), m.group(2)
        ident = _CALL_ID.match(call_id)
        if not ident:
            errors.append({"raw": m.group(0), "error": f"tool call id {call_id!r} is not functions.NAME:IDX"})
            continue
        try:
            json.loads(args)
        except ValueError as exc:
            errors.append({"raw": m.group(0), "error": f"arguments are not valid JSON ({exc})"})
            continue
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": ident.group(1), "arguments": args}})
    rest = body[pos:].strip()
    if rest:
        errors.append({"raw": rest, "error": "unterminated tool call (truncated?)"})
    elif not closed:
        errors.append({"raw": section, "error": "tool-call section not closed (truncated?)"})
    if calls:
        msg["tool_calls"] = calls
        if not content:
            msg["content"] = None
    if errors:
        msg["tool_call_errors"] = errors
    return msg
