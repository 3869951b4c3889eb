"""The package's shape, as docs/architecture.md states it: stages in pipeline order, no cycles, rooms that stay small.

Measured with tools/import_graph.py, the same command the docs give for reading the graph.
"""

import ast
import configparser
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_dpo"

spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


@pytest.fixture(scope="module")
def graph():
    return import_graph.analyse(PACKAGE)


def test_imports_go_down_the_pipeline_without_cycles(graph):
    assert graph["cycles"] == []
    assert graph["upward"] == []  # e.g. reference -> losses would be an arrow against the pipeline


def test_the_graph_tool_sees_cycles_and_upward_arrows(tmp_path):
    """The tool itself can fail: a planted cycle and a planted upward import are both reported."""
    package = tmp_path / "hf_dpo"
    for stage in ("data", "training"):
        (package / stage).mkdir(parents=True)
        (package / stage / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "data" / "rows.py").write_text("from ..training import trainer\n")
    (package / "training" / "trainer.py").write_text("from ..data import rows\n")
    found = import_graph.analyse(package)
    assert found["cycles"] == [["hf_dpo.data.rows", "hf_dpo.training.trainer"]]
    assert found["upward"] == [("hf_dpo.data.rows", "hf_dpo.training.trainer")]


def test_top_level_holds_only_entry_points_and_stage_folders():
    files = sorted(p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py")
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert files == ["__init__.py", "__main__.py"]
    assert folders == sorted(import_graph.STAGES)


def test_no_module_is_over_400_lines(graph):
    assert {m: n for m, n in graph["lines"].items() if n > 400} == {}


def test_no_function_outside_training_takes_the_trainer():
    """Functions take what they need (a model, a batch, an accelerator), not the trainer as a service locator."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "training":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
                if "trainer" in names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert offenders == []


def test_public_api_is_unchanged():
    import hf_dpo

    assert sorted(hf_dpo.__all__) == sorted(
        [
            "DPOCollator",
            "DPOConfig",
            "DataError",
            "DataReport",
            "LOSS_REGISTRY",
            "NonFiniteLossError",
            "NormalizedDPOTrainer",
            "hinge_loss",
            "ipo_loss",
            "latest_complete_checkpoint",
            "load_preference_dataset",
            "preference_loss",
            "response_logp_sums",
            "robust_loss",
            "sequence_logps",
            "sft_nll",
            "sigmoid_loss",
            "simpo_loss",
            "tokenize_dataset",
        ]
    )
    assert all(getattr(hf_dpo, name) is not None for name in hf_dpo.__all__)


def test_version_is_written_once():
    import hf_dpo

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert hf_dpo.__version__ == config["metadata"]["version"]
