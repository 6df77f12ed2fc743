"""The `attn_implementation` and `trust_remote_code` keys through the real commands: a refused choice stops the run
before training, naming the key and the model folder; the packing layout a run takes is stated in its log."""

import json

from posttrain.cli import main


def sft_args(tiny_model, arith_dir, out, *extra):
    return ["sft", f"model={tiny_model}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={out}",
            "batch_size=8", "max_length=64", "data.max_rows=32", "logging.progress=false", *extra]


def test_packing_on_eager_states_its_mask_and_trains(tiny_model, arith_dir, tmp_path, capsys):
    out = tmp_path / "eager"
    assert main(sft_args(tiny_model, arith_dir, out, "packing=true", "attn_implementation=eager", "max_steps=2")) == 0
    log = capsys.readouterr().out
    assert log.count("packing: eager: the block-diagonal (T x T) mask transformers builds from the position resets") == 1
    assert "attn_implementation" not in (out / "final" / "config.json").read_text()


def test_refused_attention_stops_sft_before_training(tiny_model, arith_dir, tmp_path, capsys):
    out = tmp_path / "flash"
    assert main(sft_args(tiny_model, arith_dir, out, "attn_implementation=flash_attention_2", "max_steps=2")) == 2
    err = capsys.readouterr().err
    assert f"model `{tiny_model}`: `attn_implementation: flash_attention_2` needs a CUDA GPU" in err
    assert not (out / "final").exists() and not (out / "metrics.jsonl").read_text().strip()


def test_eval_and_generate_refuse_an_unknown_implementation_by_name(tiny_model, tmp_path, capsys):
    assert main(["generate", f"model={tiny_model}", "prompt=hi", "attn_implementation=fast"]) == 2
    assert "config key `attn_implementation`: unknown value `fast`" in capsys.readouterr().err
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "one two three"}) + "\n")
    assert main(["eval", f"model={tiny_model}", f"data={data}", "attn_implementation=fast"]) == 2
    assert "config key `attn_implementation`: unknown value `fast`" in capsys.readouterr().err


def test_custom_code_model_is_refused_without_trust_remote_code(tiny_model, arith_dir, tmp_path, capsys):
    """The tiny default with `auto_map` in its config.json (custom code in the folder): sft names the key."""
    folder = tmp_path / "custom"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'posttrain_custom'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="posttrain_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["sft", f"model={folder}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={out}",
                 "max_steps=1", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"model `{folder}`: its configuration is custom Python code" in err and "`trust_remote_code: true`" in err
