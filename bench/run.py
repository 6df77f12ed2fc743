"""posttrain against its peers (TRL) on identical work; writes bench/results.md.

    .venv/bin/python bench/run.py                    # everything, 3 repeats (make bench)
    .venv/bin/python bench/run.py --quick            # smoke run: tiny scale, few steps, 1 repeat
    .venv/bin/python bench/run.py --only sft,dpo --scales tiny,long --repeats 5

For every recipe (sft, rm, dpo, ppo, grpo, kto; orpo and simpo: `posttrain dpo` with that loss_type) and scale (tiny, small ~30M, long = SFT on 1-2k-token rows)
it builds one model folder and one data file, runs ``posttrain RECIPE`` and the TRL peer on them
with the same batch size, max length, steps, learning rate, seed, float32 and thread count,
checks both did the same work, repeats each run ``--repeats`` times (alternating the two sides) and
reports medians. See bench/README.md for how to read the tables.

Measurements, the same for both sides:
- wall time of the training loop, tokens, steps, final loss: from the JSON each side writes
  (the peers: ``--out``); posttrain carries no benchmark hook, so its fields are read from its
  ``metrics.jsonl`` and log (``posttrain_result``).
- peak resident memory: the kernel's high-water mark of the child process, from ``os.wait4``'s
  rusage (``ru_maxrss``; what ``/usr/bin/time -v`` prints as "Maximum resident set size").
- hardware limit: best of a few float32 2048x2048 ``torch.mm`` at the same thread count;
  achieved model FLOP/s = (FLOPs per token, see ``flops_per_token``) x tokens / wall.

``--device cuda`` runs both sides on the GPU in bfloat16 (bf16 autocast; posttrain ``dtype=bfloat16`` with float32
master weights, the peers ``--device cuda`` with weights loaded in bf16), adds each side's peak GPU memory
(``torch.cuda.max_memory_allocated``, judged instead of RSS) and takes the bf16 peak of an 8192^3 matmul as
the hardware limit. ``--python PY --peer-path DIR --ppo-peer-path DIR`` run posttrain as ``PY -m posttrain``
and the peers with ``PY`` and DIR in front of ``PYTHONPATH`` instead of the venvs (bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import data as bench_data  # noqa: E402

POSTTRAIN = ROOT / ".venv" / "bin" / "posttrain"
PEERS = {  # recipe -> (venv, script)
    "sft": (BENCH / ".venv-peers", BENCH / "peers" / "trl_sft.py"),
    "rm": (BENCH / ".venv-peers", BENCH / "peers" / "trl_rm.py"),
    "dpo": (BENCH / ".venv-peers", BENCH / "peers" / "trl_dpo.py"),
    "ppo": (BENCH / ".venv-peers-ppo", BENCH / "peers" / "trl_ppo.py"),
    "orpo": (BENCH / ".venv-peers", BENCH / "peers" / "trl_orpo.py"),
    "simpo": (BENCH / ".venv-peers", BENCH / "peers" / "trl_simpo.py"),  # CPOTrainer, loss_type simpo
    "grpo": (BENCH / ".venv-peers", BENCH / "peers" / "trl_grpo.py"),
    "kto": (BENCH / ".venv-peers", BENCH / "peers" / "trl_kto.py"),  # trl.KTOTrainer, loss_type kto
}
RECIPES = ["sft", "rm", "dpo", "ppo", "grpo", "orpo", "simpo", "kto"]
ONLINE = ("ppo", "grpo")  # sampled work: rows are prompts, tokens differ by design
UNIT = {"sft": "sequences", "rm": "pairs", "dpo": "pairs", "ppo": "episodes", "grpo": "episodes", "orpo": "pairs",
        "simpo": "pairs", "kto": "rows"}
PAIRS = ("dpo", "orpo", "simpo")  # `posttrain dpo` with these loss types, on the same preference rows
# the issue's targets: posttrain / peer on the recipe's headline throughput
TARGETS = {"sft": ("tokens/s", 1.5), "dpo": ("pairs/s", 2.0), "ppo": ("episodes/s", 3.0), "orpo": ("pairs/s", 1.5),
           "simpo": ("pairs/s", 1.5), "grpo": ("episodes/s", 2.0),  # grpo: issue 14
           "kto": ("rows/s", 1.5)}  # kto: issue 15, unpaired rows (prompt, completion, label) per second
TOKEN_TOLERANCE = 0.02  # token counts may differ by the chat-template / EOS handling, never by more than 2%


@dataclass
class Sides:
    """How to start each side; the defaults are the CPU benchmark's venvs, main() may replace them."""

    device: str = "cpu"
    posttrain: list[str] = field(default_factory=lambda: [str(POSTTRAIN)])  # command prefix of `posttrain ...`
    python: str = str(ROOT / ".venv" / "bin" / "python")  # posttrain's interpreter (import checks, --profile)
    peer_python: dict[str, str] = field(default_factory=lambda: {r: str(v / "bin" / "python") for r, (v, _) in PEERS.items()})
    peer_path: dict[str, str] = field(default_factory=dict)  # recipe -> folder put in front of PYTHONPATH


SIDES = Sides()


@dataclass
class Plan:
    """The work of one (recipe, scale) pair; both sides get exactly these numbers."""

    recipe: str
    scale: str
    model_size: str  # tiny | small
    batch_size: int
    steps: int
    lr: float
    rows_words: tuple[int, int] = (4, 120)
    # gradient checkpointing, the same on both sides (SFT/RM/DPO; TRL's PPOTrainer never turns it on): off at the tiny
    # scale, where memory is the process itself and recomputation is only a cost; on from ~30M, where activations
    # dominate memory (TRL 1.16's configs default to on)
    checkpointing: bool = False
    # PPO only
    rollout_batch: int = 16
    mini_batches: int = 2
    ppo_epochs: int = 2
    response_length: int = 32
    # GRPO only: rollout_batch completions a generation (num_generations per prompt), each generation feeding
    # steps_per_generation optimizer steps of batch_size completions; steps counts optimizer steps (TRL's unit)
    num_generations: int = 8
    steps_per_generation: int = 2


def plans(quick: bool, only: list[str], scales: list[str], device: str = "cpu") -> list[Plan]:
    lr = {"sft": 2e-5, "rm": 1e-5, "dpo": 1e-6, "ppo": 1e-5, "orpo": 1e-6, "simpo": 1e-6, "grpo": 1e-5, "kto": 1e-6}
    out: list[Plan] = []
    for scale in scales:
        for r in only:
            if scale == "long" and r != "sft":
                continue  # the long-sequence case is SFT: cost growth with sequence length
            if device == "cuda" and not quick:
                # A GPU step takes milliseconds: more steps, so the loop, not its first step, is measured; the
                # process start (imports, model load) is the same on both sides and outside the loop.
                # the long case on the ~30M model: on a GPU the 0.9M one measures launch overhead only
                size = {"base": "base", "small": "small", "long": "small"}.get(scale, "tiny")
                p = Plan(r, scale, size, batch_size=4 if scale == "long" else 8,
                         steps={"ppo": 4}.get(r, 12 if scale == "long" else 30), lr=lr[r], rollout_batch=16,
                         mini_batches=2, ppo_epochs=2, response_length=32)
            elif quick:
                p = Plan(r, scale, "small" if scale == "small" else "tiny", batch_size=4, steps=3, lr=lr[r],
                         rollout_batch=8, mini_batches=2, ppo_epochs=1, response_length=16)
                if r == "ppo":
                    p.steps = 2
            elif scale == "tiny":
                p = Plan(r, scale, "tiny", batch_size=8, steps=20, lr=lr[r], rollout_batch=16, mini_batches=2,
                         ppo_epochs=2, response_length=32)
                if r == "ppo":
                    p.steps = 4
            elif scale in ("small", "base"):
                p = Plan(r, scale, scale, batch_size=8, steps=8, lr=lr[r], rollout_batch=16, mini_batches=2,
                         ppo_epochs=2, response_length=32)
                if r == "ppo":
                    p.steps = 2
            else:  # long
                p = Plan(r, scale, "tiny", batch_size=4, steps=4 if quick else 8, lr=lr[r])
            if scale == "long":
                p.rows_words = (-1, -1)  # sized from the tokenizer, see long_rows
            if r == "grpo":  # 8 generations of 4 prompts x 8 completions (quick: 2 of 2 x 4), 2 steps each
                p.rollout_batch, p.num_generations = (8, 4) if quick else (32, 8)
                p.batch_size, p.steps = p.rollout_batch // p.steps_per_generation, 4 if quick else 16
            if r not in ONLINE and scale != "tiny" and not quick:
                p.checkpointing = True
            out.append(p)
    return out


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": len(os.sched_getaffinity(0)),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


def matmul_peak(threads: int, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best float32 FLOP/s of an n x n matmul over ``reps`` timed calls (after one warm-up).

    On CUDA: the bf16 dense peak, the mean of 10 timed 8192^3 products after 3 warm-ups (what KINDS.md measured
    on the H200: about 790 TFLOP/s), each run waited for with ``torch.cuda.synchronize``."""
    import torch

    if device == "cuda":
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.mm(a, b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        torch.cuda.synchronize()
        peak = 10 * 2 * n**3 / (time.perf_counter() - t)
        del a, b
        torch.cuda.empty_cache()
        return peak
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peer_versions() -> dict[str, str]:
    out = {}
    for name, recipe in (("peers", "sft"), ("peers-ppo", "ppo")):
        py = SIDES.peer_python[recipe]
        if not Path(py).exists() and not shutil.which(py):
            out[name] = "not installed"
            continue
        r = subprocess.run([py, "-c", "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)"],
                           capture_output=True, text=True, env=child_env(1, peer=recipe))
        out[name] = r.stdout.strip() or f"broken: {r.stderr.strip()[-200:]}"
    return out


# --------------------------------------------------------------------------- inputs


def run_quiet(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def posttrain_has(command: str) -> tuple[bool, str]:
    """True when ``posttrain COMMAND`` exists and its module imports."""
    if len(SIDES.posttrain) == 1 and not Path(SIDES.posttrain[0]).exists():
        return False, f"{SIDES.posttrain[0]} not found (run `make setup`)"
    module = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo", "orpo": "dpo", "simpo": "dpo", "grpo": "grpo",
              "kto": "kto", "tiny-model": None,
              "task": None}.get(command)
    check = {"tiny-model": "import posttrain.models.tiny as m; m.main",
             "task": "import posttrain.tasks as m; m.main"}.get(command, f"import posttrain.recipes.{module} as m; m.main")
    r = run_quiet([SIDES.python, "-c", check])
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return True, ""


def build_model(out: Path, size: str, need_positions: int, notes: list[str]) -> Path:
    """``posttrain tiny-model`` when it works and fits the sequence length, else bench/data.py's model."""
    if (out / "config.json").exists():
        return out
    ok, why = posttrain_has("tiny-model")
    if ok:
        r = run_quiet([*SIDES.posttrain, "tiny-model", str(out), f"size={size}"])
        cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if r.returncode == 0 and cfg.get("max_position_embeddings", 0) >= need_positions:
            notes.append(f"model `{size}`: `posttrain tiny-model {rel(out)} size={size}`")
            return out
        why = r.stderr.strip()[-300:] if r.returncode else f"max_position_embeddings {cfg.get('max_position_embeddings')} < {need_positions}"
        shutil.rmtree(out, ignore_errors=True)
    bench_data.build_model(out, size=size)
    notes.append(f"model `{size}` at {rel(out)}: bench/data.py's own (posttrain tiny-model not used: {why})")
    return out


def build_rm_init(model_dir: Path, out: Path) -> Path:
    """The policy's backbone with a seeded scalar head: the RM start for both sides, PPO's reward and value model."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    m.config.pad_token_id = tok.pad_token_id
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def count_params(folder: Path, head: str = "causal") -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, logging as hf_logging

    hf_logging.set_verbosity_error()
    cls = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    m = cls.from_pretrained(folder, dtype=torch.float32)
    return sum(p.numel() for p in m.parameters())


def task_rows(out: Path, n: int, notes: list[str]) -> dict[str, list[dict]] | None:
    ok, why = posttrain_has("task")
    if not ok:
        notes.append(f"data: bench/data.py's mixed-length rows (`posttrain task` not available: {why})")
        return None
    r = run_quiet([*SIDES.posttrain, "task", "arithmetic", str(out), f"n_train={n}", "n_eval=16"])
    if r.returncode != 0:
        notes.append(f"data: bench/data.py's mixed-length rows (`posttrain task arithmetic` failed: {r.stderr.strip()[-200:]})")
        return None
    notes.append(f"data: `posttrain task arithmetic {rel(out)} n_train={n} n_eval=16`")
    return {k: bench_data.read_jsonl(out / f"{k}.jsonl") for k in ("sft", "prefs", "prompts")}


def token_lengths(tok, kind: str, rows: list[dict]) -> list[int]:
    """Tokens of every sequence the rows make under the chat template (prefs: chosen and rejected; kto: each row's
    prompt + completion)."""
    def n(msgs, gen=False):
        enc = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)
        return len(enc["input_ids"])

    def user(x):
        return [{"role": "user", "content": x}]

    def asst(x):
        return [{"role": "assistant", "content": x}]

    if kind == "sft":
        return [n(r["messages"]) for r in rows]
    if kind == "prefs":
        return [n(user(r["prompt"]) + asst(r[k])) for r in rows for k in ("chosen", "rejected")]
    if kind == "kto":
        return [n(user(r["prompt"]) + asst(r["completion"])) for r in rows]
    return [n(user(r["prompt"]), gen=True) for r in rows]


def kto_rows(pairs: list[dict], n: int) -> list[dict]:
    """n unpaired KTO rows ``{"prompt", "completion", "label"}`` from n/2 preference pairs: every pair's chosen
    completion once (label true) and its rejected one once (false), in the order d_0, u_h, d_1, u_(h+1), ...
    (h = n/4): each run of consecutive rows is half desirable, half undesirable, and no two neighbours share a
    prompt. TRL's KTOTrainer samples the rows in this order (its KL pairs need sequential sampling) and takes each
    row's mismatched completion from its neighbour in the batch, so the order keeps those pairs mismatched."""
    m = n // 2
    ps = take(pairs, m)
    h = m // 2
    out = []
    for k in range(m):
        d, u = ps[k], ps[(k + h) % m]
        out += [{"prompt": d["prompt"], "completion": d["chosen"], "label": True},
                {"prompt": u["prompt"], "completion": u["rejected"], "label": False}]
    return out


def kto_peer_kl_tokens(tok, rows: list[dict], batch_size: int) -> int:
    """Tokens of TRL's mismatched pairs under the template: within each batch-sized chunk of the rows (dataset
    order), row i's prompt with row i-1's completion (the first row taking the last's)."""
    def n(msgs, gen=False):
        return len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"])

    prompt = [n([{"role": "user", "content": r["prompt"]}], gen=True) for r in rows]
    full = token_lengths(tok, "kto", rows)
    total = 0
    for lo in range(0, len(rows), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(rows))))
        for a, b in zip(idx, [idx[-1]] + idx[:-1]):
            total += prompt[a] + full[b] - prompt[b]
    return total


def posttrain_kto_tokens(model: Path, data: Path, max_length: int, seed: int = 0) -> dict | None:
    """What `posttrain kto` counts in its logged ``tokens_per_second``, computed with posttrain's own functions
    (the tokenizer, the unpaired rows, `assign_mismatched` with the run's seed), in posttrain's interpreter:
    {"rows", "tokens_rows" (prompt + completion of every row), "tokens_kl" (prompt + its mismatched completion)}.
    The harness reads posttrain's loop time as these tokens / the logged rate, so it needs them exactly."""
    code = (
        "import json, sys\n"
        "from posttrain.models import load_tokenizer\n"
        "from posttrain.data import load_examples, tokenize_examples\n"
        "from posttrain.recipes.kto import unpair, assign_mismatched\n"
        "model, data, L, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n"
        "tok = load_tokenizer(model)\n"
        "ex, _ = load_examples([data], 'unpaired')\n"
        "items = unpair(tokenize_examples(tok, ex, max_length=L))\n"
        "assign_mismatched(items, seed, L)\n"
        "print(json.dumps({'rows': len(items),"
        " 'tokens_rows': sum(len(i['prompt_ids']) + len(i['completion_ids']) for i in items),"
        " 'tokens_kl': sum(len(i['prompt_ids']) + len(i['kl_ids']) for i in items)}))\n")
    r = run_quiet([SIDES.python, "-c", code, str(model), str(data), str(max_length), str(seed)], env=child_env(1))
    if r.returncode != 0:
        print(f"  posttrain kto token count failed: {r.stderr.strip()[-300:]}", flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def after_end_of_turn(tok, kind: str, rows: list[dict]) -> tuple[int, bool]:
    """(sequences, whether every one ends `eos` + exactly one newline token under the chat template).

    posttrain stops a preference sequence right after the end-of-turn token (nothing after it is trained on);
    TRL keeps the template's trailing newline. When this holds, posttrain's count is the harness's minus one
    token per sequence, and that is the whole difference."""
    if kind not in ("prefs", "kto") or tok.eos_token_id is None:
        return 0, False
    seqs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}]
            for r in rows for k in (("completion",) if kind == "kto" else ("chosen", "rejected"))]
    for msgs in seqs:
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) < 2 or ids[-2] != tok.eos_token_id or tok.decode(ids[-1:]).strip(" ") != "\n":
            return len(seqs), False
    return len(seqs), True


def long_rows(tok, n: int, lo: int = 1000, hi: int = 2000, seed: int = 0) -> list[dict]:
    """SFT rows of lo..hi tokens under this tokenizer: word counts scaled by its measured tokens/word."""
    probe = bench_data.make_rows(8, seed, 200, 200)["sft"]
    per_word = statistics.mean(token_lengths(tok, "sft", probe)) / (200 + 50)
    lo_w, hi_w = int(lo / per_word), int(hi / per_word * 0.9)
    rows = bench_data.make_rows(n * 3, seed, lo_w, hi_w)["sft"]
    lens = token_lengths(tok, "sft", rows)
    keep = [r for r, k in zip(rows, lens) if lo <= k <= hi]
    return (keep * (n // max(1, len(keep)) + 1))[:n]


def take(rows: list[dict], n: int) -> list[dict]:
    """Exactly n rows (cycled when short): with max_steps x batch_size = n, both sides see every row once."""
    return (rows * (n // max(1, len(rows)) + 1))[:n]


def rel(path: Path) -> str:
    """``path`` relative to the repo when it is inside it (--work may be anywhere)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def round_up(x: int, m: int = 64) -> int:
    return (x + m - 1) // m * m


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    ok: bool
    result: dict = field(default_factory=dict)
    rss_mb: float = 0.0
    process_s: float = 0.0
    error: str = ""


def run_child(cmd: list[str], env: dict, timeout: int, log: Path) -> tuple[int, float, float]:
    """Run cmd; returns (exit code, process wall seconds, peak RSS MB of the child from wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = t + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(p.pid, 9)
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    return code, wall, ru.ru_maxrss / 1024.0


def child_env(threads: int, extra: dict | None = None, peer: str | None = None) -> dict:
    """The children's environment; ``peer`` (a recipe) puts that peer's ``--peer-path`` in front of PYTHONPATH."""
    env = dict(os.environ)
    if peer and SIDES.peer_path.get(peer):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (SIDES.peer_path[peer], env.get("PYTHONPATH")) if x)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def measure(cmd: list[str], json_path: Path | None, env: dict, timeout: int, log: Path,
            result_fn: Callable[[], dict | None] | None = None) -> Run:
    """Run one side. The peers write their result JSON at ``json_path``; posttrain is measured from outside
    (``result_fn``, `posttrain_result`): the product carries no benchmark hook."""
    if json_path is not None:
        json_path.unlink(missing_ok=True)
    code, wall, rss = run_child(cmd, env, timeout, log)
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:]) if log.exists() else ""
    if code != 0:
        return Run(False, rss_mb=rss, process_s=wall, error=f"exit {code}: {tail}")
    result = result_fn() if result_fn is not None else (
        json.loads(json_path.read_text()) if json_path is not None and json_path.exists() else None)
    if result is None:
        return Run(False, rss_mb=rss, process_s=wall, error=f"exit 0 but no result; log tail:\n{tail}")
    return Run(True, result, rss_mb=rss, process_s=wall)


REF_PASS = re.compile(r"reference log-probs cached for \d+ (?:pairs|rows and their mismatched pairs) in ([0-9.]+) s")


def posttrain_result(out_dir: Path, log: Path, p: Plan, expected_tokens: int | None, prompt_tokens: float,
                     kto_tokens: dict | None = None) -> dict | None:
    """posttrain's result, read from what any run writes (``metrics.jsonl``, its log), with the peers' fields.

    Steps and the final loss are logged. The loop's wall time: PPO logs ``rollout/seconds`` and ``train/seconds`` of
    every iteration (their sum); the others log ``tokens_per_second`` per logging window, so the loop takes the
    harness's own token count of the rows / their mean (windows of equal steps), plus, for DPO, the reference pass
    its log reports (a peer does that work inside its steps). Tokens: the harness's count of the rows (PPO: per
    episode, the mean prompt tokens + the logged mean response length; KTO: posttrain's own count of the rows and of
    their mismatched pairs, `posttrain_kto_tokens`, which is what its logged rate counts, plus its logged reference
    pass over both). Peak memory is the harness's wait4 rusage."""
    f = out_dir / "metrics.jsonl"
    if not f.exists():
        return None
    logs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    if p.recipe == "ppo":
        its = [r for r in logs if "rollout/seconds" in r]
        if not its:
            return None
        episodes = p.rollout_batch * len(its)
        tokens = sum(p.rollout_batch * (prompt_tokens + r["rollout/response_length"]) for r in its)
        return {"steps": len(its), "tokens": int(tokens), "units": episodes, "unit": "episodes",
                "wall_s": sum(r["rollout/seconds"] + r["train/seconds"] for r in its),
                "final_loss": its[-1].get("loss/policy_avg")}
    if p.recipe == "grpo":
        gens = [r for r in logs if "rollout/seconds" in r]
        if not gens:
            return None
        return {"steps": len(gens) * p.steps_per_generation, "units": p.rollout_batch * len(gens), "unit": "episodes",
                "tokens": int(sum(p.rollout_batch * (prompt_tokens + r["completions/mean_length"]) for r in gens)),
                "wall_s": sum(r["rollout/seconds"] + r["train/seconds"] for r in gens),
                "final_loss": gens[-1].get("loss"), "mean_reward": statistics.mean(r["reward"] for r in gens)}
    tps = [r["tokens_per_second"] for r in logs if r.get("tokens_per_second")]
    losses = [r for r in logs if "loss" in r and "tokens_per_second" in r]
    extra = {}
    if p.recipe == "kto":
        if not kto_tokens:
            return None
        expected_tokens = kto_tokens["tokens_rows"] + kto_tokens["tokens_kl"]
        extra = {"tokens_rows": kto_tokens["tokens_rows"], "tokens_kl": kto_tokens["tokens_kl"],
                 "final_kl": losses[-1].get("kl") if losses else None}
    if not tps or not losses or not expected_tokens:
        return None
    wall = expected_tokens / statistics.mean(tps)
    found = REF_PASS.search(log.read_text(errors="replace")) if log.exists() else None
    if found:
        wall += float(found.group(1))
    return {"steps": max(r.get("step", 0) for r in losses), "tokens": expected_tokens, "wall_s": wall,
            "final_loss": losses[-1]["loss"], **extra}


def posttrain_cmd(p: Plan, model: Path, rm: Path, data: Path, out: Path, max_length: int) -> list[str]:
    dtype = "bfloat16" if SIDES.device == "cuda" else "float32"
    common = [f"output_dir={out}", "seed=0", f"dtype={dtype}", f"max_length={max_length}",
              f"gradient_checkpointing={str(p.checkpointing).lower()}",
              f"learning_rate={p.lr}", "lr_scheduler=linear", "warmup_ratio=0", "weight_decay=0",
              "max_grad_norm=1.0", "resume=false", "logging.progress=false",
              f"logging.steps={log_every(p)}", "save.steps=0"]
    if p.recipe == "sft":
        return [*SIDES.posttrain, "sft", f"model={model}", f"data.train={data}", f"max_steps={p.steps}", "grad_accum=1",
                f"batch_size={p.batch_size}", "loss_on=completion", "packing=true", *common]
    if p.recipe == "rm":
        return [*SIDES.posttrain, "rm", f"model={rm}", f"data.train={data}", f"max_steps={p.steps}", "grad_accum=1",
                f"batch_size={p.batch_size}", "normalize=false", *common]
    if p.recipe in PAIRS:
        loss = {"dpo": ["beta=0.1", "loss_type=sigmoid"], "orpo": ["beta=0.1", "loss_type=orpo"],
                "simpo": ["beta=2.0", "loss_type=simpo", "simpo_gamma=0.5"]}[p.recipe]
        return [*SIDES.posttrain, "dpo", f"model={model}", f"data.train={data}", f"max_steps={p.steps}", "grad_accum=1",
                f"batch_size={p.batch_size}", *loss, *common]
    if p.recipe == "kto":  # the rows in file order (TRL's KTOTrainer must sample sequentially): the same rows a step
        return [*SIDES.posttrain, "kto", f"model={model}", f"data.train={data}", f"max_steps={p.steps}", "grad_accum=1",
                f"batch_size={p.batch_size}", "beta=0.1", "desirable_weight=1.0", "undesirable_weight=1.0",
                "data.shuffle=false", *common]
    if p.recipe == "grpo":  # beta 0, dapo, group scaling, epsilon 0.2, one iteration: TRL 1.16's GRPOConfig defaults
        return [*SIDES.posttrain, "grpo", f"model={model}", f"prompts={data}", "reward.task=arithmetic",
                f"rollout.batch_size={p.rollout_batch}", f"num_generations={p.num_generations}",
                f"steps_per_generation={p.steps_per_generation}", f"batch_size={p.batch_size}",
                f"total_episodes={p.batch_size * p.steps}", f"rollout.max_new_tokens={p.response_length}",
                "rollout.temperature=1.0", "beta=0", "loss_type=dapo", "scale_rewards=group", "epsilon=0.2",
                "num_iterations=1", *common]
    mini = p.rollout_batch // p.mini_batches
    return [*SIDES.posttrain, "ppo", f"model={model}", f"prompts={data}", f"reward.model={rm}", "critic_init=reward",
            f"rollout.batch_size={p.rollout_batch}", f"mini_batch_size={mini}", f"batch_size={mini}",
            f"ppo_epochs={p.ppo_epochs}", f"total_episodes={p.rollout_batch * p.steps}",
            f"rollout.max_new_tokens={p.response_length}", "rollout.temperature=1.0", "kl_coef=0.05",
            "kl_estimator=k1", "vf_coef=0.1", "clip_range=0.2", "value_clip=0.2", "gamma=1.0", "lam=0.95",
            "missing_eos_penalty=-1.0", "advantage_estimator=gae", "whiten_rewards=false", *common]


def peer_cmd(p: Plan, model: Path, rm: Path, data: Path, out: Path, max_length: int, threads: int) -> list[str]:
    script = PEERS[p.recipe][1]
    cmd = [SIDES.peer_python[p.recipe], str(script), "--model", str(rm if p.recipe == "rm" else model),
           "--data", str(data), "--out", str(out), "--max-length", str(max_length), "--steps", str(p.steps),
           "--lr", str(p.lr), "--threads", str(threads), "--seed", "0", "--log-every", str(log_every(p)),
           "--device", SIDES.device]
    if p.recipe == "grpo":
        cmd += ["--num-generations", str(p.num_generations), "--generation-batch", str(p.rollout_batch),
                "--steps-per-generation", str(p.steps_per_generation), "--batch-size", str(p.batch_size),
                "--response-length", str(p.response_length), "--gradient-checkpointing", "off"]
    elif p.recipe == "ppo":
        cmd += ["--reward-model", str(rm), "--rollout-batch", str(p.rollout_batch), "--mini-batches",
                str(p.mini_batches), "--ppo-epochs", str(p.ppo_epochs), "--response-length", str(p.response_length)]
    else:
        cmd += ["--batch-size", str(p.batch_size), "--gradient-checkpointing", "on" if p.checkpointing else "off"]
    if p.recipe in ("dpo", "orpo"):
        cmd += ["--beta", "0.1"]
    if p.recipe == "simpo":
        cmd += ["--beta", "2.0", "--simpo-gamma", "0.5"]
    if p.recipe == "kto":
        cmd += ["--beta", "0.1", "--desirable-weight", "1.0", "--undesirable-weight", "1.0"]
    return cmd


def log_every(p: Plan) -> int:
    return 1 if p.recipe in ONLINE else min(10, p.steps)


# --------------------------------------------------------------------------- numbers


def flops_per_token(p: Plan, params: dict[str, int]) -> float:
    """Model FLOPs per counted token: 6N for a training pass (forward 2N + backward 4N), 2N forward-only.

    DPO: policy trained (6N) + reference forward (2N). PPO, per prompt+response token of an episode:
    sampling 2N_pi, reference 2N_pi, reward 2N_rm, old values 2N_v, then each PPO epoch trains policy
    and value (6(N_pi + N_v)). Both sides are charged the same, so a side that skips a pass scores
    higher, as it should.
    """
    n = params["policy"]
    if p.recipe == "sft":
        return 6 * n
    if p.recipe == "rm":
        return 6 * params["rm"]
    if p.recipe == "dpo":
        return 8 * n
    if p.recipe in PAIRS:  # reference-free: the policy's pass only
        return 6 * n
    if p.recipe == "kto":
        # per row token: trained policy 6N + reference 2N; per mismatched-pair token: policy 2N (no grad) + reference
        # 2N. Counted tokens are rows + pairs, about half each (the pairs re-use the rows' prompts and completions):
        # (8N + 4N) / 2 = 6N a counted token, the same charge to both sides
        return 6 * n
    if p.recipe == "grpo":  # sampling 2N, one training pass 6N (beta 0: no reference; on-policy old log-probs)
        return 2 * n + 6 * n
    v = params["rm"]
    return 2 * n + 2 * n + 2 * v + 2 * v + p.ppo_epochs * 6 * (n + v)


def summarize(runs: list[Run], p: Plan, fpt: float, peak: float) -> dict | None:
    good = [r for r in runs if r.ok]
    if not good:
        return None
    med = statistics.median

    def m(key, fn=lambda r, k: r.result.get(k)):
        vals = [fn(r, key) for r in good if fn(r, key) is not None]
        return med(vals) if vals else None

    steps = good[0].result.get("steps")
    units = good[0].result.get("units") or (p.rollout_batch if p.recipe == "ppo" else p.batch_size) * (steps or 0)
    wall = m("wall_s")
    tokens = m("tokens")
    s = {
        "n": len(good), "steps": steps, "tokens": tokens, "units": units, "wall_s": wall,
        "wall_per_step_ms": 1000 * wall / steps if wall and steps else None,
        "tokens_per_s": m(None, lambda r, k: r.result["tokens"] / r.result["wall_s"] if r.result.get("wall_s") else None),
        "units_per_s": m(None, lambda r, k: units / r.result["wall_s"] if r.result.get("wall_s") else None),
        "rss_mb": m(None, lambda r, k: r.rss_mb),
        "self_rss_mb": m("peak_rss_mb"),
        "gpu_mb": m("peak_gpu_mb"),
        "final_loss": m("final_loss"),
        "process_s": m(None, lambda r, k: r.process_s),
        "spread": (min(r.result["wall_s"] for r in good), max(r.result["wall_s"] for r in good)),
    }
    s["mfu"] = s["tokens_per_s"] * fpt / peak if s["tokens_per_s"] else None
    return s


def same_work_kto(a: dict, b: dict, kto: dict, trailing: tuple[int, bool]) -> tuple[bool, str]:
    """KTO: steps and rows equal; tokens = the rows + their mismatched pairs, each part checked apart.

    ``kto``: the harness's template count of the rows (``rows_template``) and of TRL's mismatched pairs
    (``kl_peer_expected``, `kto_peer_kl_tokens`), each side's own two parts (``pt_rows``/``pt_kl``: posttrain's
    count with its own functions; ``peer_rows``/``peer_kl``: what the peer's batches held)."""
    if a["steps"] != b["steps"] or a["units"] != b["units"]:
        return False, f"steps / rows differ: posttrain {a['steps']} / {a['units']} vs peer {b['steps']} / {b['units']}"
    n_seqs, newline_after_eot = trailing
    notes, ok = [], True
    if kto["peer_rows"] != kto["rows_template"] or kto["peer_kl"] != kto["kl_peer_expected"]:
        ok = False
        notes.append(f"the peer's tokens are not the harness's count of its batches (rows {kto['peer_rows']} vs "
                     f"{kto['rows_template']}, mismatched pairs {kto['peer_kl']} vs {kto['kl_peer_expected']})")
    rows_d = kto["peer_rows"] - kto["pt_rows"]
    if not (newline_after_eot and rows_d == n_seqs):
        ok = False
        notes.append(f"the rows' tokens differ by {rows_d}, not by the one newline token a row ({n_seqs})")
    kl_d = kto["peer_kl"] - kto["pt_kl"]
    # the newline (one token a row and one a pair) is explained; what is left must be within the tolerance
    rest = abs(kl_d - n_seqs) / max(1, b["tokens"])
    ok = ok and rest <= TOKEN_TOLERANCE
    msg = (f"same steps ({a['steps']}) and rows ({a['units']}); tokens = the rows + their mismatched (KL) pairs, "
           f"posttrain {a['tokens']:.0f} ({kto['pt_rows']} + {kto['pt_kl']}) vs peer {b['tokens']:.0f} "
           f"({kto['peer_rows']} + {kto['peer_kl']}), {100 * (a['tokens'] - b['tokens']) / max(1, b['tokens']):+.2f}%; "
           f"less the newline explained below, {100 * rest:.2f}% ({'within' if rest <= TOKEN_TOLERANCE else 'OUTSIDE'} "
           f"the {100 * TOKEN_TOLERANCE:.0f}% allowed). "
           f"Rows: the peer's count equals the harness's count of the rows under the template ({kto['rows_template']}), "
           f"posttrain's is exactly one token a row fewer ({n_seqs} rows): the template's newline after the "
           "end-of-turn token, which posttrain does not train on. Mismatched pairs (the same number on both sides, "
           f"one a row): {kl_d} tokens fewer on posttrain's side, {n_seqs} of them that newline again, the other "
           f"{kl_d - n_seqs:+d} from which completion each prompt is paired with (TRL: the previous row's within "
           "its batch, a rotation, so its pairs hold exactly the batch's completions, "
           f"{kto['kl_peer_expected']} by the harness's count; posttrain: a seeded shuffle over all rows, skipping a "
           "completion of the same prompt, fixed before training and counted with posttrain's own functions)")
    if notes:
        msg += "; **" + "; ".join(notes) + "**"
    return ok, msg


def same_work(p: Plan, a: dict, b: dict, expected: int | None, trailing: tuple[int, bool] = (0, False)) -> tuple[bool, str]:
    """Steps equal; tokens equal or within TOKEN_TOLERANCE (PPO: episodes equal, tokens are sampled).

    `trailing` = (sequences, verified) from `after_end_of_turn`: when verified and posttrain's count is exactly
    the peer's minus one token per sequence, the difference is explained and the work is the same."""
    if a["steps"] != b["steps"]:
        return False, f"steps differ: posttrain {a['steps']} vs peer {b['steps']}"
    if a["units"] != b["units"]:
        return False, f"{UNIT[p.recipe]} differ: posttrain {a['units']} vs peer {b['units']}"
    if a["tokens"] is None or b["tokens"] is None:
        return False, "a side reported no token count"
    d = a["tokens"] - b["tokens"]
    rel = abs(d) / max(1, b["tokens"])
    if p.recipe in ONLINE:
        return True, (f"same steps ({a['steps']}) and episodes ({a['units']}); tokens are sampled, so they differ "
                      f"by design: posttrain {a['tokens']:.0f} vs peer {b['tokens']:.0f} ({100 * d / max(1, b['tokens']):+.1f}%)")
    n_seqs, newline_after_eot = trailing
    if p.recipe in ("orpo", "simpo") and expected and a["tokens"] == expected and b["tokens"] - a["tokens"] == n_seqs:
        return True, (f"same steps ({a['steps']}) and {UNIT[p.recipe]} ({a['units']}); posttrain {a['tokens']:.0f} "
                      f"non-pad tokens (the harness's count of the rows) vs peer {b['tokens']:.0f}: exactly one token "
                      f"per sequence more on the peer's side ({n_seqs} sequences), the EOS that TRL's ORPO / CPO "
                      "tokenize_row appends to every completion not already ending with it (the chat template ends "
                      "the turn with its own end-of-turn token): the peer does slightly more work")
    if newline_after_eot and b["tokens"] - a["tokens"] == n_seqs and (not expected or b["tokens"] == expected):
        return True, (f"same steps ({a['steps']}) and {UNIT[p.recipe]} ({a['units']}); posttrain {a['tokens']:.0f} vs "
                      f"peer {b['tokens']:.0f} non-pad tokens: exactly one token per sequence fewer ({n_seqs} sequences): "
                      "the template's newline after the end-of-turn token, which posttrain does not train on "
                      "(verified by the harness: every sequence ends end-of-turn + one newline token under the template, "
                      f"and the peer's count equals the harness's count of the rows{f' ({expected})' if expected else ''})")
    if expected:
        ok, msg = same_work(p, a, b, None)
        return ok, msg + (f"; the rows hold {expected} tokens by the harness's own count "
                          f"(posttrain {100 * (a['tokens'] - expected) / expected:+.2f}%, "
                          f"peer {100 * (b['tokens'] - expected) / expected:+.2f}%)")
    if d == 0:
        return True, f"same steps ({a['steps']}), same {UNIT[p.recipe]} ({a['units']}), token counts equal ({a['tokens']:.0f})"
    verdict = rel <= TOKEN_TOLERANCE
    return verdict, (f"same steps ({a['steps']}) and {UNIT[p.recipe]} ({a['units']}); non-pad tokens posttrain "
                     f"{a['tokens']:.0f} vs peer {b['tokens']:.0f} ({100 * d / b['tokens']:+.2f}%, "
                     f"{'within' if verdict else 'OUTSIDE'} the {100 * TOKEN_TOLERANCE:.0f}% allowed for template/EOS handling)")


# --------------------------------------------------------------------------- report


def fmt(x, spec=".3g", none="-"):
    if x is None:
        return none
    return format(x, spec)


def table(p: Plan, pt: dict | None, peer: dict | None, peer_name: str) -> list[str]:
    unit_s = f"{UNIT[p.recipe]}/s"
    gpu = SIDES.device == "cuda"
    head = ["side", "steps", "tokens", "wall/step ms", "tokens/s", unit_s, "peak RSS MB", *(["peak GPU MB"] if gpu else []),
            "final loss", "MFU", "process s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, s):
        if s is None:
            return f"| {name} | " + " | ".join(["n/a"] * (len(head) - 1)) + " |"
        return (f"| {name} | {s['steps']} | {fmt(s['tokens'], '.0f')} | {fmt(s['wall_per_step_ms'], '.1f')} | "
                f"{fmt(s['tokens_per_s'], '.0f')} | {fmt(s['units_per_s'], '.2f')} | {fmt(s['rss_mb'], '.0f')} | "
                + (f"{fmt(s['gpu_mb'], '.0f')} | " if gpu else "") +
                f"{fmt(s['final_loss'], '.4f')} | {fmt(100 * s['mfu'] if s['mfu'] else None, '.2f')}% | "
                f"{fmt(s['process_s'], '.1f')} |")

    lines.append(row("posttrain", pt))
    lines.append(row(peer_name, peer))
    if pt and peer:
        def ratio(k):
            return pt[k] / peer[k] if pt.get(k) and peer.get(k) else None
        lines.append(f"| posttrain / peer | | | {fmt(ratio('wall_per_step_ms'), '.2f')}x | {fmt(ratio('tokens_per_s'), '.2f')}x | "
                     f"{fmt(ratio('units_per_s'), '.2f')}x | {fmt(ratio('rss_mb'), '.2f')}x | "
                     + (f"{fmt(ratio('gpu_mb'), '.2f')}x | " if gpu else "") + f"| | {fmt(ratio('process_s'), '.2f')}x |")
    return lines


def targets(p: Plan, pt: dict | None, peer: dict | None) -> list[str]:
    if not pt or not peer:
        return []
    out = []
    if p.recipe in TARGETS:
        what, need = TARGETS[p.recipe]
        key = "tokens_per_s" if what == "tokens/s" else "units_per_s"
        got = pt[key] / peer[key]
        if got >= need:
            out.append(f"- speed target ({what} >= {need}x the peer): **met**, {got:.2f}x")
        else:
            out.append(f"- speed target ({what} >= {need}x the peer): **missed**, {got:.2f}x "
                       f"(needs {need / got:.2f}x more; {100 * (1 - got / need):.0f}% short)")
    # on a GPU the memory that limits a run is the GPU's: judged on the allocator's peak, RSS stays in the table
    key, what = ("gpu_mb", "peak GPU memory") if pt.get("gpu_mb") and peer.get("gpu_mb") else ("rss_mb", "peak RSS")
    mem = pt[key] / peer[key]
    if mem <= 1.0:
        out.append(f"- memory target ({what} <= the peer's): **met**, {mem:.2f}x ({pt[key]:.0f} vs {peer[key]:.0f} MB)")
    else:
        out.append(f"- memory target ({what} <= the peer's): **missed** by {pt[key] - peer[key]:.1f} MB "
                   f"({mem:.2f}x)")
    return out


def profile(cmd: list[str], env: dict, out: Path, timeout: int) -> str:
    """One more posttrain run under cProfile: the top functions by own time (imports included), then posttrain's
    own functions by cumulative time (where the training loop's time goes)."""
    import pstats

    prof = out / "posttrain.prof"
    pcmd = [SIDES.python, "-m", "cProfile", "-o", str(prof), "-m", "posttrain", *cmd[len(SIDES.posttrain):]]
    code, _, _ = run_child(pcmd, env, timeout, out / "profile.log")
    if code != 0 or not prof.exists():
        return f"profile run failed (exit {code}); see {out / 'profile.log'}"
    import io

    buf = io.StringIO()
    pstats.Stats(str(prof), stream=buf).sort_stats("tottime").print_stats(15)
    text = buf.getvalue()
    start = text.find("   ncalls")
    own = text[start:] if start >= 0 else text
    buf = io.StringIO()
    pstats.Stats(str(prof), stream=buf).sort_stats("cumtime").print_stats(r"src/posttrain/(recipes|engine|models|losses|rollout|rewards|data)/", 15)
    text = buf.getvalue()
    start = text.find("   ncalls")
    return own.rstrip() + "\n\nposttrain functions by cumulative time:\n" + (text[start:] if start >= 0 else text)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny scale, few steps, 1 repeat")
    ap.add_argument("--only", default=",".join(RECIPES), help=f"recipes, comma-separated ({','.join(RECIPES)})")
    ap.add_argument("--scales", default="", help="tiny,small,long,base (default: tiny,small,long; --quick: tiny)")
    ap.add_argument("--repeats", type=int, default=0, help="runs per side and case; medians reported (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch / OpenMP threads for both sides")
    ap.add_argument("--data", choices=["auto", "task", "synthetic"], default="auto",
                    help="auto: SFT on bench/data.py's mixed-length chat rows (the SFT target's condition), RM/DPO/PPO "
                         "on `posttrain task arithmetic` rows when available; task / synthetic: one source for all")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--profile", action="store_true", help="where a target is missed, profile one more posttrain run (cProfile)")
    ap.add_argument("--no-setup", action="store_true", help="do not run bench/setup_peers.sh")
    ap.add_argument("--work", default=str(BENCH / "work"))
    ap.add_argument("--out", default=str(BENCH / "results.md"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: both sides on the GPU in bfloat16, peak GPU memory and the bf16 matmul peak reported")
    ap.add_argument("--python", default="", help="interpreter for both sides instead of the venvs: posttrain runs as "
                                                 "`PY -m posttrain` (posttrain importable from PYTHONPATH)")
    ap.add_argument("--peer-path", default="", help="with --python: folder in front of PYTHONPATH for the SFT/RM/DPO peers")
    ap.add_argument("--ppo-peer-path", default="", help="with --python: folder in front of PYTHONPATH for the PPO peer")
    ap.add_argument("--budget", type=float, default=0, help="seconds: start no new case after this much of the run "
                                                           "(skipped cases are listed; 0 = no limit)")
    a = ap.parse_args(argv)
    SIDES.device = a.device
    if a.python:
        SIDES.posttrain, SIDES.python = [a.python, "-m", "posttrain"], a.python
        SIDES.peer_python = {r: a.python for r in RECIPES}
        SIDES.peer_path = {r: a.ppo_peer_path if r == "ppo" else a.peer_path for r in RECIPES}
    only = [r.strip() for r in a.only.split(",") if r.strip()]
    bad = [r for r in only if r not in RECIPES]
    if bad:
        ap.error(f"unknown recipe(s) {bad}; choose from {RECIPES}")
    scales = [s.strip() for s in (a.scales or ("tiny" if a.quick else "tiny,small,long")).split(",") if s.strip()]
    bad = [s for s in scales if s not in ("tiny", "small", "long", "base")]
    if bad:
        ap.error(f"unknown scale(s) {bad}; choose from tiny, small, long, base (~120M, for a GPU)")
    repeats = a.repeats or (1 if a.quick else 3)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    notes: list[str] = []

    if not a.no_setup:
        print("+ bash bench/setup_peers.sh", flush=True)
        r = subprocess.run(["bash", str(BENCH / "setup_peers.sh")], cwd=ROOT)
        if r.returncode != 0:
            notes.append(f"bench/setup_peers.sh failed (exit {r.returncode}); peers that are not installed show n/a")
    info = machine_info()
    if a.device == "cuda" and not info["gpu"]:
        ap.error("--device cuda: torch sees no CUDA device")
    peak = matmul_peak(a.threads, device=a.device)
    print(f"matmul peak {'bf16 8192^3 on ' + info['gpu'] if a.device == 'cuda' else f'float32, {a.threads} threads'}: "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    versions = peer_versions()

    from transformers import AutoTokenizer

    all_plans = plans(a.quick, only, scales, a.device)
    avail = {r: posttrain_has(r) for r in only}
    sections: list[str] = []
    commands: list[str] = []
    try:  # cases of earlier runs stay, this run's replace theirs
        raw: dict = json.loads((work / "raw.json").read_text())
    except (OSError, ValueError):
        raw = {}
    t_start = time.perf_counter()
    for n_done, p in enumerate(all_plans):
        key = f"{p.recipe}-{p.scale}"
        if a.budget and time.perf_counter() - t_start > a.budget:
            left = ", ".join(f"{q.recipe}-{q.scale}" for q in all_plans[n_done:])
            notes.append(f"**not run** (the --budget of {a.budget:.0f}s was spent): {left}")
            print(f"budget spent: skipping {left}", flush=True)
            break
        print(f"== {key}", flush=True)
        case = work / key
        case.mkdir(parents=True, exist_ok=True)
        long_case = p.scale == "long"
        model = build_model(work / (f"model-{p.model_size}" + ("-long" if long_case else "")), p.model_size,
                            2048 + 64 if long_case else 0, notes)
        rm = build_rm_init(model, work / (model.name + "-rm"))
        tok = AutoTokenizer.from_pretrained(model)
        n_rows = {"ppo": p.rollout_batch * p.steps, "grpo": p.batch_size * p.steps // p.num_generations}.get(
            p.recipe, p.batch_size * p.steps)
        kind = {"sft": "sft", "ppo": "prompts", "grpo": "prompts", "kto": "kto"}.get(p.recipe, "prefs")
        if p.scale == "long":
            rows = long_rows(tok, n_rows)
            notes.append(f"long case: bench/data.py rows of 1000-2000 tokens ({len(rows)} rows)")
        else:
            use_task = a.data == "task" or (a.data == "auto" and p.recipe != "sft")
            src = task_rows(work / "task", max(n_rows, 256), notes) if use_task else None
            if src is None:
                notes.append(f"{p.recipe}: bench/data.py mixed-length rows ({p.rows_words[0]}-{p.rows_words[1]} words a turn)")
            pool = src or bench_data.make_rows(max(n_rows, 256), 0, *p.rows_words)
            rows = kto_rows(pool["prefs"], n_rows) if kind == "kto" else take(pool[kind], n_rows)
        data_file = bench_data.write_jsonl(case / f"{kind}.jsonl", rows)
        lens = token_lengths(tok, kind, rows)
        # non-pad tokens both sides must process (PPO: sampled, so none expected)
        expected_tokens = sum(lens) if p.recipe not in ONLINE else None
        max_length = round_up(max(lens) + 8, 64)
        if p.recipe in ONLINE:
            max_length = round_up(max(lens) + p.response_length + 8, 64)
        kto_counts: dict = {}
        if p.recipe == "kto":  # room for any prompt with any completion: no mismatched pair is cut on either side
            plen = token_lengths(tok, "prompts", [{"prompt": r["prompt"]} for r in rows])
            max_length = round_up(max(plen) + max(n - q for n, q in zip(lens, plen)) + 8, 64)
            kto_counts = {"rows_template": sum(lens), "kl_peer_expected": kto_peer_kl_tokens(tok, rows, p.batch_size)}
        params = {"policy": count_params(model), "rm": count_params(rm, "seq")}
        fpt = flops_per_token(p, params)
        peer_json = case / "peer.json"
        pcmd = posttrain_cmd(p, model, rm, data_file, case / "posttrain-out", max_length)
        qcmd = peer_cmd(p, model, rm, data_file, peer_json, max_length, a.threads)
        env = child_env(a.threads, peer=p.recipe)
        pt_env = child_env(a.threads)
        prompt_tokens = statistics.mean(lens)
        commands += [f"# {key}", f"OMP_NUM_THREADS={a.threads} " + shlex.join(pcmd),
                     f"OMP_NUM_THREADS={a.threads} " + shlex.join(qcmd)]
        have_pt, why_pt = avail[p.recipe]
        peer_py = Path(SIDES.peer_python[p.recipe])
        peer_py = peer_py if peer_py.exists() else Path(shutil.which(str(peer_py)) or peer_py)
        pt_runs: list[Run] = []
        peer_runs: list[Run] = []
        pt_kto = posttrain_kto_tokens(model, data_file, max_length) if p.recipe == "kto" and have_pt else None
        for i in range(repeats):
            if have_pt:
                shutil.rmtree(case / "posttrain-out", ignore_errors=True)
                pt_log = case / f"posttrain-{i}.log"
                r = measure(pcmd, None, pt_env, a.timeout, pt_log,
                            lambda: posttrain_result(case / "posttrain-out", pt_log, p, expected_tokens, prompt_tokens,
                                                     pt_kto))
                pt_runs.append(r)
                print(f"  posttrain #{i}: " + (f"wall {r.result.get('wall_s', 0):.2f}s rss {r.rss_mb:.0f}MB" if r.ok else r.error.splitlines()[0]), flush=True)
            if peer_py.exists():
                r = measure(qcmd, peer_json, env, a.timeout, case / f"peer-{i}.log")
                peer_runs.append(r)
                print(f"  peer      #{i}: " + (f"wall {r.result.get('wall_s', 0):.2f}s rss {r.rss_mb:.0f}MB" if r.ok else r.error.splitlines()[0]), flush=True)
        pt = summarize(pt_runs, p, fpt, peak)
        peer = summarize(peer_runs, p, fpt, peak)
        peer_name = "TRL " + (versions["peers-ppo"] if p.recipe == "ppo" else versions["peers"]).split(" ")[0]
        sec = [f"### {p.recipe.upper()} — {p.scale} (model `{p.model_size}`, {params['policy'] / 1e6:.2f}M params)", ""]
        if p.recipe == "ppo":
            sec.append(f"Work: {p.steps} PPO iterations x {p.rollout_batch} episodes, response length {p.response_length}, "
                       f"{p.ppo_epochs} PPO epochs x {p.mini_batches} minibatches, lr {p.lr}, max_length {max_length}. "
                       "Gradient checkpointing: off for both sides (TRL's PPOTrainer never turns it on).")
        elif p.recipe == "grpo":
            sec.append(f"Work: {p.steps // p.steps_per_generation} generations x {p.rollout_batch} episodes "
                       f"({p.rollout_batch // p.num_generations} prompts x {p.num_generations} completions), completion "
                       f"length {p.response_length}, {p.steps_per_generation} optimizer steps of {p.batch_size} "
                       f"completions a generation ({p.steps} steps), lr {p.lr}, max_length {max_length}; beta 0 (no "
                       "reference model on either side), loss_type dapo, scale_rewards group, epsilon 0.2, one "
                       "iteration, temperature 1, the arithmetic verifier as the reward. TRL generates with "
                       "`generate` (KV cache), no vLLM. Gradient checkpointing: off for both sides.")
        else:
            sec.append(f"Work: {p.steps} steps x batch {p.batch_size} ({UNIT[p.recipe]}), max_length {max_length}, lr {p.lr}; "
                       f"row lengths (tokens) min {min(lens)} / median {statistics.median(lens):.0f} / max {max(lens)}.")
            if p.recipe == "kto":
                sec.append("Unpaired rows `{prompt, completion, label}` (each arithmetic pair's chosen completion once, "
                           "label true, and its rejected one once, false: half desirable, in the order d_0, u_h, d_1, "
                           "u_(h+1), ...), beta 0.1, desirable / undesirable weights 1.0, loss_type kto. Both sides take "
                           "the rows in file order (TRL's KTOTrainer requires sequential sampling; posttrain "
                           "`data.shuffle=false`), so each step holds the same rows. Each row also has a mismatched "
                           "pair (its prompt with another row's completion) whose log-ratio under policy and reference "
                           "gives the KL reference point z0: TRL runs the policy (no grad) and the reference over the "
                           "pairs and the reference over the rows inside every step (`precompute_ref_log_probs=False`, "
                           "its default, a second model); posttrain runs the reference over rows and pairs once before "
                           "training (its log's time is added to its loop) and the policy over the pairs before each "
                           "step. max_length leaves room for any prompt with any completion, so no pair is cut.")
            if p.recipe == "sft":
                sec.append("posttrain runs its recommended setting `packing=true`: each batch's sequences in one row with no "
                           "padding and causal attention per sequence (padding-free; the same loss as the padded batch). "
                           "TRL pads each batch to its longest row (its padding-free mode needs flash-attention, absent on "
                           "a CPU). The non-pad tokens, i.e. the work, are the same: checked below.")
            sec.append("Gradient checkpointing: **on** for both sides (each keeps only the layers' inputs and recomputes "
                       "every layer in the backward pass; TRL 1.16's default, and what ~30M-parameter activations call "
                       "for)." if p.checkpointing else "Gradient checkpointing: **off** for both sides (TRL 1.16 defaults "
                       "to on; the peer runs with `gradient_checkpointing=False` here, so neither side recomputes).")
        sec.append("")
        if not have_pt:
            sec.append(f"**posttrain side not available**: {why_pt}" + "\n")
        elif not pt:
            sec.append("**posttrain side failed**:\n\n```\n" + pt_runs[-1].error[-1500:] + "\n```" + "\n")
        if not peer_py.exists():
            sec.append(f"**peer side not available**: {peer_py} missing (bench/setup_peers.sh)" + "\n")
        elif not peer:
            sec.append("**peer side failed**:\n\n```\n" + peer_runs[-1].error[-1500:] + "\n```" + "\n")
        sec += table(p, pt, peer, peer_name)
        sec.append("")
        if pt and peer:
            if p.recipe == "kto" and pt_kto:
                pr = next(r.result for r in peer_runs if r.ok)
                kto_counts.update(pt_rows=pt_kto["tokens_rows"], pt_kl=pt_kto["tokens_kl"],
                                  peer_rows=pr.get("tokens_rows"), peer_kl=pr.get("tokens_kl"))
                ok, msg = same_work_kto(pt, peer, kto_counts, after_end_of_turn(tok, kind, rows))
            else:
                ok, msg = same_work(p, pt, peer, expected_tokens, after_end_of_turn(tok, kind, rows))
            sec.append("- posttrain is measured from outside (`posttrain_result`): loop time from its metrics.jsonl "
                       "(PPO: logged rollout + train seconds; else the harness's token count / mean logged "
                       "`tokens_per_second`, + DPO's / KTO's logged reference pass), memory from the process rusage")
            sec.append(f"- same work: {'yes' if ok else '**NO — the comparison below is not valid**'}: {msg}")
            sec += targets(p, pt, peer)
            missed = any("**missed**" in line for line in targets(p, pt, peer))
            if missed and a.profile:
                sec += ["", "Profile of one more posttrain run (cProfile; top 15 by own time, then posttrain's functions "
                        "by cumulative time):", "", "```",
                        profile(pcmd, pt_env, case, a.timeout), "```"]
            elif missed:
                sec.append("- where missed: rerun with `--profile` for a cProfile of the posttrain run, "
                           "or `py-spy record -o prof.svg -- <the posttrain command above>`")
        for name, s in (("posttrain", pt), ("peer", peer)):
            if s and s["n"] > 1:
                sec.append(f"- {name}: {s['n']} runs, training-loop wall min {s['spread'][0]:.2f}s / max {s['spread'][1]:.2f}s")
        sections += sec + [""]
        raw[key] = {"plan": p.__dict__, "params": params, "flops_per_token": fpt, "max_length": max_length,
                    "posttrain": [r.__dict__ for r in pt_runs], "peer": [r.__dict__ for r in peer_runs],
                    "posttrain_cmd": pcmd, "peer_cmd": qcmd, **({"kto_tokens": {**kto_counts, "posttrain": pt_kto}}
                                                                 if p.recipe == "kto" else {})}
        (work / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
        if a.budget:  # a time-boxed run may be killed: keep a report of the cases done so far
            info["loadavg_end"] = os.getloadavg()
            write_report(Path(a.out), started, info, peak, a, repeats, versions, notes, commands, sections)

    info["loadavg_end"] = os.getloadavg()
    write_report(Path(a.out), started, info, peak, a, repeats, versions, notes, commands, sections)
    print(f"wrote {a.out}")
    return 0


def write_report(out: Path, started, info, peak, a, repeats, versions, notes, commands, sections) -> None:
    load = info["loadavg_start"], info["loadavg_end"]
    busy = max(load[0][0], load[1][0]) > info["cores"] * 0.75 + 0.5
    lines = [
        "# posttrain vs peers", "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Invocation: `{a.python or '.venv/bin/python'} bench/run.py {' '.join(sys.argv[1:])}`", "",
        "## Machine", "",
        *([f"- GPU: {info['gpu']} (CUDA {info['cuda']}), both sides on it in bfloat16 (weights in bf16, bf16 autocast)"]
          if a.device == "cuda" else []),
        f"- CPU: {info['cpu_model']}, {info['cores']} cores available ({info['logical_cpus']} logical CPUs)",
        f"- torch {info['torch']} (posttrain side), Python {info['python']}, {info['platform']}",
        f"- peers: TRL/transformers/torch `{versions['peers']}` (SFT, RM, DPO); `{versions['peers-ppo']}` (PPO)",
        f"- threads for both sides: {a.threads} (`torch.set_num_threads` in the peers, `OMP_NUM_THREADS` for both)",
        (f"- bf16 matmul peak (8192x8192x8192 `torch.mm`, mean of 10 after 3 warm-ups): {peak / 1e12:.1f} TFLOP/s"
         if a.device == "cuda" else f"- float32 matmul peak (2048x2048 `torch.mm`, best of 5): {peak / 1e9:.1f} GFLOP/s"),
        f"- load average at start {load[0][0]:.2f}, at end {load[1][0]:.2f}"
        + (" — **the machine was busy with other work; absolute numbers are noisy, the ratios less so**" if busy else ""),
        f"- repeats per side: {repeats}, medians reported; the two sides alternate run by run", "",
        "## How to read", "",
        "wall/step and tokens/s are over the training loop only (first step start to last step end); "
        "`process s` is the whole command (imports, tokenization, model loading, saving). Peak RSS is the "
        "child's `ru_maxrss` from `os.wait4` (the kernel's high-water mark, as `/usr/bin/time -v` reports). "
        + ("Peak GPU MB is `torch.cuda.max_memory_allocated` inside each side's process (the caching allocator's "
           "high-water mark of allocated bytes); the memory target is judged on it. Both loop ends wait for the GPU "
           "(`torch.cuda.synchronize`). " if a.device == "cuda" else "") +
        "MFU = achieved model FLOP/s / the matmul peak above (FLOPs per token: SFT/RM 6N, DPO 8N, ORPO/SimPO 6N, "
        "KTO 6N over rows + mismatched pairs, "
        "PPO 2N sample + 2N ref + 2N reward + 2N value + epochs x 6(N+N_value); GRPO 2N sample + 6N train). Final loss "
        "is the last logged "
        "value (TRL logs the mean over its logging window). Ratios are posttrain / peer: above 1 is better "
        "for throughput, below 1 better for wall/step and memory.", "",
        "## Inputs", "",
        *[f"- {n}" for n in dict.fromkeys(notes)], "",
        "## Results", "",
        *sections,
        "## Exact commands", "",
        "```", *commands, "```", "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
