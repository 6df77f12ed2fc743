"""A trained reward model as the reward: ``reward.model: runs/rm/final``.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (what ``posttrain rm``
saves). A (prompt, completion) pair is rendered with the reward model's own chat template, the
completion as the last assistant turn ending with the end-of-turn token, and scored by the head on
that last real token (Ouyang et al. 2022; Huang et al. 2024, arXiv 2403.17031). Sequences are right
padded, so the last real token of row b sits at ``attention_mask[b].sum() - 1``.

``posttrain rm`` may store a normalisation in the saved config (``posttrain_reward_bias``,
``posttrain_reward_scale``, chosen so the training prompts' chosen responses score mean 0, std 1);
it is applied here: reward = (raw - bias) / scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.errors import RewardError
from posttrain.models import default_device, load_sequence_classifier, load_tokenizer, sequence_scores
from posttrain.models.load import load_model_config
from posttrain.rewards.base import Prompt, check_lengths, to_messages

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder carries its own tokenizer files."""
    return any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def render_pair(tokenizer: Any, prompt: Prompt, completion: str, max_length: int | None = None) -> list[int]:
    """Token ids of prompt + completion as an assistant turn that ends with the end-of-turn token.

    The prompt is rendered with the generation prompt to find where the assistant text starts; the
    full conversation is then cut right after the first end-of-turn (EOS) token of the assistant part,
    dropping what templates add after it (ChatML's trailing newline), so the scored last token is the
    end-of-turn token. If the template puts none there, one is appended. Longer than ``max_length``:
    the first ``max_length - 1`` tokens are kept and the end-of-turn token closes them, so the head
    always reads the same kind of position (the completion side is what gets truncated).
    """
    eos = tokenizer.eos_token_id
    messages = to_messages(prompt)
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    tail = ids[n_prefix:]
    ids = ids[: n_prefix + tail.index(eos) + 1] if eos in tail else ids + [eos]
    if max_length is not None and len(ids) > max_length:
        ids = ids[: max_length - 1] + [eos]
    return ids


def reward_folder(path: str | Path) -> Path:
    """The folder holding a full reward model: ``path`` itself, or the ``merged/`` model of a LoRA run."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    if (folder / "merged" / "config.json").is_file():
        return folder / "merged"
    if (folder / "adapter_config.json").is_file():
        raise RewardError(
            f"reward.model: {folder} holds a LoRA adapter only; train the reward model with "
            "save.merge_lora=true and give its folder (the merged model under merged/ is used)"
        )
    raise RewardError(f"reward.model: {folder} is not a model folder (no config.json)")


def trained_head_labels(folder: Path, trust_remote_code: bool = False) -> int:
    """The number of labels of a folder saved as a sequence classifier.

    A causal-LM folder would get a freshly initialised, random head: scores from it mean nothing,
    so that is an error rather than a warning.
    """
    config = load_model_config(folder, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RewardError(
            f"reward.model: {folder} has no trained scalar head (architectures: {', '.join(architectures) or 'none'}); "
            "train a reward model with `posttrain rm`, or a classifier with `posttrain sft task=classification`"
        )
    return int(config.num_labels)


def _label_index(config: Any, label: str | int | None, name: str) -> int:
    """Which logit is the reward: the only one (reward model), or ``label`` of a C-label classifier.

    A classifier as the reward stands in for the DPO paper's IMDb sentiment classifier, whose
    positive-class logit scores a continuation (Rafailov et al. 2023, section 6.1).
    """
    num_labels = int(getattr(config, "num_labels", 1))
    names = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if label is None or label == "":
        if num_labels == 1:
            return 0
        raise RewardError(f"{name} is a {num_labels}-label classifier; name the label to use as the reward, one of: {', '.join(names)}")
    if isinstance(label, int) or str(label).isdigit():
        index = int(label)
    elif str(label) in names:
        index = names[str(label)]
    else:
        raise RewardError(f"{name}: no label `{label}`; labels: {', '.join(names)}")
    if not 0 <= index < num_labels:
        raise RewardError(f"{name}: label index {index} out of range for {num_labels} labels")
    return index


class ModelReward:
    """Scores from a reward model's scalar head on the last real token.

    ``path_or_model``: a model folder (loaded with ``load_sequence_classifier(num_labels=1)`` on
    ``device`` in ``dtype``, with its own tokenizer unless ``tokenizer`` is given), or a loaded model,
    which is used as it is (its device, dtype and train/eval mode are the caller's) and then needs
    ``tokenizer``. ``batch_size`` sequences go through each forward pass; items are sorted by length
    first so little compute goes to padding, and scores return in the input order. A C-label
    classifier needs ``label`` (a name from ``config.id2label`` or an index): its logit is the reward.
    """

    def __init__(
        self,
        path_or_model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        dtype: str = "auto",
        max_length: int | None = None,
        label: str | int | None = None,
        attn_implementation: str = "auto",
        trust_remote_code: bool = False,
    ):
        if isinstance(path_or_model, torch.nn.Module):
            if tokenizer is None:
                raise RewardError("ModelReward given a loaded model needs its tokenizer as well")
            self.model = path_or_model
            self.name = f"model:{type(path_or_model).__name__}"
        else:
            folder = reward_folder(path_or_model)
            num_labels = trained_head_labels(folder, trust_remote_code)
            device = torch.device(device) if device is not None else default_device()
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(folder),
                                                                               trust_remote_code=trust_remote_code)
            self.model = load_sequence_classifier(
                str(folder), num_labels=num_labels, dtype=dtype, device=device, tokenizer=tokenizer,
                attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            )
            self.model.eval()
            self.name = f"model:{folder}"
        self.log_name = "model"
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise RewardError(f"{self.name}: the tokenizer needs a pad token different from EOS")
        if batch_size < 1:
            raise RewardError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        config = self.model.config
        self.label_index = _label_index(config, label, self.name)
        self.max_length = max_length if max_length is not None else getattr(config, "max_position_embeddings", None)
        self.bias = float(getattr(config, "posttrain_reward_bias", None) or 0.0)
        self.scale = float(getattr(config, "posttrain_reward_scale", None) or 1.0)
        if not self.scale > 0:
            raise RewardError(f"{self.name}: posttrain_reward_scale must be > 0, got {self.scale}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised scores of padded token ids already in the reward model's vocabulary.

        input_ids, attention_mask: (N, T), right or left padded, each row's last real token being its
        end-of-turn token. Runs in chunks of ``batch_size``; returns (N,) float32 on the CPU.
        """
        out = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[start : start + self.batch_size].to(self.device)  # (B, T)
            mask = attention_mask[start : start + self.batch_size].to(self.device)  # (B, T)
            used = mask.any(dim=0).nonzero()  # columns holding a real token in some row
            width = int(used.max().item()) + 1 if used.numel() else mask.shape[1]  # drop all-pad columns on the right
            raw = sequence_scores(self.model, ids[:, :width], mask[:, :width])  # (B,) or (B, C)
            if raw.dim() == 2:
                raw = raw[:, self.label_index]  # a C-label classifier: the chosen label's logit
            out.append(raw.float().cpu())
        raw = torch.cat(out) if out else torch.zeros(0)  # (N,)
        return (raw - self.bias) / self.scale

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **context: Any) -> torch.Tensor:
        """Scores of the rendered pairs; the optional context (columns, completion_ids, step) is not used: the model
        reads the conversation only."""
        n = check_lengths(prompts, completions)
        seqs = [render_pair(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        order = sorted(range(n), key=lambda i: len(seqs[i]), reverse=True)
        scores = torch.zeros(n, dtype=torch.float32)  # (N,)
        pad = self.tokenizer.pad_token_id
        for start in range(0, n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = len(seqs[chunk[0]])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T) right padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(chunk):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            scores[chunk] = self.score_ids(ids, mask)
        return scores
