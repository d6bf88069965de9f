"""`k2 import-hf` and `k2 export-hf` as a user runs them, transformers on both ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

K2 = str(Path(sys.executable).parent / "k2")


def test_import_then_export_round_trip(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=256,
    )
    hf = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = hf(ids).logits

    run = lambda *a: subprocess.run([K2, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    imp = run("import-hf", str(tmp_path / "src"), str(tmp_path / "k2ck"))
    assert imp.returncode == 0, imp.stderr
    assert "imported" in imp.stdout
    exp = run("export-hf", str(tmp_path / "k2ck"), str(tmp_path / "out"))
    assert exp.returncode == 0, exp.stderr
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = back(ids).logits
    assert (got - want).abs().max() < 1e-4

    missing = run("import-hf", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_export_of_a_training_checkpoint(tmp_path):
    """What `k2 pretrain` writes (runs/NAME/checkpoints/step_N) exports like a saved model:
    one loader for every command that takes a checkpoint."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.trainstate import list_checkpoints, save_train_state
    from small_model import small_model
    from transformers import DeepseekV3ForCausalLM

    cfg = load_config("tiny", [*small_model(experts=4), "tracking.tracker=null"])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    root = str(tmp_path / "run" / "checkpoints")
    save_train_state(
        root, 3, model=model, optimizer=opt, attrs={"run_config": cfg.model_dump(mode="json")}
    )
    ckpt = list_checkpoints(root)[-1][1]
    cache = tmp_path / "cache"  # the run's dataset is the built-in one: export never builds it
    exp = subprocess.run(
        [K2, "export-hf", ckpt, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "K2_CACHE_DIR": str(cache)},
    )
    assert exp.returncode == 0, exp.stderr
    assert "warning: no tokenizer" in exp.stderr and not (cache / "data").exists()
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    bad = subprocess.run(
        [K2, "export-hf", str(tmp_path / "run"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# -- the tokenizer and chat template beside the weights (issue 15) ------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter in einer Stadt (é, 你好)",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVOS = [
    ([{"role": "user", "content": "hi"}], None),
    (
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "quote <|im_end|> and {{ x }} as text"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "name": "bob", "content": "2+2?"},
        ],
        None,
    ),
    (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Paris "},
                    {"type": "text", "text": "and Rome?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "Rôme", "days": [1, 2]},
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "24C"},
            {"role": "tool", "name": "lookup", "content": "by name"},
            {"role": "assistant", "name": "kimi", "content": "Paris 18C, Rome 24C."},
        ],
        TOOLS,
    ),
    (
        [
            {"role": "user", "content": "call me"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "functions.search:0",
                        "type": "function",
                        "function": {"name": "search", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "functions.search:0", "content": ""},
        ],
        TOOLS,
    ),
]


def _tiny_checkpoint(path):
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.modelio import save_model

    cfg = load_config(
        "tiny",
        [
            "model.num_hidden_layers=1",
            "model.hidden_size=32",
            "model.num_attention_heads=2",
            "model.q_lora_rank=16",
            "model.kv_lora_rank=16",
            "model.vocab_size=1024",
            "moe.n_routed_experts=4",
            "moe.num_experts_per_tok=2",
            "tracking.tracker=null",
        ],
    )
    save_model(build_model(cfg), str(path))
    return str(path)


def _bpe():
    from k2_data.tokenizer import BpeTokenizer
    from k2data_testutil import make_texts

    return BpeTokenizer.train(make_texts(200, 5) + ["Paris Rome weather"] * 5, vocab_size=600)


def _modes(folder):
    return {
        str(p.relative_to(folder)): oct(os.stat(p).st_mode & 0o777)
        for p in [folder, *folder.rglob("*")]
    }


def test_export_writes_a_tokenizer_and_chat_template_transformers_loads(tmp_path, capsys):
    """The exported folder loads with AutoTokenizer as it is: same ids as k2's tokenizer, and
    apply_chat_template renders what k2's chat renderer renders; files 0644, folders 0755
    even under a umask of 077."""
    from k2_core.cli import main
    from k2_data.chat import encode_chat_prompt, render
    from transformers import AutoTokenizer, GenerationConfig

    ckpt = _tiny_checkpoint(tmp_path / "ck")
    tok = _bpe()
    tok.save(f"{ckpt}/tokenizer")  # beside the weights: the checkpoint's own tokenizer
    old = os.umask(0o077)
    try:
        assert main(["export-hf", ckpt, str(tmp_path / "out" / "model")]) == 0
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("private")  # the user's, 0600: untouched
        assert main(["export-hf", ckpt, str(tmp_path / "mine")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out" / "model"
    assert "tokenizer.json" in capsys.readouterr().out
    modes = _modes(tmp_path / "out")
    assert {m for p, m in modes.items() if (tmp_path / "out" / p).is_dir()} == {"0o755"}, modes
    assert {m for p, m in modes.items() if (tmp_path / "out" / p).is_file()} == {"0o644"}, modes
    assert _modes(tmp_path / "mine")["notes.txt"] == "0o600"
    assert _modes(tmp_path / "mine")["tokenizer_config.json"] == "0o644"
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "config.json",
        "model.safetensors.index.json",
    ):
        assert (out / f).is_file(), f

    hf = AutoTokenizer.from_pretrained(out)
    texts = ["Hello, wörld! 你好 1234 tabs\tand\nnewlines  ", "Paris Rome weather"]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False) == tok.encode(t)
        assert hf.decode(tok.encode(t)) == t
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    for name, i in tok.special_tokens.items():
        assert hf.convert_tokens_to_ids(name) == i
    for msgs, tools in CONVOS:
        for gp in (False, True):
            got = hf.apply_chat_template(
                msgs, tools=tools, tokenize=False, add_generation_prompt=gp
            )
            assert got == render(msgs, tools, add_generation_prompt=gp)
    msgs = CONVOS[0][0]
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert list(ids) == encode_chat_prompt(tok, msgs)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [tok.special_tokens["<|im_end|>"], tok.eos_id]


def test_chat_template_renders_like_k2_in_plain_jinja2():
    """The template in the sandboxed jinja2 environment transformers, vLLM and SGLang use
    (trim/lstrip blocks, json.dumps tojson), without transformers itself."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from k2_data.chat import CHAT_TEMPLATE, render

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = (
        lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
    )
    template = env.from_string(CHAT_TEMPLATE)
    for msgs, tools in [*CONVOS, ([], None), ([{"role": "system", "content": "s"}], TOOLS)]:
        for gp in (False, True):
            got = template.render(messages=msgs, tools=tools, add_generation_prompt=gp)
            assert got == render(msgs, tools, add_generation_prompt=gp)


def test_export_of_a_tiktoken_tokenizer_keeps_its_ids(tmp_path):
    """--tokenizer names the folder; a tiktoken file becomes a byte-level BPE tokenizer.json
    with the same ids as tiktoken's own encoding."""
    import base64

    from k2_core.cli import main
    from k2_data.tokenizer import TiktokenTokenizer
    from transformers import AutoTokenizer

    toks = [bytes([i]) for i in range(256)]
    for a in b"etaoinsrhl ":
        for b in b"etaoinsrhl ":
            toks.append(bytes([a, b]))
    toks += [b"the", b" the", b"ther", b"rain", "你好".encode()]
    data = b"".join(
        base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in enumerate(toks)
    )
    ckpt = _tiny_checkpoint(tmp_path / "ck")
    for pattern in ("kimi", "cl100k"):  # K2's own split regex (class intersections) and GPT-4's
        tok = TiktokenTokenizer(data, pattern=pattern)
        tok.save(str(tmp_path / pattern))
        out = tmp_path / f"out-{pattern}"
        assert main(["export-hf", ckpt, str(out), "--tokenizer", str(tmp_path / pattern)]) == 0
        hf = AutoTokenizer.from_pretrained(out)
        for t in [
            "the rain in the hills",
            "Hello, wörld! 你好 1234\n\n there other",
            " ther  e",
            "It's DON'T camelCase 中文abc",
        ]:
            assert hf.encode(t, add_special_tokens=False) == tok.encode(t), (pattern, t)
        assert hf.convert_tokens_to_ids("<|im_end|>") == tok.special_tokens["<|im_end|>"]


def test_export_without_a_tokenizer_warns_in_one_line(tmp_path):
    """A checkpoint with no tokenizer to find still exports (weights and config, one warning
    line); a --tokenizer that does not load is an error, one line, exit 2."""
    ckpt = _tiny_checkpoint(tmp_path / "ck")
    run = lambda *a: subprocess.run([K2, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    ok = run("export-hf", ckpt, str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stderr.strip().splitlines()) == 1 and "warning: no tokenizer" in ok.stderr
    assert (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    bad = run("export-hf", ckpt, str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "Traceback" not in bad.stderr
