"""Normalise raw rows of many formats into a few example types.

Every conversation becomes a list of `{"role", "content"}` messages (roles `system`, `user`, `assistant`).
A string prompt is one user turn; a string completion / chosen / rejected is one assistant turn.

Formats (`data.format`, or detected per row with `auto`):
- `messages`: `{"messages": [{"role", "content"}, ...]}` (OpenAI chat; optional system turn).
- `prompt_completion`: `{"prompt", "completion"}`, each a string or a message list.
- `alpaca`: `{"instruction", "input"?, "output", "system"?}`.
- `sharegpt`: `{"conversations": [{"from": human|gpt|system, "value"}, ...]}`.
- `text`: `{"text"}` (plain language modelling).
- `classification`: `{"text", "label"}` with label names or integer ids.
- `preference`: `{"prompt"?, "chosen", "rejected", "margin"?}`; without `prompt`, chosen and rejected must be
  conversations and the prompt is their shared message prefix. K-way: `{"prompt", "ranking": [best, ..., worst]}`
  or `{"prompt", "responses": [...]}` (best first), or `responses` plus `ranking` as indices into it, best first.
- `prompt`: `{"prompt"}` (string or messages) or `{"messages"}` ending in a user turn; other columns go to meta.
- `unpaired`: `{"prompt", "completion", "label"}` (KTO; TRL's unpaired preference format): `label` true for a
  desirable completion, false for an undesirable one (JSON booleans; a csv cell `true` / `false`). A preference row
  read as this kind stays a pair; `posttrain kto` splits it into one true and one false completion.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.io import Row, load_rows
from posttrain.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text", "classification", "preference", "prompt",
           "unpaired")
KINDS = ("sft", "classification", "preference", "prompt", "unpaired")
# Which row formats can give which kind of example. SFT on preference rows trains on prompt + chosen (the
# SFT-on-preferred stage that DPO benefits from, Rafailov et al. 2023 Sec. 4); prompts come from any
# conversational row by dropping the final assistant reply.
KIND_FORMATS = {
    "sft": ("messages", "prompt_completion", "alpaca", "sharegpt", "text", "preference"),
    "classification": ("classification",),
    "preference": ("preference",),
    "prompt": ("prompt", "messages", "prompt_completion", "alpaca", "sharegpt", "preference"),
    "unpaired": ("unpaired", "preference"),
}


@dataclass
class ChatExample:
    messages: list[Message]


@dataclass
class TextExample:
    text: str


@dataclass
class ClassificationExample:
    text: str
    label: str | int


@dataclass
class PreferenceExample:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None


@dataclass
class RankingExample:
    prompt: list[Message]
    responses: list[list[Message]]  # best first


@dataclass
class UnpairedExample:
    prompt: list[Message]
    completion: list[Message]
    desirable: bool


@dataclass
class PromptExample:
    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


Example = (ChatExample | TextExample | ClassificationExample | PreferenceExample | RankingExample | PromptExample
           | UnpairedExample)


@dataclass
class DataStats:
    """What happened to the rows: read, skipped (by reason), and later truncated or dropped by tokenisation."""

    rows: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        out = {"rows": self.rows, "examples": self.examples, "skipped": sum(self.skipped.values()),
               "truncated": self.truncated, "dropped": self.dropped}
        out.update({f"skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return out

    def summary(self) -> str:
        text = f"{self.rows} rows read, {self.examples} examples"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{n} ({r})" for r, n in sorted(self.skipped.items()))
        if self.truncated or self.dropped:
            text += f", {self.truncated} truncated, {self.dropped} dropped (over max_length)"
        return text


class RowError(ValueError):
    """A bad row; `reason` is the skip-count bucket, `field` the offending column."""

    def __init__(self, message: str, field: str | None, reason: str):
        super().__init__(message)
        self.field, self.reason = field, reason


def _missing(name: str) -> RowError:
    return RowError("missing field", name, "missing field")


def _wrong_type(name: str, expected: str, value: Any) -> RowError:
    return RowError(f"expected {expected}, got {type(value).__name__}", name, "wrong type")


def _require(data: dict, name: str) -> Any:
    if name not in data or data[name] is None:
        raise _missing(name)
    return data[name]


def _string(data: dict, name: str, *, allow_empty: bool = True) -> str:
    value = _require(data, name)
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    if not allow_empty and not value.strip():
        raise RowError("empty text", name, "empty completion")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    """Validate an OpenAI-style message list; keep only role and content."""
    if not isinstance(value, list):
        raise _wrong_type(name, "a list of messages", value)
    if not value:
        raise RowError("empty message list", name, "empty completion")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(where, "a {role, content} object", m)
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise _missing(f"{where}.role")
        if role not in ROLES:
            raise RowError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{where}.role", "unknown role")
        if content is None:
            raise _missing(f"{where}.content")
        if not isinstance(content, str):
            raise _wrong_type(f"{where}.content", "a string", content)
        if role == "assistant" and not content.strip():
            raise RowError("empty assistant turn", f"{where}.content", "empty completion")
        out.append({"role": role, "content": content})
    return out


def _turns(data: dict, name: str, role: str, *, allow_empty: bool = False) -> list[Message]:
    """A string is one turn of `role`; a list is a message list."""
    value = _require(data, name)
    if isinstance(value, str):
        if role == "assistant" and not allow_empty and not value.strip():
            raise RowError("empty completion", name, "empty completion")
        return [{"role": role, "content": value}]
    return _messages(value, name)


def _require_assistant(messages: list[Message], name: str) -> list[Message]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn", name, "empty completion")
    return messages


def _sharegpt(data: dict) -> list[Message]:
    turns = _require(data, "conversations")
    if not isinstance(turns, list):
        raise _wrong_type("conversations", "a list", turns)
    converted = []
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise _wrong_type(where, "a {from, value} object", t)
        who = t.get("from")
        if who is None:
            raise _missing(f"{where}.from")
        if who not in SHAREGPT_ROLES:
            raise RowError(f"unknown role {who!r}; expected human, gpt or system", f"{where}.from", "unknown role")
        if "value" not in t or t["value"] is None:
            raise _missing(f"{where}.value")
        converted.append({"role": SHAREGPT_ROLES[who], "content": t["value"]})
    return _messages(converted, "conversations")


def _alpaca(data: dict) -> tuple[list[Message], list[Message]]:
    instruction = _string(data, "instruction", allow_empty=False)
    extra = data.get("input") or ""
    if not isinstance(extra, str):
        raise _wrong_type("input", "a string", extra)
    prompt = []
    if data.get("system"):
        prompt.append({"role": "system", "content": _string(data, "system")})
    prompt.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    output = _string(data, "output", allow_empty=False)
    return prompt, [{"role": "assistant", "content": output}]


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _margin(data: dict) -> float | None:
    value = data.get("margin")
    if value is None or value == "":
        return None
    if isinstance(value, str):  # csv cells are strings
        try:
            value = float(value)
        except ValueError:
            raise _wrong_type("margin", "a number", value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type("margin", "a number", value)
    if not math.isfinite(value):
        raise RowError("margin must be finite", "margin", "bad value")
    return float(value)


def _strip_prompt(prompt: list[Message], completion: list[Message], name: str) -> list[Message]:
    """Completions that repeat the explicit prompt conversation (HH-style full dialogues) keep only the rest."""
    if len(completion) > len(prompt) and completion[: len(prompt)] == prompt:
        completion = completion[len(prompt):]
    return _require_assistant(completion, name)


def _preference(data: dict) -> PreferenceExample | RankingExample:
    if "chosen" not in data and "rejected" not in data and ("ranking" in data or "responses" in data):
        return _ranking(data)
    if data.get("prompt") is None:
        chosen, rejected = _require(data, "chosen"), _require(data, "rejected")
        if isinstance(chosen, str) or isinstance(rejected, str):
            # Implicit prompts are only well defined for conversations: a string pair needs an explicit prompt.
            raise _missing("prompt")
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = _common_prefix(chosen, rejected)
        if n == 0:
            raise RowError("chosen and rejected share no prompt messages and there is no prompt field", "prompt",
                           "missing field")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen:
            raise RowError("chosen has nothing after the shared prompt", "chosen", "empty completion")
        if not rejected:
            raise RowError("rejected has nothing after the shared prompt", "rejected", "empty completion")
    else:
        prompt = _turns(data, "prompt", "user")
        chosen = _strip_prompt(prompt, _turns(data, "chosen", "assistant"), "chosen")
        rejected = _strip_prompt(prompt, _turns(data, "rejected", "assistant"), "rejected")
    return PreferenceExample(prompt, _require_assistant(chosen, "chosen"), _require_assistant(rejected, "rejected"),
                             _margin(data))


def _ranking(data: dict) -> PreferenceExample | RankingExample:
    prompt = _turns(data, "prompt", "user")
    ranking = data.get("ranking")
    if "responses" in data and isinstance(ranking, list) and all(isinstance(i, int) for i in ranking):
        responses, name = _require(data, "responses"), "responses"
        if not isinstance(responses, list):
            raise _wrong_type("responses", "a list", responses)
        if sorted(ranking) != list(range(len(responses))):
            raise RowError("ranking must be a permutation of the response indices", "ranking", "bad value")
        ordered = [responses[i] for i in ranking]
    else:
        name = "ranking" if ranking is not None else "responses"
        ordered = _require(data, name)
        if not isinstance(ordered, list):
            raise _wrong_type(name, "a list of responses", ordered)
    if len(ordered) < 2:
        raise RowError("a ranking needs at least two responses", name, "bad value")
    responses = [_strip_prompt(prompt, _turns({name: r}, name, "assistant"), f"{name}[{i}]")
                 for i, r in enumerate(ordered)]
    if len(responses) == 2:
        return PreferenceExample(prompt, responses[0], responses[1], _margin(data))
    return RankingExample(prompt, responses)


def _prompt(data: dict, fmt: str) -> PromptExample:
    if fmt == "prompt":
        if data.get("prompt") is None and "messages" in data:
            return _prompt(data, "messages")
        prompt, used = _turns(data, "prompt", "user"), {"prompt"}
    elif fmt == "messages":
        prompt, used = _messages(_require(data, "messages"), "messages"), {"messages"}
    elif fmt == "sharegpt":
        prompt, used = _sharegpt(data), {"conversations"}
    elif fmt == "alpaca":
        prompt, used = _alpaca(data)[0], {"instruction", "input", "system"}
    else:  # prompt_completion, preference: the prompt column (explicit) is the prompt
        if data.get("prompt") is None and fmt == "preference":
            return PromptExample(_preference(data).prompt, {k: v for k, v in data.items()
                                                            if k not in ("chosen", "rejected")})
        prompt, used = _turns(data, "prompt", "user"), {"prompt"}
    # A conversation given as a prompt is cut before its final assistant reply (kept out of the prompt).
    while prompt and prompt[-1]["role"] == "assistant":
        prompt = prompt[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("a prompt must end with a user turn", next(iter(sorted(used))), "bad value")
    return PromptExample(prompt, {k: v for k, v in data.items() if k not in used})


def _unpaired(data: dict) -> UnpairedExample:
    label = _require(data, "label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # csv cells are strings
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise RowError(f"label must be true or false (desirable or not), got {label!r}", "label", "wrong type")
    prompt = _turns(data, "prompt", "user")
    return UnpairedExample(prompt, _strip_prompt(prompt, _turns(data, "completion", "assistant"), "completion"), label)


def detect_format(data: dict[str, Any], kind: str | None = None) -> str:
    """The row format from the columns present; with `kind`, the format that kind reads from such a row."""
    if not isinstance(data, dict):
        raise RowError("a row must be an object", None, "wrong type")
    keys = set(data)
    if kind == "classification":
        return "classification"
    if kind == "preference":
        return "preference"
    if kind == "unpaired":
        return "preference" if keys & {"chosen", "rejected"} else "unpaired"
    if keys & {"chosen", "rejected", "ranking", "responses"}:
        fmt = "preference"
    elif "messages" in keys:
        fmt = "messages"
    elif "conversations" in keys:
        fmt = "sharegpt"
    elif "instruction" in keys:
        fmt = "alpaca"
    elif "completion" in keys:
        fmt = "prompt_completion"
    elif "label" in keys and kind is None:
        fmt = "classification"
    elif "text" in keys:
        fmt = "text"
    elif "prompt" in keys:
        fmt = "prompt" if kind in (None, "prompt") else "prompt_completion"
    else:
        raise RowError(f"cannot tell the row format from its columns {sorted(keys)}; set data.format to one of "
                       f"{', '.join(FORMATS)}", None, "unknown format")
    if kind == "prompt" and fmt == "text":
        raise _missing("prompt")
    return fmt


def normalize(row: Row | dict[str, Any], kind: str, fmt: str = "auto") -> Example:
    """One raw row -> one example of `kind`. Raises `RowError` (message, field, reason) for a bad row."""
    data = row.data if isinstance(row, Row) else row
    if fmt == "auto":
        fmt = detect_format(data, kind)
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(f"data.format {fmt!r} cannot give {kind} examples; use one of {', '.join(KIND_FORMATS[kind])}")
    if kind == "prompt":
        return _prompt(data, fmt)
    if fmt == "unpaired":
        return _unpaired(data)
    if fmt == "classification":
        label = _require(data, "label")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise _wrong_type("label", "a label name or integer id", label)
        return ClassificationExample(_string(data, "text", allow_empty=False), label)
    if fmt == "preference":
        ex = _preference(data)
        if kind == "sft":
            chosen = ex.chosen if isinstance(ex, PreferenceExample) else ex.responses[0]
            return ChatExample(ex.prompt + chosen)
        return ex
    if fmt == "text":
        return TextExample(_string(data, "text", allow_empty=False))
    if fmt == "messages":
        return ChatExample(_require_assistant(_messages(_require(data, "messages"), "messages"), "messages"))
    if fmt == "sharegpt":
        return ChatExample(_require_assistant(_sharegpt(data), "conversations"))
    if fmt == "alpaca":
        prompt, completion = _alpaca(data)
        return ChatExample(prompt + completion)
    prompt = _turns(data, "prompt", "user")
    return ChatExample(prompt + _strip_prompt(prompt, _turns(data, "completion", "assistant"), "completion"))


def load_examples(sources: list[str] | str, kind: str, *, fmt: str = "auto", skip_invalid: bool = False,
                  labels: list[str] | None = None) -> tuple[list[Example], DataStats]:
    """Read and normalise every row. A bad row raises `DataError` naming file, row and field before any training,
    or with `skip_invalid` is skipped and counted in `DataStats.skipped` by reason. With `labels` (classification),
    a label that is neither one of these names nor an id in range is a bad row."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data.format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    stats, examples = DataStats(), []
    for row in load_rows(sources):
        stats.rows += 1
        try:
            ex = normalize(row, kind, fmt)
            if labels is not None and isinstance(ex, ClassificationExample):
                _check_label(ex.label, labels)
        except RowError as err:
            if not skip_invalid:
                raise DataError(str(err), source=row.source, row=row.index, field=err.field) from None
            stats.skipped[err.reason] += 1
            continue
        examples.append(ex)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no usable rows ({stats.summary()})", source=", ".join(map(str, _as_list(sources))))
    return examples, stats


def _as_list(sources: list[str] | str) -> list[str]:
    return [sources] if isinstance(sources, str) else list(sources)


def _check_label(label: str | int, labels: list[str]) -> None:
    if label in labels or (isinstance(label, int) and 0 <= label < len(labels)):
        return
    raise RowError(f"label {label!r} is not in the label set {labels}", "label", "unknown label")


def label_maps(examples: list[ClassificationExample]) -> tuple[dict[str | int, int], dict[int, str]]:
    """label2id and id2label from the labels seen. Integer ids (or digit strings, as csv gives) keep their value;
    names are numbered in sorted order so the mapping does not depend on row order."""
    seen = {ex.label for ex in examples}
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) for v in seen):
        ids = sorted({int(v) for v in seen})
        label2id: dict[str | int, int] = {}
        for v in seen:
            label2id[v] = int(v)
        return label2id, {i: str(i) for i in range(max(ids) + 1)}
    names = sorted(str(v) for v in seen)
    label2id = {name: i for i, name in enumerate(names)}
    return label2id, dict(enumerate(names))
