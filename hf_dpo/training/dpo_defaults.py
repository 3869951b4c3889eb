"""TrainingArguments with DPO's defaults where supervised fine-tuning's are wrong for DPO (docs/usage.md, "Defaults").

TrainingArguments sets 5e-5 for 3 epochs with no warmup and logs every 500 steps: right for supervised
fine-tuning, 50x too fast and too quiet for DPO, which moves a model that already follows instructions.
:class:`~hf_dpo.DPOConfig` inherits these fields; everything else is TrainingArguments' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DPOTrainingDefaults(TrainingArguments):
    """``learning_rate`` 1e-6 (TRL's), one epoch, a 10 percent warmup, logging every 10 steps."""

    learning_rate: float = field(
        default=1e-6,
        metadata={
            "help": "Peak learning rate. DPO moves a model that is already good at following instructions: the usual "
            "range for a full fine-tune is 1e-7 to 5e-6 (TRL's default is 1e-6, SimPO's recipes 3e-7 to 1e-6), far below "
            "supervised fine-tuning's 5e-5. LoRA adapters take about 10x more."
        },
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the preference data. One is the usual DPO recipe: more overfits the preferences."
        },
    )
    warmup_steps: float = field(
        default=0.1,
        metadata={
            "help": "Linear warmup: a number of steps, or a fraction of the run below 1 (default: the first 10 percent)."
        },
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log the loss and the DPO metrics every this many optimizer steps (or this fraction of the run)."
        },
    )
