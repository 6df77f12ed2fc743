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
    named = set(re.findall(r"examples/([\w/.-]+\.yaml)", README.read_text()))
    assert named and all((EXAMPLES / rel).is_file() for rel in named), sorted(r for r in named if not (EXAMPLES / r).is_file())
