"""Reference log-probs computed once before training, cached on disk, then the reference model released.

The reference is frozen, so its log-prob sums per pair never change: computing
them every step (and every epoch) costs a third of DPO's FLOPs and a second model
in memory. :func:`precompute_reference` scores every pair of the train and eval
sets once, in ``precompute_ref_batch_size`` batches with a progress bar, and adds
the columns ``ref_chosen_logp_sums`` / ``ref_rejected_logp_sums`` that
:func:`hf_dpo.reference.modes.reference_logp_sums` prefers over any reference model. Sums are stored (with
the token counts), so both summed and length-normalized losses reuse them.

The cache file is keyed by a hash of the tokenized data (token ids and masks), the
reference weights (config, and per tensor its name, shape, dtype and a strided
sample of its values), the tokenizer, the truncation settings and the precision,
so a change in any of them computes afresh.

Under several processes each rank scores a strided shard and the shards are
gathered, so every rank ends with the full columns; the main process writes the
file. The trainer passes its own collator and a ``score(batch)`` that runs the same
scoring as training, so the sums are exactly those the reference would produce then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import datasets
import pyarrow.compute as pc
import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.columns import REF_LOGP_COLUMNS, TOKENIZED_COLUMNS
from ..common.models import unwrap
from ..common.paths import cache_root
from .engines import full_tensors

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_VALUES_PER_TENSOR = 4096


def default_cache_dir() -> Path:
    """``$HF_DPO_CACHE/ref_logps`` (``HF_DPO_CACHE`` defaulting to ``~/.cache/hf_dpo``)."""
    return cache_root() / "ref_logps"


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
    config = getattr(unwrap(model), "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    trainable = {name for name, tensor in unwrap(model).named_parameters() if tensor.requires_grad}
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


def cache_settings(args, tokenizer, ref_fingerprint: str) -> dict[str, Any]:
    """Everything besides the data that decides the reference sums: weights, tokenizer, truncation, precision."""
    return {
        "reference": ref_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "completion_turns": args.completion_turns,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }


def cache_key(dataset, settings: Mapping[str, Any]) -> str:
    """The cache key of one data set's reference sums under ``settings`` (:func:`cache_settings`)."""
    parts = {"format": CACHE_FORMAT, "data": data_fingerprint(dataset), **settings}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _shard(n_rows: int, rank: int, world: int) -> list[int]:
    """Strided shard of ``range(n_rows)``, padded by repeating its last index so that every rank runs as many batches."""
    indices = list(range(rank, n_rows, world))
    per_rank = -(-n_rows // world)
    return indices + [indices[-1] if indices else 0] * (per_rank - len(indices))


Score = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def compute_reference_sums(
    dataset: datasets.Dataset,
    score: Score,
    collate: Callable,
    accelerator,
    batch_size: int,
    description: str,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Score every pair of ``dataset`` with the reference; returns ``(N,)`` tensors per column, in dataset row order.

    ``score(batch) -> (sums (2B,), counts (2B,))`` scores a collated batch under the reference
    (moving it to the device itself). Keys: ``ref_chosen_logp_sums``, ``ref_rejected_logp_sums``
    (float64) and ``chosen_lengths``, ``rejected_lengths`` (int64).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = _shard(len(dataset), rank, world)
    columns = [c for c in dataset.column_names if c not in REF_LOGP_COLUMNS]
    loader = torch.utils.data.DataLoader(
        dataset.select(indices).select_columns(columns), batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    pieces = []
    for batch in tqdm(loader, desc=description, disable=not (progress and accelerator.is_local_main_process)):
        sums, counts = score(batch)
        n_pairs = counts.shape[0] // 2
        counts = counts.to(sums.dtype)
        pieces.append(torch.stack([sums[:n_pairs], sums[n_pairs:], counts[:n_pairs], counts[n_pairs:]], 1))
    local = torch.cat(pieces) if pieces else torch.zeros(0, 4, device=accelerator.device)  # (n_local, 4)
    index = torch.tensor(indices, dtype=torch.long, device=local.device)
    if world > 1:
        local, index = accelerator.gather(local.contiguous()), accelerator.gather(index)
    full = torch.zeros(len(dataset), 4, dtype=torch.float64)  # sums keep the float64 accumulation of score()
    full[index.cpu()] = local.cpu().double()  # padding repeats a row with the same values
    return {
        REF_LOGP_COLUMNS[0]: full[:, 0].clone(),
        REF_LOGP_COLUMNS[1]: full[:, 1].clone(),
        "chosen_lengths": full[:, 2].round().long(),
        "rejected_lengths": full[:, 3].round().long(),
    }


def _load(path: Path, n_rows: int) -> Optional[dict[str, torch.Tensor]]:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        logger.warning("ignoring unreadable reference cache %s (%s)", path, err)
        return None
    if cached.get(REF_LOGP_COLUMNS[0], torch.zeros(0)).shape != (n_rows,):
        logger.warning("ignoring reference cache %s: it has a different number of rows", path)
        return None
    return cached


def _save(path: Path, values: dict[str, torch.Tensor]) -> None:
    """Write ``path`` atomically: a reader, or a run after a kill at any moment, finds the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as handle:
            torch.save(values, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
        os.replace(partial, path)  # atomic on POSIX and Windows within one file system
    finally:
        partial.unlink(missing_ok=True)  # an exception left it half written; after the rename it is gone already


def reference_sums_for(
    dataset: datasets.Dataset,
    name: str,
    settings: Mapping[str, Any],
    cache_dir: Optional[str],
    compute: Callable[[], dict],
) -> dict[str, torch.Tensor]:
    """Load ``dataset``'s reference sums from the cache, or ``compute()`` them (all ranks) and store them (main rank).

    ``cache_dir``: None for the default (:func:`default_cache_dir`), "" for no disk cache.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    path = Path(cache_dir) / f"{cache_key(dataset, settings)}.pt" if cache_dir else None
    # One decision for all ranks, so that they either all load or all take part in the computation.
    cached = [path is not None and path.exists()]
    if state.num_processes > 1:
        broadcast_object_list(cached)
    if cached[0]:
        values = _load(path, len(dataset))
        if values is not None:
            logger.info("%s: reference log-probs loaded from %s", name, path)
            return values
    values = compute()
    if path is not None and state.is_main_process:
        _save(path, values)
        logger.info("%s: reference log-probs cached in %s", name, path)
    state.wait_for_everyone()
    return values


def with_reference_columns(dataset: datasets.Dataset, values: dict[str, torch.Tensor]) -> datasets.Dataset:
    """``dataset`` plus the two ``ref_*_logp_sums`` columns."""
    for column in REF_LOGP_COLUMNS:
        dataset = dataset.add_column(column, values[column].tolist())
    return dataset


def has_reference_columns(dataset) -> bool:
    """Whether ``dataset`` already carries both ``ref_*_logp_sums`` columns."""
    return set(REF_LOGP_COLUMNS) <= set(getattr(dataset, "column_names", ()) or ())
