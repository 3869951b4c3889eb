"""examples/train.py, run as a user runs it: python, accelerate launch (DDP over gloo), LoRA, config files."""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
DDP_CONFIG = ROOT / "examples" / "accelerate_configs" / "ddp.yaml"

# The demo, shortened: 6 optimizer steps, no evaluation during training, 32 held-out pairs
# evaluated in one batch before and after (so the logged means are exact per-pair means).
QUICK = [
    "--max_steps",
    "6",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--eval_strategy",
    "no",
    "--max_eval_samples",
    "32",
    "--per_device_eval_batch_size",
    "32",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command, timeout=300):
    proc = subprocess.run([str(c) for c in command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    return proc


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def held_out_eval(model, output_dir: Path) -> dict:
    """Evaluate ``model`` on the run's 32 held-out pairs with the run's settings, in one batch."""
    from cpu_run import cpu_args
    from transformers import AutoTokenizer

    from hf_dpo import NormalizedDPOTrainer, load_preference_dataset

    eval_rows = load_preference_dataset(output_dir / "demo_assets" / "eval.jsonl").select(range(32))
    args = cpu_args(output_dir / "reload_eval", per_device_eval_batch_size=32, max_length=128, max_prompt_length=96)
    trainer = NormalizedDPOTrainer(
        model=model, args=args, eval_dataset=eval_rows, processing_class=AutoTokenizer.from_pretrained(output_dir)
    )
    return trainer.evaluate()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, 8 pairs per step."""
    output_dir = tmp_path_factory.mktemp("single")
    proc = run([sys.executable, TRAIN, "--output_dir", output_dir, "--per_device_train_batch_size", "8", *QUICK])
    return output_dir, proc


def test_demo_trains_saves_and_reports(single_run):
    output_dir, proc = single_run
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "summary.json",
    ):
        assert (output_dir / name).is_file(), name
    png = (output_dir / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((output_dir / "summary.json").read_text())
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]
    # Step 0: policy == reference, every reward is exactly 0: a tie on every pair, loss ln 2.
    assert before["rewards/accuracies"] == 0.5
    assert before["rewards/margins"] == 0.0
    assert before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert after["rewards/accuracies"] >= 0.8
    assert after["rewards/margins"] > 0.1
    assert summary["held_out"]["pairs"] == 32 and summary["global_steps"] == 6 and summary["world_size"] == 1
    assert summary["reference"] == "model" and summary["trainable_parameters"] == summary["total_parameters"]
    assert [step for step, _ in train_losses(output_dir)] == [1, 2, 3, 4, 5, 6]

    assert "reward accuracy:  0.500 -> " in proc.stdout and "training_curves.png" in proc.stdout
    assert "6/6 [" in proc.stderr  # Trainer's progress bar

    # The saved model is the trained policy: reloaded, it reproduces the final held-out numbers.
    from transformers import AutoModelForCausalLM

    reloaded = held_out_eval(AutoModelForCausalLM.from_pretrained(output_dir), output_dir)
    for key in ("eval_logps/chosen", "eval_logps/rejected"):
        assert reloaded[key] == pytest.approx(after[key[len("eval_") :]], abs=1e-5), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(entry, single_run, hf_dpo_command, tmp_path):
    """2 processes x 4 pairs == 1 process x 8 pairs, step by step, launched as the docs show:
    ``accelerate launch -m hf_dpo`` and ``accelerate launch $(which hf-dpo)``.

    Trainer's seedable sampler draws one permutation from the seed, whatever the world
    size; accelerate hands consecutive 4-pair slices of it to rank 0 and rank 1, so the
    global batch of every step holds the same 8 pairs as the single-process batch. The
    logged loss is the mean over both ranks and DDP averages the gradients, so the two
    runs differ only by float summation order.
    """
    single_dir, _ = single_run
    output_dir = tmp_path / "ddp"
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            DDP_CONFIG,
            "--num_processes",
            "2",
            "--main_process_port",
            _free_port(),
            *(["-m", "hf_dpo"] if entry == "module" else [hf_dpo_command]),
            "--output_dir",
            output_dir,
            "--per_device_train_batch_size",
            "4",
            *QUICK,
        ]
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["world_size"] == 2  # a real process group, not two independent runs
    single, ddp = train_losses(single_dir), train_losses(output_dir)
    assert [s for s, _ in ddp] == [s for s, _ in single] == [1, 2, 3, 4, 5, 6]
    assert single[0][1] == pytest.approx(0.693147, abs=1e-5)
    assert single[-1][1] < 0.6  # the runs moved, so equality below is not just ln 2 six times
    for (step, loss_single), (_, loss_ddp) in zip(single, ddp):
        assert abs(loss_single - loss_ddp) < 1e-5, (step, loss_single, loss_ddp)


def test_lora_saves_only_the_adapter_which_reproduces_the_policy(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "lora"
    run(
        [
            sys.executable,
            TRAIN,
            "--output_dir",
            output_dir,
            "--per_device_train_batch_size",
            "8",
            *QUICK,
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--plot",
            "false",
        ]
    )
    assert (output_dir / "adapter_config.json").is_file()
    assert not (output_dir / "model.safetensors").exists()
    with safe_open(output_dir / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
        adapter_numel = sum(f.get_tensor(name).numel() for name in names)
    assert names and all("lora_A" in name or "lora_B" in name for name in names)

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["reference"] == "adapter"  # the adapter-disabled base: no second model
    assert summary["trainable_parameters"] == adapter_numel < summary["total_parameters"] / 10
    after = summary["held_out"]["after"]
    assert after["rewards/margins"] > 0.01  # the adapter changed the policy relative to its base

    # The base is named relative to the adapter's folder (no absolute path of this machine in a published file).
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(output_dir / adapter_config["base_model_name_or_path"])
    reloaded = held_out_eval(PeftModel.from_pretrained(base, output_dir), output_dir)
    for key in ("eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
        assert reloaded[key] == pytest.approx(after[key[len("eval_") :]], abs=1e-5), key


# --------------------------------------------------------------------------- arguments, in process


@pytest.fixture(scope="module")
def train_module():
    """The script's logic: hf_dpo/cli/ (examples/train.py only calls it)."""
    from types import SimpleNamespace

    from hf_dpo.cli import arguments, summary

    return SimpleNamespace(parse_args=arguments.parse_args, write_plot=summary.write_plot)


def _as_dicts(parsed):
    script_args, model_args, training_args = parsed
    return vars(script_args), vars(model_args), training_args.to_dict()


FLAGS = [
    "--model_name_or_path",
    "some/model",
    "--dataset",
    "pairs.jsonl",
    "--eval_split_size",
    "0.1",
    "--use_peft",
    "true",
    "--lora_r",
    "8",
    "--lora_target_modules",
    "q_proj",
    "v_proj",
    "--learning_rate",
    "5e-7",
    "--beta",
    "4.0",
    "--loss_type",
    "ipo",
    "--bf16",
    "false",
    "--max_length",
    "256",
    "--max_prompt_length",
    "128",
    "--output_dir",
    "out/run",
    "--lr_scheduler_type",
    "cosine",
]
YAML = """\
model_name_or_path: some/model
dataset: pairs.jsonl
eval_split_size: 0.1
use_peft: true
lora_r: 8
lora_target_modules: [q_proj, v_proj]
learning_rate: 5e-7   # YAML reads this as a string; it must still become the float 5e-07
beta: 4.0
loss_type: ipo
bf16: false
max_length: 256
max_prompt_length: 128
output_dir: out/run
lr_scheduler_type: cosine
"""


def test_yaml_and_json_config_files_equal_the_flags(train_module, tmp_path):
    (tmp_path / "run.yaml").write_text(YAML)
    from_flags = _as_dicts(train_module.parse_args(FLAGS))
    from_yaml = _as_dicts(train_module.parse_args([str(tmp_path / "run.yaml")]))
    assert from_yaml == from_flags
    assert from_flags[2]["learning_rate"] == 5e-7 and from_flags[1]["lora_target_modules"] == ["q_proj", "v_proj"]

    (tmp_path / "run.json").write_text(json.dumps(yaml.safe_load(YAML)))
    assert _as_dicts(train_module.parse_args([str(tmp_path / "run.json")])) == from_flags


def test_flags_override_the_config_file_and_demo_defaults_apply_only_to_the_demo(train_module, tmp_path):
    (tmp_path / "run.yaml").write_text(YAML)
    _, _, args = train_module.parse_args([str(tmp_path / "run.yaml"), "--beta", "7", "--output_dir", "elsewhere"])
    assert (args.beta, args.output_dir, args.loss_type) == (7.0, "elsewhere", ["ipo"])

    script_args, model_args, demo_args = train_module.parse_args([])
    assert model_args.model_name_or_path is None and script_args.torch_num_threads == 1
    assert (demo_args.output_dir, demo_args.learning_rate, demo_args.max_length) == ("outputs/demo", 1e-3, 128)
    _, _, demo_args = train_module.parse_args(["--learning_rate", "0.01"])
    assert demo_args.learning_rate == 0.01 and demo_args.output_dir == "outputs/demo"
    # With a model of one's own, TrainingArguments' and DPOConfig's defaults hold.
    script_args, _, real_args = train_module.parse_args(["--model_name_or_path", "some/model"])
    assert (real_args.output_dir, real_args.learning_rate, real_args.max_length) == (
        "trainer_output",
        1e-6,
        1024,
    )  # DPOConfig's default, not the demo's 1e-3
    assert script_args.torch_num_threads is None


def test_a_loss_list_in_yaml_equals_the_flags(train_module, tmp_path):
    """TRL's list syntax in a config file (``loss_type: [sigmoid, sft]``) and on the command line."""
    (tmp_path / "list.yaml").write_text("loss_type: [sigmoid, sft]\nloss_weights: [1, 0.5]\n")
    _, _, from_yaml = train_module.parse_args([str(tmp_path / "list.yaml")])
    _, _, from_flags = train_module.parse_args(["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"])
    assert from_yaml.loss_type == from_flags.loss_type == ["sigmoid", "sft"]
    assert from_yaml.loss_weights == from_flags.loss_weights == [1.0, 0.5]
    (tmp_path / "rpo.yaml").write_text("rpo_alpha: 0.5\n")  # TRL < 1.0's RPO, mapped to the same list
    _, _, from_rpo = train_module.parse_args([str(tmp_path / "rpo.yaml")])
    assert (from_rpo.loss_type, from_rpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])


def test_unknown_config_key_is_refused_by_name(train_module, tmp_path):
    from hf_dpo.cli.errors import UsageError

    (tmp_path / "bad.yaml").write_text("learning_rate: 1e-5\nlerning_rate: 1e-4\n")
    with pytest.raises(UsageError, match="unknown argument --lerning_rate \\(did you mean --learning_rate\\?\\)"):
        train_module.parse_args([str(tmp_path / "bad.yaml")])


def test_missing_matplotlib_skips_the_plot_with_one_line(train_module, tmp_path, monkeypatch, capsys):
    for name in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.backends",
        "matplotlib.backends.backend_agg",
        "matplotlib.ticker",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    assert train_module.write_plot([{"loss": 0.7, "step": 1}], tmp_path) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Skipping the training-curve plot:")
    assert not (tmp_path / "training_curves.png").exists()


# --------------------------------------------------------------------------- documented code


def documented_snippets():
    """Every ```python block that README.md or docs/usage.md marks with ``<!-- tested: NAME -->``."""
    pattern = re.compile(r"<!-- tested: ([\w-]+) -->\n```python\n(.*?)```", re.S)
    params = []
    for path in (ROOT / "README.md", ROOT / "docs" / "usage.md"):
        for name, code in pattern.findall(path.read_text(encoding="utf-8")):
            params.append(pytest.param(name, code, id=f"{path.name}:{name}"))
    return params


def test_the_docs_mark_their_code():
    names = sorted({param.values[0] for param in documented_snippets()})
    assert names == ["drop-in", "plain-pytorch"]


@pytest.mark.parametrize("name, code", documented_snippets())
def test_documented_snippet_runs(name, code, tmp_path, monkeypatch, capsys):
    """The snippet runs as printed, on 8 demo pairs (2 steps of 4) with the tiny demo model."""
    from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows

    monkeypatch.chdir(tmp_path)
    with open("pairs.jsonl", "w", encoding="utf-8") as f:
        for row in make_preference_rows(8, seed=1):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokenizer = build_tokenizer("chatml")
    namespace = {"model": build_model(tokenizer), "tokenizer": tokenizer}
    exec(compile(code, f"<{name}>", "exec"), namespace)
    if name == "drop-in":
        trainer = namespace["trainer"]
        assert trainer.state.global_step == 2
        assert (tmp_path / "out" / "model.safetensors").is_file()
    else:
        losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("loss ")]
        assert len(losses) == 2
        assert losses[0] == round(math.log(2), 4)  # printed with 4 decimals; policy == reference at the first step


def test_readme_data_rows_load_with_their_layouts(tmp_path):
    """Each one-row example of the README's data section is a valid pair of the layout the README names."""
    from hf_dpo import load_preference_dataset

    block = re.search(r"```jsonl\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    layouts = []
    for i, line in enumerate(block.strip().splitlines()):
        path = tmp_path / f"row{i}.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        row = load_preference_dataset(path)[0]
        layouts.append(row["layout"])
        assert (row["chosen"][0]["content"] if row["chosen"] else row["chosen_text"]).strip() == "Cold."
    assert layouts == ["minimind", "conversational", "string"]
