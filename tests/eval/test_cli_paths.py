"""`python -m eval`'s paths checked before the work: a --out (or explain.jsonl) folder it cannot write,
an SAE whose recorded model folder moved; and a report the disk refuses at the end is not lost."""

import errno
import json
from pathlib import Path

import pytest

import eval.__main__ as eval_main
from eval.data import check_recorded_model
from sae.errors import MissingFileError, UsageError, UserError

from known_saes import random_sae


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): from now on, opening a file under `folder` for writing fails as on a read-only
    disk (EROFS). (The tests run as root, whom file permissions do not stop.)"""
    real_open = Path.open

    def make(folder: Path):
        def open_(path, mode="r", *args, **kwargs):
            if set(mode) & set("wax+") and Path(path).resolve().is_relative_to(folder.resolve()):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)

    return make


@pytest.fixture
def no_eval(monkeypatch):
    """Fail the test if the eval starts (loads an LM)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the eval started before the paths were checked")

    monkeypatch.setattr(eval_main, "load_model_and_tokenizer", refuse)


def tiny_sae(root: Path, tiny_lm_dir, text_file, model: str | None = None) -> Path:
    metadata = {"model": model or str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16,
                "dataset": str(text_file), "split": "train", "text_column": "text"}
    return random_sae(32).save(root / "sae", metadata=metadata)


def test_an_out_that_cannot_be_written_fails_in_one_line_before_any_work(tiny_lm_dir, text_file, tmp_path, read_only,
                                                                         no_eval):
    sae_dir = tiny_sae(tmp_path, tiny_lm_dir, text_file)
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    with pytest.raises(UserError, match=r"cannot write to --out report.json in the folder .*locked: Read-only file "
                                        r"system \[EROFS\]; choose another --out") as error:
        eval_main.main([str(sae_dir), "--out", str(locked / "report.json")])
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="locked"):  # its folder cannot be created there either
        eval_main.main([str(sae_dir), "--out", str(locked / "new" / "report.json")])
    with pytest.raises(UsageError, match=r"--out .* is a folder; name the report's file, e.g. .*report.json"):
        eval_main.main([str(sae_dir), "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"cannot write to the folder of explain.jsonl .*locked"):
        eval_main.main([str(sae_dir), "--explain", "2", "--explain_out", str(locked / "units.jsonl")])


def test_a_report_the_disk_refuses_at_the_end_is_printed_not_lost(tiny_lm_dir, text_file, tmp_path, read_only,
                                                                  monkeypatch, capsys):
    sae_dir = tiny_sae(tmp_path, tiny_lm_dir, text_file)
    out = tmp_path / "reports" / "report.json"
    run_eval = eval_main.run_eval

    def eval_then_disk_goes_read_only(*args, **kwargs):
        reports = run_eval(*args, **kwargs)
        read_only(out.parent)
        return reports

    monkeypatch.setattr(eval_main, "run_eval", eval_then_disk_goes_read_only)
    with pytest.raises(UserError, match=r"cannot write the report to .*report.json: Read-only file system \[EROFS\]; "
                                        "it is printed above on stdout instead") as error:
        eval_main.main([str(sae_dir), "--tokens", "160", "--out", str(out)])
    assert "\n" not in str(error.value) and not out.exists()
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("\n{\n") + 1:])
    assert report["sae"] == str(sae_dir) and 0 < report["fvu"]


def test_a_moved_model_folder_fails_in_one_line_before_loading(tiny_lm_dir, text_file, tmp_path, no_eval):
    moved = tmp_path / "models" / "gone"
    sae_dir = tiny_sae(tmp_path, tiny_lm_dir, text_file, model=str(moved))
    with pytest.raises(MissingFileError, match=rf"the model folder {moved} that {sae_dir / 'cfg.json'} records does "
                                               r"not exist \(moved\?\); pass --model with where it is now") as error:
        eval_main.main([str(sae_dir)])
    assert "\n" not in str(error.value)
    job = eval_main.resolve_job(eval_main.EvalConfig(model=str(tiny_lm_dir)), sae_dir)  # --model overrides the record
    assert job.model == str(tiny_lm_dir)


def test_only_what_can_only_be_a_folder_is_checked(tmp_path):
    cfg_json = tmp_path / "cfg.json"
    for hub_name in ("gpt2", "EleutherAI/pythia-70m"):
        check_recorded_model(hub_name, cfg_json)  # the loader's to judge
    check_recorded_model(str(tmp_path), cfg_json)
    for folder in ("./models/llama", "../llama", "~/no-such-models/llama", "runs/models/llama", "/no/such/llama"):
        with pytest.raises(MissingFileError, match="cfg.json records does not exist"):
            check_recorded_model(folder, cfg_json)
