"""K2's chat/tool-call format: exact rendering, parsing back, SFT masks."""

from __future__ import annotations

import json

import pytest
from k2_data.chat import ChatFormatError, encode_chat, parse_assistant, render
from k2_data.tokenizer import BpeTokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CONVO = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "24C"},
    {"role": "assistant", "content": "Paris 18C, Rome 24C."},
]


def test_render_exact():
    got = render(CONVO, TOOLS, add_generation_prompt=False)
    tools = json.dumps(TOOLS, separators=(",", ":"))
    want = (
        f"<|im_system|>tool_declare<|im_middle|>{tools}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
        "<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris and Rome?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Let me check.<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city":"Paris"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
        '{"city":"Rome"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n18C<|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n24C<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Paris 18C, Rome 24C.<|im_end|>"
    )
    assert got == want


def test_system_name_and_generation_prompt():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]}]
    assert render(msgs, add_generation_prompt=True) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>ann<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_parse_round_trip():
    text = render(CONVO[:2])
    body = text.split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    msg = parse_assistant(body)
    assert msg["content"] == "Let me check."
    assert [c["function"] for c in msg["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"name": "get_weather", "arguments": '{"city":"Rome"}'}]
    assert [c["id"] for c in msg["tool_calls"]] == ["functions.get_weather:0",
                                                    "functions.get_weather:1"]
    assert "tool_call_errors" not in msg
    # the parsed message (K2 ids) renders to the same body again
    again = render([CONVO[0], msg])
    assert again == text
    assert parse_assistant("just text") == {"role": "assistant", "content": "just text"}


def test_parse_reports_malformed_calls():
    bad = ("ok<|tool_calls_section_begin|>"
           "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": 1<|tool_call_end|>"
           "<|tool_call_begin|>nonsense<|tool_call_argument_begin|>{}<|tool_call_end|>"
           "<|tool_call_begin|>functions.g:2<|tool_call_argument_begin|>{}<|tool_call_end|>"
           "<|tool_call_begin|>functions.h:3<|tool_call_argument_begin|>{\"x\"")
    msg = parse_assistant(bad)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["g"]
    errors = [e["error"] for e in msg["tool_call_errors"]]
    assert len(errors) == 3
    assert "JSON" in errors[0] and "functions.NAME:IDX" in errors[1] and "truncated" in errors[2]
    assert msg["content"] == "ok"


def test_render_rejects_bad_messages():
    with pytest.raises(ChatFormatError, match="role"):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="tool result"):
        render([{"role": "tool", "tool_call_id": "zzz", "content": "x"}])


def test_encode_chat_mask():
    tok = BpeTokenizer.train([render(CONVO, TOOLS)] * 3 + ["Weather in Paris and Rome"] * 5,
                             vocab_size=320, min_frequency=1)
    ids, mask = encode_chat(tok, CONVO, TOOLS)
    assert ids == tok.encode(render(CONVO, TOOLS), allow_special=True)
    assert len(mask) == len(ids)
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    body1 = render(CONVO[:2]).split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    assert learned == body1 + "Paris 18C, Rome 24C.<|im_end|>"
    im_end = tok.special_tokens["<|im_end|>"]
    assert sum(m for i, m in zip(ids, mask, strict=True) if i == im_end) == 2
