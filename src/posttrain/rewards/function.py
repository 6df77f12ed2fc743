"""A user's Python function as the reward: ``reward.function: path/to/file.py:fn``.

The hook for code execution, unit tests and math checkers. The function receives the prompts as
plain text (the last user message of each) and the completions, and returns one number per pair:

    def fn(prompts: list[str], completions: list[str]) -> list[float]
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from posttrain.config import ConfigError
from posttrain.errors import RewardError
from posttrain.rewards.base import Prompt, check_lengths, prompt_text, scores_to_tensor


def parse_function_spec(spec: str) -> tuple[Path, str]:
    """``path/to/file.py:fn`` -> (path, fn). The last colon splits, so ``C:\\x.py:fn`` also works."""
    path, sep, fn = spec.rpartition(":")
    if not sep or not path or not fn.isidentifier():
        raise ConfigError(f"reward.function: expected `path/to/file.py:function_name`, got `{spec}`")
    return Path(path), fn


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``fn`` from the file at ``path`` (not from sys.path), under a module name unique to the file."""
    path, fn = parse_function_spec(spec)
    if not path.is_file():
        raise ConfigError(f"reward.function: file not found: {path}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"posttrain_reward_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward.function: cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before exec so dataclasses / pickling inside the user's file can find the module;
    # the file's folder goes on sys.path while it runs so it can import its sibling helpers.
    sys.modules[module_name] = module
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(f"reward function file {path} failed to import: {type(e).__name__}: {e}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    obj = getattr(module, fn, None)
    if not callable(obj):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module_name)
        raise ConfigError(f"reward.function: {path} has no function `{fn}`" + (f"; it defines: {', '.join(found)}" if found else ""))
    return obj


class FunctionReward:
    """Scores from ``fn(prompts: list[str], completions: list[str]) -> list[float]`` in a user's file."""

    def __init__(self, spec: str):
        path, fn = parse_function_spec(spec)
        self.fn = load_function(spec)
        self.name = f"{path}:{fn}"

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        n = check_lengths(prompts, completions)
        texts, comps = [prompt_text(p) for p in prompts], list(completions)
        try:
            values = self.fn(texts, comps)
        except Exception as e:
            raise RewardError(self._locate_failure(texts, comps, e)) from e
        return scores_to_tensor(values, n, f"reward function {self.name}", comps)  # (N,)

    def _locate_failure(self, texts: list[str], comps: list[str], error: Exception) -> str:
        """Name the item that makes the function raise, by calling it on one item at a time.

        Only on the error path; if no single item raises, the failure is the batch's as a whole.
        """
        head = f"reward function {self.name} raised {type(error).__name__}: {error}"
        for i, (t, c) in enumerate(zip(texts, comps)):
            try:
                self.fn([t], [c])
            except Exception as e:  # noqa: BLE001 - any exception of the user's function locates the item
                return f"{head} (at item {i}: {type(e).__name__}: {e}; completion {i}: {c[:60]!r})"
        return f"{head} (on the batch of {len(comps)}; no single item raises alone)"
