"""Where a data source goes: our line reader, load_from_disk, or datasets.load_dataset (hub names, parquet folders).

Only the hub itself is mocked (one test patches ``datasets.load_dataset`` and checks the arguments it got);
every local folder is a real one, written by ``save_to_disk`` or ``to_parquet``/``to_json``.
"""

import json

import datasets
import pytest

from hf_dpo.data import data_report, load_preference_dataset
from hf_dpo.data.sources import source_kind

datasets.disable_progress_bars()


def pair(i, layout="conversational"):
    question = f"Opposite of word {i}?"
    if layout == "strings":
        return {"prompt": question, "chosen": f" yes {i}", "rejected": f" no {i}"}
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"yes {i}"}],
        "rejected": [{"role": "assistant", "content": f"no {i}"}],
    }


def answers(dataset):
    return [row["chosen"][0]["content"] if row["chosen"] else row["chosen_text"] for row in dataset]


def test_hub_name_reaches_load_dataset_with_every_option(monkeypatch, tmp_path):
    """The README's command: `trl-lib/ultrafeedback_binarized` is not a local path, so it goes to the hub."""
    monkeypatch.chdir(tmp_path)  # nothing of that name here
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([pair(0), pair(1)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_preference_dataset(
        "trl-lib/ultrafeedback_binarized",
        split="test",
        name="default",
        data_files={"test": "data/test-*.parquet"},
        revision="v1.0",
    )
    assert calls == [
        (
            "trl-lib/ultrafeedback_binarized",
            {"split": "test", "name": "default", "data_files": {"test": "data/test-*.parquet"}, "revision": "v1.0"},
        )
    ]
    assert answers(ds) == ["yes 0", "yes 1"] and list(ds["row_id"]) == [0, 1]
    assert data_report(ds).sources == ["trl-lib/ultrafeedback_binarized:test"]
    calls.clear()
    load_preference_dataset("imdb")  # a name without an org; split defaults to train, unset options are not passed
    assert calls == [("imdb", {"split": "train"})]


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list([pair(0), pair(1)]).save_to_disk(str(tmp_path / "one"))
    ds = load_preference_dataset(str(tmp_path / "one"))
    assert answers(ds) == ["yes 0", "yes 1"] and list(ds["row_id"]) == [0, 1]
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([pair(0)]),
            "test": datasets.Dataset.from_list([pair(5, "strings"), pair(6, "strings")]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert answers(load_preference_dataset(str(tmp_path / "dict"))) == ["yes 0"]
    test = load_preference_dataset(str(tmp_path / "dict"), split="test")
    assert answers(test) == [" yes 5", " yes 6"] and data_report(test).sources == [f"{tmp_path / 'dict'}:test"]
    with pytest.raises(ValueError, match=r"no split 'validation'; available: \['train', 'test'\]"):
        load_preference_dataset(str(tmp_path / "dict"), split="validation")


def test_parquet_and_json_folders_in_the_hub_layout(tmp_path):
    """data/<split>-00000-of-00001.parquet, as the hub stores data sets; a JSON Lines variant; one parquet file."""
    parquet = tmp_path / "parquet"
    (parquet / "data").mkdir(parents=True)
    datasets.Dataset.from_list([pair(0), pair(1), pair(2)]).to_parquet(
        str(parquet / "data" / "train-00000-of-00001.parquet")
    )
    datasets.Dataset.from_list([pair(7)]).to_parquet(str(parquet / "data" / "test-00000-of-00001.parquet"))
    (parquet / "README.md").write_text("a data set card\n")
    assert source_kind(str(parquet)) == "local_dataset"
    assert answers(load_preference_dataset(str(parquet))) == ["yes 0", "yes 1", "yes 2"]
    assert answers(load_preference_dataset(str(parquet), split="test")) == ["yes 7"]
    only_test = load_preference_dataset(str(parquet), data_files={"train": "data/test-*.parquet"})
    assert answers(only_test) == ["yes 7"]

    jsonl = tmp_path / "jsonl"
    (jsonl / "data").mkdir(parents=True)
    datasets.Dataset.from_list([pair(3, "strings"), pair(4, "strings")]).to_json(
        str(jsonl / "data" / "train-00000-of-00001.jsonl")
    )
    assert answers(load_preference_dataset(str(jsonl))) == [" yes 3", " yes 4"]

    single = load_preference_dataset(str(parquet / "data" / "test-00000-of-00001.parquet"))
    assert answers(single) == ["yes 7"]


def test_existing_local_path_wins_and_missing_paths_name_themselves(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"reached the hub with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "prefs.jsonl").write_text(json.dumps(pair(0)) + "\n" + json.dumps(pair(1)) + "\n")
    local = load_preference_dataset("org/name")  # spelled like a hub id, but it exists here
    assert answers(local) == ["yes 0", "yes 1"] and list(local["row_id"]) == [1, 2]
    for missing in (
        "missing.jsonl",
        "org/missing.json",
        "data.parquet",
        "./data",
        "../elsewhere",
        "/no/such/folder",
        "a/b/c",
    ):
        with pytest.raises(FileNotFoundError, match=f"preference data not found: {missing} "):
            load_preference_dataset(missing)
    with pytest.raises(ValueError, match=r"org/name: data_files, revision apply to hub names and data set folders"):
        load_preference_dataset("org/name", data_files="x.parquet", revision="main")


def test_arrow_null_filled_message_keys_are_not_counted_as_ignored(tmp_path):
    """Parquet gives every message the union of keys, None-filled: only a real extra value counts."""
    named = pair(1)
    named["chosen"] = [{"role": "assistant", "content": "yes 1", "name": "bot"}]
    folder = tmp_path / "data"
    folder.mkdir()
    datasets.Dataset.from_list([pair(0), named, pair(2)]).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    ds = load_preference_dataset(str(tmp_path))
    assert answers(ds) == ["yes 0", "yes 1", "yes 2"]
    assert data_report(ds).counters["ignored_message_keys"] == 1
