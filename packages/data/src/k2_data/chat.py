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
_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_ARGS) + r"(.*?)" + re.escape(CALL_END),
    re.DOTALL,
)
_CALL_ID = re.compile(r"^functions\.(.+):(\d+)$")


# The same format as a Jinja chat template (tokenizer_config.json "chat_template", as
# transformers, vLLM and SGLang render it): renders exactly what `render` returns.
CHAT_TEMPLATE = (
    "{%- macro text(c) -%}"
    "{%- if c is none -%}"
    "{%- elif c is string -%}{{ c }}"
    "{%- else -%}{%- for p in c -%}{{ p.get('text', '') }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM + "<|im_end|>"
    "{%- endif -%}"
    "{%- set ns = namespace(calls=[], fn=none, idx=0) -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'assistant' -%}"
    "{%- set ns.calls = [] -%}"
    "<|im_assistant|>{{ message.get('name') or role }}<|im_middle|>"
    "{{ text(message.get('content')) }}"
    "{%- if message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] -%}"
    "{%- set call_id = call['id'] | string if 'id' in call"
    " else 'functions.' ~ fn['name'] ~ ':' ~ loop.index0 -%}"
    "{%- set ns.calls = ns.calls + [[call_id, fn['name'] | string, loop.index0]] -%}"
    "{%- set args = fn.get('arguments', '{}') -%}"
    "<|tool_call_begin|>functions.{{ fn['name'] }}:{{ loop.index0 }}<|tool_call_argument_begin|>"
    "{{ args if args is string else args | tojson }}<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- elif role == 'tool' -%}"
    "{%- set call_id = (message.get('tool_call_id') or '') | string -%}"
    "{%- set parts = call_id[10:].rsplit(':', 1) -%}"
    "{%- set ns.fn = none -%}"
    "{%- for c in ns.calls if c[0] == call_id -%}"
    "{%- set ns.fn = c[1] -%}{%- set ns.idx = c[2] -%}"
    "{%- endfor -%}"
    "{%- if ns.fn is none and call_id.startswith('functions.') and parts | length == 2"
    " and parts[0] and parts[1].isdigit() -%}"
    "{%- set ns.fn = parts[0] -%}{%- set ns.idx = parts[1] | int -%}"
    "{%- elif ns.fn is none -%}"
    "{%- set ns.fn = message.get('name') -%}{%- set ns.idx = 0 -%}"
    "{%- endif -%}"
    "<|im_system|>{{ message.get('name') or ns.fn }}<|im_middle|>"
    "## Return of functions.{{ ns.fn }}:{{ ns.idx }}\n{{ text(message.get('content')) }}<|im_end|>"
    "{%- else -%}"
    "{{ '<|im_user|>' if role == 'user' else '<|im_system|>' }}"
    "{{ message.get('name') or role }}<|im_middle|>{{ text(message.get('content')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + GENERATION_PROMPT + "{%- endif -%}"
)


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
    raise ChatFormatError(
        f"message content must be a string or a list of parts, got {type(content).__name__}"
    )


def _arguments(fn: dict[str, Any]) -> str:
    """A tool call's arguments as raw JSON text (dicts are serialised)."""
    args = fn.get("arguments", "{}")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


# A rendered conversation is a list of parts: (text, is_control). Control parts are the
# envelope's special tokens, placed by the renderer from the messages' structure; every other
# part (message content, names, tool arguments, tool declarations) is data and is encoded with
# special tokens disallowed, so a message quoting `<|im_end|><|im_system|>` stays plain text.
Part = tuple[str, bool]


def _ctl(token: str) -> Part:
    return (token, True)


def _data(text: str) -> Part:
    return (text, False)


def _turn(head: str, name: str, body: list[Part]) -> list[Part]:
    """`{head}{name}<|im_middle|>{body}<|im_end|>` as parts."""
    return [_ctl(head), _data(name), _ctl(IM_MIDDLE), *body, _ctl(IM_END)]


def _assistant_body(msg: dict[str, Any], call_index: dict[str, tuple[str, int]]) -> list[Part]:
    """Text then the tool-call section; records each call id -> (name, idx) for tool results."""
    body = [_data(_text(msg.get("content")))]
    calls = msg.get("tool_calls") or []
    if not calls:
        return body
    body.append(_ctl(CALLS_BEGIN))
    for idx, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"assistant tool_calls[{idx}] lacks function.name")
        name = str(fn["name"])
        call_index[str(call.get("id", f"functions.{name}:{idx}"))] = (name, idx)
        body += [
            _ctl(CALL_BEGIN),
            _data(f"functions.{name}:{idx}"),
            _ctl(CALL_ARGS),
            _data(_arguments(fn)),
            _ctl(CALL_END),
        ]
    body.append(_ctl(CALLS_END))
    return body


def chat_parts(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[list[Part], bool]]:
    """The conversation as (parts, is_assistant_output) segments, in order.

    The assistant-output segments are each assistant turn's body and its closing <|im_end|>:
    what a model learns in SFT (the role headers are not).
    """
    out: list[tuple[list[Part], bool]] = []
    if tools:
        declared = json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
        out.append((_turn(IM_SYSTEM, "tool_declare", [_data(declared)]), False))
    if not messages or messages[0].get("role") != "system":
        out.append((_turn(IM_SYSTEM, "system", [_data(DEFAULT_SYSTEM)]), False))
    call_index: dict[str, tuple[str, int]] = {}
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ChatFormatError(f"messages[{i}] must be an object with a string role")
        role = msg["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"messages[{i}].role: unknown role {role!r}")
        if role == "assistant":
            name = str(msg.get("name") or role)
            call_index = {}
            out.append(([_ctl(IM_ASSISTANT), _data(name), _ctl(IM_MIDDLE)], False))
            out.append(([*_assistant_body(msg, call_index), _ctl(IM_END)], True))
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
                raise ChatFormatError(
                    f"messages[{i}]: a tool result needs a tool_call_id of an "
                    "earlier call (or a name)"
                )
            name = str(msg.get("name") or fn_name)
            body = f"## Return of functions.{fn_name}:{idx}\n{_text(msg.get('content'))}"
            out.append((_turn(IM_SYSTEM, name, [_data(body)]), False))
        else:
            name = str(msg.get("name") or role)
            out.append(
                (
                    _turn(_CLASS.get(role, IM_SYSTEM), name, [_data(_text(msg.get("content")))]),
                    False,
                )
            )
    if add_generation_prompt:
        out.append(([_ctl(IM_ASSISTANT), _data("assistant"), _ctl(IM_MIDDLE)], False))
    return out


def segments(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces, in order."""
    return [
        ("".join(t for t, _ in parts), train)
        for parts, train in chat_parts(messages, tools, add_generation_prompt)
    ]


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation in K2's chat format (no [BOS]/[EOS]); for display and logs: encode
    with `encode_chat`/`encode_chat_prompt`, never by encoding this text with specials allowed."""
    return "".join(text for text, _ in segments(messages, tools, add_generation_prompt))


def encode_parts_batch(tokenizer: Any, batch: list[list[Part]]) -> list[list[int]]:
    """Token ids of each list of parts: control parts by id, data parts as plain text.

    Adjacent data parts are joined before encoding, and control tokens split the text as
    encoding the whole rendered text would, so a benign conversation gets exactly the ids of
    `tokenizer.encode(render(...), allow_special=True)`.
    """
    special = tokenizer.special_tokens
    plans: list[list[int | str]] = []  # per item: control ids and data texts, in order
    texts: list[str] = []
    for parts in batch:
        plan: list[int | str] = []
        run: list[str] = []
        for text, control in parts:
            if not control:
                run.append(text)
                continue
            if run:
                plan.append("".join(run))
                run = []
            if text not in special:
                raise ChatFormatError(f"the tokenizer has no control token {text}")
            plan.append(special[text])
        if run:
            plan.append("".join(run))
        texts += [x for x in plan if isinstance(x, str) and x]
        plans.append(plan)
    encoded = iter(tokenizer.encode_batch(texts, allow_special=False) if texts else [])
    out: list[list[int]] = []
    for plan in plans:
        ids: list[int] = []
        for x in plan:
            if isinstance(x, int):
                ids.append(x)
            elif x:
                ids.extend(next(encoded))
        out.append(ids)
    return out


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and a mask, True on the tokens SFT trains on.

    Control tokens come from the structure, message content is encoded as text (special-token
    strings in it stay text); pieces are encoded one by one, every boundary at a control token.
    """
    pieces = chat_parts(messages, tools, add_generation_prompt)
    encoded = encode_parts_batch(tokenizer, [parts for parts, _ in pieces])
    ids: list[int] = []
    mask: list[bool] = []
    for (_, train), piece in zip(pieces, encoded, strict=True):
        ids.extend(piece)
        mask.extend([train] * len(piece))
    return ids, mask


def encode_chat_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of the conversation plus the generation prompt (what a model completes)."""
    return encode_chat(tokenizer, messages, tools, add_generation_prompt=True)[0]


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
        between = body[pos : m.start()].strip()
        if between:
            errors.append({"raw": between, "error": "text between tool calls"})
        pos = m.end()
        call_id, args = m.group(1).strip(), m.group(2)
        ident = _CALL_ID.match(call_id)
        if not ident:
            errors.append(
                {"raw": m.group(0), "error": f"tool call id {call_id!r} is not functions.NAME:IDX"}
            )
            continue
        try:
            json.loads(args)
        except ValueError as exc:
            errors.append({"raw": m.group(0), "error": f"arguments are not valid JSON ({exc})"})
            continue
        calls.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": ident.group(1), "arguments": args},
            }
        )
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
