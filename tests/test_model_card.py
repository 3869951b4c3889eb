"""The model card's names for models and data: publishable (hub ids or relative names, never this machine's paths).

Issue 19 (9): the card named the base as an absolute local path, and adapter_config.json's
base_model_name_or_path was one too. The end-to-end card is checked in tests/test_cli.py and
tests/test_cli_reports.py; these are the naming rules, case by case.
"""

import json

import pytest

from hf_dpo.training.model_card import hub_id, publish_adapter_config, publishable_name


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "out"
    (out / "demo_assets" / "model").mkdir(parents=True)
    (out / "checkpoint-3").mkdir()
    (tmp_path / "models" / "sft").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("")
    return out


def test_names_for_published_files(run_folder, tmp_path):
    out = run_folder
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "0123abc"
    cases = {
        "Qwen/Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",  # a hub id stays
        str(snapshot): "Qwen/Qwen2.5-0.5B-Instruct",  # a model loaded from the hub cache: its hub id
        str(out / "demo_assets" / "model"): "demo_assets/model",  # inside the output folder: relative to it
        "runs/out/demo_assets/model": "demo_assets/model",  # given relative to the working folder: the same
        str(tmp_path / "models" / "sft"): "sft",  # elsewhere on this machine: its own name
        "data/pairs.jsonl": "data/pairs.jsonl",  # relative, as the user gave it
        "../" + tmp_path.name + "/data/pairs.jsonl": "pairs.jsonl",
    }
    for name, expected in cases.items():
        assert publishable_name(name, out) == expected, name
    # A checkpoint's card sits one folder lower: the run's demo model is ../demo_assets/model from there.
    assert publishable_name(str(out / "demo_assets" / "model"), out / "checkpoint-3") == "../demo_assets/model"
    assert hub_id(str(snapshot)) == "Qwen/Qwen2.5-0.5B-Instruct" and hub_id(str(out / "demo_assets" / "model")) is None


def test_adapter_config_names_its_base_like_the_card(run_folder, tmp_path):
    out = run_folder
    config = {"base_model_name_or_path": str(out / "demo_assets" / "model"), "r": 4, "peft_type": "LORA"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    publish_adapter_config(out)
    assert json.loads((out / "adapter_config.json").read_text()) == {
        **config,
        "base_model_name_or_path": "demo_assets/model",
    }
    hub = {"base_model_name_or_path": "someone/tiny-base", "r": 4}
    (out / "adapter_config.json").write_text(json.dumps(hub))
    publish_adapter_config(out)  # a hub id is what AutoPeftModel needs anywhere: left as it is
    assert json.loads((out / "adapter_config.json").read_text()) == hub
