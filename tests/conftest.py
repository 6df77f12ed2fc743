"""Fixtures shared by the recipe tests: the embedded default model and built-in task files, built once per session."""

import os

import pytest

# Two cores: one intra-op thread per process keeps the suite fast and deterministic, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402 - after the thread settings above

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """`task:` data sources write to a per-session cache, never to the user's home."""
    os.environ["POSTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("posttrain-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The embedded default (`posttrain tiny-model`): ~0.85M-parameter Llama + BPE ChatML tokenizer."""
    from posttrain.models.tiny import build_tiny_model
    from posttrain.tasks import corpus

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus(0))


@pytest.fixture(scope="session")
def arith_dir(tmp_path_factory):
    """A small arithmetic task: sft / prefs / prompts / eval jsonl."""
    from posttrain.tasks import get_task

    out = tmp_path_factory.mktemp("arith")
    get_task("arithmetic").generate(out, seed=0, n_train=400, n_eval=60, noise=0.2, difficulty=1)
    return out


@pytest.fixture(scope="session")
def senti_dir(tmp_path_factory):
    from posttrain.tasks import get_task

    out = tmp_path_factory.mktemp("senti")
    get_task("sentiment").generate(out, seed=0, n_train=600, n_eval=60, noise=0.2, difficulty=1)
    return out


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir(name) -> the tiny model folder of that family (`tests/families.py`), built once per session."""
    from families import build_family

    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(name, root / name)
        return built[name]

    return get
