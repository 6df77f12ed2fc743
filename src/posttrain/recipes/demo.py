"""`posttrain demo`: SFT vs PPO vs DPO vs DPO-Iter on one task, evaluated and reported.

The pipeline of the seed (and of Xu et al. 2024, arXiv 2404.10719, Sec. 5 / Table 3) on the embedded default:

    tiny-model -> task -> SFT -> reward model (on the task's preference pairs)
    from the SFT model:  ppo-rm        PPO with the reward model
                         ppo-verifier  PPO with the task's verifier as the reward
                         dpo           offline DPO on the preference pairs
                         sft+dpo       SFT on the chosen responses, then DPO
                         dpo-iter      iterative online DPO, pairs labelled by the verifier
    -> `posttrain eval` of every model on the same 500 held-out prompts, KL measured to the SFT model
    -> the seed's SFT for classification: a new head on the sentiment task's labelled reviews, trained four ways
       (head only, top 2 blocks, all layers, LoRA; `CLASSIFY`)
    -> runs/demo/report.md: what was run, a "what this shows" section written from the numbers (each method
       against SFT, +- standard error, or "no verdict" where the evidence is degenerate), the claims table, the
       results table, the gold-vs-KL frontier, held-out gold during training, proxy-vs-gold for ppo-rm, training
       curves per method family, and wall time per stage (written by `posttrain.report.demo`).

`--seeds N` runs all of it once per seed into `seed-S/` folders (seed S of N is exactly `posttrain demo seed=S
output_dir=OUT/seed-S`, so seeds can also run apart, on other machines, and be reported together) and writes
`OUT/report.md` with the verdicts from the spread over seeds (`posttrain.report.evidence`); one seed (the default
and `--quick`) is indicative only, and its report says so.

Every stage is an ordinary posttrain command with a config file under `examples/demo/` (`examples/demo/sentiment/`
for `--task sentiment`, where the reward model is a sentiment classifier and gold is the task's rule-based
verifier); the demo prints each command as it runs it, so any stage can be rerun or changed on its own. Paths
(model, data, output) are given on the command line so the same files serve any `output_dir`; `--quick` adds
tiny step counts on the command line too.

Choices:
- Stages run in this process through `posttrain.cli.main`, not as subprocesses: with a sub-million-parameter
  model the import of torch + transformers (seconds per process) would be a large part of `--quick`'s two
  minutes, and each stage seeds everything from its own config, so the order of stages changes no result.
  The cost of sharing the process: a hard crash (not an exception) of one stage ends the demo.
- A stage is skipped when its output (`final/config.json`, `eval.json`, ...) exists and is newer than the outputs
  of the stages it reads, so a rerun after a failure continues from the stage that failed (which starts over
  from scratch); `--force` reruns everything. A stage that fails stops the demo with its error; what earlier
  stages wrote stays. SIGTERM or Ctrl-C stops the demo, not only its current stage: a training stage saves its
  checkpoint as it always does on a signal, then the demo exits naming the stage.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.cli import EXAMPLES
from posttrain.config import ConfigError, DemoConfig
from posttrain.engine.signals import StopSignal
from posttrain.errors import TrainingError
from posttrain.report.demo import METHODS, write_demo_report, write_seeds_report

TASKS = {"arithmetic": "demo", "sentiment": "demo/sentiment"}  # task -> config folder under examples/
# --quick: two PPO iterations of 8 episodes, a few DPO steps, two tiny online rounds, 16 evaluation prompts
PPO_QUICK = ["total_episodes=16", "rollout.batch_size=8", "mini_batch_size=8", "batch_size=8", "ppo_epochs=1",
             "eval_prompts=8", "eval_every=1"]
DPO_QUICK = ["max_steps=4", "batch_size=8", "data.max_rows=64"]
GRPO_ROWS = ["grpo", "dr_grpo", "dapo"]  # arithmetic only: `posttrain grpo examples/demo/NAME.yaml`
GRPO_QUICK = ["total_episodes=16", "rollout.batch_size=8", "num_generations=4", "steps_per_generation=1",
              "batch_size=8", "eval_prompts=8", "eval_every=1"]
KTO_QUICK = ["max_steps=4", "batch_size=16", "data.max_rows=64"]  # 16 rows = dpo's 8 pairs, unpaired


@dataclass
class Stage:
    name: str  # also the run folder under output_dir
    command: str  # the posttrain command
    config: str  # file name under the task's config folder
    args: list[str]  # key=value overrides: paths and seed
    output: str  # relative to output_dir: exists (and is fresh) => the stage is done
    needs: list[str] = field(default_factory=list)  # stages whose outputs this one reads
    quick: list[str] = field(default_factory=list)  # extra overrides under --quick


# --------------------------------------------------------------------------- the pipeline


def pipeline(task: str, out: Path) -> list[Stage]:
    """The stages, in order, for `task`, writing under `out`."""
    o = lambda *p: str(out.joinpath(*p))  # noqa: E731
    sft, data = o("sft", "final"), o("task")
    rm_cmd = ["sft", "rm.yaml"] if task == "sentiment" else ["rm", "rm.yaml"]
    reward_rm = [f"reward.model={o('rm', 'final')}"] + (["reward.label=positive"] if task == "sentiment" else [])
    rm_data = f"{data}/classify.jsonl" if task == "sentiment" else f"{data}/prefs.jsonl"
    stages = [
        Stage("tiny", "tiny-model", "tiny.yaml", [f"output_dir={o('tiny')}"], "tiny/config.json"),
        Stage("task", "task", "task.yaml", [f"output_dir={data}"], "task/eval.jsonl",
              quick=["n_train=400", "n_eval=40"]),
        Stage("sft", "sft", "sft.yaml", [f"model={o('tiny')}", f"data.train={data}/sft.jsonl", f"output_dir={o('sft')}"],
              "sft/final/config.json", ["tiny", "task"], ["max_steps=20"]),
        Stage("rm", rm_cmd[0], rm_cmd[1],
              [f"model={o('tiny') if task == 'sentiment' else sft}", f"data.train={rm_data}", f"output_dir={o('rm')}"],
              "rm/final/config.json", ["tiny" if task == "sentiment" else "sft", "task"],
              ["max_steps=6", "logging.eval_steps=6"]),
        Stage("ppo-rm", "ppo", "ppo_rm.yaml", [f"model={sft}", f"prompts={data}/prompts.jsonl", *reward_rm,
                                                f"output_dir={o('ppo-rm')}"],
              "ppo-rm/final/config.json", ["sft", "rm"], PPO_QUICK),
        Stage("ppo-verifier", "ppo", "ppo_verifier.yaml", [f"model={sft}", f"prompts={data}/prompts.jsonl",
                                                            f"output_dir={o('ppo-verifier')}"],
              "ppo-verifier/final/config.json", ["sft"], PPO_QUICK),
        Stage("dpo", "dpo", "dpo.yaml", [f"model={sft}", f"data.train={data}/prefs.jsonl", f"output_dir={o('dpo')}"],
              "dpo/final/config.json", ["sft"], DPO_QUICK),
        Stage("sft-chosen", "sft", "sft_chosen.yaml", [f"model={sft}", f"data.train={data}/prefs.jsonl",
                                                         f"output_dir={o('sft-chosen')}"],
              "sft-chosen/final/config.json", ["sft"], ["max_steps=4", "batch_size=8"]),
        Stage("sft+dpo", "dpo", "dpo.yaml", [f"model={o('sft-chosen', 'final')}", f"data.train={data}/prefs.jsonl",
                                              f"output_dir={o('sft+dpo')}"],
              "sft+dpo/final/config.json", ["sft-chosen"], DPO_QUICK),
        Stage("dpo-iter", "online-dpo", "dpo_iter.yaml", [f"model={sft}", f"prompts={data}/prompts.jsonl",
                                                           f"output_dir={o('dpo-iter')}"],
              "dpo-iter/final/config.json", ["sft"],
              ["rounds=2", "prompts_per_round=8", "samples_per_prompt=2", "batch_size=4", "eval_prompts=8"]),
        *[Stage(m, "kto" if m == "kto" else "dpo", f"{m}.yaml", [f"model={sft}", f"data.train={data}/prefs.jsonl",
                                                                  f"output_dir={o(m)}"],
                f"{m}/final/config.json", ["sft"], KTO_QUICK if m == "kto" else DPO_QUICK)
          for m in ("kto", "orpo", "simpo")],  # the preference family on dpo's pairs (kto: unpaired)
    ]
    grpo_rows = GRPO_ROWS if task == "arithmetic" else []
    stages += [Stage(name, "grpo", f"{name}.yaml", [f"model={sft}", f"prompts={data}/prompts.jsonl",
                                                   f"output_dir={o(name)}"], f"{name}/final/config.json", ["sft"],
                     GRPO_QUICK) for name in grpo_rows]
    for method in METHODS:
        if method not in GRPO_ROWS or method in grpo_rows:
            stages.append(eval_stage(method, method, out, sft, data, reward_rm))
    return stages + classification(out)


# the seed's transfer learning, four ways from the same backbone: variant -> overrides of examples/demo/classify.yaml
CLASSIFY = {"head": ["freeze.trainable_layers=0", "freeze.extra=[score]"], "top2": [],
            "all": ["freeze.trainable_layers=-1"], "lora": ["lora.r=8", "freeze.trainable_layers=-1"]}


def classification(out: Path) -> list[Stage]:
    """A new classification head on the sentiment task's labelled reviews: head only, top 2 blocks, all layers,
    LoRA; each run's held-out accuracy is its last `eval_accuracy` (metrics.jsonl)."""
    data = out / "classify" / "task"
    stages = [Stage("classify/task", "task", "sentiment/task.yaml", [f"output_dir={data}"], "classify/task/eval.jsonl",
                    quick=["n_train=400", "n_eval=40"])]
    for variant, keys in CLASSIFY.items():
        run = f"classify/{variant}"
        done = "adapter_config.json" if any(k.startswith("lora.r=") for k in keys) else "config.json"  # LoRA: PEFT's
        stages.append(Stage(run, "sft", "classify.yaml", [f"model={out / 'tiny'}", f"data.train={data}/classify.jsonl",
                                                          f"output_dir={out / run}", *keys],
                            f"{run}/final/{done}", ["tiny", "classify/task"], ["max_steps=10", "logging.eval_steps=10"]))
    return stages


def eval_stage(name: str, run: str, out: Path, ref: str, data: str, reward: list[str]) -> Stage:
    """`posttrain eval` of run `run`'s final model, written to `run/eval.json` (where `posttrain report` reads it)."""
    return Stage(f"eval {name}", "eval", "eval.yaml",
                 [str(out / run / "final"), f"prompts={data}/eval.jsonl", f"ref_model={ref}", *reward,
                  f"output={out / run / 'eval.json'}"],
                 f"{run}/eval.json", [run, "sft", "rm"], ["num_prompts=16", "num_samples=2"])


def ablation(out: Path) -> list[Stage]:
    """Xu et al. Table 3: the PPO ablation configs of examples/ppo_ablation/, each from the demo's SFT model."""
    files = sorted((EXAMPLES / "ppo_ablation").glob("*.yaml"))
    if not files:
        raise ConfigError(f"--ablation: no configs in {EXAMPLES / 'ppo_ablation'}")
    stages = [s for s in pipeline("arithmetic", out) if s.name in ("tiny", "task", "sft")]
    sft, data = str(out / "sft" / "final"), str(out / "task")
    for f in files:
        run = f"ablation/{f.stem}"
        stages.append(Stage(run, "ppo", str(f), [f"model={sft}", f"prompts={data}/prompts.jsonl",
                                                  f"output_dir={out / run}"], f"{run}/final/config.json", ["sft"],
                            PPO_QUICK))
    for run in ["sft"] + [f"ablation/{f.stem}" for f in files]:  # SFT is the row every ablation row starts from
        stages.append(eval_stage(run, run, out, sft, data, ["reward.model="]))  # no reward model in the ablation
    return stages


# --------------------------------------------------------------------------- running stages


def _shown(path: str) -> str:
    """A path as the user would type it: a shipped config as `examples/...` (which `posttrain` finds from any
    folder), else relative to the working directory when inside it."""
    if not path or not Path(path).is_absolute():
        return path
    if Path(path).is_relative_to(EXAMPLES):
        return str("examples" / Path(path).relative_to(EXAMPLES))
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def command_line(stage: Stage, config_dir: Path, quick: bool, seed: int) -> list[str]:
    """The stage's `posttrain` arguments: COMMAND, the config file's full path, then key=value overrides."""
    config = Path(stage.config) if Path(stage.config).is_absolute() else config_dir / stage.config
    if not config.is_file():  # a task's folder holds only the configs that differ from arithmetic's
        config = EXAMPLES / "demo" / stage.config
    if not config.is_file():
        raise ConfigError(f"demo stage `{stage.name}`: config file not found: {config}")
    args = [*stage.args, *(stage.quick if quick else [])]
    if seed and stage.command != "task":  # every seed evaluates on the same held-out prompts
        args.append(f"seed={seed}")
    shown = [_shown(a) if "=" not in a else a.split("=", 1)[0] + "=" + _shown(a.split("=", 1)[1]) for a in args]
    return [stage.command, str(config), *shown]


def is_fresh(stage: Stage, out: Path, by_name: dict[str, Stage]) -> bool:
    """The stage's output exists and is newer than the outputs of the stages it reads."""
    done = out / stage.output
    if not done.exists():
        return False
    inputs = [out / by_name[n].output for n in stage.needs if n in by_name]
    return all(not p.exists() or p.stat().st_mtime <= done.stat().st_mtime for p in inputs)


def run_stage(stage: Stage, argv: list[str], out: Path, *, fresh_start: bool) -> float:
    """Run one stage in this process; its wall time in seconds. Raises TrainingError naming the stage on failure."""
    from posttrain.cli import main as cli_main

    if fresh_start and stage.command not in ("eval", "tiny-model", "task"):
        shutil.rmtree(out / stage.name, ignore_errors=True)  # no stale checkpoint to resume from
    # the shipped config is run by its full path (never a same-named file in the working directory) and shown as
    # `examples/...`, which `posttrain` finds from any folder
    print("+ posttrain " + " ".join([argv[0], _shown(argv[1]), *argv[2:]]), flush=True)
    start = time.perf_counter()
    StopSignal.received = None
    try:
        code = cli_main(argv)
    except Exception as e:  # a bug, not a user error: keep the traceback for the report
        traceback.print_exc()
        raise TrainingError(f"demo stage `{stage.name}` failed: {type(e).__name__}: {e}. The outputs of earlier "
                            f"stages are kept in {out}; rerun the demo to continue from this stage") from e
    if StopSignal.received is not None:  # the stage's loop saved a checkpoint and returned: the demo stops too
        name = signal.Signals(StopSignal.received).name
        raise TrainingError(f"demo stopped by {name} during stage `{stage.name}`; the outputs of earlier stages are "
                            f"kept in {out}; rerun the demo to continue from this stage")
    if code != 0:
        raise TrainingError(f"demo stage `{stage.name}` failed (`posttrain {stage.command}` exited with {code}; its "
                            f"error is printed above). The outputs of earlier stages are kept in {out}; rerun the "
                            "demo to continue from this stage")
    return time.perf_counter() - start


def check_settings(cfg: DemoConfig, out: Path, seed: int) -> dict:
    """demo.json records the settings of the run in `out`; a different setting there needs --force."""
    stamp = out / "demo.json"
    settings = {"task": cfg.task, "quick": cfg.quick, "seed": seed}
    if stamp.is_file() and not cfg.force:
        old = json.loads(stamp.read_text())
        diff = {k: (old.get("settings", {}).get(k), v) for k, v in settings.items() if old.get("settings", {}).get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise ConfigError(f"{out} holds a demo run with other settings ({shown}); use --force to redo it, or "
                              "another output_dir")
        return old.get("seconds", {})
    return {}


def save_stamp(cfg: DemoConfig, out: Path, seed: int, seconds: dict) -> None:
    stamp = out / "demo.json"
    settings = {"task": cfg.task, "quick": cfg.quick, "seed": seed}
    tmp = stamp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "seconds": seconds}, indent=1))
    tmp.replace(stamp)


# --------------------------------------------------------------------------- command


def run_seed(cfg: DemoConfig, out: Path, seed: int) -> dict[str, float]:
    """Every stage of one seed into `out` (skipping fresh ones), then that seed's report; wall time per stage."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = check_settings(cfg, out, seed)
    config_dir = EXAMPLES / TASKS[cfg.task]
    stages = ablation(out) if cfg.ablation else pipeline(cfg.task, out)
    by_name = {s.name: s for s in stages}
    for stage in stages:
        argv = command_line(stage, config_dir, cfg.quick, seed)
        if not cfg.force and is_fresh(stage, out, by_name):
            print(f"= {stage.name}: done ({_shown(str(out / stage.output))} exists), skipped", flush=True)
            continue
        seconds[stage.name] = run_stage(stage, argv, out, fresh_start=True)
        save_stamp(cfg, out, seed, seconds)
    runs = ["sft"] + [s.name for s in stages if s.command == "ppo"] if cfg.ablation else METHODS
    path = write_demo_report(cfg, out / "ablation" if cfg.ablation else out, out, runs, seconds)
    print(f"report: {_shown(str(path))}", flush=True)
    return seconds


def main(cfg: DemoConfig) -> Path:
    if cfg.ablation and cfg.task != "arithmetic":
        raise ConfigError("--ablation runs on the arithmetic task only")
    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
    out = Path(cfg.output_dir)
    if cfg.task != "arithmetic" and cfg.output_dir == DemoConfig.output_dir:
        out = Path(f"{cfg.output_dir}-{cfg.task}")  # the default folder of each task's demo: runs/demo-sentiment
    if cfg.seeds == 1:  # one seed: the stages' folders directly under output_dir
        run_seed(cfg, out, cfg.seed)
        return (out / "ablation" if cfg.ablation else out) / "report.md"
    # seed S of --seeds N is exactly `posttrain demo seed=S output_dir=OUT/seed-S`, so seeds can also run apart
    folders = {s: out / f"seed-{s}" for s in range(cfg.seed, cfg.seed + cfg.seeds)}
    for seed, folder in folders.items():
        print(f"== seed {seed}: {_shown(str(folder))}", flush=True)
        run_seed(cfg, folder, seed)
    path = write_seeds_report(cfg, out, folders)
    print(f"report over {cfg.seeds} seeds: {_shown(str(path))}", flush=True)
    return path
