"""Stage 3, batch layouts: how tokenized pairs become a batch.

``padded`` (the plain :class:`DPOCollator`, ``[chosen_1..B, rejected_1..B]`` right-padded),
``packed`` (padding-free rows and the shared-prompt ``[prompt | chosen | rejected]`` unit),
``attention`` (the attention rule of every layout and the forward's inputs), ``choice``
(``"auto"``: the layout that computes fewer tokens), ``check`` (the first-batch proof that
a layout gives the padded path's numbers on the model at hand), ``grouping`` (length-grouped
sampling).
"""

from .check import LayoutCheck, LayoutMismatchError
from .choice import LayoutChoice, LayoutCollator, build_collator, choose_layouts
from .packed import PackedDPOCollator
from .padded import DPOCollator, default_pad_token_id

__all__ = [
    "DPOCollator",
    "LayoutCheck",
    "LayoutChoice",
    "LayoutCollator",
    "LayoutMismatchError",
    "PackedDPOCollator",
    "build_collator",
    "choose_layouts",
    "default_pad_token_id",
]
