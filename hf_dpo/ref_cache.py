"""Reference log-probs computed once before training, cached on disk, then the reference model released.

The reference is frozen, so its log-prob sums per pair never change: computing
them every step (and every epoch) costs a third of DPO's FLOPs and a second model
in memory. :func:`precompute_reference` scores every pair of the train and eval
sets once, in ``precompute_ref_batch_size`` batches with a progress bar, and adds
the columns ``ref_chosen_logp_sums`` / ``ref_rejected_logp_sums`` that
:mod:`hf_dpo.reference` prefers over any reference model. Sums are stored (with
the token counts), so both summed and length-normalized losses reuse them.

The cache file is keyed by a hash of the tokenized data (token ids and masks), the
reference weights (config, and per tensor its name, shape, dtype and a strided
sample of its values), the tokenizer, the truncation settings and the precision,
so a change in any of them computes afresh.

Under several processes each rank scores a strided shard and the shards are
gathered, so every rank ends with the full columns; the main process writes the
file. The scoring goes through the trainer's own collator and ``score``, so the
sums are exactly those the reference would produce during training.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import datasets
import pyarrow.compute as pc
import torch
from torch import nn
from tqdm.auto import tqdm

from .collator import PASSTHROUGH_FLOAT_COLUMNS
from .engines import full_tensors, unwrap_engine
from .layout_check import check_layout
from .reference import adapter_disabled
from .tokenization import TOKENIZED_COLUMNS

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SUM_COLUMNS = PASSTHROUGH_FLOAT_COLUMNS  # ("ref_chosen_logp_sums", "ref_rejected_logp_sums")
_VALUES_PER_TENSOR = 4096


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_DPO_CACHE", Path.home() / ".cache" / "hf_dpo")) / "ref_logps"


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """Hash of the token ids, response masks and row ids, in row order (independent of how the set was built)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(len(dataset)).encode())
    table = dataset.select_columns([*TOKENIZED_COLUMNS, "row_id"]).with_format("arrow")
    for batch in table.iter(batch_size=10_000):
        for name in (*TOKENIZED_COLUMNS, "row_id"):
            column = batch[name]
            if name != "row_id":
                # Flatten + lengths respect slicing and row selection, unlike the raw buffers.
                digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
                column = pc.list_flatten(column)
            digest.update(column.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module, frozen_only: bool = False) -> str:
    """Hash of a model's config and weights: per tensor its name, shape, dtype and an evenly strided sample of values.

    ``frozen_only`` hashes only parameters without gradients: for a PEFT reference
    (adapter disabled) the trainable adapter must not change the key.
    """
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(unwrap_engine(model), "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    trainable = {name for name, tensor in unwrap_engine(model).named_parameters() if tensor.requires_grad}
    for name, tensor in full_tensors(model):  # gathered one at a time when sharded (ZeRO-3, FSDP2)
        if frozen_only and name in trainable:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            sample = flat[:: max(1, flat.numel() // _VALUES_PER_TENSOR)]
            digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=16)
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(tokenizer.special_tokens_map).encode())
    return digest.hexdigest()


def cache_key(dataset, ref_fingerprint: str, tokenizer, args) -> str:
    """The cache key of one data set's reference sums."""
    parts = {
        "format": CACHE_FORMAT,
        "data": data_fingerprint(dataset),
        "reference": ref_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "completion_turns": args.completion_turns,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _shard(n_rows: int, rank: int, world: int) -> list[int]:
    """Strided shard of ``range(n_rows)``, padded by repeating its last index so that every rank runs as many batches."""
    indices = list(range(rank, n_rows, world))
    per_rank = -(-n_rows // world)
    return indices + [indices[-1] if indices else 0] * (per_rank - len(indices))


def compute_reference_sums(trainer, dataset: datasets.Dataset, description: str) -> dict[str, torch.Tensor]:
    """Score every pair of ``dataset`` with the trainer's reference; returns ``(N,)`` tensors per column.

    Keys: ``ref_chosen_logp_sums``, ``ref_rejected_logp_sums`` (fp32) and
    ``chosen_lengths``, ``rejected_lengths`` (int64), in dataset row order.
    """
    args, accelerator = trainer.args, trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = _shard(len(dataset), rank, world)
    batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
    columns = [c for c in dataset.column_names if c not in SUM_COLUMNS]
    loader = torch.utils.data.DataLoader(
        dataset.select(indices).select_columns(columns), batch_size=batch_size, shuffle=False, collate_fn=trainer.data_collator
    )
    scorer = trainer.ref_model if trainer.reference_mode == "model" else trainer.model
    was_training = scorer.training
    scorer.eval()
    pieces = []
    try:
        for batch in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process or args.disable_tqdm):
            batch = check_layout(trainer, scorer, trainer._prepare_inputs(batch))  # a packed layout proves itself first
            with torch.no_grad(), accelerator.autocast():
                if trainer.reference_mode == "adapter":
                    with adapter_disabled(scorer):
                        sums, counts = trainer.score(scorer, batch)
                else:
                    sums, counts = trainer.score(scorer, batch)
            n_pairs = counts.shape[0] // 2
            pieces.append(torch.stack([sums[:n_pairs], sums[n_pairs:], counts[:n_pairs].to(sums.dtype), counts[n_pairs:].to(sums.dtype)], 1))
    finally:
        scorer.train(was_training)
    local = torch.cat(pieces) if pieces else torch.zeros(0, 4, device=accelerator.device)  # (n_local, 4)
    index = torch.tensor(indices, dtype=torch.long, device=local.device)
    if world > 1:
        local, index = accelerator.gather(local.contiguous()), accelerator.gather(index)
    full = torch.zeros(len(dataset), 4, dtype=torch.float64)  # sums keep the float64 accumulation of score()
    full[index.cpu()] = local.cpu().double()  # padding repeats a row with the same values
    return {
        SUM_COLUMNS[0]: full[:, 0].clone(),
        SUM_COLUMNS[1]: full[:, 1].clone(),
        "chosen_lengths": full[:, 2].round().long(),
        "rejected_lengths": full[:, 3].round().long(),
    }


def _load(path: Path, n_rows: int) -> Optional[dict[str, torch.Tensor]]:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        logger.warning("ignoring unreadable reference cache %s (%s)", path, err)
        return None
    if cached.get(SUM_COLUMNS[0], torch.zeros(0)).shape != (n_rows,):
        logger.warning("ignoring reference cache %s: it has a different number of rows", path)
        return None
    return cached


def _save(path: Path, values: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(values, partial)
    os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the whole new one


def reference_sums_for(trainer, dataset: datasets.Dataset, name: str, ref_fingerprint: str) -> dict[str, torch.Tensor]:
    """Load ``dataset``'s reference sums from the cache, or compute them (all ranks) and store them (main rank)."""
    from accelerate.utils import broadcast_object_list

    args, accelerator = trainer.args, trainer.accelerator
    cache_dir = default_cache_dir() if args.ref_logps_cache_dir is None else args.ref_logps_cache_dir
    path = Path(cache_dir) / f"{cache_key(dataset, ref_fingerprint, trainer.processing_class, args)}.pt" if cache_dir else None
    # One decision for all ranks, so that they either all load or all take part in the computation.
    cached = [path is not None and path.exists()]
    if accelerator.num_processes > 1:
        broadcast_object_list(cached)
    if cached[0]:
        values = _load(path, len(dataset))
        if values is not None:
            logger.info("%s: reference log-probs loaded from %s", name, path)
            return values
    values = compute_reference_sums(trainer, dataset, f"Reference log-probs ({name})")
    if path is not None and accelerator.is_main_process:
        _save(path, values)
        logger.info("%s: reference log-probs cached in %s", name, path)
    accelerator.wait_for_everyone()
    return values


def with_reference_columns(dataset: datasets.Dataset, values: dict[str, torch.Tensor]) -> datasets.Dataset:
    """``dataset`` plus the two ``ref_*_logp_sums`` columns."""
    for column in SUM_COLUMNS:
        dataset = dataset.add_column(column, values[column].tolist())
    return dataset


def precompute_reference(trainer) -> None:
    """Add cached reference sums to the trainer's train and eval sets, then release the reference model.

    Data sets that already carry both ``ref_*_logp_sums`` columns are left as they are.
    """
    if trainer.reference_mode not in ("model", "adapter"):
        raise ValueError(f"--precompute_ref_logps needs a reference, but the reference mode is {trainer.reference_mode!r}")
    scorer = trainer.ref_model if trainer.reference_mode == "model" else trainer.model
    ref_fingerprint = model_fingerprint(scorer, frozen_only=trainer.reference_mode == "adapter")

    def prepare(dataset, name):
        if dataset is None:
            return None
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"--precompute_ref_logps needs a datasets.Dataset, but the {name} set is a {type(dataset).__name__}")
        if set(SUM_COLUMNS) <= set(dataset.column_names):
            return dataset
        return with_reference_columns(dataset, reference_sums_for(trainer, dataset, name, ref_fingerprint))

    trainer.train_dataset = prepare(trainer.train_dataset, "train")
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {key: prepare(value, f"eval_{key}") for key, value in trainer.eval_dataset.items()}
    else:
        trainer.eval_dataset = prepare(trainer.eval_dataset, "eval")
    release_reference_model(trainer)


def release_reference_model(trainer) -> None:
    """Drop the trainer's (and accelerate's) references to the separate reference model and free its memory."""
    ref_model = trainer.ref_model
    if ref_model is None:
        return
    trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not ref_model]
    trainer.ref_model = None
    del ref_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("reference model released: reference log-probs come from the precomputed columns")
