"""SFT: assistant-only labels, packing with per-sequence attention, the loss falls, resume."""

from __future__ import annotations

import json

import pytest
import torch
from k2_rl.chat_data import ChatDataset, encode_conversation, pack_rows, shift_labels
from k2_rl.options import ChatDataOptions
from rl_fixtures import save_tiny_checkpoint, tiny_configs, tiny_tokenizer

CONVS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Answer: 5"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 4 and 4."},
        {"role": "assistant", "content": "4 + 4 = 8.\nAnswer: 8"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "Answer: 2"},
    ],
    [{"role": "user", "content": "Compute 7 + 1."}, {"role": "assistant", "content": "Answer: 8"}],
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_only_assistant_tokens_have_labels(tmp_path, tok):
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS))
    ds = ChatDataset(
        ChatDataOptions(uri=str(f), val_fraction=0.0),
        split="train",
        batch_size=2,
        seq_len=256,
        tokenizer=tok,
    )
    assert ds.n_conversations == 3 and ds.n_rows == 1  # all three packed in one row
    rows = ds.rows
    learned = rows["labels"][0][rows["labels"][0] != -100].tolist()
    text = tok.decode(learned)
    assert text == (
        "Answer: 5<|im_end|>4 + 4 = 8.\nAnswer: 8<|im_end|>Answer: 2<|im_end|>Answer: 8<|im_end|>"
    )
    # no user/system text and no role header is ever a label
    assert "What is" not in text and "assistant" not in text
    seg, pos = rows["segment_ids"][0], rows["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts[:3] == [0, int((seg == 0).sum()), int((seg <= 1).sum())]
    assert seg.max().item() == 3  # the padding tail is its own segment


def test_packed_loss_equals_unpacked_loss(tok):
    from k2_core.model import K2ForCausalLM

    mcfg, ecfg = tiny_configs(tok.vocab_size)
    torch.manual_seed(0)
    model = K2ForCausalLM(mcfg, ecfg).eval()
    examples = [shift_labels(*encode_conversation(tok, c)) for c in CONVS]
    packed = {k: torch.from_numpy(v) for k, v in pack_rows(examples, 256, tok.pad_id).items()}
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(
            packed["input_ids"],
            position_ids=packed["position_ids"],
            segment_ids=packed["segment_ids"],
        ).logits
        ce = torch.nn.functional.cross_entropy(
            logits[0], packed["labels"][0], ignore_index=-100, reduction="sum"
        )
        single = 0.0
        for inp, lab in examples:
            lg = model(torch.tensor([inp])).logits[0]
            single += torch.nn.functional.cross_entropy(
                lg, torch.tensor(lab), ignore_index=-100, reduction="sum"
            )
    assert ce.item() == pytest.approx(float(single), rel=1e-4)
    # without the segment mask the later conversations see the earlier ones: different loss
    with torch.no_grad():
        leak = model(packed["input_ids"], position_ids=packed["position_ids"]).logits
        ce_leak = torch.nn.functional.cross_entropy(
            leak[0], packed["labels"][0], ignore_index=-100, reduction="sum"
        )
    assert abs(ce_leak.item() - float(single)) > 1e-3


def _sft_cfg(init, run_dir, steps):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path

    return load_config(
        config_path("sft-math"),
        [
            f"plugins.sft.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={steps}",
            "train.micro_batch_size=4",
            "train.log_every=1",
            "train.eval_every=0",
            "checkpoint.every=5",
            "data.seq_len=128",
            "data.options.builtin_n=200",
            "optim.lr=3e-3",
            "optim.schedule_options.warmup_steps=2",
            "tracking.tracker=null",
        ],
    )


@pytest.mark.slow
def test_sft_loss_falls_and_resumes(tmp_path):
    from k2_core.checkpoint import load_tensors
    from k2_rl.sft import run_sft

    init, tok = save_tiny_checkpoint(tmp_path / "init")
    out = run_sft(_sft_cfg(init, tmp_path / "sft", 10), progress=False)
    assert out["steps"] == 10
    assert out["last_loss"] < 0.75 * out["first_loss"]
    ckpt = tmp_path / "sft" / "checkpoints" / "step_00000010"
    assert (ckpt / "tokenizer" / "k2_tokenizer.json").exists()
    _, attrs = load_tensors(str(ckpt), [])
    assert attrs["run_config"]["data"]["options"]["tokenizer"] == f"{init}/tokenizer"
    assert attrs["run_config"]["model"]["hidden_size"] == 64  # the init checkpoint's model
    again = run_sft(_sft_cfg(init, tmp_path / "sft", 12), progress=False)
    # resumed from step 10 (its own weights, not the init checkpoint's): the loss starts low
    assert again["steps"] == 12 and again["first_loss"] < 0.75 * out["first_loss"]


def test_parquet_and_jsonl_read_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from k2_core.errors import ConfigError
    from k2_rl.chat_data import read_records

    recs = [{"messages": c} for c in CONVS]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got_pq = read_records(str(tmp_path / "a.parquet"))
    got_js = read_records(str(tmp_path / "b.jsonl"))
    assert [r["messages"][-1]["content"] for r in got_pq] == [c[-1]["content"] for c in CONVS]
    assert len(read_records(str(tmp_path / "*"))) == 6 and got_js == recs
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(ConfigError, match="no 'messages' list"):
        read_records(str(tmp_path / "bad.jsonl"))
