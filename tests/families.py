"""Tiny random models of every family posttrain claims, each a model folder with its family's real chat template.

`build_family(name, out)` writes a Hugging Face folder (safetensors, config, generation_config, tokenizer) that
`AutoModelForCausalLM` / `AutoTokenizer` load like the hub model: hidden 32, 2 layers, the vocabulary of the tiny
default's tokenizer (`posttrain.models.tiny.build_tokenizer`) plus the family's special tokens, and the family's
post-head transform, sliding window and BOS where it has them. Chat templates and special tokens are copied from
the families' released tokenizers (string content only; tool-calling branches left out). The fixture
`family_dir` (tests/conftest.py) builds each folder once per session.

Weights use initializer_range 0.5 so that logits are O(1): at the families' default 0.02 the logits are ~1e-2 and
a missing softcap or scale would hide under the 1e-5 tolerance the conformance tests use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import processors
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from posttrain.models.adapt import save_pretrained_atomic
from posttrain.models.tiny import FALLBACK_CORPUS, build_tokenizer

VOCAB = 300  # the tiny default's BPE at 300 entries: 256 bytes, 4 specials, 40 merges
DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=256, initializer_range=0.5, attention_dropout=0.0)
WINDOW = 4  # sliding window of Mistral / Gemma 2 / Gemma 3: shorter than the test rows

# ---------------------------------------------------------------------------------------------- templates
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same text, with the assistant's reply and its <|eot_id|> inside {% generation %} (transformers' assistant mask)
LLAMA3_TAGGED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN25_TAGGED = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- elif (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA2_TAGGED = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{{ '<start_of_turn>model\n' }}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_TAGGED = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_TAGGED = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'}}{% generation %}{{ message['content'] + '<|end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GRANITE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"Knowledge Cutoff Date: April 2024.\nYou are Granite, developed by IBM.\" %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\n' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
    "{%- endfor %}"
)
COHERE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% if system_message != false %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """One family's tiny model folder: its config, tokenizer special tokens and chat template.

    `eos` / `pad` / `bos` are what the released tokenizer declares (None: it has none); `end_of_turn` is the token
    that `load_tokenizer` must make the EOS (what ends an assistant reply); `generation_eos` the generation
    config's list of stop tokens where the family ships one. `attn`: an attention implementation the family loads
    with (Gemma 2 refuses SDPA). `transform`: what its head does after the matmul.
    """

    name: str
    config: Callable[..., object]
    template: str | None
    eos: str
    end_of_turn: str
    bos: str | None = None
    pad: str | None = None
    specials: tuple[str, ...] = ()
    generation_eos: tuple[str, ...] = ()
    attn: str = "sdpa"
    tagged_template: str | None = None
    transform: str = ""
    sliding_window: bool = False
    extra: dict = field(default_factory=dict)


def _llama(**kw):
    return LlamaConfig(**DIMS, tie_word_embeddings=False, **kw)


def _gpt2(**kw):
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.5, attn_pdrop=0.0,
                      embd_pdrop=0.0, resid_pdrop=0.0, **kw)


def _neox(**kw):
    return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, initializer_range=0.5, tie_word_embeddings=False, **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", _llama, LLAMA3, eos="<|eot_id|>", end_of_turn="<|eot_id|>", bos="<|begin_of_text|>",
           specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                     "<|eot_id|>", "<|finetune_right_pad_id|>"),
           generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), tagged_template=LLAMA3_TAGGED),
    Family("qwen2", lambda **kw: Qwen2Config(**DIMS, tie_word_embeddings=True, **kw), QWEN25, eos="<|im_end|>",
           end_of_turn="<|im_end|>", pad="<|endoftext|>", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           generation_eos=("<|im_end|>", "<|endoftext|>"), tagged_template=QWEN25_TAGGED),
    Family("qwen3", lambda **kw: Qwen3Config(**DIMS, tie_word_embeddings=True, **kw), QWEN3, eos="<|im_end|>",
           end_of_turn="<|im_end|>", pad="<|endoftext|>", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           generation_eos=("<|im_end|>", "<|endoftext|>"), extra={"added": ("<think>", "</think>")}),
    Family("mistral", lambda **kw: MistralConfig(**DIMS, sliding_window=WINDOW, **kw), MISTRAL, eos="</s>",
           end_of_turn="</s>", bos="<s>", specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
           tagged_template=MISTRAL_TAGGED, sliding_window=True),
    Family("gemma2", lambda **kw: Gemma2Config(**DIMS, sliding_window=WINDOW, final_logit_softcapping=2.0,
                                               query_pre_attn_scalar=8, **kw),
           GEMMA2, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>", pad="<pad>",
           specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
           generation_eos=("<eos>", "<end_of_turn>"), attn="eager", tagged_template=GEMMA2_TAGGED,
           transform="softcap", sliding_window=True),
    Family("gemma3", lambda **kw: Gemma3TextConfig(**DIMS, sliding_window=WINDOW, final_logit_softcapping=2.0,
                                                   query_pre_attn_scalar=8,
                                                   layer_types=["sliding_attention", "full_attention"], **kw),
           GEMMA3, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>", pad="<pad>",
           specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
           generation_eos=("<eos>", "<end_of_turn>"), transform="softcap", sliding_window=True),
    Family("phi3", lambda **kw: Phi3Config(**{**DIMS, "num_key_value_heads": 4}, resid_pdrop=0.0, embd_pdrop=0.0, **kw),
           PHI3, eos="<|endoftext|>", end_of_turn="<|end|>", bos="<s>", pad="<|endoftext|>",
           specials=("<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
           generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), tagged_template=PHI3_TAGGED),
    Family("granite", lambda **kw: GraniteConfig(**DIMS, logits_scaling=4.0, **kw), GRANITE, eos="<|end_of_text|>",
           end_of_turn="<|end_of_text|>", bos="<|end_of_text|>", pad="<|end_of_text|>",
           specials=("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"), transform="scale"),
    Family("cohere", lambda **kw: CohereConfig(**DIMS, logit_scale=0.25, **kw), COHERE, eos="<|END_OF_TURN_TOKEN|>",
           end_of_turn="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", pad="<PAD>",
           specials=("<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                     "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"), transform="scale"),
    Family("gpt2", _gpt2, None, eos="<|endoftext|>", end_of_turn="<|im_end|>", bos="<|endoftext|>",
           specials=("<|endoftext|>",)),
    Family("gpt_neox", _neox, None, eos="<|endoftext|>", end_of_turn="<|im_end|>", bos="<|endoftext|>",
           specials=("<|endoftext|>",)),
    Family("olmo2", lambda **kw: Olmo2Config(**DIMS, **kw), OLMO2, eos="<|endoftext|>", end_of_turn="<|endoftext|>",
           bos="<|endoftext|>", pad="<|pad|>", specials=("<|endoftext|>", "<|pad|>")),
]}
NAMES = list(FAMILIES)
# BOS written by the template and added by the tokenizer's post-processor, as the released tokenizers do
_BOS_ON_ENCODE = ("llama3", "mistral", "gemma2", "gemma3", "cohere")


def build_tokenizer_for(fam: Family):
    """The tiny default's tokenizer with the family's special tokens, BOS / EOS / pad and chat template."""
    tok = build_tokenizer(FALLBACK_CORPUS, VOCAB)
    tok.add_special_tokens({"additional_special_tokens": list(fam.specials)}, replace_extra_special_tokens=False)
    if fam.extra.get("added"):
        tok.add_tokens(list(fam.extra["added"]))
    tok.eos_token = fam.eos
    tok.bos_token = fam.bos
    tok.pad_token = fam.pad
    tok.chat_template = fam.template
    if fam.name in _BOS_ON_ENCODE:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, tok.bos_token_id)])
    return tok


def build_family(name: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write family `name`'s tiny random model and tokenizer to `out`; returns the folder."""
    fam = FAMILIES[name]
    tok = build_tokenizer_for(fam)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = fam.config(vocab_size=len(tok), **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=fam.attn)
    stops = [tok.convert_tokens_to_ids(t) for t in fam.generation_eos] or tok.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tok.pad_token_id)
    out = Path(out)
    save_pretrained_atomic(model, tok, out)
    return out
