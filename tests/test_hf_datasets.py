"""Hugging Face datasets interop: ``data.train`` naming a ``save_to_disk`` directory, and the
Python API taking a Dataset / DatasetDict in place of a path; same rows, same errors."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import peftlab
from peftlab.data.hf_datasets import resolve_data_objects
from peftlab.data.readers import DataError, read_records
from tests.deps import import_test_dep

datasets = import_test_dep("datasets")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def test_save_to_disk_directory_reads_like_the_jsonl(tiny_chat_model_dir, demo_data_dir,
                                                     tmp_path):
    rows = _rows(demo_data_dir["train"])
    directory = tmp_path / "train_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(directory))
    records, report = read_records(directory, max_rows=5)
    assert records == rows[:5] and report.row_numbers == [1, 2, 3, 4, 5]

    # a bad row: the same check and message as the JSONL's, naming the directory and row
    bad = [*rows[:2], {"instruction": "q", "input": "", "output": None}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad_ds"))
    errors = []
    for source in (tmp_path / "bad.jsonl", tmp_path / "bad_ds"):
        cfg = {"model": str(tiny_chat_model_dir), "data": {"train": str(source)},
               "output_dir": str(tmp_path / "never")}
        with pytest.raises(DataError) as err:
            peftlab.train(cfg, progress=False)
        errors.append(str(err.value).replace(str(source), "SRC"))
    assert errors[0] == errors[1] and "SRC:3" in errors[0]
    assert not (tmp_path / "never").exists()

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:6])}).save_to_disk(str(dd))
    with pytest.raises(DataError, match=r"a DatasetDict directory \(splits: test, train\); "
                                        r"name one split's directory"):
        read_records(dd)
    assert read_records(dd / "test")[0] == rows[3:6]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a directory, but not one written by"):
        read_records(tmp_path / "plain")


def test_missing_datasets_package_is_one_clear_error(demo_data_dir, tmp_path, monkeypatch):
    directory = tmp_path / "ds"
    datasets.Dataset.from_list(_rows(demo_data_dir["train"])[:2]).save_to_disk(str(directory))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"needs the 'datasets' package \(pip install "
                                        r"'peftlab\[datasets\]'\)"):
        read_records(directory)


def test_api_accepts_dataset_objects(tiny_chat_model_dir, demo_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the saved copies land here
    rows, val = _rows(demo_data_dir["train"]), _rows(demo_data_dir["validation"])
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                               "validation": datasets.Dataset.from_list(val[:8])})
    cfg = {"model": str(tiny_chat_model_dir), "method": {"name": "lora", "r": 2},
           "data": {"train": dd},
           "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "num_threads": 1},
           "output_dir": str(tmp_path / "run")}
    summary = peftlab.train(cfg, progress=False)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert summary.data_report["train"]["kept"] == 16
    assert summary.data_report["validation"]["kept"] == 8  # the DatasetDict's validation split
    assert read_records(written["train"])[0] == rows[:16]
    assert Path(written["train"]).parent == tmp_path
    # a .select view is what is read, not the whole table it came from
    view = datasets.Dataset.from_list(rows).select(range(3, 6))
    assert read_records(resolve_data_objects({"train": view})["train"])[0] == rows[3:6]
    with pytest.raises(DataError, match=r"data.validation: the DatasetDict has no 'validation' "
                                        r"split \(splits: train\)"):
        resolve_data_objects({"train": "x.jsonl",
                              "validation": datasets.DatasetDict({"train": view})})
    with pytest.raises(DataError, match="data.train: the Dataset has no rows"):
        resolve_data_objects({"train": view.select([])})
