"""The example configs ship inside the package: `examples/NAME.yaml` runs from any folder (a file of that name in
the working directory wins), `posttrain examples` lists and copies them, and every config the README names exists."""

import json
import re
from pathlib import Path

from posttrain.cli import EXAMPLES, main

README = Path(__file__).resolve().parents[1] / "README.md"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_examples_config_not_in_the_folder_is_the_shipped_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["task", "examples/demo/task.yaml", "output_dir=shipped", "n_train=8", "n_eval=2"]) == 0
    assert "using the copy shipped with posttrain" in capsys.readouterr().out
    assert len(rows(tmp_path / "shipped" / "sft.jsonl")) == 8 and (tmp_path / "shipped" / "prefs.jsonl").is_file()

    local = tmp_path / "examples" / "demo" / "task.yaml"  # the user's own file of that name is the one used
    local.parent.mkdir(parents=True)
    local.write_text("name: sentiment\nn_train: 8\nn_eval: 2\n")
    assert main(["task", "examples/demo/task.yaml", "output_dir=local"]) == 0
    assert "shipped" not in capsys.readouterr().out
    assert (tmp_path / "local" / "classify.jsonl").is_file()  # only the sentiment task writes labelled texts

    assert main(["task", "examples/no_such.yaml", "output_dir=x"]) == 2
    assert "config file not found: examples/no_such.yaml" in capsys.readouterr().err


def test_examples_lists_and_copies_every_shipped_config(tmp_path, capsys):
    shipped = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml"))
    assert {"sft_tiny.yaml", "rm_tiny.yaml", "dpo_tiny.yaml", "ppo_tiny.yaml", "online_dpo_tiny.yaml",
            "demo/sft.yaml", "demo/sentiment/rm.yaml", "ppo_ablation/4_ref_ema.yaml"} <= set(shipped)
    assert main(["examples"]) == 0
    listed = re.findall(r"^  examples/(\S+)", capsys.readouterr().out, flags=re.M)
    assert listed == shipped

    dest = tmp_path / "my-examples"
    assert main(["examples", str(dest)]) == 0
    assert f"copied {len(shipped)} configs" in capsys.readouterr().out
    assert all((dest / rel).read_bytes() == (EXAMPLES / rel).read_bytes() for rel in shipped)
    assert main(["examples", str(dest)]) == 2  # never over an existing folder
    assert f"{dest} exists" in capsys.readouterr().err


def test_every_config_the_readme_names_is_shipped():
    named = set(re.findall(r"examples/([a-z0-9_][\w/.-]*\.yaml)", README.read_text()))  # NAME.yaml: a placeholder
    assert named and all((EXAMPLES / rel).is_file() for rel in named), sorted(r for r in named if not (EXAMPLES / r).is_file())


def test_the_demo_runs_the_shipped_configs_and_shows_them_as_examples(tmp_path, monkeypatch):
    """From a folder that holds its own examples/demo/sft.yaml, the demo still runs the shipped one (by full path)
    and prints it as `examples/demo/sft.yaml`."""
    from posttrain.recipes.demo import _shown, command_line, pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "demo").mkdir(parents=True)
    (tmp_path / "examples" / "demo" / "sft.yaml").write_text("max_steps: 1\n")
    sft = next(s for s in pipeline("sentiment", tmp_path / "out") if s.name == "sft")
    argv = command_line(sft, EXAMPLES / "demo" / "sentiment", quick=False, seed=0)
    assert argv[:2] == ["sft", str(EXAMPLES / "demo" / "sentiment" / "sft.yaml")]
    assert _shown(argv[1]) == "examples/demo/sentiment/sft.yaml" and "output_dir=out/sft" in argv
    tiny = next(s for s in pipeline("sentiment", tmp_path / "out") if s.name == "tiny")  # arithmetic's file
    assert _shown(command_line(tiny, EXAMPLES / "demo" / "sentiment", quick=False, seed=0)[1]) == "examples/demo/tiny.yaml"
