"""`posttrain demo`: SFT vs PPO vs DPO vs DPO-Iter on one task, evaluated and reported.

The pipeline of the seed (and of Xu et al. 2024, arXiv 2404.10719, Sec. 5 / Table 3) on the embedded default:

    tiny-model -> task -> SFT -> reward model (on the task's preference pairs)
    from the SFT model:  ppo-rm        PPO with the reward model
                         ppo-verifier  PPO with the task's verifier as the reward
                         dpo           offline DPO on the preference pairs
                         sft+dpo       SFT on the chosen responses, then DPO
                         dpo-iter      iterative online DPO, pairs labelled by the verifier
    -> `posttrain eval` of every model on the same held-out prompts, KL measured to the SFT model
    -> runs/demo/report.md: what was run, a "what this shows" section written from the numbers (each method
       against SFT, +- standard error), the results table, the gold-vs-KL frontier, held-out gold during
       training, proxy-vs-gold for ppo-rm, training curves per method family, and wall time per stage.

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
  stages wrote stays.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ConfigError, DemoConfig
from posttrain.errors import TrainingError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
METHODS = ["sft", "ppo-rm", "ppo-verifier", "dpo", "sft+dpo", "dpo-iter"]
TASKS = {"arithmetic": "demo", "sentiment": "demo/sentiment"}  # task -> config folder under examples/
# --quick: two PPO iterations of 8 episodes, a few DPO steps, two tiny online rounds, 16 evaluation prompts
PPO_QUICK = ["total_episodes=16", "rollout.batch_size=8", "mini_batch_size=8", "batch_size=8", "ppo_epochs=1",
             "eval_prompts=8", "eval_every=1"]
DPO_QUICK = ["max_steps=4", "batch_size=8", "data.max_rows=64"]


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
    ]
    for method in METHODS:
        stages.append(eval_stage(method, method, out, sft, data, reward_rm))
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
    """A path as the user would type it: relative to the working directory when inside it."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def command_line(stage: Stage, config_dir: Path, quick: bool, seed: int) -> list[str]:
    config = Path(stage.config) if Path(stage.config).is_absolute() else config_dir / stage.config
    if not config.is_file():  # a task's folder holds only the configs that differ from arithmetic's
        config = EXAMPLES / "demo" / stage.config
    if not config.is_file():
        raise ConfigError(f"demo stage `{stage.name}`: config file not found: {config}")
    args = [*stage.args, *(stage.quick if quick else [])]
    if seed and stage.command not in ("task", "tiny-model"):
        args.append(f"seed={seed}")
    shown = [_shown(a) if "=" not in a else a.split("=", 1)[0] + "=" + _shown(a.split("=", 1)[1]) for a in args]
    return [stage.command, _shown(str(config)), *shown]


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
    print("+ posttrain " + " ".join(argv), flush=True)
    start = time.perf_counter()
    try:
        code = cli_main(argv)
    except Exception as e:  # a bug, not a user error: keep the traceback for the report
        traceback.print_exc()
        raise TrainingError(f"demo stage `{stage.name}` failed: {type(e).__name__}: {e}. The outputs of earlier "
                            f"stages are kept in {out}; rerun the demo to continue from this stage") from e
    if code != 0:
        raise TrainingError(f"demo stage `{stage.name}` failed (`posttrain {stage.command}` exited with {code}; its "
                            f"error is printed above). The outputs of earlier stages are kept in {out}; rerun the "
                            "demo to continue from this stage")
    return time.perf_counter() - start


def check_settings(cfg: DemoConfig, out: Path) -> dict:
    """demo.json records the settings of the run in `out`; a different setting there needs --force."""
    stamp = out / "demo.json"
    settings = {"task": cfg.task, "quick": cfg.quick, "seed": cfg.seed}
    if stamp.is_file() and not cfg.force:
        old = json.loads(stamp.read_text())
        diff = {k: (old.get("settings", {}).get(k), v) for k, v in settings.items() if old.get("settings", {}).get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise ConfigError(f"{out} holds a demo run with other settings ({shown}); use --force to redo it, or "
                              "another output_dir")
        return old.get("seconds", {})
    return {}


def save_stamp(cfg: DemoConfig, out: Path, seconds: dict) -> None:
    stamp = out / "demo.json"
    settings = {"task": cfg.task, "quick": cfg.quick, "seed": cfg.seed}
    tmp = stamp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "seconds": seconds}, indent=1))
    tmp.replace(stamp)


# --------------------------------------------------------------------------- the report


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def difference(a: dict, b: dict, key: str) -> tuple[float, float]:
    """(a - b, its standard error) of the gold measure ``key``. Paired over prompts when both eval.json files hold
    per-prompt records of the same prompts: SE = std(a_i - b_i) / sqrt(n), which the shared prompts make much
    smaller than an unpaired SE. Otherwise unpaired with the binomial bound, sqrt(2 p (1-p) / n) at the pooled p
    (p (1-p) bounds the variance of any [0, 1] score with mean p)."""
    from posttrain.eval.metrics import mean_and_stderr
    from posttrain.report import per_prompt

    d = a[key] - b[key]
    pa, pb = per_prompt(a, key), per_prompt(b, key)
    same = [r["prompt"] for r in a.get("samples", [])] == [r["prompt"] for r in b.get("samples", [])]
    if len(pa) > 1 and len(pa) == len(pb) and same:
        return d, mean_and_stderr([x - y for x, y in zip(pa, pb)])[1]
    p, n = (a[key] + b[key]) / 2, int(b.get("num_prompts") or 1)
    return d, math.sqrt(2 * max(p * (1 - p), 0.0) / max(n, 1))


def findings(evals: dict[str, dict], curves: dict[str, list[dict]], task: str) -> str:
    """The "what this shows" text, written from the numbers: a plain verdict per method against SFT, the details,
    then the paper's comparisons and over-optimisation of the reward model.

    The measure is held-out gold accuracy (greedy), or for sentiment the mean gold score (the share of positive
    words: SFT's continuations are never all positive). A difference is given +- one standard error
    (`difference`); it counts as real beyond two standard errors, anything smaller is called noise."""
    key = "gold_score" if task == "sentiment" else "gold_accuracy"
    what = "mean gold score" if task == "sentiment" else "gold accuracy"
    base = evals.get("sft", {})
    if key not in base:
        return "The SFT model has no evaluation, so nothing can be compared."
    n = int(base.get("num_prompts", 1))

    def verdict(name: str, ref: str = "sft") -> tuple[str, str] | None:
        a, b = evals.get(name, {}), evals.get(ref, {})
        if key not in a or key not in b:
            return None
        d, se = difference(a, b, key)
        kind = "better" if d > 2 * se else ("worse" if d < -2 * se else "noise")
        word = {"better": "improved on", "noise": "did NOT improve on",
                "worse": "did NOT improve on, and is worse than"}
        tail = " (the difference is within noise)" if kind == "noise" else ""
        return kind, (f"{word[kind]} {ref} ({what} {a[key]:.1%} vs {b[key]:.1%}, {100 * d:+.1f} ± {100 * se:.1f} "
                      f"points){tail}")

    groups: dict[str, list[str]] = {"better": [], "noise": [], "worse": [], "missing": []}
    details = []
    for name in METHODS[1:]:
        v = verdict(name)
        if v is None:
            groups["missing"].append(name)
            details.append(f"- {name}: no evaluation (the stage did not run).")
            continue
        ev = evals[name]
        d, se = difference(ev, base, key)
        groups[v[0]].append(f"{name} ({100 * d:+.1f} ± {100 * se:.1f} points)")
        details.append(f"- {name} {v[1]}; KL to SFT {ev.get('kl', float('nan')):.2f} nats, EOS rate "
                       f"{ev.get('eos_rate', float('nan')):.0%}.")
    heads = {"better": "Improved on SFT", "noise": "No measurable change from SFT (within noise)",
             "worse": "Worse than SFT", "missing": "Not evaluated"}
    lines = [f"**{heads[g]}:** {', '.join(groups[g]) or 'none'}.  " for g in heads if groups[g] or g == "better"]
    lines += ["", f"Measure: held-out {what}, greedy decoding, on {n} prompts; differences in percentage points ± one "
                  "standard error, paired over the same prompts; a method counts as better or worse only beyond two "
                  "standard errors.", "",
              f"- sft: {what} {base[key]:.1%} (greedy), pass@1 {base.get('pass@1', float('nan')):.1%} (sampled).",
              *details]
    if task != "sentiment" and "pass@1" in base:
        # RL optimises the sampling distribution, so the sampled accuracy is where it should show first.
        sampled = {"better": [], "noise": [], "worse": []}
        for name in METHODS[1:]:
            if "pass@1" in evals.get(name, {}):
                d, se = difference(evals[name], base, "pass@1")
                kind = "better" if d > 2 * se else ("worse" if d < -2 * se else "noise")
                sampled[kind].append(f"{name} ({100 * d:+.1f} ± {100 * se:.1f})")
        lines += ["", f"Sampled accuracy (pass@1 at the training temperature, {base.get('num_samples', 4)} samples per "
                      f"prompt; SFT {base['pass@1']:.1%}) — the distribution RL optimises: "
                      f"**above SFT:** {', '.join(sampled['better']) or 'none'}; "
                      f"**within noise:** {', '.join(sampled['noise']) or 'none'}; "
                      f"**below SFT:** {', '.join(sampled['worse']) or 'none'} (points ± SE, paired over prompts).", ""]
    for a, b, claim in (("ppo-verifier", "dpo", "PPO vs DPO (Xu et al. 2024 found PPO better)"),
                        ("dpo-iter", "dpo", "online DPO vs offline DPO (Xu et al.: DPO-Iter above DPO)"),
                        ("sft+dpo", "dpo", "an extra SFT stage on the chosen responses before DPO")):
        v = verdict(a, b)
        if v is not None:
            lines.append(f"- {claim}: {a} {v[1]}.")
    rows = curves.get("ppo-rm", [])
    proxy = [r["objective/scores"] for r in rows if "objective/scores" in r]
    gold = [r["eval/gold_accuracy"] for r in rows if "eval/gold_accuracy" in r]
    if len(proxy) >= 2 and len(gold) >= 2:
        over = proxy[-1] > proxy[0] and gold[-1] < gold[0]
        lines.append(f"- ppo-rm: the reward model's score went {proxy[0]:.2f} -> {proxy[-1]:.2f} during training while "
                     f"held-out gold (greedy) went {gold[0]:.1%} -> {gold[-1]:.1%}"
                     + (": the policy over-optimised the proxy reward." if over else "."))
    return "\n".join(lines)


def parameter_count(model_dir: Path) -> int | None:
    """Parameters in a model folder's `model.safetensors`, from its header alone (8-byte length, then JSON)."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _rows(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0


def intro(cfg: DemoConfig, out: Path, evals: dict[str, dict], seconds: dict[str, float]) -> str:
    """The paragraph under the title: what was run, on what, and how it was measured."""
    params = parameter_count(out / "sft" / "final")
    model = f"a {params / 1e3:,.0f}k-parameter" if params else "the tiny"
    base = evals.get("sft", {})
    example = base.get("samples", [{}])[0].get("prompt") if base.get("samples") else None
    task = f"the **{cfg.task}** task" + (f' (prompts like "{example}")' if example else "")
    if cfg.ablation:
        what = ("the PPO ablation of Xu et al. 2024 (Table 3): each config of `examples/ppo_ablation/` trained from "
                "the same SFT model")
    else:
        rm = ("a sentiment classifier on labelled texts as the reward model" if cfg.task == "sentiment" else
              f"a reward model on {_rows(out / 'task' / 'prefs.jsonl'):,} preference pairs")
        what = ("then from the SFT model: PPO with that reward model (**ppo-rm**), PPO with the task's verifier as the "
                "reward (**ppo-verifier**), offline DPO on the pairs (**dpo**), SFT on the chosen responses then DPO "
                "(**sft+dpo**), and iterative online DPO with pairs labelled by the verifier (**dpo-iter**)")
        what = f"{rm}, {what}"
    n, k = base.get("num_prompts", "?"), base.get("num_samples", "?")
    quick = " This is a `--quick` run: tiny step counts, so the numbers are noise." if cfg.quick else ""
    return (f"The demo post-trained {model} Llama model (built locally by `posttrain tiny-model`) on {task}: SFT on "
            f"{_rows(out / 'task' / 'sft.jsonl'):,} demonstrations, {what}. Every model was scored on the same {n} "
            f"held-out prompts: greedy gold accuracy, {k} samples per prompt for pass@k, the reward model's score and "
            f"the KL to the SFT model. The whole run took {sum(seconds.values()):,.0f} s; the table's wall time is "
            f"each method's training (sft+dpo's includes its SFT-on-chosen stage), every stage's is at the end.{quick}")


def stage_table(seconds: dict[str, float]) -> str:
    lines = ["| stage | wall time (s) |", "|---|---:|"]
    lines += [f"| {name} | {s:.1f} |" for name, s in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.1f} |")
    return "\n".join(lines)


def write_demo_report(cfg: DemoConfig, report_dir: Path, out: Path, runs: list[str], seconds: dict[str, float]) -> Path:
    from posttrain.report import read_metrics, write_report

    names = [Path(r).name for r in runs]
    evals = {n: _read(out / r / "eval.json") for n, r in zip(names, runs)}
    curves = {n: read_metrics(out / r) for n, r in zip(names, runs)}
    title = (f"posttrain demo: {cfg.task}" + (" (PPO ablation)" if cfg.ablation else "")
             + (" (--quick)" if cfg.quick else ""))
    wall = {n: seconds[r] for n, r in zip(names, runs) if r in seconds}
    if "sft+dpo" in wall:
        wall["sft+dpo"] += seconds.get("sft-chosen", 0.0)  # the method is both stages
    extra = [] if cfg.ablation or not (out / "rm").is_dir() else [out / "rm"]  # the reward model's curves
    return write_report([out / r for r in runs], report_dir, title=title, intro=intro(cfg, out, evals, seconds),
                        findings=None if cfg.ablation else findings(evals, curves, cfg.task), wall_times=wall,
                        curve_runs=extra, extra_sections={"Wall time per stage": stage_table(seconds)})


# --------------------------------------------------------------------------- command


def main(cfg: DemoConfig) -> Path:
    if cfg.ablation and cfg.task != "arithmetic":
        raise ConfigError("--ablation runs on the arithmetic task only")
    out = Path(cfg.output_dir)
    if cfg.task != "arithmetic" and cfg.output_dir == DemoConfig.output_dir:
        out = Path(f"{cfg.output_dir}-{cfg.task}")  # the default folder of each task's demo: runs/demo-sentiment
    out.mkdir(parents=True, exist_ok=True)
    seconds = check_settings(cfg, out)
    config_dir = EXAMPLES / TASKS[cfg.task]
    stages = ablation(out) if cfg.ablation else pipeline(cfg.task, out)
    by_name = {s.name: s for s in stages}
    for stage in stages:
        argv = command_line(stage, config_dir, cfg.quick, cfg.seed)
        if not cfg.force and is_fresh(stage, out, by_name):
            print(f"= {stage.name}: done ({_shown(str(out / stage.output))} exists), skipped", flush=True)
            continue
        seconds[stage.name] = run_stage(stage, argv, out, fresh_start=True)
        save_stamp(cfg, out, seconds)
    runs = ["sft"] + [s.name for s in stages if s.command == "ppo"] if cfg.ablation else METHODS
    path = write_demo_report(cfg, out / "ablation" if cfg.ablation else out, out, runs, seconds)
    print(f"report: {_shown(str(path))}", flush=True)
    return path
