"""Models, tokenizer and data for a command-line run: the usual from_pretrained / file / hub calls.

The demo's pieces are built only when asked for (no model and no data, or ``demo`` as the
model or the data): once, on the main process, into ``<output_dir>/demo_assets``, and loaded
from disk like any user's. A user's model or data never builds or writes them. Loading
errors that are the user's to fix (a folder without a model, a hub name that does not
exist) become one :class:`~hf_dpo.cli.errors.UsageError` naming the flag.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data import data_report, load_preference_dataset, with_report
from ..training.config import DPOConfig
from ..training.trainer import NormalizedDPOTrainer
from .arguments import DTYPES, ModelArguments, ScriptArguments, is_demo, uses_demo_data, uses_demo_model
from .checks import eval_split_count
from .demo import build_model, build_tokenizer, write_demo_dataset
from .errors import UsageError

logger = logging.getLogger("hf_dpo.cli")

DEMO_DIR = "demo_assets"


def _on_main_process(training_args: DPOConfig, description: str, build) -> None:
    """``build()`` on the main process while the others wait (they read what it wrote)."""
    with training_args.main_process_first(local=False, desc=description):
        if training_args.process_index == 0:
            build()


def demo_data(output_dir: Path, training_args: DPOConfig) -> dict[str, Path]:
    """The demo's ``train.jsonl`` and ``eval.jsonl``, written into ``output_dir/demo_assets``."""
    directory = (output_dir / DEMO_DIR).resolve()
    paths = {"train": directory / "train.jsonl", "eval": directory / "eval.jsonl"}
    _on_main_process(training_args, "writing the demo's pairs", lambda: write_demo_dataset(directory))
    return paths


def demo_model(output_dir: Path, training_args: DPOConfig) -> dict[str, Path]:
    """The demo's tokenizer and random-init tiny model, saved into ``output_dir/demo_assets``."""
    directory = (output_dir / DEMO_DIR).resolve()
    paths = {"tokenizer": directory / "tokenizer", "model": directory / "model"}

    def build():
        tokenizer = build_tokenizer("chatml")
        tokenizer.save_pretrained(paths["tokenizer"])
        build_model(tokenizer).save_pretrained(paths["model"])

    _on_main_process(training_args, "building the demo model", build)
    logger.info("built-in demo model: %s", paths["model"])
    return paths


def hub_kwargs(script_args: ScriptArguments) -> dict[str, Any]:
    """Keyword arguments for ``load_preference_dataset`` from ``--dataset_config`` / ``--dataset_revision``."""
    kwargs = {"name": script_args.dataset_config, "revision": script_args.dataset_revision}
    return {key: value for key, value in kwargs.items() if value is not None}


def _read(flag: str, source, **kwargs):
    """``load_preference_dataset``; a hub data set that cannot be found or fetched is the user's to fix."""
    try:
        return load_preference_dataset(source, **kwargs)
    except (FileNotFoundError, ConnectionError) as err:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise UsageError(f"{flag} {source}: {' '.join(str(err).split())}") from err


def _select_first(dataset, count: Optional[int], flag: str):
    """The first ``count`` pairs (``--max_*_samples``), keeping each row's file:line in the data report."""
    if count is None or count >= len(dataset):
        return dataset
    report = data_report(dataset)  # every data set load_data reads carries one
    subset = dataset.select(range(count))
    return with_report(subset, report.subset(count, f"the first {count} of {len(dataset)} pairs ({flag})"))


def split_off_eval(train, size: float, seed: int):
    """``--eval_split_size``: the training pairs and the held-out ones, each keeping its rows' file:line."""
    held_out = eval_split_count(size, len(train))
    report = data_report(train)
    split = train.train_test_split(test_size=held_out, seed=seed)
    how = f"--eval_split_size {size:g}, seed {seed}"
    train = with_report(split["train"], report.subset(len(split["train"]), f"{held_out} pairs held out ({how})"))
    evaluation = with_report(
        split["test"], report.subset(held_out, f"held out from the {report.rows_kept} training pairs ({how})")
    )
    return train, evaluation


def load_data(script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig):
    """The canonical training and evaluation data sets (evaluation may be None); the demo's when asked for."""
    demo = None
    if uses_demo_data(model_args.model_name_or_path, script_args.dataset):
        demo = demo_data(Path(training_args.output_dir), training_args)
    read = {"on_bad_row": training_args.on_bad_row}
    if not demo:
        read["columns"] = training_args.dataset_columns  # --dataset_columns maps the user's files, eval included
    extra = {} if demo else hub_kwargs(script_args)
    train = _read(
        "--dataset", demo["train"] if demo else script_args.dataset, split=script_args.dataset_split, **read, **extra
    )
    evaluation = None
    if script_args.eval_dataset or script_args.eval_dataset_split:
        eval_source = script_args.eval_dataset or script_args.dataset
        flag = "--eval_dataset" if script_args.eval_dataset else "--eval_dataset_split"
        evaluation = _read(
            flag,
            eval_source,
            split=script_args.eval_dataset_split,
            **read,
            **(extra if not script_args.eval_dataset else {}),
        )
    elif script_args.eval_split_size > 0:
        train, evaluation = split_off_eval(train, script_args.eval_split_size, training_args.seed)
    elif demo is not None:
        evaluation = _read("--dataset", demo["eval"], **read)
    train = _select_first(train, script_args.max_train_samples, "--max_train_samples")
    if evaluation is not None:
        evaluation = _select_first(evaluation, script_args.max_eval_samples, "--max_eval_samples")
    return train, evaluation


def _load(loader, flag: str, name: str, **kwargs):
    """``loader.from_pretrained(name)``; what it refuses (a folder without a model, an unknown or invalid hub name,
    a model type this transformers does not know) is about the user's model: one line naming the flag."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {name}: cannot load it: {' '.join(str(err).split())}") from err


def load_tokenizer(name: str, training_args: DPOConfig, revision: Optional[str] = None, flag: str = "--tokenizer"):
    kwargs: dict[str, Any] = {"trust_remote_code": training_args.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    # A tokenizer without a pad token is left as it is (and saved so): the trainer's collator pads with EOS then,
    # which is safe because masks come from the response mask, never from input_ids != pad_token_id.
    return _load(AutoTokenizer, flag, name, **kwargs)


def load_model(
    name: str,
    model_args: ModelArguments,
    training_args: DPOConfig,
    revision: Optional[str] = None,
    flag: str = "--model_name_or_path",
):
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[model_args.torch_dtype],
        "trust_remote_code": training_args.trust_remote_code,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if revision:
        kwargs["revision"] = revision
    return _load(AutoModelForCausalLM, flag, name, **kwargs)


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def wants_lora_config(model_args: ModelArguments, training_args: DPOConfig) -> bool:
    """Whether the run trains a new LoRA adapter from the --lora_* flags: --use_peft, or --policy_adapter new."""
    return model_args.use_peft or bool(training_args.ref_adapter and training_args.policy_adapter == "new")


def dataset_names(script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig) -> list[str]:
    """The data sets named on the command line (or the demo's files), for the model card."""
    demo = Path(training_args.output_dir) / DEMO_DIR
    uses_demo = uses_demo_data(model_args.model_name_or_path, script_args.dataset)
    names = [str(demo / "train.jsonl") if uses_demo else script_args.dataset]
    names.append(script_args.eval_dataset or (str(demo / "eval.jsonl") if uses_demo else None))
    return list(dict.fromkeys(str(n) for n in names if n))


def build_trainer(
    script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig, train_dataset, eval_dataset
) -> NormalizedDPOTrainer:
    """Models and tokenizer loaded with the usual from_pretrained calls (the demo's from disk), and the trainer."""
    model_name, tokenizer_name = model_args.model_name_or_path, model_args.tokenizer_name_or_path
    revision = model_args.model_revision
    if uses_demo_model(model_name, script_args.dataset):
        demo = demo_model(Path(training_args.output_dir), training_args)
        model_name, revision = str(demo["model"]), None
        tokenizer_name = tokenizer_name or str(demo["tokenizer"])
    ref_name = model_args.ref_model_name_or_path
    if ref_name is not None and is_demo(ref_name):
        ref_name = str(demo_model(Path(training_args.output_dir), training_args)["model"])
    trainer = NormalizedDPOTrainer(
        model=load_model(model_name, model_args, training_args, revision),
        ref_model=load_model(ref_name, model_args, training_args, flag="--ref_model_name_or_path")
        if ref_name
        else None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(
            tokenizer_name or model_name,
            training_args,
            revision if not model_args.tokenizer_name_or_path else None,
            "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path",
        ),
        peft_config=lora_config(model_args) if wants_lora_config(model_args, training_args) else None,
    )
    trainer.model_card_datasets = dataset_names(script_args, model_args, training_args)
    return trainer
