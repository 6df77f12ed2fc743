"""A Python function as the reward: ``reward.function: path/to/file.py:fn`` (or ``package.module:fn``).

The hook for code execution, unit tests and math checkers. The function returns one number per completion.
It is called the way TRL's GRPOTrainer calls a reward function, so functions written for TRL carry over:

    def fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]

- ``prompts``: the prompt of each completion as plain text (the last user message); ``completions``: the
  decoded assistant texts (strings, also for chat prompts, where TRL would pass message lists).
- keyword arguments, each a list aligned with the completions: every other column of the prompt row
  (``answer``, ``solution``, ...; None in a row that lacks it), ``completion_ids`` (the sampled token ids,
  through EOS); and ``step``, the training step (an int; TRL passes ``trainer_state`` instead).
- A function that names ``completions`` as a parameter is called by keyword, as TRL does; an older one
  (``def fn(p, c)``) gets prompts and completions by position. A function without ``**kwargs`` receives only
  the keyword arguments it names; one it names without a default and the data lacks is an error naming it.

Anything unusable raises RewardError naming the function and the row: an exception (the row found by calling
one row at a time), a None, NaN or infinite value, a wrong length or type, or no answer within
``reward.timeout`` seconds (the row found the same way, each row given the timeout).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from posttrain.config import ConfigError
from posttrain.errors import RewardError
from posttrain.rewards.base import Columns, Prompt, _where, check_lengths, prompt_text, scores_to_tensor

# keyword arguments the call itself fills; a prompt column of one of these names would be ambiguous
RESERVED = ("prompts", "completions", "completion_ids", "step")


def parse_function_spec(spec: str) -> tuple[Path | str, str]:
    """``path/to/file.py:fn`` -> (Path, fn); ``package.module:fn`` -> ("package.module", fn).

    The last colon splits, so ``C:\\x.py:fn`` also works. A spec naming a `.py` file or a path with a folder
    separator is a file; otherwise an importable module."""
    path, sep, fn = spec.rpartition(":")
    if not sep or not path or not fn.isidentifier():
        raise ConfigError(f"reward.function: expected `path/to/file.py:function_name` or `package.module:function_name`, "
                          f"got `{spec}`")
    if path.endswith(".py") or "/" in path or "\\" in path:
        return Path(path), fn
    if not all(part.isidentifier() for part in path.split(".")):
        raise ConfigError(f"reward.function: `{path}` is neither a .py file nor a module name (in `{spec}`)")
    return path, fn


def _import_file(path: Path) -> Any:
    """The module of the file at ``path`` (not from sys.path), under a module name unique to the file."""
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
    return module


def load_function(spec: str) -> Callable[..., Any]:
    """The function ``fn`` of ``path/to/file.py:fn`` or ``package.module:fn``."""
    where, fn = parse_function_spec(spec)
    if isinstance(where, Path):
        module = _import_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"reward.function: cannot import module `{where}`: {e}") from e
    obj = getattr(module, fn, None)
    if not callable(obj):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"reward.function: {where} has no function `{fn}`" + (f"; it defines: {', '.join(found)}" if found else ""))
    return obj


# --------------------------------------------------------------------------- timeout


class _Timeout(Exception):
    """The reward call did not return within its time."""


def call_with_timeout(fn: Callable[..., Any], timeout: float, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising _Timeout after ``timeout`` seconds (0 = no limit).

    On the main thread the call runs right there and a timer thread interrupts it with a signal (SIGUSR2) whose
    handler raises: the function keeps the main thread, so its own signal.alarm timeouts (math_verify's) still work,
    and a Python-level hang (a loop, a sleep) is stopped. Elsewhere it runs in a daemon thread that is abandoned
    on timeout. A hang inside C code that holds the GIL is out of reach of both.
    """
    if timeout <= 0:
        return fn(*args, **kwargs)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return _call_in_thread(fn, timeout, args, kwargs)
    state = {"armed": True, "fired": False}
    main = threading.get_ident()

    def handler(signum, frame):  # runs on the main thread between bytecodes
        if state["armed"] and state["fired"]:  # an outside SIGUSR2 during the call is ignored, never a timeout
            state["armed"] = False
            raise _Timeout

    def fire():
        if state["armed"]:
            state["fired"] = True
            signal.pthread_kill(main, signal.SIGUSR2)

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            state["armed"] = False  # from here on a late signal is a no-op
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)


def _call_in_thread(fn, timeout: float, args, kwargs) -> Any:
    out: dict[str, Any] = {}

    def work():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread as it is
            out["error"] = e

    worker = threading.Thread(target=work, daemon=True, name="posttrain-reward")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout
    if "error" in out:
        raise out["error"]
    return out["value"]


# --------------------------------------------------------------------------- the source


def _signature(fn: Callable[..., Any]) -> tuple[bool, set[str], set[str], bool]:
    """(called by keyword, names it accepts by keyword, names it requires by keyword, takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the old positional call, nothing more
        return False, set(), set(), False
    by_keyword = any(p.name == "completions" and p.kind != p.POSITIONAL_ONLY for p in params)
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}
    if not by_keyword:  # the first two parameters take prompts and completions by position
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
        keywords -= set(positional)
        required -= set(positional)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return by_keyword, keywords, required - {"prompts", "completions"}, var_kw


class FunctionReward:
    """Scores from a Python function (module doc), checked row by row; ``timeout`` seconds per call (0 = none)."""

    def __init__(self, spec: str, timeout: float = 0.0):
        where, fn = parse_function_spec(spec)
        self.fn = load_function(spec)
        self.name = f"{where}:{fn}"
        self.log_name = fn
        self.timeout = float(timeout)
        self.by_keyword, self.keywords, self.required, self.var_kw = _signature(self.fn)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], *, columns: Columns | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, step: int | None = None) -> torch.Tensor:
        n = check_lengths(prompts, completions)
        texts, comps = [prompt_text(p) for p in prompts], list(completions)
        kwargs = self._keywords(n, columns, completion_ids, step)
        try:
            values = self._call(texts, comps, kwargs)
        except _Timeout:
            raise RewardError(self._locate_hang(texts, comps, kwargs)) from None
        except Exception as e:
            raise RewardError(self._locate_failure(texts, comps, kwargs, e)) from e
        return scores_to_tensor(values, n, f"reward function {self.name}", comps, texts)  # (N,)

    def _keywords(self, n: int, columns: Columns | None, completion_ids, step) -> dict[str, Any]:
        """The keyword arguments this function takes: row columns, completion_ids, step (module doc)."""
        given: dict[str, Any] = {}
        for name, values in (columns or {}).items():
            if name in RESERVED:
                raise RewardError(f"reward function {self.name}: the prompt rows have a column `{name}`, which is also "
                                  f"an argument the call fills ({', '.join(RESERVED)}); rename the column")
            if len(values) != n:
                raise RewardError(f"reward function {self.name}: column `{name}` has {len(values)} values for {n} completions")
            given[name] = list(values)
        if completion_ids is not None:
            given["completion_ids"] = [list(map(int, ids)) for ids in completion_ids]
        if step is not None:
            given["step"] = int(step)
        missing = sorted(self.required - set(given))
        if missing:
            have = ", ".join(sorted(c for c in given if c not in RESERVED)) or "none"
            raise RewardError(f"reward function {self.name} needs {', '.join(f'`{m}`' for m in missing)}, which the "
                              f"prompt rows do not have (their other columns: {have})")
        return given if self.var_kw else {k: v for k, v in given.items() if k in self.keywords}

    def _call(self, texts: list[str], comps: list[str], kwargs: dict[str, Any]) -> Any:
        if self.by_keyword:
            return call_with_timeout(self.fn, self.timeout, prompts=texts, completions=comps, **kwargs)
        return call_with_timeout(self.fn, self.timeout, texts, comps, **kwargs)

    def _one(self, i: int, texts: list[str], comps: list[str], kwargs: dict[str, Any]) -> Any:
        """The call on row i alone (its columns sliced; step as it is)."""
        row = {k: (v if k == "step" else v[i: i + 1]) for k, v in kwargs.items()}
        return self._call(texts[i: i + 1], comps[i: i + 1], row)

    def _locate_failure(self, texts: list[str], comps: list[str], kwargs: dict[str, Any], error: Exception) -> str:
        """Name the row that makes the function raise, by calling it on one row at a time.

        Only on the error path; if no single row raises, the failure is the batch's as a whole.
        """
        head = f"reward function {self.name} raised {type(error).__name__}: {error}"
        for i in range(len(comps)):
            try:
                self._one(i, texts, comps, kwargs)
            except _Timeout:
                return f"{head} (and {self._timeout_text()} at {_where(i, comps, texts)} alone)"
            except Exception as e:  # noqa: BLE001 - any exception of the user's function locates the row
                return f"{head} (at {_where(i, comps, texts)}: {type(e).__name__}: {e})"
        return f"{head} (on the batch of {len(comps)}; no single row raises alone)"

    def _locate_hang(self, texts: list[str], comps: list[str], kwargs: dict[str, Any]) -> str:
        """Name the row the function hangs on: rows one at a time, each with the timeout, so this costs at most
        the quick rows before it plus one timeout."""
        head = f"reward function {self.name} {self._timeout_text()}"
        for i in range(len(comps)):
            try:
                self._one(i, texts, comps, kwargs)
            except _Timeout:
                return f"{head} (at {_where(i, comps, texts)}: it hangs on that row alone)"
            except Exception as e:  # noqa: BLE001 - a row that raises is as much the culprit
                return f"{head} (at {_where(i, comps, texts)}, which alone raises {type(e).__name__}: {e})"
        return f"{head} on the batch of {len(comps)} (every row alone returns in time)"

    def _timeout_text(self) -> str:
        return f"did not return within reward.timeout = {self.timeout:g} s"
