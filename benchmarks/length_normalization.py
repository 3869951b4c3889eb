"""Length-normalized against summed DPO on the same data and steps: what the model writes, before and after.

Runs ``hf-dpo`` twice on the same pairs, with ``--length_normalize true`` and ``false`` (each with its usual
beta: 2.0 per token, 0.1 summed), both evaluating before training and at the last step with
``--eval_generations``, and prints one Markdown table: held-out reward accuracy and loss, the generated
length (and its ratio to the held-out chosen answers), the share of completions that ended, and the
per-token log-ratio to the reference on what the policy generates (the KL estimate), before and after.

    python benchmarks/length_normalization.py --model PATH --data FILE --out DIR [options]

``--data`` is a JSON list or JSONL file in any layout ``hf-dpo`` reads (LLaMA-Factory's sharegpt file as
published included). The first ``--train_pairs`` rows train, the next ``--eval_pairs`` are held out. docs/metrics.md shows the table
measured on SmolLM2-135M-Instruct and the commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON list or JSONL file, as they are: hf-dpo reads their layout itself."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def command(args, train: Path, evaluation: Path, normalize: bool) -> list[str]:
    return [
        "hf-dpo",
        "--model_name_or_path", str(args.model),
        "--dataset", str(train),
        "--eval_dataset", str(evaluation),
        "--output_dir", str(args.out / f"length_normalize_{str(normalize).lower()}"),
        "--length_normalize", str(normalize).lower(),
        "--max_length", str(args.max_length),
        "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(args.accumulation),
        "--per_device_eval_batch_size", str(args.eval_batch_size),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "constant",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--eval_strategy", "steps",
        "--eval_steps", str(args.max_steps),
        "--eval_generations", str(args.eval_generations),
        "--eval_generation_max_new_tokens", str(args.max_new_tokens),
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", str(args.seed),
        "--torch_num_threads", str(args.threads),
        "--dataloader_pin_memory", "false",
    ]  # fmt: skip


def results(output_dir: Path) -> dict:
    """Held-out numbers and generation scalars at the first and last evaluation of one run."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [e for e in history if "eval_loss" in e]
    first, last = evaluations[0], evaluations[-1]
    steps = [e["step"] for e in history if "loss" in e and "eval_loss" not in e]
    train = next(e for e in history if "train_runtime" in e)
    return {
        "steps": (first["step"], last["step"]),
        "first": first,
        "last": last,
        "seconds_per_step": train["train_runtime"] / max(len(steps), 1),
    }


def table(runs: dict[bool, dict], beta: dict[bool, float]) -> str:
    def pair(run, key, fmt="{:.3f}"):
        a, b = run["first"].get(key), run["last"].get(key)
        return "n/a" if a is None or b is None else f"{fmt.format(a)} -> {fmt.format(b)}"

    lines = [
        "| length_normalize (beta) | reward accuracy | eval loss | generated length | length / chosen | ended | KL estimate | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for normalize, run in runs.items():
        lines.append(
            f"| {str(normalize).lower()} ({beta[normalize]:g}) | {pair(run, 'eval_rewards/accuracies')} "
            f"| {pair(run, 'eval_loss', '{:.4f}')} | {pair(run, 'eval_generation/length_mean', '{:.1f}')} "
            f"| {pair(run, 'eval_generation/chosen_length_ratio', '{:.2f}')} "
            f"| {pair(run, 'eval_generation/finished_fraction', '{:.2f}')} "
            f"| {pair(run, 'eval_generation/kl', '{:+.4f}')} | {run['seconds_per_step']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder or hub name")
    parser.add_argument("--data", type=Path, required=True, help="preference pairs in a layout hf-dpo reads")
    parser.add_argument("--out", type=Path, default=Path("outputs/length_normalization"))
    parser.add_argument("--train_pairs", type=int, default=96)
    parser.add_argument("--eval_pairs", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=384)
    parser.add_argument("--max_steps", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--eval_generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="1: on a shared CPU two threads decode several times slower"
    )
    parser.add_argument("--hf_dpo", default="hf-dpo", help="the command to run (e.g. 'python -m hf_dpo')")
    args = parser.parse_args(argv)

    rows = read_rows(args.data)
    if len(rows) < args.train_pairs + args.eval_pairs:
        raise SystemExit(f"{args.data}: {len(rows)} usable rows, fewer than {args.train_pairs} + {args.eval_pairs}")
    args.out.mkdir(parents=True, exist_ok=True)
    train, evaluation = args.out / "train.json", args.out / "eval.json"
    write_json(train, rows[: args.train_pairs])
    write_json(evaluation, rows[args.train_pairs : args.train_pairs + args.eval_pairs])
    print(f"{args.data}: {len(rows)} rows; {args.train_pairs} train, {args.eval_pairs} held out", flush=True)

    runs = {}
    for normalize in (True, False):
        argv_run = command(args, train, evaluation, normalize)
        print("$ " + shlex.join(argv_run), flush=True)
        start = time.perf_counter()
        done = subprocess.run([*shlex.split(args.hf_dpo), *argv_run[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"hf-dpo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        print(done.stdout[done.stdout.find("==== hf_dpo") :], flush=True)
        runs[normalize] = results(args.out / f"length_normalize_{str(normalize).lower()}")
        print(f"wall clock {time.perf_counter() - start:.0f} s", flush=True)
    text = table(runs, {True: 2.0, False: 0.1})
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
