"""`posttrain generate` on a tiny model saved to disk: prompts from the command line and from files, and the chat loop."""

from __future__ import annotations

import io
import json

import pytest
from rollout_helpers import build_model

from posttrain.config import ConfigError, GenerateConfig, GenerateSamplingConfig, RolloutConfig
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.rollout import Sampler
from posttrain.rollout.generate import chat, main, read_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny_lm")
    build_model(len(tokenizer), eos_bias=2.0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_generate_prints_prompt_and_samples(model_dir, tmp_path, capsys):
    """Two command-line prompts + one jsonl row = 3 conversations, 2 samples each; a plain file gives one prompt per line."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "9+9=?"}) + "\n")
    (tmp_path / "p.txt").write_text("hello\n\n")
    cfg = GenerateConfig(model=str(model_dir), prompt=["1+2=?", "abc"], prompts=str(tmp_path / "p.jsonl"),
                         rollout=GenerateSamplingConfig(max_new_tokens=6, samples_per_prompt=2), dtype="float32")
    replies = main(cfg)
    assert len(replies) == 3 and all(len(r) == 2 for r in replies)
    out = capsys.readouterr().out
    assert out.count("### prompt") == 3 and "### response 2" in out and "9+9=?" in out
    assert read_prompts(GenerateConfig(prompts=str(tmp_path / "p.txt"))) == [[{"role": "user", "content": "hello"}]]


def test_generate_without_prompts_is_a_config_error():
    with pytest.raises(ConfigError, match="prompt"):
        read_prompts(GenerateConfig())


def test_chat_keeps_history_until_reset(model_dir):
    """'hi' -> 2 messages; '/reset' -> empty; 'yo' -> 2 messages; '/exit' stops before 'never'."""
    tok = load_tokenizer(model_dir)
    sampler = Sampler(load_causal_lm(model_dir, dtype="float32", device="cpu", tokenizer=tok), tok,
                      RolloutConfig(max_new_tokens=4, temperature=0.0))
    out = io.StringIO()
    history = chat(sampler, tok, ["hi", "/reset", "yo", "/exit", "never"], out)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "yo"
    assert out.getvalue().count("assistant> ") == 2 and "(history cleared)" in out.getvalue()
