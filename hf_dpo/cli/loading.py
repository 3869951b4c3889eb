"""Models, tokenizer and data for a command-line run: the usual from_pretrained / file / hub calls.

Without ``--model_name_or_path`` (or ``--dataset``) the built-in demo's assets are built
once on the main process and loaded from disk like any user's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data import load_preference_dataset
from ..training.config import DPOConfig
from ..training.trainer import NormalizedDPOTrainer
from .arguments import DTYPES, ModelArguments, ScriptArguments
from .demo import build_demo

logger = logging.getLogger("hf_dpo.cli")


def demo_assets(directory: Path, training_args: DPOConfig) -> dict[str, Path]:
    """Build the demo's tokenizer, model and data once (main process), and return their paths."""
    directory = directory.resolve()
    paths = {
        "tokenizer": directory / "tokenizer",
        "model": directory / "model",
        "train": directory / "train.jsonl",
        "eval": directory / "eval.jsonl",
    }
    with training_args.main_process_first(local=False, desc="building the demo assets"):
        if training_args.process_index == 0:
            built = {key: Path(value).resolve() for key, value in build_demo(directory).items()}
            if built != paths:  # the other ranks rely on this layout without building
                raise RuntimeError(f"hf_dpo.demo.build_demo wrote {built}, expected {paths}")
    return paths


def hub_kwargs(script_args: ScriptArguments) -> dict[str, Any]:
    """Keyword arguments for ``load_preference_dataset`` from ``--dataset_config`` / ``--dataset_revision``."""
    kwargs = {"name": script_args.dataset_config, "revision": script_args.dataset_revision}
    return {key: value for key, value in kwargs.items() if value is not None}


def load_data(script_args: ScriptArguments, training_args: DPOConfig, demo: Optional[dict[str, Path]]):
    """The canonical training and evaluation data sets (evaluation may be None)."""
    source = script_args.dataset or (demo and demo["train"])
    if source is None:
        raise SystemExit("--dataset is required with --model_name_or_path")
    on_bad_row = training_args.on_bad_row
    extra = hub_kwargs(script_args)
    columns = training_args.dataset_columns
    train = load_preference_dataset(
        source, split=script_args.dataset_split, on_bad_row=on_bad_row, columns=columns, **extra
    )
    evaluation = None
    if script_args.eval_dataset or script_args.eval_dataset_split:
        eval_source = script_args.eval_dataset or script_args.dataset
        if eval_source is None:
            raise SystemExit("--eval_dataset_split needs --eval_dataset or --dataset to take the split from")
        if script_args.eval_dataset is None and os.path.exists(eval_source):
            # A local file has no splits: the "test split" would be the training pairs themselves.
            raise SystemExit(
                f"--eval_dataset_split {script_args.eval_dataset_split}: {eval_source} is a local path, which has no splits; "
                "pass --eval_dataset FILE or --eval_split_size instead"
            )
        evaluation = load_preference_dataset(
            eval_source,
            split=script_args.eval_dataset_split,
            on_bad_row=on_bad_row,
            columns=columns,
            **(extra if not script_args.eval_dataset else {}),
        )
    elif script_args.eval_split_size > 0:
        size = script_args.eval_split_size
        split = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    elif script_args.dataset is None and demo is not None:
        evaluation = load_preference_dataset(demo["eval"], on_bad_row=on_bad_row)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def load_tokenizer(name: str, training_args: DPOConfig, revision: Optional[str] = None):
    kwargs: dict[str, Any] = {"trust_remote_code": training_args.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    # A tokenizer without a pad token is left as it is (and saved so): the trainer's collator pads with EOS then,
    # which is safe because masks come from the response mask, never from input_ids != pad_token_id.
    return AutoTokenizer.from_pretrained(name, **kwargs)


def load_model(name: str, model_args: ModelArguments, training_args: DPOConfig, revision: Optional[str] = None):
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[model_args.torch_dtype],
        "trust_remote_code": training_args.trust_remote_code,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if revision:
        kwargs["revision"] = revision
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


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


def dataset_names(script_args: ScriptArguments, demo: Optional[dict[str, Path]]) -> list[str]:
    """The data sets named on the command line (or the demo's files), for the model card."""
    names = [script_args.dataset or (demo and str(demo["train"]))]
    names.append(script_args.eval_dataset or (demo and script_args.dataset is None and str(demo["eval"])) or None)
    return list(dict.fromkeys(str(n) for n in names if n))


def build_trainer(
    script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig
) -> NormalizedDPOTrainer:
    """Models, tokenizer and data loaded with the usual from_pretrained / file / hub calls (the demo's from disk)."""
    demo = None
    if model_args.model_name_or_path is None or script_args.dataset is None:
        demo = demo_assets(Path(training_args.output_dir) / "demo_assets", training_args)
        logger.info("built-in demo: assets in %s", demo["model"].parent)
    model_name = model_args.model_name_or_path or str(demo["model"])
    tokenizer_name = model_args.tokenizer_name_or_path or (model_args.model_name_or_path or str(demo["tokenizer"]))
    revision = model_args.model_revision
    train_dataset, eval_dataset = load_data(script_args, training_args, demo)
    trainer = NormalizedDPOTrainer(
        model=load_model(model_name, model_args, training_args, revision),
        ref_model=load_model(model_args.ref_model_name_or_path, model_args, training_args)
        if model_args.ref_model_name_or_path
        else None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(
            tokenizer_name, training_args, revision if not model_args.tokenizer_name_or_path else None
        ),
        peft_config=lora_config(model_args) if wants_lora_config(model_args, training_args) else None,
    )
    trainer.model_card_datasets = dataset_names(script_args, demo)
    return trainer
