"""A full or read-only disk: refused before the model loads, or one line that keeps what was done
(the SAE is written before the last checkpoint, earlier checkpoints stay intact) and says how to go on."""

import dataclasses
import errno
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from sae import SparseAutoencoder, checkpoint, files, folder, trainer
from sae.errors import UserError
from sae.trainer import train
from test_trainer import read_log, tiny_config


def fail_writing(real, errno_code: int, when):
    """`real` (a write function taking the path first), raising OSError(errno_code) where `when(path)`
    is true, after writing part of the file, as a disk that fills up does."""
    def write(path, *args, **kwargs):
        if when(str(path)):
            pathlib.Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno_code, os.strerror(errno_code), str(path))
        return real(path, *args, **kwargs)
    return write


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message, message
    return message


def test_a_full_disk_at_the_end_keeps_the_sae_and_resume_writes_the_last_checkpoint(tiny_lm_dir, text_file, tmp_path,
                                                                                    monkeypatch):
    """The final checkpoint used to be written before the (much smaller) SAE: a full disk lost the whole
    run with a traceback. The hint is checked by following it: --resume redoes steps 11-20 exactly."""
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, max_tokens=128 * 20)
    monkeypatch.setattr(checkpoint, "write_safetensors",
                        fail_writing(checkpoint.write_safetensors, errno.ENOSPC, lambda path: "step-00000020" in path))
    with pytest.raises(UserError) as error:
        train(cfg)
    sae_dir, kept = cfg.run_dir / "transformer.h.1", checkpoint.step_dir(cfg.run_dir, 10)
    assert one_line(error) == (
        f"could not write checkpoint {checkpoint.step_dir(cfg.run_dir, 20)}: No space left on device [ENOSPC]; "
        f"the trained SAE is saved in {sae_dir} (only this checkpoint, needed to train on past step 20, is missing); "
        f"the last checkpoint kept is {kept}: free space on the disk of {cfg.run_dir} and rerun with --resume "
        "to continue from step 10")
    saved = load_file(sae_dir / "sae.safetensors")
    assert SparseAutoencoder.load(sae_dir).cfg.n_latents == 128
    assert checkpoint.list_checkpoints(cfg.run_dir) == [kept]
    assert not list(checkpoint.checkpoint_dir(cfg.run_dir).glob(".tmp-*"))  # the partial write is removed

    monkeypatch.undo()
    assert train(dataclasses.replace(cfg, resume=True)) == sae_dir
    assert checkpoint.list_checkpoints(cfg.run_dir) == [kept, checkpoint.step_dir(cfg.run_dir, 20)]
    for name, tensor in load_file(sae_dir / "sae.safetensors").items():
        assert torch.equal(tensor, saved[name]), name


def test_a_full_disk_mid_run_stops_in_one_line_and_keeps_the_earlier_checkpoints(tiny_lm_dir, text_file, tmp_path,
                                                                                 monkeypatch):
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, max_tokens=128 * 30)
    monkeypatch.setattr(checkpoint, "write_safetensors",
                        fail_writing(checkpoint.write_safetensors, errno.EDQUOT, lambda path: "step-00000020" in path))
    with pytest.raises(UserError) as error:
        train(cfg)
    kept = checkpoint.step_dir(cfg.run_dir, 10)
    assert one_line(error) == (
        f"could not write checkpoint {checkpoint.step_dir(cfg.run_dir, 20)}: Disk quota exceeded [EDQUOT]; "
        f"the run stopped at step 20; the last checkpoint kept is {kept}: free space on the disk of {cfg.run_dir} "
        "and rerun with --resume to continue from step 10")
    assert checkpoint.list_checkpoints(cfg.run_dir) == [kept]
    assert not list(checkpoint.checkpoint_dir(cfg.run_dir).glob(".tmp-*"))
    tensors, state = checkpoint.load_checkpoint(kept)
    assert state["step"] == 10 and "W_dec" in tensors


def test_a_failed_sae_write_leaves_no_folder_and_points_at_the_last_checkpoint(tiny_lm_dir, text_file, tmp_path,
                                                                               monkeypatch):
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, max_tokens=128 * 20, save_every=0)
    monkeypatch.setattr(folder, "write_safetensors",
                        fail_writing(folder.write_safetensors, errno.EROFS, lambda path: True))
    with pytest.raises(UserError) as error:
        train(cfg)
    assert one_line(error) == (
        f"could not write the SAE {cfg.run_dir / 'transformer.h.1'}: Read-only file system [EROFS]; "
        f"no checkpoint is kept: make {cfg.run_dir} writable and rerun with --resume to start again from step 0")
    assert [path.name for path in cfg.run_dir.iterdir()] == ["log.jsonl"]  # no SAE folder, whole or part


def test_an_sae_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "sae"
    files.atomic_folder(folder, lambda tmp: (tmp / "a").write_text("old"))

    def half_written(tmp):
        (tmp / "a").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_folder(folder, half_written)
    assert [path.name for path in tmp_path.iterdir()] == ["sae"] and (folder / "a").read_text() == "old"
    files.atomic_folder(folder, lambda tmp: (tmp / "b").write_text("new"))
    assert [path.name for path in folder.iterdir()] == ["b"] and [path.name for path in tmp_path.iterdir()] == ["sae"]


def test_a_full_disk_while_logging_is_one_line(tiny_lm_dir, text_file, tmp_path, monkeypatch):
    class FullAfterOneLine:
        """log.jsonl on a disk with room for one line."""

        def __init__(self, path, *args, **kwargs):
            self.lines = 0

        def write(self, data):
            self.lines += 1
            if self.lines > 1:
                raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(trainer, "open", FullAfterOneLine, raising=False)
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, save_every=5)
    with pytest.raises(UserError) as error:
        train(cfg)
    assert one_line(error).startswith(
        f"could not write {cfg.run_dir / 'log.jsonl'}: No space left on device [ENOSPC]; the run stopped at step 10; "
        f"the last checkpoint kept is {checkpoint.step_dir(cfg.run_dir, 5)}: free space")


def refuse_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the run folder was found unwritable")


def test_a_read_only_out_dir_is_refused_before_the_model_loads(tiny_lm_dir, text_file, tmp_path, monkeypatch):
    """It was found only after the model load and the first LM passes (a traceback from RunLog's mkdir).
    A read-only file system, simulated so that the test runs as root too (root ignores chmod)."""
    read_only = tmp_path / "read-only"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(trainer, "load_run_lm", refuse_model_load)
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, out_dir=str(read_only))
    with pytest.raises(UserError) as error:
        train(cfg)
    assert one_line(error) == (f"cannot write to the run folder {cfg.run_dir}: Read-only file system [EROFS]; "
                               "choose a writable --out_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0o555")
def test_an_out_dir_without_write_permission_is_refused_before_the_model_loads(tiny_lm_dir, text_file, tmp_path,
                                                                              monkeypatch):
    out_dir = tmp_path / "locked"
    out_dir.mkdir(mode=0o555)
    monkeypatch.setattr(trainer, "load_run_lm", refuse_model_load)
    try:
        with pytest.raises(UserError, match=rf"^cannot write to the run folder {out_dir}/run: Permission denied"):
            train(tiny_config(tiny_lm_dir, text_file, tmp_path, out_dir=str(out_dir)))
    finally:
        out_dir.chmod(0o755)


def test_max_tokens_is_rounded_down_to_whole_batches_and_said(tiny_lm_dir, text_file, tmp_path, capsys):
    """128 * 10 + 100 tokens used to train 10 batches without a word."""
    sae_dir = train(tiny_config(tiny_lm_dir, text_file, tmp_path, max_tokens=128 * 10 + 100))
    assert ("note: max_tokens 1,380 is not a whole number of batches of 128; training 10 steps = 1,280 tokens "
            "(rounded down)") in capsys.readouterr().out
    assert read_log(sae_dir)[-1]["tokens"] == 1280
    assert SparseAutoencoder.load(sae_dir) is not None
    assert files.read_json(sae_dir / "cfg.json")["tokens_trained"] == 1280
