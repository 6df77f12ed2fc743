"""``posttrain CMD [CONFIG.yaml] [key=value ...]``.

Every command has one typed config (``posttrain.config``); ``--help`` lists its
keys. ``--nproc N`` relaunches the command under ``torch.distributed.run``.
A config path ``examples/...`` that is not in the working directory is the copy
shipped with the package, so the README's commands run from any folder;
``posttrain examples [DEST]`` lists those configs or copies them to DEST.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

from posttrain.config import COMMANDS, ConfigError, help_text, load_config
from posttrain.errors import PosttrainError

# the example and demo configs, package data (pyproject.toml): beside this module in a checkout and in a wheel
EXAMPLES = Path(__file__).resolve().parent / "examples"

# command -> "module:function"; imported lazily so `posttrain --help` stays fast
ENTRY = {
    "sft": "posttrain.recipes.sft:main",
    "rm": "posttrain.recipes.rm:main",
    "dpo": "posttrain.recipes.dpo:main",
    "kto": "posttrain.recipes.kto:main",
    "online-dpo": "posttrain.recipes.online_dpo:main",
    "ppo": "posttrain.recipes.ppo:main",
    "grpo": "posttrain.recipes.grpo:main",
    "demo": "posttrain.recipes.demo:main",
    "eval": "posttrain.eval.run:main",
    "generate": "posttrain.rollout.generate:main",
    "tiny-model": "posttrain.models.tiny:main",
    "task": "posttrain.tasks:main",
    "report": "posttrain.report:main",
}

# `key=value` only when the left side looks like a (dotted) key, so a prompt such as "1+2=?" stays positional
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\+?$")

# bare positional words (not a .yaml file, not key=value) fill these keys in order
POSITIONAL = {
    "task": ["name", "output_dir"],
    "tiny-model": ["output_dir"],
    "report": ["runs*"],
    "eval": ["model"],
    "generate": ["model", "prompt*"],
}

USAGE = """usage: posttrain COMMAND [CONFIG.yaml] [key=value ...] [--help] [--nproc N]

commands:
  sft          supervised fine-tuning (instruction tuning, or classification with a new head)
  rm           reward model (Bradley-Terry)
  dpo          offline preference optimisation: DPO (sigmoid, ipo, hinge, robust; + SFT term) and the
               reference-free simpo, cpo, orpo
  kto          KTO on unpaired desirable / undesirable completions (or preference pairs, unpaired)
  online-dpo   iterative online DPO (sample, label, train, repeat)
  ppo          PPO with a reward model / function / verifier and a critic (or GRPO, RLOO, REINFORCE++)
  grpo         GRPO and its family (DAPO, Dr. GRPO, GSPO): group-relative, critic-free, TRL's key names
  eval         evaluate a model: gold accuracy, pass@k, reward, KL, length, EOS rate, perplexity
  generate     sample from a model (--chat for a terminal chat)
  demo         the whole pipeline on the embedded default, with a report
  tiny-model   write the embedded default model and tokenizer
  task         write a built-in task's data files: posttrain task NAME OUT_DIR
  report       markdown + PNG report for one or more runs
  examples     list the shipped example configs; `posttrain examples DEST` copies them to DEST

A CONFIG.yaml `examples/NAME.yaml` that is not in the working directory is the shipped copy.
"""


def _bool_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if hints[f.name] is bool}


def parse_args(command: str, argv: list[str]) -> tuple[str | None, list[str], int]:
    """Split argv into (config file, key=value overrides, nproc)."""
    cls = COMMANDS[command]
    bools = _bool_fields(cls)
    path: str | None = None
    overrides: list[str] = []
    positional = list(POSITIONAL.get(command, []))
    nproc = 0
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            name = a[2:].replace("-", "_")
            if "=" in name:
                k, v = name.split("=", 1)
                overrides.append(f"{k}={v}")
            elif name == "nproc":
                i += 1
                nproc = int(argv[i])
            elif name in bools:
                overrides.append(f"{name}=true")
            elif name.startswith("no_") and name[3:] in bools:
                overrides.append(f"{name[3:]}=false")
            elif i + 1 < len(argv):
                i += 1
                overrides.append(f"{name}={argv[i]}")
            else:
                raise ConfigError(f"option `{a}` needs a value")
        elif "=" in a and _KEY.match(a.split("=", 1)[0]):
            overrides.append(a)
        elif path is None and a.endswith((".yaml", ".yml")):
            path = a
        elif positional:
            key = positional[0]
            if key.endswith("*"):
                overrides.append(f"{key[:-1]}+={a}")
            else:
                positional.pop(0)
                overrides.append(f"{key}={a}")
        else:
            raise ConfigError(f"unexpected argument `{a}` for `posttrain {command}`")
        i += 1
    # collect repeated list positionals ("runs+=a runs+=b") into one list override
    lists: dict[str, list[str]] = {}
    plain = []
    for o in overrides:
        k, v = o.split("=", 1)
        if k.endswith("+"):
            lists.setdefault(k[:-1], []).append(v)
        else:
            plain.append(o)
    for k, vs in lists.items():
        plain.append(f"{k}=[{', '.join(repr(v) for v in vs)}]")
    return path, plain, nproc


def config_file(path: str | None) -> str | None:
    """`path` as given, or the shipped copy when `path` is `examples/...` and no such file is here."""
    if path is None or Path(path).is_file() or Path(path).parts[:1] != ("examples",):
        return path
    shipped = EXAMPLES.joinpath(*Path(path).parts[1:])
    if not shipped.is_file():
        return path
    print(f"config: {path} is not in this folder; using the copy shipped with posttrain, {shipped}", flush=True)
    return str(shipped)


def examples(argv: list[str]) -> int:
    """`posttrain examples`: each shipped config with its first comment line; `posttrain examples DEST`: copy them."""
    if argv and argv[0] not in ("-h", "--help"):
        dest = Path(argv[0])
        if dest.exists():
            print(f"posttrain examples: error: {dest} exists; give a new folder to copy the examples into", file=sys.stderr)
            return 2
        shutil.copytree(EXAMPLES, dest, ignore=shutil.ignore_patterns("__pycache__"))
        print(f"copied {len(list(dest.rglob('*.yaml')))} configs to {dest}")
        return 0
    print(f"example configs shipped with posttrain (run one as `posttrain CMD examples/NAME.yaml`; copy them all with "
          f"`posttrain examples DEST`), in {EXAMPLES}:")
    for f in sorted(EXAMPLES.rglob("*.yaml")):
        first = f.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ") if first and first[0].startswith("#") else ""
        print(f"  examples/{f.relative_to(EXAMPLES).as_posix():32s} {about}")
    return 0


def _relaunch(nproc: int, command: str, argv: list[str]) -> int:
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "posttrain", command, *rest]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _quiet_libraries() -> None:
    """posttrain prints its own progress; transformers' per-load progress bars and load reports are noise here."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _name_lost_rank_on_sigterm(command: str) -> None:
    """In a worker of a several-process job: a SIGTERM that comes because another rank died (torchrun stops the
    survivors) says which rank was lost and exits 3, as a failed collective does; any other SIGTERM keeps its default
    effect. The training loop's own handler (a checkpoint, then a clean stop) takes precedence while it runs."""

    def handle(signum, frame) -> None:
        from posttrain.engine.dist import terminated_by_launcher

        lost = terminated_by_launcher()
        if lost is None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        print(f"posttrain {command}: error: {lost}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)

    signal.signal(signal.SIGTERM, handle)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "examples":
        return examples(rest)
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"posttrain: unknown command `{command}`" + (f"; did you mean `{close[0]}`?" if close else ""), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(f"usage: posttrain {command} [CONFIG.yaml] [key=value ...]\n\nkeys (default, meaning):")
        print(help_text(COMMANDS[command]))
        return 0
    try:
        path, overrides, nproc = parse_args(command, rest)
        path = config_file(path)
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch(nproc, command, rest)
        if "LOCAL_RANK" in os.environ:
            _name_lost_rank_on_sigterm(command)
        cfg = load_config(COMMANDS[command], path, overrides)
        _quiet_libraries()
        module, fn = ENTRY[command].split(":")
        getattr(importlib.import_module(module), fn)(cfg)
    except (ConfigError, PosttrainError) as e:
        print(f"posttrain {command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from posttrain.engine.dist import peer_failure

        lost = peer_failure(e)
        if lost is None:
            raise
        print(f"posttrain {command}: error: {lost}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)  # the process group is broken: a normal exit would wait on its threads
    except KeyboardInterrupt:
        print(f"posttrain {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
