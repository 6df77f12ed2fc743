"""Typed configs: one dataclass per command, a help string on every key.

A config comes from an optional YAML file plus dotted ``key=value`` overrides
(command-line values win). Each command's dataclass holds exactly the keys that
command honours: it is composed from groups of top-level keys (``RunKeys``,
``OptimKeys``, ...) and sections (``data``, ``rollout``, ...), never inherited
from another command. Unknown keys and wrong types are rejected with the key's
name and the closest valid key; a key another command takes is refused with the
key that does its job here (``REFUSED``); a key that only does something with
some values of another (dpo's ``cpo_alpha`` with ``loss_type: cpo``) is refused
when set with the others (``ONLY_WITH``); an enum key (``Literal``) is checked
here, once, with the closest valid value suggested. ``posttrain CMD --help``
prints :func:`help_text` of the command's config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A config field with a default and a help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def sub(cls: type, help: str) -> Any:  # noqa: A002
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- enum values

# Every key with a closed set of values is typed with one of these; `load_config` checks the value and suggests the
# closest valid one. Library functions that take the same names (losses.dpo_loss, losses.kl_estimate, ...) keep
# their own tuples, pinned equal to these by tests/test_config.py.
DType = Literal["auto", "float32", "bfloat16", "float16"]
LRScheduler = Literal["constant", "linear", "cosine"]
Strategy = Literal["ddp", "fsdp"]
SFTTask = Literal["causal_lm", "classification"]
LossOn = Literal["assistant", "completion", "all"]
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text", "classification",
                     "preference", "prompt", "unpaired"]
Reporter = Literal["jsonl", "tensorboard", "wandb"]
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
PrefLossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "cpo", "orpo"]  # dpo: + the reference-free
KLEstimator = Literal["k1", "k2", "k3"]
AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
GRPOLossType = Literal["grpo", "dapo", "dr_grpo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]
CriticInit = Literal["auto", "reward", "policy"]
Backend = Literal["hf", "vllm"]
TaskName = Literal["arithmetic", "sentiment", "dialogue", "math"]
OptionalTask = Literal["", "arithmetic", "sentiment", "dialogue", "math"]  # "" = none
DemoTask = Literal["arithmetic", "sentiment"]
TinySize = Literal["tiny", "small", "base"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """The data of the supervised commands (sft, rm, dpo)."""

    train: list[str] = opt([], "training data: file path(s) (json, jsonl, csv, parquet), a saved dataset folder, or an HF dataset name (`name` or `name:split`)")
    eval: list[str] = opt([], "evaluation data, same forms as data.train")
    eval_split: float = opt(0.0, "when data.eval is empty, hold out this fraction of data.train for evaluation")
    format: DataFormat = opt("auto", "row format: auto, messages, prompt_completion, alpaca, sharegpt, text, classification, preference, prompt, unpaired (kto)")
    chat_template: str = opt("auto", "auto (the tokenizer's own, else chatml), chatml, or a Jinja template string")
    skip_invalid: bool = opt(False, "skip and count bad rows instead of stopping the run")
    max_rows: int = opt(0, "use at most this many training rows (0 = all)")
    shuffle: bool = opt(True, "shuffle the training rows each epoch (seeded)")


@dataclass
class PromptDataConfig:
    """The prompts of the online commands (ppo, online-dpo): they sample their own responses."""

    train: list[str] = opt([], "prompt file(s) (json, jsonl, csv, parquet), a saved dataset folder or an HF dataset name, when `prompts` is empty")
    eval: list[str] = opt([], "held-out prompt file(s) that eval_task scores (default: eval.jsonl beside the first prompt file)")
    format: DataFormat = opt("auto", "row format of the prompt files: auto, prompt, messages, prompt_completion, alpaca, sharegpt, preference")
    chat_template: str = opt("auto", "auto (the tokenizer's own, else chatml), chatml, or a Jinja template string")
    skip_invalid: bool = opt(False, "skip and count bad rows instead of stopping the run")
    max_rows: int = opt(0, "use at most this many training prompts, the first of the file(s) (0 = all)")
    shuffle: bool = opt(True, "take the prompts in a seeded random order, every prompt once per pass (false: file order); "
                              "online-dpo also shuffles each round's pairs")


@dataclass
class LoraConfig:
    r: int = opt(0, "LoRA rank; 0 means full fine-tuning")
    alpha: int = opt(16, "LoRA scaling alpha")
    dropout: float = opt(0.0, "dropout on the LoRA path")
    target_modules: list[str] = opt(["all-linear"], "module names to adapt, or all-linear")


@dataclass
class FreezeConfig:
    trainable_layers: int = opt(-1, "train only the top N transformer blocks (-1 = all, 0 = none)")
    extra: list[str] = opt(["norm", "lm_head", "score"], "module name patterns that stay trainable when freezing (final norm, heads)")


@dataclass
class LoggingConfig:
    """Logging of the supervised commands (sft, rm, dpo)."""

    steps: int = opt(10, "log training metrics every N optimizer steps")
    report_to: list[Reporter] = opt(["jsonl"], "jsonl always; add tensorboard and/or wandb when installed")
    progress: bool = opt(True, "show a progress bar with ETA and live loss")
    eval_steps: int = opt(0, "evaluate on data.eval every N steps (0 = at the end of each epoch)")


@dataclass
class OnlineLoggingConfig:
    """Logging of the online commands, which evaluate on their own cadence (ppo `eval_every`, online-dpo each round)."""

    steps: int = opt(10, "ppo: print a progress line every N iterations (metrics.jsonl has every one); "
                         "online-dpo: log the DPO metrics every N optimizer steps")
    report_to: list[Reporter] = opt(["jsonl"], "jsonl always; add tensorboard and/or wandb when installed")
    progress: bool = opt(True, "show a progress bar with ETA")


@dataclass
class SaveConfig:
    steps: int = opt(0, "save a checkpoint every N optimizer steps (ppo: iterations; 0 = only at the end)")
    keep: int = opt(2, "how many step checkpoints to keep")
    merge_lora: bool = opt(False, "with LoRA, also write a merged full model to final/merged")


@dataclass
class RoundSaveConfig:
    """online-dpo saves a checkpoint at the end of every round."""

    keep: int = opt(2, "how many round checkpoints to keep")
    merge_lora: bool = opt(False, "with LoRA, also write a merged full model to final/merged")


@dataclass
class SamplingConfig:
    """What the sampler (`rollout.Sampler`) reads: how one response is drawn."""

    max_new_tokens: int = opt(32, "longest sampled response")
    temperature: float = opt(1.0, "sampling temperature (the loss uses the same)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling (1.0 = off)")
    generation_batch_size: int = opt(0, "sequences per generation call (0 = the whole rollout batch)")

    def __post_init__(self) -> None:
        # a top_p of 0 would keep no token, a negative top_k none either; refused here, once, by name
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"`rollout.top_p` must be in (0, 1] (1.0 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"`rollout.top_k` must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class RolloutConfig(SamplingConfig):
    """ppo's rollout: how many episodes an iteration samples."""

    batch_size: int = opt(64, "prompts x samples generated per rollout batch (episodes per PPO iteration)")
    samples_per_prompt: int = opt(1, "completions sampled per prompt (group size for grpo / rloo)")


@dataclass
class GRPORolloutConfig(SamplingConfig):
    """grpo's rollout: how many completions one generation samples."""

    batch_size: int = opt(64, "completions sampled per generation, over all processes: prompts x num_generations "
                              "(TRL's generation_batch_size)")


@dataclass
class EvalSamplingConfig(SamplingConfig):
    backend: Backend = opt("hf", "hf (KV-cached batched sampler) or vllm (optional extra: pip install 'posttrain[vllm]')")


@dataclass
class GenerateSamplingConfig(SamplingConfig):
    samples_per_prompt: int = opt(1, "completions sampled per prompt")
    backend: Backend = opt("hf", "hf (KV-cached batched sampler) or vllm (optional extra: pip install 'posttrain[vllm]')")


@dataclass
class RewardConfig:
    model: str = opt("", "folder of a trained reward model (scalar head)")
    function: list[str] = opt([], "reward function(s), `path/to/file.py:fn` or `package.module:fn`, called as TRL calls "
                                  "one: fn(prompts, completions, **kwargs) -> one float per completion, the kwargs being "
                                  "the prompt row's other columns (e.g. answer), completion_ids and step; built-in: "
                                  "posttrain.rewards.verifiers:math_accuracy, posttrain.rewards.verifiers:boxed_format")
    task: OptionalTask = opt("", "built-in verifier: arithmetic, sentiment, dialogue, math")
    weights: list[float] = opt([], "weights when several sources are given (model, each function, task order); each "
                                   "source is also logged on its own as rewards/NAME/mean and rewards/NAME/std")
    timeout: float = opt(600.0, "seconds a reward function may take on one batch before the run stops with an error "
                                "naming the function and the row it hangs on (0 = no limit)")
    clip: float = opt(0.0, "clip scores to [-clip, clip] (0 = off)")
    batch_size: int = opt(32, "sequences per reward-model forward pass")
    label: str = opt("", "with a classifier as the reward model: the label whose logit is the reward (e.g. positive)")


# --------------------------------------------------------------------------- groups of top-level keys
#
# A command's config is its own keys plus the groups it honours (dataclass mixins: the fields of every base, the
# rightmost base's first in --help) plus its own sections. No command inherits another's config.

# keys of every command that loads a model (training, eval, generate)
ATTN_HELP = ("auto (per model family: SDPA where transformers supports it, eager where the family needs it, e.g. "
             "Gemma 2), sdpa, eager, flash_attention_2 (flash_attn installed, CUDA), flex_attention (GPU); "
             "a choice the family or this install cannot run is refused")
TRUST_REMOTE_CODE_HELP = ("run custom Python code shipped with the model folder (config.json `auto_map`); "
                          "off unless you trust the folder")


@dataclass
class ModelLoadKeys:
    """Every command that loads a model: sft, rm, dpo, online-dpo, ppo, eval, generate."""

    dtype: DType = opt("auto", "compute and saved precision: auto (bf16 on a CUDA GPU that supports it, else float32), "
                       "float32, bfloat16, float16. bf16/fp16 train float32 weights and AdamW state under autocast "
                       "(fp16 with loss scaling); final/ is written in this dtype")
    attn_implementation: AttnImplementation = opt("auto", ATTN_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


@dataclass
class RunKeys:
    """Every training command."""

    model: str = opt("runs/tiny", "HF hub id or local folder of the model to train")
    output_dir: str = opt("runs/out", "where everything of the run goes")
    seed: int = opt(0, "one seed for data order, init and sampling")
    max_length: int = opt(512, "longest tokenized sequence; longer ones are truncated (completion side) or dropped, and counted")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    resume: str = opt("auto", "auto (the newest checkpoint in output_dir that verifies against its manifest), a "
                      "checkpoint path (refused if it does not verify), or false")
    resume_force: bool = opt(False, "resume even when the checkpoint was written with other training data or other "
                             "values of keys that alter the run (the differences are printed either way)")


@dataclass
class OptimKeys:
    """Every training command: AdamW and its schedule."""

    batch_size: int = opt(8, "sequences per device per micro-step")
    learning_rate: float = opt(2e-5, "peak learning rate")
    lr_scheduler: LRScheduler = opt("linear", "constant, linear or cosine (after warm-up)")
    warmup_ratio: float = opt(0.0, "fraction of steps spent warming up linearly from 0")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm (0 = off)")


@dataclass
class SupervisedKeys:
    """The supervised loop of sft, rm and dpo: its length, accumulation and parallelism."""

    grad_accum: int = opt(1, "micro-steps per optimizer step")
    num_epochs: float = opt(1.0, "passes over the training data")
    max_steps: int = opt(0, "optimizer steps; wins over num_epochs when > 0")
    strategy: Strategy = opt("ddp", "several processes: ddp (each rank holds the whole model) or fsdp (FSDP2: weights, "
                             "gradients and optimizer state sharded over the ranks)")


@dataclass
class DPOKeys:
    """The DPO objective (dpo and online-dpo)."""

    beta: float = opt(0.1, "KL weight beta")
    loss_type: DPOLossType = opt("sigmoid", "sigmoid (DPO), ipo, hinge, robust")
    label_smoothing: float = opt(0.0, "assumed fraction of flipped labels (robust / cDPO)")
    sft_weight: float = opt(0.0, "weight of the chosen response's NLL added to the loss")
    ref_model: str = opt("", "folder of the reference model (default: the policy's starting weights)")
    precompute_ref: bool = opt(True, "compute reference log-probs once before training and cache them")


# Keys another command takes that this one does not: refused with the key that does the job.
_ONLINE_REFUSED = {
    "strategy": "{cmd} samples from the whole policy on each rank, so it always runs DDP (fsdp is for sft, rm and dpo)",
    "data.eval_split": "{cmd}'s held-out prompts are data.eval (or eval.jsonl beside the prompts), scored by eval_task",
    "rollout.backend": "{cmd} samples with the built-in sampler; rollout.backend is for eval and generate",
}


def _refused(cmd: str, **extra: str) -> dict[str, str]:
    return {k: v.format(cmd=cmd) for k, v in {**_ONLINE_REFUSED, **extra}.items()}


# --------------------------------------------------------------------------- commands


@dataclass
class SFTConfig(SupervisedKeys, OptimKeys, RunKeys, ModelLoadKeys):
    ONLY_WITH: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "packing": ("task", ("causal_lm",)),
        "loss_on": ("task", ("causal_lm",)),
        "num_labels": ("task", ("classification",)),
    }

    task: SFTTask = opt("causal_lm", "causal_lm (instruction tuning) or classification (new head)")
    num_labels: int = opt(0, "classification: number of labels (0 = from the data)")
    loss_on: LossOn = opt("assistant", "assistant (assistant turns), completion (last assistant turn), or all tokens")
    packing: bool = opt(False, "padding-free: a micro-batch's sequences in one row, no attention across them")
    learning_rate: float = opt(2e-5, "peak learning rate")
    data: DataConfig = sub(DataConfig, "data sources and format")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: LoggingConfig = sub(LoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


@dataclass
class RMConfig(SupervisedKeys, OptimKeys, RunKeys, ModelLoadKeys):
    margin: bool = opt(True, "use a per-pair `margin` column when the data has one")
    center_rewards_coef: float = opt(0.0, "weight of the reward-centring term mean((r_c + r_r)^2)")
    normalize: bool = opt(True, "after training, store bias/scale so chosen rewards on the training prompts have mean 0, std 1")
    learning_rate: float = opt(1e-5, "peak learning rate")
    data: DataConfig = sub(DataConfig, "data sources and format")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: LoggingConfig = sub(LoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


REFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DPOConfig(DPOKeys, SupervisedKeys, OptimKeys, RunKeys, ModelLoadKeys):
    # key -> (the key that selects, the values with which it does something): set with any other value, refused
    ONLY_WITH: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "ref_model": ("loss_type", REFERENCE_LOSSES),
        "precompute_ref": ("loss_type", REFERENCE_LOSSES),
        "label_smoothing": ("loss_type", ("sigmoid", "robust", "simpo", "cpo")),
        "sft_weight": ("loss_type", REFERENCE_LOSSES + ("simpo",)),
        "simpo_gamma": ("loss_type", ("simpo",)),
        "cpo_alpha": ("loss_type", ("cpo",)),
    }

    beta: float = opt(0.1, "sigmoid / ipo / hinge / robust: KL weight beta; simpo, cpo: the reward scale; orpo: the "
                      "odds-ratio term's weight (the paper's lambda; TRL's name)")
    loss_type: PrefLossType = opt("sigmoid", "with a reference model: sigmoid (DPO), ipo (on length-normalised "
                                  "log-probs, as TRL), hinge, robust; reference-free (no reference model, no "
                                  "reference pass): simpo (length-normalised, margin simpo_gamma), cpo (+ cpo_alpha "
                                  "* NLL), orpo (odds ratio + NLL on the chosen response)")
    label_smoothing: float = opt(0.0, "assumed fraction of flipped labels (sigmoid / cDPO, robust, simpo, cpo)")
    sft_weight: float = opt(0.0, "weight of the chosen response's token-mean NLL added to the loss (not cpo / orpo, "
                            "which have their own NLL term)")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin gamma (TRL's CPOConfig name)")
    cpo_alpha: float = opt(1.0, "cpo: weight of the chosen response's token-mean NLL (TRL's CPOConfig name)")
    learning_rate: float = opt(1e-6, "peak learning rate")
    data: DataConfig = sub(DataConfig, "data sources and format")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: LoggingConfig = sub(LoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


@dataclass
class KTOConfig(SupervisedKeys, OptimKeys, RunKeys, ModelLoadKeys):
    REFUSED: ClassVar[dict[str, str]] = {
        "precompute_ref": "kto always caches the reference log-probs (of each completion and of its mismatched KL "
                          "completion) in one pass before training",
        "loss_type": "kto has one loss (Ethayarajh et al. 2024); the paired losses are `posttrain dpo loss_type=...`",
        "label_smoothing": "kto has no label smoothing; weigh the two kinds with desirable_weight / undesirable_weight",
        "sft_weight": "kto has no NLL term",
    }

    beta: float = opt(0.1, "KL weight beta")
    desirable_weight: float = opt(1.0, "weight of a desirable (label true) completion's loss (the paper's lambda_D)")
    undesirable_weight: float = opt(1.0, "weight of an undesirable (label false) completion's loss (lambda_U); "
                                    "the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]")
    ref_model: str = opt("", "folder of the reference model (default: the policy's starting weights)")
    learning_rate: float = opt(1e-6, "peak learning rate")
    data: DataConfig = sub(DataConfig, "rows `prompt`, `completion`, `label` (true / false), plain or chat; "
                           "preference rows (prompt, chosen, rejected) give one true and one false row each")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: LoggingConfig = sub(LoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


@dataclass
class OnlineDPOConfig(DPOKeys, OptimKeys, RunKeys, ModelLoadKeys):
    REFUSED: ClassVar[dict[str, str]] = _refused(
        "online-dpo",
        num_epochs="online-dpo trains `epochs_per_round` DPO epochs on each round's pairs, for `rounds` rounds",
        **{"logging.eval_steps": "online-dpo evaluates after every round (eval_task on data.eval)",
           "save.steps": "online-dpo saves a checkpoint at the end of every round",
           "rollout.batch_size": "a round samples `prompts_per_round` x `samples_per_prompt` responses",
           "rollout.samples_per_prompt": "online-dpo's key is `samples_per_prompt`"})

    grad_accum: int = opt(1, "micro-steps per DPO optimizer step")
    max_steps: int = opt(0, "DPO optimizer steps per round; wins over epochs_per_round when > 0")
    learning_rate: float = opt(1e-6, "peak learning rate (each round runs its own warm-up and decay)")
    prompts: list[str] = opt([], "prompt file(s) to sample from (default: data.train)")
    rounds: int = opt(3, "sample-label-train rounds")
    prompts_per_round: int = opt(64, "prompts sampled per round")
    samples_per_prompt: int = opt(4, "completions per prompt; pairs are best vs worst, ties dropped")
    epochs_per_round: int = opt(1, "DPO epochs over each round's pairs")
    reset_ref_each_round: bool = opt(True, "the trained policy becomes the next round's reference (DPO-Iter)")
    missing_eos_penalty: float = opt(-1.0, "added to the score of a sample that hit rollout.max_new_tokens without EOS, "
                                           "so a truncated sample is not ranked as if it had finished (as ppo): 0 = off, "
                                           "negative penalises. TRL's key of this name is positive and SUBTRACTED; here "
                                           "it is ADDED, so a positive value (a config ported from TRL) would reward "
                                           "truncation and is refused")
    eval_task: OptionalTask = opt("", "built-in task whose verifier scores held-out prompts after each round")
    eval_prompts: int = opt(64, "held-out prompts scored per round when eval_task is set")
    data: PromptDataConfig = sub(PromptDataConfig, "prompt sources and format")
    rollout: SamplingConfig = sub(SamplingConfig, "sampling")
    reward: RewardConfig = sub(RewardConfig, "reward source(s)")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: OnlineLoggingConfig = sub(OnlineLoggingConfig, "metrics logging")
    save: RoundSaveConfig = sub(RoundSaveConfig, "checkpoints")


@dataclass
class PPOConfig(OptimKeys, RunKeys, ModelLoadKeys):
    # The run's length is `total_episodes`: one key, not a second one counting the same iterations.
    REFUSED: ClassVar[dict[str, str]] = _refused(
        "ppo",
        max_steps="ppo runs `total_episodes` episodes: total_episodes // rollout.batch_size iterations, each "
                  "ppo_epochs x ceil(rollout.batch_size / mini_batch_size) optimizer steps",
        num_epochs="ppo runs `total_episodes` episodes (`ppo_epochs` is the passes over each rollout batch)",
        grad_accum="ppo's optimizer step is `mini_batch_size` sequences, in micro-batches of `batch_size`",
        **{"logging.eval_steps": "ppo evaluates every `eval_every` iterations"})

    prompts: list[str] = opt([], "prompt file(s) (default: data.train)")
    total_episodes: int = opt(1024, "sampled responses over the whole run: total_episodes // rollout.batch_size iterations")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    mini_batch_size: int = opt(16, "sequences per PPO optimizer step (split into micro-batches of batch_size)")
    clip_range: float = opt(0.2, "policy ratio clip")
    value_clip: float = opt(0.2, "value clip around the old values")
    vf_coef: float = opt(0.1, "value loss weight")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    kl_coef: float = opt(0.05, "KL penalty weight; 0 = no penalty and no reference model (none loaded, none run)")
    kl_estimator: KLEstimator = opt("k1", "k1, k2 or k3 (Schulman's estimators): the per-token KL put in the reward "
                                    "(gae, rloo, reinforce_pp) and logged as objective/kl. In the reward only k1 gives "
                                    "an unbiased policy gradient of KL(pi||pi_ref): the reward's gradient misses k2's "
                                    "and k3's own dependence on pi, which k1's gradient has zero mean, so k2 / k3 there "
                                    "bias the update (a warning says so; grpo's loss uses k3 as a loss, which is fine)")
    adaptive_kl_target: float = opt(0.0, "target KL for the adaptive controller (0 = fixed kl_coef)")
    adaptive_kl_horizon: int = opt(10000, "horizon (episodes) of the adaptive KL controller (Ziegler et al. 2019)")
    whiten_advantages: bool = opt(True, "normalise advantages over the batch's valid tokens")
    whiten_rewards: bool = opt(False, "normalise scores over the batch")
    ref_ema: float = opt(0.0, "0 = frozen reference; else the EMA weight given to the policy each step")
    missing_eos_penalty: float = opt(-1.0, "added to the score of a response that hit rollout.max_new_tokens without "
                                           "EOS, so the model learns to stop: 0 = off, negative penalises. TRL's key of "
                                           "this name is positive and SUBTRACTED; here it is ADDED, so a positive value "
                                           "(a config ported from TRL) would reward truncation and is refused")
    advantage_estimator: AdvantageEstimator = opt("gae", "gae (critic), grpo, rloo, reinforce_pp")
    loss_agg_mode: GRPOLossType = opt("dapo", "how per-token losses make the minibatch's loss (grpo's loss_type names): "
                                      "dapo (token mean over the minibatch), grpo (mean over sequences of token means), "
                                      "dr_grpo (token sum / rollout.max_new_tokens, mean over sequences), bnpo (token "
                                      "mean of each micro-batch, averaged)")
    critic_init: CriticInit = opt("auto", "reward (from the reward model), policy (policy backbone), auto")
    critic_learning_rate: float = opt(0.0, "critic learning rate (0 = learning_rate)")
    eval_task: OptionalTask = opt("", "built-in task whose verifier scores held-out prompts during training")
    eval_prompts: int = opt(64, "held-out prompts scored at each evaluation")
    eval_every: int = opt(0, "evaluate every N PPO iterations (0 = start and end only)")
    learning_rate: float = opt(1e-5, "actor learning rate")
    data: PromptDataConfig = sub(PromptDataConfig, "prompt sources and format")
    rollout: RolloutConfig = sub(RolloutConfig, "sampling")
    reward: RewardConfig = sub(RewardConfig, "reward source(s)")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: OnlineLoggingConfig = sub(OnlineLoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


@dataclass
class GRPOConfig(OptimKeys, RunKeys, ModelLoadKeys):
    # TRL's GRPOConfig names where TRL has one; the run's length is `total_episodes`, as ppo's.
    REFUSED: ClassVar[dict[str, str]] = _refused(
        "grpo",
        max_steps="grpo runs `total_episodes` completions: total_episodes // rollout.batch_size generations, each "
                  "num_iterations x steps_per_generation optimizer steps",
        num_epochs="grpo runs `total_episodes` completions (`num_iterations` is the passes over each generation)",
        grad_accum="grpo's optimizer step is rollout.batch_size / steps_per_generation completions, in micro-batches "
                   "of `batch_size` (rounded down to whole groups)",
        generation_batch_size="grpo's key is `rollout.batch_size` (completions per generation)",
        max_completion_length="grpo's key is `rollout.max_new_tokens`",
        kl_coef="grpo's KL weight is `beta`", clip_range="grpo's clip keys are `epsilon` and `epsilon_high`",
        ppo_epochs="grpo's key is `num_iterations`", mini_batch_size="grpo's key is `steps_per_generation`",
        advantage_estimator="grpo's advantages are group-relative: `scale_rewards` chooses the std",
        loss_agg_mode="grpo's key is `loss_type`",
        missing_eos_penalty="grpo: `overlong_buffer_len` (DAPO's soft penalty) or `mask_truncated_completions`",
        **{"logging.eval_steps": "grpo evaluates every `eval_every` generations",
           "rollout.samples_per_prompt": "grpo's key is `num_generations`"})

    prompts: list[str] = opt([], "prompt file(s) (default: data.train)")
    total_episodes: int = opt(1024, "completions sampled over the whole run: total_episodes // rollout.batch_size "
                                    "generations")
    num_generations: int = opt(8, "completions per prompt (the group); rollout.batch_size must be a multiple")
    loss_type: GRPOLossType = opt("dapo", "how per-token losses make an optimizer step's loss: grpo (mean over "
                                  "sequences of each one's token mean), dapo (token mean over the step), dr_grpo "
                                  "(token sum / rollout.max_new_tokens, mean over sequences: no length bias), bnpo "
                                  "(token mean of each micro-batch, averaged over micro-batches and processes)")
    scale_rewards: ScaleRewards = opt("group", "divide the group-centred rewards by the group's std (group), the "
                                      "batch's std (batch), or nothing (none: Dr. GRPO)")
    epsilon: float = opt(0.2, "clip the ratio below at 1 - epsilon (and above at 1 + epsilon unless epsilon_high)")
    epsilon_high: float = opt(0.0, "upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28; 0 = epsilon)")
    importance_sampling_level: ImportanceSamplingLevel = opt(
        "token", "token (one ratio per token) or sequence (GSPO: one ratio per completion, exp of the mean token "
                 "log-ratio)")
    beta: float = opt(0.0, "KL weight toward the starting policy (0 = no reference model is loaded)")
    kl_in_reward: bool = opt(False, "put the KL in the reward (beta * sum of k1 subtracted from each score before the "
                                    "group baseline) instead of the loss (beta * k3 per token, clamped as verl does)")
    num_iterations: int = opt(1, "optimizer passes over each generation (the old log-probs are kept; mu in GRPO)")
    steps_per_generation: int = opt(1, "optimizer steps per pass: each takes rollout.batch_size / steps_per_generation "
                                       "completions")
    mask_truncated_completions: bool = opt(False, "leave completions that hit rollout.max_new_tokens (no EOS) out of "
                                                  "the loss (their rewards still enter the group baselines)")
    overlong_buffer_len: int = opt(0, "DAPO's soft overlong penalty: over the last N tokens before "
                                      "rollout.max_new_tokens the reward falls linearly to -overlong_penalty_factor "
                                      "(0 = off)")
    overlong_penalty_factor: float = opt(1.0, "the soft overlong penalty at rollout.max_new_tokens")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) "
                                        "and sample more prompts until the generation is full")
    max_generation_batches: int = opt(4, "dynamic sampling: at most this many rollout batches per generation; "
                                         "short of groups then, train on those kept")
    share_prompt_forward: bool = opt(True, "run each group's prompt once in the training and reference forwards, the "
                                           "completions on top of its KV cache (the same numbers, fewer tokens; "
                                           "off, or a model where it is not exact, e.g. sliding-window attention or "
                                           "gradient checkpointing: every completion row carries its prompt)")
    eval_task: OptionalTask = opt("", "built-in task whose verifier scores held-out prompts during training")
    eval_prompts: int = opt(64, "held-out prompts scored at each evaluation")
    eval_every: int = opt(0, "evaluate every N generations (0 = start and end only)")
    learning_rate: float = opt(1e-6, "peak learning rate")
    data: PromptDataConfig = sub(PromptDataConfig, "prompt sources and format")
    rollout: GRPORolloutConfig = sub(GRPORolloutConfig, "sampling")
    reward: RewardConfig = sub(RewardConfig, "reward source(s)")
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters (peft)")
    freeze: FreezeConfig = sub(FreezeConfig, "layer freezing")
    logging: OnlineLoggingConfig = sub(OnlineLoggingConfig, "metrics logging")
    save: SaveConfig = sub(SaveConfig, "checkpoints")


@dataclass
class EvalConfig(ModelLoadKeys):
    REFUSED: ClassVar[dict[str, str]] = {
        "rollout.samples_per_prompt": "eval's key is `num_samples` (samples per prompt for pass@k)",
        "rollout.batch_size": "eval's key is `batch_size` (sequences per forward pass and generation call)",
    }

    model: str = opt("runs/out/final", "model folder to evaluate")
    task: OptionalTask = opt("", "built-in task whose held-out prompts and verifier to use")
    prompts: list[str] = opt([], "prompt file(s) (default: the task's eval.jsonl)")
    data: list[str] = opt([], "data file(s) for perplexity (causal LM) or accuracy / macro-F1 (classifier)")
    ref_model: str = opt("", "reference model for the sequence KL")
    reward: RewardConfig = sub(RewardConfig, "reward source for the mean reward")
    num_prompts: int = opt(200, "held-out prompts to score (0 = all)")
    num_samples: int = opt(4, "samples per prompt for pass@k (k = 1..num_samples)")
    greedy: bool = opt(True, "also score greedy decoding")
    rollout: EvalSamplingConfig = sub(EvalSamplingConfig, "sampling")
    batch_size: int = opt(64, "sequences per forward pass")
    max_length: int = opt(512, "longest sequence for perplexity")
    output: str = opt("", "where to write eval.json (default: MODEL/eval.json)")
    seed: int = opt(0, "sampling seed")


@dataclass
class GenerateConfig(ModelLoadKeys):
    REFUSED: ClassVar[dict[str, str]] = {
        "rollout.batch_size": "generate answers 64 prompts a call; rollout.generation_batch_size caps a call's sequences",
    }

    model: str = opt("runs/out/final", "model folder or hub id")
    prompt: list[str] = opt([], "prompt text(s)")
    prompts: str = opt("", "file of prompts (jsonl with prompt / messages, or one per line)")
    chat: bool = opt(False, "interactive chat in the terminal")
    rollout: GenerateSamplingConfig = sub(GenerateSamplingConfig, "sampling")
    seed: int = opt(0, "sampling seed")


@dataclass
class TinyModelConfig:
    output_dir: str = opt("runs/tiny", "where to write the model and tokenizer")
    size: TinySize = opt("tiny", "tiny (~1M params), small (~30M params) or base (~120M params, for a GPU)")
    vocab_size: int = opt(512, "BPE vocabulary size")
    seed: int = opt(0, "init seed")


@dataclass
class TaskConfig:
    name: TaskName = opt("arithmetic", "arithmetic, sentiment, dialogue or math")
    output_dir: str = opt("data/task", "where the jsonl files go")
    seed: int = opt(0, "generator seed")
    n_train: int = opt(4000, "training rows (sft, prefs, prompts, classify)")
    n_eval: int = opt(500, "held-out prompts")
    noise: float = opt(0.2, "fraction of wrong SFT demonstrations")
    difficulty: int = opt(1, "task difficulty level")


@dataclass
class DemoConfig:
    output_dir: str = opt("runs/demo", "where every stage writes")
    task: DemoTask = opt("arithmetic", "arithmetic or sentiment")
    quick: bool = opt(False, "the same pipeline in under two minutes (for tests)")
    ablation: bool = opt(False, "run the Xu et al. Table 3 PPO ablation instead")
    seed: int = opt(0, "seed for every stage (the first seed with --seeds N)")
    seeds: int = opt(1, "run every stage once per seed (seed, seed+1, ...; folders seed-S/) and judge each "
                        "difference by its spread over seeds; the full demo's setting is 3 or more")
    force: bool = opt(False, "re-run every stage, even those whose output (final/, eval.json) already exists")


@dataclass
class ReportConfig:
    runs: list[str] = opt([], "run folders")
    output: str = opt("", "report folder (default: the single run, or runs/report)")
    title: str = opt("posttrain report", "report title")


COMMANDS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "online-dpo": OnlineDPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "eval": EvalConfig,
    "generate": GenerateConfig,
    "tiny-model": TinyModelConfig,
    "task": TaskConfig,
    "demo": DemoConfig,
    "report": ReportConfig,
}


# --------------------------------------------------------------------------- parsing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{where}{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key `{where}{key}`{hint}")


def _choice(value: Any, valid: tuple[str, ...], key: str) -> str:
    """An enum key's value, or a ConfigError naming the key, the value and the closest valid value."""
    text = _coerce(value, str, key)
    if text in valid:
        return text
    close = difflib.get_close_matches(text, [v for v in valid if v], n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    shown = ", ".join(v or '"" (none)' for v in valid)
    raise ConfigError(f"config key `{key}`: unknown value `{text}`{hint} (valid: {shown})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _choice(value, typing.get_args(tp), key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not (isinstance(value, str) and "," in value and item is not str) else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key `{key}` expects a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key `{key}` expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key `{key}` expects an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"config key `{key}` expects an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"config key `{key}` expects an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key `{key}` expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key `{key}` expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"config key `{key}` expects a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], where: str = "", refused: dict[str, str] | None = None) -> Any:
    """``cls`` from a nested mapping. ``refused``: the command's keys that other commands take, with what to use
    instead (a command class's ``REFUSED``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section `{where.rstrip('.') or '<root>'}` expects a mapping, got {values!r}")
    refused = getattr(cls, "REFUSED", {}) if refused is None else refused
    hints, fields = _hints(cls), _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            if f"{where}{key}" in refused:
                raise ConfigError(f"config key `{where}{key}` is not accepted: {refused[f'{where}{key}']}")
            raise _unknown(str(key), list(fields), where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}{key}.", refused)
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    built = cls(**kwargs)
    defaults = cls()
    for key, (selector, valid) in getattr(cls, "ONLY_WITH", {}).items():
        # a key at its default does nothing either way (a saved config.yaml lists every key): only a set value counts
        if key in kwargs and kwargs[key] != getattr(defaults, key) and getattr(built, selector) not in valid:
            raise ConfigError(f"config key `{where}{key}` does not apply with {selector}={getattr(built, selector)} "
                              f"(only with {selector} {', '.join(valid)}); remove it")
    return built


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got `{text}`")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Any:
    """Build ``cls`` from an optional YAML file and dotted overrides (overrides win)."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
        for k, v in loaded.items():
            if isinstance(v, dict) and "." not in str(k):
                tree[str(k)] = dict(v)
            else:
                _set_dotted(tree, str(k), v)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for k, v in items:
        _set_dotted(tree, k, v)
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def convert(cfg: Any, cls: type, **changes: Any) -> Any:
    """A ``cls`` holding the values of ``cfg``'s fields of the same name (sections field by field), ``cls``'s
    defaults for the rest, then ``changes``."""
    def values(src: Any, target: type) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(target):
            if hasattr(src, f.name):
                v = getattr(src, f.name)
                tp = _hints(target)[f.name]
                out[f.name] = tp(**values(v, tp)) if dataclasses.is_dataclass(tp) else v
        return out
    return cls(**{**values(cfg, cls), **changes})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that do not alter a run's trajectory, left out of a checkpoint's identity (engine.checkpoint.run_identity) so
# that changing them on resume is not refused: where it logs, evaluates and saves, where it resumes from, and the
# paths of the training data (their contents are fingerprinted instead, so a moved file is the same run).
RESUME_NEUTRAL = ("output_dir", "resume", "resume_force", "trust_remote_code", "gradient_checkpointing", "logging.",
                  "save.", "data.train", "data.eval", "prompts", "eval_task", "eval_prompts", "eval_every")


def resume_identity(cfg: Any) -> dict[str, Any]:
    """The config keys that alter the run (dotted key -> value), as a checkpoint records them. A run's length (the
    supervised `max_steps` / `num_epochs`, ppo's `total_episodes`, online-dpo's `rounds`) is left out too, so that a
    finished run can be extended; online-dpo's `max_steps` (steps per round) stays in."""
    length = {"max_steps", "num_epochs"} if isinstance(cfg, SupervisedKeys) else set()
    length |= {"total_episodes"} if isinstance(cfg, PPOConfig) else set()
    length |= {"rounds"} if isinstance(cfg, OnlineDPOConfig) else set()
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif name not in length and not any(name == n or (n.endswith(".") and name.startswith(n))
                                                for n in RESUME_NEUTRAL):
                out[name] = value
    walk(to_dict(cfg), "")
    return out


def training_sources(cfg: Any) -> list[str]:
    """The data a run trains on (`data.train`, and ppo's / online-dpo's `prompts`), whose contents a checkpoint
    fingerprints."""
    data = getattr(cfg, "data", None)
    return [*getattr(cfg, "prompts", []), *(getattr(data, "train", []) if data is not None else [])]


def save_config(cfg: Any, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(v or '""' for v in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if isinstance(tp, types.GenericAlias):
        return str(tp)
    return getattr(tp, "__name__", str(tp))


def help_text(cls: type, prefix: str = "") -> str:
    """Every key with its type, default and meaning."""
    lines: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n  [{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(help_text(tp, prefix=f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
