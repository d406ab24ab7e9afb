"""`python -m eval`: the report of a trained embedded SAE, several SAEs at once, held-out text, wandb."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.data import resolve_model_path
from sae.config import ConfigError
from sae.embedded import EMBEDDED_MODEL_DIR
from sae.folder import read_sae_metadata

from known_saes import random_sae


def data_dir_of(sae_dir: Path) -> str:
    return str(sae_dir.parent.parent.parent / "data")  # the embedded fixture builds its corpus there


def test_report_of_a_trained_embedded_sae(embedded_sae_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    [report] = main([str(embedded_sae_dir), "--tokens", "4096", "--batch", "8", "--out", str(out),
                     "--data_dir", data_dir_of(embedded_sae_dir)])
    assert json.loads(out.read_text()) == report
    assert 0 < report["ce_recovered"] <= 1 and 0 < report["ce_recovered_mean"] <= 1
    assert report["ce_clean"] < report["ce_sae"] < report["ce_mean"] < report["ce_zero"]
    assert 0 < report["fvu"] < 1 and report["kl"] > 0 and report["l0"] <= 16
    assert report["data"]["split"] == "validation" and "validation" in report["data"]["held_out"]
    assert report["model"] == str(EMBEDDED_MODEL_DIR)
    printed = capsys.readouterr().out
    assert str(embedded_sae_dir) in printed and "ce_clean=" in printed
    # the SAE was trained without its separators' rows (cfg.json says so), and is evaluated so unless told
    assert report["token_hygiene"] == {"exclude_special_tokens": True, "outlier_norm_ratio": 0.0}
    [every_token] = main([str(embedded_sae_dir), "--tokens", "4096", "--batch", "8", "--exclude_special_tokens", "false",
                          "--data_dir", data_dir_of(embedded_sae_dir)])
    assert every_token["tokens"] == 64 * 63 > report["tokens"] > 0.9 * 64 * 63
    assert every_token["ce_clean"] == report["ce_clean"] and not every_token["token_hygiene"]["exclude_special_tokens"]


def test_several_saes_share_the_tokens_and_get_one_row_each(embedded_sae_dir, tmp_path, capsys):
    other = tmp_path / "random" / "transformer.h.2"
    metadata = {key: value for key, value in read_sae_metadata(embedded_sae_dir).items() if key in
                ("model", "hookpoint", "ctx_len", "dataset", "dataset_config", "split", "tokens_trained",
                                   "exclude_special_tokens")}
    random_sae(128, n_latents=256, k=8).save(other, metadata=metadata)
    out = tmp_path / "reports.json"
    reports = main([str(embedded_sae_dir), str(other), "--tokens", "2048", "--out", str(out),
                    "--data_dir", data_dir_of(embedded_sae_dir)])
    assert json.loads(out.read_text()) == reports and len(reports) == 2
    assert reports[0]["ce_clean"] == reports[1]["ce_clean"] and reports[0]["tokens"] == reports[1]["tokens"]
    assert reports[1]["fvu"] > reports[0]["fvu"]  # a random SAE reconstructs worse than a trained one
    table = capsys.readouterr().out
    assert str(embedded_sae_dir) in table and str(other) in table


def read_transaction_log(path: Path) -> list:
    """The records of a wandb transaction log (run-ID.wandb): a 7-byte W&B header, then the leveldb log
    format (32 KiB blocks of chunks: crc32 u32, length u16, type u8 full/first/middle/last, then data)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    records, record, offset = [], b"", 7
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a chunk header is zero padding
            offset += 32768 - offset % 32768
            continue
        _, length, kind = struct.unpack_from("<IHB", data, offset)
        chunk, offset = data[offset + 7: offset + 7 + length], offset + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            records.append(Record.FromString(record))
    return records


def test_wandb_writes_the_report_into_the_training_run(embedded_sae_dir):
    import wandb

    run_id = read_sae_metadata(embedded_sae_dir)["wandb_run_id"]
    wandb_dir = embedded_sae_dir.parent / "wandb"
    training_runs = set(wandb_dir.glob(f"offline-run-*-{run_id}"))
    assert training_runs
    [report] = main([str(embedded_sae_dir), "--tokens", "1024", "--wandb", "--wandb_mode", "offline",
                     "--data_dir", data_dir_of(embedded_sae_dir)])
    # run.finish() only publishes the end of the run to wandb's service process, which closes the run's
    # transaction log (writing out its buffered records: before, the file may hold just its header) when it
    # gets to that message. teardown() returns once the service, having handled it, has exited.
    wandb.teardown()
    [eval_run] = set(wandb_dir.glob(f"offline-run-*-{run_id}")) - training_runs  # the eval, resuming the id
    records = read_transaction_log(eval_run / f"run-{run_id}.wandb")
    assert records and records[-1].WhichOneof("record_type") == "exit"  # the whole log, to the run's end
    summary = {item.key: json.loads(item.value_json) for record in records if record.HasField("summary")
               for item in record.summary.update}
    assert summary["eval/ce_recovered"] == pytest.approx(report["ce_recovered"])
    assert summary["eval/fvu"] == pytest.approx(report["fvu"])


def test_cli_errors_name_the_problem(tiny_lm_dir, text_file, tmp_path):
    sae_dir = random_sae(32).save(tmp_path / "bare")  # no model, hookpoint or dataset in cfg.json
    with pytest.raises(ValueError, match=r"does not say its 'dataset'; pass --dataset"):
        main([str(sae_dir)])
    with pytest.raises(ValueError, match=r"does not say its 'model'; pass --model"):
        main([str(sae_dir), "--dataset", str(text_file), "--split", "train", "--ctx_len", "16"])
    with pytest.raises(ConfigError, match="tokens"):
        main([str(sae_dir), "--tokens", "many"])
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        main([str(tmp_path / "missing")])
    # what training read is unknown: a local dataset's validation split, or the split named
    options = ["--dataset", str(text_file), "--ctx_len", "16", "--model", str(tiny_lm_dir), "--hookpoint", "transformer.h.1",
               "--tokens", "160"]
    [report] = main([str(sae_dir), *options])
    assert report["data"]["split"] == "validation" and report["data"]["dataset"] == str(text_file)
    [report] = main([str(sae_dir), *options, "--split", "train"])
    assert report["data"]["split"] == "train" and report["data"]["held_out"] == "split 'train' (as asked)"


def test_module_entry_point_without_a_folder_says_what_to_name():
    result = subprocess.run([sys.executable, "-m", "eval"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: name one or more SAE folders: python -m eval SAE_DIR [SAE_DIR ...] [--options]; --help lists the options"]


def test_embedded_model_path_from_another_checkout_maps_to_this_one(tmp_path):
    assert resolve_model_path("/elsewhere/repo/sae/embedded/gpt2-tiny") == str(EMBEDDED_MODEL_DIR)
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_random_model_baseline_is_trained_and_evaluated_on_the_same_random_lm(tiny_lm_dir, text_file, tmp_path, capsys,
                                                                            monkeypatch):
    """train.py --model_init random trains on the LM rebuilt from its seed and records how to rebuild it;
    the eval rebuilds that LM (not the pretrained one), scores both SAEs side by side and says which LM
    each row reads. (That one seed always rebuilds the same weights: tests/test_activations.py.)"""
    import sae.activations
    import sae.trainer
    import eval.__main__ as eval_main
    from sae.config import DataConfig, SaeConfig, TrainConfig

    loads = []

    def recording(load):
        def wrapper(name, dtype="float32", device="cpu", init="pretrained", init_seed=0):
            loads.append((init, init_seed))
            return load(name, dtype, device, init, init_seed)
        return wrapper

    monkeypatch.setattr(sae.activations, "load_model_and_tokenizer", recording(sae.activations.load_model_and_tokenizer))
    monkeypatch.setattr(eval_main, "load_model_and_tokenizer", recording(eval_main.load_model_and_tokenizer))
    common = dict(model=str(tiny_lm_dir), hookpoint="transformer.h.1", sae=SaeConfig(n_latents=64, k=4, k_aux=16, dead_tokens=2000),
                  data=DataConfig(dataset=str(text_file), ctx_len=16, shuffle_buffer_tokens=512), batch_size=128,
                  max_tokens=128 * 10, save_every=0, out_dir=str(tmp_path / "runs"))
    random_dir = sae.trainer.train(TrainConfig(**common, model_init="random", model_init_seed=3, run_name="random"))
    trained_dir = sae.trainer.train(TrainConfig(**common, run_name="pretrained"))
    assert loads == [("random", 3), ("pretrained", 0)]
    metadata = read_sae_metadata(random_dir)
    assert metadata["model_init"] == "random" and metadata["model_init_seed"] == 3
    assert set(metadata["model_init_versions"]) == {"torch", "transformers"}
    assert "model_init" not in read_sae_metadata(trained_dir)

    reports = main([str(random_dir), str(trained_dir), "--split", "train", "--tokens", "512", "--ablation", "3",
                    "--ablation_horizon", "4"])
    assert loads[2:] == [("random", 3), ("pretrained", 0)]
    assert [report["model_init"] for report in reports] == ["random (seed 3)", "pretrained"]
    assert reports[0]["ce_clean"] != reports[1]["ce_clean"]  # two LMs
    printed = capsys.readouterr().out
    assert "with random (seed 3) weights @ transformer.h.1: ce_clean=" in printed
    assert "lm" in printed and "random (seed 3)" in printed and "ablation" in printed  # the side-by-side table


def test_an_openai_sae_file_is_evaluated_in_raw_units(tiny_lm_dir, text_file, tmp_path):
    """An OpenAI TopK state dict normalises each token (LayerNorm) before encoding; the eval splices its
    reconstruction mapped back to raw units. Built as a perfect autoencoder of the normalised input
    (latents +-e_i, k = d), it reconstructs the raw activations up to the 1e-5 eps: fvu ~ 0, the LM loss
    unchanged. Spliced in normalised units (no mapping back) the fvu would be ~1 and the loss far off."""
    from collections import OrderedDict

    import torch

    d = 32
    eye = torch.eye(d)
    state = OrderedDict(pre_bias=torch.zeros(d), latent_bias=torch.zeros(2 * d))
    state["encoder.weight"] = torch.cat([eye, -eye])
    state["decoder.weight"] = torch.cat([eye, -eye]).T.contiguous()
    state["activation"] = "TopK"
    state["activation_state_dict"] = OrderedDict(k=d, postact_fn="ReLU")
    path = tmp_path / "v5_layer1.pt"
    torch.save(state, path)
    [report] = main([str(path), "--model", str(tiny_lm_dir), "--hookpoint", "transformer.h.1", "--dataset", str(text_file),
                     "--split", "train", "--ctx_len", "16", "--tokens", "256", "--ablation", "2", "--ablation_horizon", "4"])
    assert report["fvu"] < 1e-6 and abs(report["ce_sae"] - report["ce_clean"]) < 1e-4
    assert 0 < report["ablation_sparsity"]["mean"] <= 1
