"""DPOConfig's fields for evaluation generations (``--eval_generations``, docs/metrics.md).

``DPOConfig`` inherits them (they are its fields on the command line, in config files and in Python);
they live beside :mod:`hf_dpo.training.generation_eval`, which uses them, and
:func:`check_generation_arguments` checks them from ``DPOConfig.__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..common.flags import parse_json_object
from .generations import check_generation_kwargs


@dataclass
class GenerationArguments:
    """``eval_generations`` / ``eval_generation_max_new_tokens`` / ``eval_generation_kwargs``."""

    eval_generations: int = field(
        default=0,
        metadata={
            "help": "At every evaluation (the one before training included, with eval_on_start), complete the first N "
            "held-out prompts and log their length, end-of-turn rate and log-ratio to the reference; records in "
            "output_dir/generations.jsonl and the trackers' tables. 0 turns it off."
        },
    )
    eval_generation_max_new_tokens: int = field(
        default=256, metadata={"help": "Most tokens generated per prompt by --eval_generations."}
    )
    eval_generation_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": "GenerationConfig settings for --eval_generations as a dict or JSON object string; greedy when "
            'unset. E.g. \'{"do_sample": true, "temperature": 0.7, "top_p": 0.9}\' (seeded by seed + step).'
        },
    )


def check_generation_arguments(args: GenerationArguments) -> None:
    """Parse ``eval_generation_kwargs`` in place and refuse settings generation cannot honour."""
    args.eval_generation_kwargs = parse_json_object(args.eval_generation_kwargs, "eval_generation_kwargs")
    check_generation_kwargs(args.eval_generation_kwargs)
    if args.eval_generations < 0:
        raise ValueError(f"--eval_generations must be >= 0, got {args.eval_generations}")
