"""`attn_implementation` per family, the packed SDPA under its own name, `trust_remote_code`, bad model folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, ViTConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from posttrain.config import ConfigError
from posttrain.models import load_causal_lm, load_sequence_classifier, load_tokenizer, save_pretrained_atomic, token_logprobs
from posttrain.models.forward import PACKED_SDPA, attention_name, packing_layout

ROWS = [[5, 9, 13, 2, 44, 7], [11, 3, 8], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A tiny random Gemma 2: attention-logit softcap 50 (SDPA cannot apply it), final-logit softcap 30."""
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                          max_position_embeddings=128, sliding_window=16)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gemma2") / "gemma2"
    Gemma2ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(out)
    return out


def test_auto_picks_eager_for_gemma2_and_packed_sdpa_for_llama(gemma2_dir, tiny_dir):
    """transformers marks Gemma2 `_supports_sdpa = False` (its attention softcap): auto loads it on eager, where
    before posttrain forced SDPA and the load failed. Llama supports SDPA: auto gives posttrain's packed SDPA."""
    gemma = load_causal_lm(gemma2_dir, device="cpu")
    assert gemma.config._attn_implementation == "eager" and attention_name(gemma) == "eager"
    llama = load_causal_lm(tiny_dir, device="cpu")
    assert llama.config._attn_implementation == PACKED_SDPA and attention_name(llama) == "sdpa"
    assert load_sequence_classifier(gemma2_dir, num_labels=1, device="cpu").config._attn_implementation == "eager"
    assert load_causal_lm(tiny_dir, device="cpu", attn_implementation="eager").config._attn_implementation == "eager"


def test_packing_on_gemma2_eager_equals_padded_and_says_which_mask(gemma2_dir):
    """Eager takes the block-diagonal mask transformers builds from the position resets: the packed rows' log-probs
    equal the padded batch's (softcapped attention included), and `packing_layout` says so for the run's log."""
    model = load_causal_lm(gemma2_dir, dtype=torch.float64, device="cpu").eval()
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(ROWS):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    packed_ids = torch.tensor([ROWS[0] + ROWS[1], ROWS[2] + [0] * 4])  # (2, 9)
    positions = torch.tensor([list(range(6)) + list(range(3)), list(range(5)) + list(range(4))])
    with torch.no_grad():
        padded = token_logprobs(model, ids, mask)  # (3, 5)
        packed = token_logprobs(model, packed_ids, None, positions)  # (2, 8)
    for got, i in zip([packed[0, 0:5], packed[0, 6:8], packed[1, 0:4]], range(3)):
        torch.testing.assert_close(got, padded[i, : len(ROWS[i]) - 1], atol=1e-6, rtol=0)
    assert packing_layout(model).startswith("eager: the block-diagonal")


def test_refused_choices_name_the_key_and_the_folder(gemma2_dir, gpt2_dir, tiny_dir):
    """Gemma2 + sdpa (transformers' flag False), GPT-2 + flex_attention (no flex support), Llama + flex_attention on
    the CPU (no backward there), flash_attention_2 with no flash_attn package or GPU, and a value that is no
    implementation: each refused before any weight is read."""
    with pytest.raises(ConfigError, match=r"gemma2.*`attn_implementation: sdpa` is not supported by Gemma2ForCausalLM"):
        load_causal_lm(gemma2_dir, device="cpu", attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=r"gpt2.*`attn_implementation: flex_attention` is not supported by GPT2LMHeadModel"):
        load_causal_lm(gpt2_dir, device="cpu", attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match=r"tiny.*`attn_implementation: flex_attention` needs a GPU"):
        load_causal_lm(tiny_dir, device="cpu", attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match=r"`attn_implementation: flash_attention_2` needs a CUDA GPU and the flash_attn"):
        load_causal_lm(tiny_dir, device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match=r"`attn_implementation` must be one of auto, sdpa, eager.*got 'flash'"):
        load_causal_lm(tiny_dir, device="cpu", attn_implementation="flash")


def test_importing_posttrain_leaves_transformers_attention_registries_unchanged():
    """A fresh interpreter: transformers' attention and mask registries are the same before and after importing
    every posttrain module a command uses."""
    code = (
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M\n"
        "before = (dict(A._global_mapping), dict(M._global_mapping))\n"
        "import posttrain, posttrain.cli, posttrain.models, posttrain.recipes.sft, posttrain.recipes.dpo\n"
        "import posttrain.recipes.rm, posttrain.recipes.ppo, posttrain.recipes.online_dpo, posttrain.eval.run\n"
        "assert (dict(A._global_mapping), dict(M._global_mapping)) == before\n"
        "print('unchanged')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unchanged"


def test_loading_adds_only_its_own_name_and_saves_none(tiny_dir, tmp_path):
    """After a load, "sdpa" is still transformers' function and mask; final/config.json carries no attention
    setting, so plain transformers loads the saved folder on its own default, SDPA."""
    tok = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir, tokenizer=tok, device="cpu")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask and ALL_MASK_ATTENTION_FUNCTIONS[PACKED_SDPA] is sdpa_mask
    out = save_pretrained_atomic(model, tok, tmp_path / "final")
    assert PACKED_SDPA not in (out / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------- trust_remote_code


def custom_code_folder(folder, tok, make_llama):
    """A Llama saved as a custom-code model: config.json's `auto_map` points to two Python files in the folder."""
    llama = make_llama(len(tok))
    llama.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'posttrain_custom'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="posttrain_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return llama


def test_custom_code_needs_trust_remote_code_and_loads_with_it(tiny_dir, tmp_path, make_llama):
    """Off (the default): refused with the key's name. On: the folder's own class loads, on the packed SDPA (it
    inherits Llama's attention), with the logits of the weights it was saved from."""
    tok = load_tokenizer(tiny_dir)
    folder = tmp_path / "custom_model"
    llama = custom_code_folder(folder, tok, make_llama)
    with pytest.raises(ConfigError, match=r"custom_model.*custom Python code.*`trust_remote_code: true`"):
        load_causal_lm(folder, device="cpu")
    model = load_causal_lm(folder, tokenizer=tok, device="cpu", trust_remote_code=True)
    assert type(model).__name__ == "CustomForCausalLM" and model.config._attn_implementation == PACKED_SDPA
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match=r"custom_model.*AutoModelForSequenceClassification"):
        load_sequence_classifier(folder, num_labels=1, device="cpu", trust_remote_code=True)


# --------------------------------------------------------------------------- bad model folders


def test_folder_without_config_json_is_named(tmp_path, tiny_dir):
    folder = tmp_path / "tokenizer_only"
    load_tokenizer(tiny_dir).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"tokenizer_only`: the folder has no config.json.*tokenizer.json"):
        load_causal_lm(folder, device="cpu")
    with pytest.raises(ConfigError, match=r"tokenizer_only`: the folder has no config.json"):
        load_sequence_classifier(folder, num_labels=1, device="cpu")


def test_architecture_without_causal_lm_or_classifier_class_is_named(tmp_path):
    """ViT (an image model) has neither an AutoModelForCausalLM nor an AutoModelForSequenceClassification class."""
    folder = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"vit`: architecture `vit` \(ViTConfig\) has no causal-LM class"):
        load_causal_lm(folder, device="cpu")
    with pytest.raises(ConfigError, match=r"vit`: architecture `vit` \(ViTConfig\) has no sequence-classification"):
        load_sequence_classifier(folder, num_labels=2, device="cpu")


def test_unknown_model_type_is_named(tmp_path):
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    with pytest.raises(ConfigError, match=r"unknown`: config.json: .*no_such_family"):
        load_causal_lm(folder, device="cpu")


def test_chat_template_that_cannot_render_a_conversation_is_refused(plain_dir):
    """A template that raises on an assistant turn, and one that drops the assistant's text: each refused with
    the folder and what is wrong, before any row is tokenized."""
    raises = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no assistant turns') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"plain`: the chat template given by `data.chat_template` cannot render a "
                                          r"user/assistant conversation \(.*no assistant turns\)"):
        load_tokenizer(plain_dir, chat_template=raises)
    drops = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ConfigError, match=r"plain`: .* drops the assistant message text"):
        load_tokenizer(plain_dir, chat_template=drops)
