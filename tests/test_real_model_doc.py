"""docs/real_model.md's commands, run as written on the real SmolLM2 model and the real pairs, at a smaller size.

The doc's numbers come from its commands at full size (minutes on 2 CPU cores); this test runs the same
command lines with a few flags appended for size (argparse keeps the last value of a repeated flag), so a
flag the doc shows that stops working, or a data report line it quotes that changes, fails here.
"""

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "real_model.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# One optimizer step on 2 pairs, 4 held-out pairs, short sequences: the doc's commands otherwise as written.
SMALLER = [
    "--eval_split_size", "4", "--max_train_samples", "2", "--max_steps", "1",
    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "4",
    "--max_length", "128", "--max_prompt_length", "64", "--plot", "false",
]  # fmt: skip


def doc_commands() -> list[str]:
    """The ``hf-dpo`` lines of the doc's bash blocks, continuation lines joined, comments dropped."""
    text = DOC.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if "hf-dpo" in line]


def quoted_report_lines() -> list[str]:
    """The data report lines the doc quotes, less what depends on the run's size (counts of pairs and tokens)."""
    block = re.search(r"```\n(data report \(train\).*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    quoted = [line for line in block.splitlines() if line.lstrip().startswith(("data report", "layouts"))]
    template = next(line for line in block.splitlines() if line.lstrip().startswith("template"))
    return [*quoted, re.sub(r"^\s*template\s+\d+ ", "", template)]


def options(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[::2], argv[1::2]))


def test_real_model_doc_commands_fetch_and_train_smollm2(real_model_dir, hf_dpo_command, tmp_path):
    """fetch-model prints the fixture's folder; the full fine-tune trains one step, as written but smaller.

    The LoRA command is the full one with LoRA's flags, learning rate and folder (checked here; test_cli parses
    it): running it too would double this test's time. Before training the policy is the reference, so the
    held-out numbers are exact: accuracy 1/2 (ties count half), margin 0, loss ln 2. One step at the doc's
    learning rate moves the rewards off zero.
    """
    commands = doc_commands()
    fetch = [line for line in commands if "fetch-model" in line]
    full, lora = [shlex.split(line.split("hf-dpo", 1)[1]) for line in commands if "--model_name_or_path" in line]
    assert fetch == ["MODEL=$(hf-dpo fetch-model)"], commands
    lora_only = {"--use_peft": "true", "--lora_r": "16", "--lora_alpha": "32"}
    assert options(lora) == {
        **options(full),
        **lora_only,
        "--learning_rate": "2e-4",
        "--output_dir": options(lora)["--output_dir"],
    }

    fetched = subprocess.run(
        [hf_dpo_command, "fetch-model"], env=ENV, capture_output=True, text=True, timeout=120, check=True
    )
    assert Path(fetched.stdout.strip()) == Path(real_model_dir)

    argv = [str(real_model_dir) if arg == "$MODEL" else arg for arg in full]
    proc = subprocess.run(
        [hf_dpo_command, *argv, *SMALLER, "--output_dir", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for quoted in quoted_report_lines():
        assert quoted in proc.stderr, quoted
    assert "rows        240 read, 2 kept, 0 skipped" in proc.stderr  # the whole file read, sharegpt as published

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["use_peft"] is False and summary["global_steps"] == 1
    held_out = summary["held_out"]
    assert held_out["pairs"] == 4
    before, after = held_out["before"], held_out["after"]
    assert before["rewards/accuracies"] == 0.5 and before["rewards/margins"] == 0.0
    assert math.isclose(before["loss"], math.log(2), abs_tol=1e-6)
    assert all(math.isfinite(after[key]) for key in ("loss", "rewards/accuracies", "rewards/margins"))
    assert after["rewards/margins"] != 0.0 and after["loss"] != before["loss"]
    recorded = json.loads((tmp_path / "hf_dpo_run.json").read_text())["arguments"]["training"]
    assert recorded["learning_rate"] == 2e-5 and recorded["beta"] == 2.0
