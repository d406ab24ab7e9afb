"""The end-to-end fine-tune (sae/finetune/): its loss against a plain float64 computation, where its gradient
goes, what the splice leaves clean, exact resume, BatchTopK and Matryoshka, and its one-line refusals."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sae.finetune.run as run_module
from sae.activations import get_module, load_model_and_tokenizer
from sae.config import SaeConfig
from sae.errors import UsageError, run_cli
from sae.finetune import FinetuneOptions, finetune
from sae.finetune.__main__ import main
from sae.finetune.loss import finetune_loss
from sae.model import SparseAutoencoder

F64 = torch.float64
HOOKPOINT, CTX = "transformer.h.1", 16


def tiny_sae_folder(path, lm_dir, text_file, d_in=32, split="train", recorded=None, hookpoint=HOOKPOINT, **fields):
    """An untrained SAE (64 latents, k 4) on the tiny LM's block 1 (width 32), saved with the provenance the
    trainer records."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, n_latents=64, k=4, **fields))
    metadata = {"model": str(lm_dir), "hookpoint": hookpoint, "dataset": str(text_file), "dataset_config": None,
                "split": split, "text_column": "text", "ctx_len": CTX} | (recorded or {})
    return sae.save(path, metadata=metadata)


def options(**overrides):
    defaults = {"tokens": 6 * 4 * CTX, "batch_windows": 4, "log_every": 1, "save_every": 2, "device": "cpu"}
    return FinetuneOptions(**(defaults | overrides))


# ---- the loss, computed plainly in float64 ------------------------------------------------------------------

def gpt2_block(block, h):
    """A GPT-2 block written out: pre-LN causal self-attention and MLP (gelu_new), Conv1D weights (in, out)."""
    B, T, d = h.shape
    heads = block.attn.num_heads
    q, k, v = (block.ln_1(h) @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(d, dim=-1)
    q, k, v = (t.view(B, T, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
    h = h + attended @ block.attn.c_proj.weight + block.attn.c_proj.bias
    u = block.ln_2(h) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
    u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    return h + u @ block.mlp.c_proj.weight + block.mlp.c_proj.bias


def logits_from_block_2(model, h):
    """The logits of the tiny 3-layer GPT-2 from the output h of block 1."""
    return model.lm_head(model.transformer.ln_f(gpt2_block(model.transformer.h[2], h)))


def plain_fvu_loss(sae, x):
    """TopK encode and decode and the fraction of variance unexplained, written out."""
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    x_hat = (values.relu().unsqueeze(-1) * sae.W_dec[indices]).sum(1) + sae.b_dec
    return x_hat, ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def plain_kl(clean_logits, logits):
    p = clean_logits[:, 1:].log_softmax(-1)
    q = logits[:, 1:].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


@pytest.fixture(scope="module")
def lm64(tiny_lm_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_lm_dir))
    return model.to(F64), tokenizer


def test_loss_equals_a_plain_float64_computation(lm64):
    model, _ = lm64
    torch.manual_seed(1)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4), dtype=F64)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.1)
    input_ids = torch.randint(1, 300, (3, CTX))

    loss = finetune_loss(model, get_module(model, HOOKPOINT), sae, input_ids, [], kl_coef=0.7)

    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[2]  # block 1's output
    clean = logits_from_block_2(model, hidden)
    assert torch.allclose(clean, model(input_ids=input_ids).logits, rtol=0, atol=1e-10)  # the plain LM is the LM
    x_hat, fvu = plain_fvu_loss(sae, hidden[:, 1:].reshape(-1, 32))
    spliced = torch.cat([hidden[:, :1], x_hat.view(3, CTX - 1, 32)], dim=1)
    expected = 0.7 * plain_kl(clean, logits_from_block_2(model, spliced)) + fvu
    assert loss.total.dtype == F64
    assert torch.allclose(loss.total, expected, rtol=1e-10, atol=0)
    assert torch.allclose(loss.sae.fvu, fvu, rtol=1e-10, atol=0)


def test_a_transcoders_loss_equals_a_plain_float64_computation(lm64):
    """A transcoder at block 1's MLP: encoded from the MLP's input (no b_dec subtracted), its prediction
    replaces the MLP's output, and its fvu is of that output."""
    model, _ = lm64
    torch.manual_seed(2)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4, transcode=True), dtype=F64)
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
        sae.encoder.bias.normal_(std=0.1)
    input_ids = torch.randint(1, 300, (3, CTX))

    loss = finetune_loss(model, get_module(model, HOOKPOINT + ".mlp"), sae, input_ids, [], kl_coef=0.5)

    block = model.transformer.h[1]
    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[1]  # block 0's output
    h = hidden + block.attn(block.ln_1(hidden))[0]  # block 1 up to its MLP
    mlp_in = block.ln_2(h)
    mlp_out = block.mlp(mlp_in)
    x, y = mlp_in[:, 1:].reshape(-1, 32), mlp_out[:, 1:].reshape(-1, 32)
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    values, indices = pre.topk(4, dim=-1)
    y_hat = (values.relu().unsqueeze(-1) * sae.W_dec[indices]).sum(1) + sae.b_dec
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    spliced = h + torch.cat([mlp_out[:, :1], y_hat.view(3, CTX - 1, 32)], dim=1)
    expected = 0.5 * plain_kl(model(input_ids=input_ids).logits, logits_from_block_2(model, spliced)) + fvu
    assert torch.allclose(loss.total, expected, rtol=1e-10, atol=0)
    assert torch.allclose(loss.sae.fvu, fvu, rtol=1e-10, atol=0)


def test_a_transcoder_fine_tunes_into_a_transcoder_folder(tmp_path, tiny_lm_dir, text_file):
    source = tiny_sae_folder(tmp_path / "src", tiny_lm_dir, text_file, hookpoint=HOOKPOINT + ".mlp", transcode=True)
    out = finetune(source, tmp_path / "run", options(save_every=0))
    tuned = SparseAutoencoder.load(out)
    assert tuned.cfg.transcode and out == tmp_path / "run" / (HOOKPOINT + ".mlp")
    assert not torch.equal(tuned.W_dec, SparseAutoencoder.load(source).W_dec)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_folded_transcoders_decoder_norm_moves_to_its_encoder_exactly(tmp_path, activation):
    """A transcoder saved with its input and output scales folded in has decoder rows of norm s/t; the
    fine-tune starts from unit rows computing the same function (its steps keep rows at unit norm)."""
    torch.manual_seed(3)
    trained = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4, transcode=True, activation=activation))
    with torch.no_grad():
        trained.encoder.bias.normal_(std=0.1)
        if trained.threshold is not None:
            trained.threshold.fill_(0.05)
    folder = trained.save(tmp_path / "tc", input_scale=0.8, output_scale=1.6)
    saved = SparseAutoencoder.load(folder)
    assert torch.allclose(saved.W_dec.norm(dim=1), torch.full((64,), 0.5))
    moved = run_module.load_sae(folder, torch.device("cpu"))
    assert torch.allclose(moved.W_dec.norm(dim=1), torch.ones(64))
    x = torch.randn(50, 32)
    with torch.no_grad():
        expected = saved.decode(*saved.encode(x))
        assert torch.allclose(moved.decode(*moved.encode(x)), expected, rtol=1e-5, atol=1e-6)
    uneven = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4))
    with torch.no_grad():
        uneven.W_dec[0] *= 2
    with pytest.raises(UsageError, match="norms from 1 to 2"):
        run_module.load_sae(uneven.save(tmp_path / "uneven"), torch.device("cpu"))


def test_the_kl_reaches_the_sae_through_the_later_layers_and_the_lm_stays_frozen(lm64):
    model, _ = lm64
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4), dtype=F64)
    loss = finetune_loss(model, get_module(model, HOOKPOINT), sae, torch.randint(1, 300, (2, CTX)), [], kl_coef=1.0)
    loss.kl.backward()  # the KL alone
    assert sae.encoder.weight.grad is not None and sae.encoder.weight.grad.abs().sum() > 0
    assert sae.W_dec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_a_step_changes_the_sae_and_not_the_lm(lm64):
    model, _ = lm64
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4), dtype=F64)
    lm_before = {name: t.clone() for name, t in model.state_dict().items()}
    sae_before = sae.W_dec.detach().clone()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    run_module.training_step(model, get_module(model, HOOKPOINT), sae, optimizer, torch.randint(1, 300, (2, CTX)),
                             [], 1.0, 1e-3)
    assert all(torch.equal(t, lm_before[name]) for name, t in model.state_dict().items())
    assert not torch.equal(sae.W_dec, sae_before)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64, dtype=F64))  # unit-norm rows kept


def test_position_0_and_special_tokens_keep_their_clean_activations(lm64):
    model, tokenizer = lm64
    eos = tokenizer.eos_token_id
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4), dtype=F64)
    with torch.no_grad():
        sae.b_dec.fill_(1e3)  # a poison: every reconstruction is far from every clean activation
    input_ids = torch.randint(1, 300, (2, CTX))
    input_ids[0, 5] = input_ids[1, 9] = eos
    seen = []
    handle = model.transformer.h[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        loss = finetune_loss(model, get_module(model, HOOKPOINT), sae, input_ids, [eos], kl_coef=1.0)
    finally:
        handle.remove()
    clean, spliced = seen  # block 2's input in the clean and the spliced forward
    kept = torch.zeros(2, CTX, dtype=torch.bool)
    kept[:, 0] = kept[0, 5] = kept[1, 9] = True
    assert torch.equal(spliced[kept], clean[kept])
    assert (spliced[~kept] - clean[~kept]).norm(dim=-1).min() > 100
    assert loss.sae.x_hat.shape == (2 * (CTX - 1) - 2, 32)  # the special tokens are left out of the fvu too


# ---- runs ---------------------------------------------------------------------------------------------------

def test_a_run_writes_an_sae_folder_with_its_record(tmp_path, tiny_lm_dir, text_file):
    source = tiny_sae_folder(tmp_path / "src" / "run" / HOOKPOINT, tiny_lm_dir, text_file,
                             recorded={"exclude_special_tokens": True})
    out = finetune(source, None, options(save_every=0))
    assert out == tmp_path / "src" / "run-finetuned" / HOOKPOINT
    SparseAutoencoder.load(out)
    record = json.loads((out / "cfg.json").read_text())
    assert record["hookpoint"] == HOOKPOINT and record["model"] == str(tiny_lm_dir)
    assert {"source", "tokens", "steps", "kl_coef", "lr", "batch_windows", "loss"} <= set(record["finetune"])
    assert record["finetune"]["steps"] == 6 and record["input_scale_folded"] == 1.0
    assert record["finetune"]["exclude_special_tokens"] and record["exclude_special_tokens"]
    assert len((out.parent / "log.jsonl").read_text().splitlines()) == 6


def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_does(tmp_path, tiny_lm_dir, text_file, monkeypatch):
    source = tiny_sae_folder(tmp_path / "src", tiny_lm_dir, text_file)
    whole = finetune(source, tmp_path / "whole", options())

    step = run_module.training_step
    calls = []

    def stop_at_fourth(*args):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2 and the log line of step 3
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(run_module, "training_step", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        finetune(source, tmp_path / "resumed", options())
    monkeypatch.setattr(run_module, "training_step", step)
    resumed = finetune(source, tmp_path / "resumed", options(resume=True))

    for name, tensor in load_file(whole / "sae.safetensors").items():
        assert torch.equal(tensor, load_file(resumed / "sae.safetensors")[name]), name
    def losses(run):
        lines = map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
        return [{key: line[key] for key in ("step", "loss", "kl", "fvu")} for line in lines]

    assert losses("whole") == losses("resumed")


def test_batchtopk_moves_its_running_threshold(tmp_path, tiny_lm_dir, text_file):
    source = tiny_sae_folder(tmp_path / "src", tiny_lm_dir, text_file, activation="batchtopk")
    tensors = load_file(source / "sae.safetensors")
    tensors["threshold"] = torch.tensor(0.05)
    from safetensors.torch import save_file
    save_file(tensors, source / "sae.safetensors")
    out = finetune(source, tmp_path / "run", options(tokens=2 * 4 * CTX, save_every=0))
    assert load_file(out / "sae.safetensors")["threshold"].item() not in (0.0, 0.05)


def test_matryoshka_runs_with_its_prefix_losses(tmp_path, tiny_lm_dir, text_file):
    source = tiny_sae_folder(tmp_path / "src", tiny_lm_dir, text_file, matryoshka=(8, 32))
    out = finetune(source, tmp_path / "run", options(tokens=2 * 4 * CTX, save_every=0))
    assert SparseAutoencoder.load(out).cfg.matryoshka == (8, 32)
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["sae_loss"] > last["fvu"]  # the prefixes reconstruct worse than the whole dictionary


# ---- refusals, one line each ----------------------------------------------------------------------------------

def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    assert stop.value.code == 2
    # transformers' own progress bar of the model load ("Loading weights") is not ours
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line(tmp_path, tiny_lm_dir, text_file, capsys, monkeypatch):
    source = str(tiny_sae_folder(tmp_path / "src", tiny_lm_dir, text_file))
    assert "SAE folder not found" in cli_error([str(tmp_path / "nope"), "--tokens", "1000"], capsys)
    assert "--tokens must be positive" in cli_error([source, "--tokens", "0"], capsys)
    taken = [source, "--tokens", "1000", "--out", str(tmp_path / "taken")]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "already holds files" in cli_error(taken, capsys)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert "no checkpoint" in cli_error(taken + ["--resume"], capsys)
    assert "less than one step" in cli_error([source, "--tokens", "10", "--out", str(tmp_path / "short"),
                                              "--device", "cpu"], capsys)
    narrow = str(tiny_sae_folder(tmp_path / "narrow", tiny_lm_dir, text_file, d_in=16))
    assert "has width 32, but the SAE's d_in is 16" in cli_error(
        [narrow, "--tokens", "1000", "--device", "cpu", "--out", str(tmp_path / "narrow-run")], capsys)
    held_out = str(tiny_sae_folder(tmp_path / "held-out", tiny_lm_dir, text_file, split="test"))
    assert "a held-out split" in cli_error([held_out, "--tokens", "1000"], capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "single process" in cli_error([source, "--tokens", "1000"], capsys)


def test_train_py_fine_tunes_each_sae_after_training_and_refuses_a_taken_folder_first(tmp_path, tiny_lm_dir, text_file,
                                                                                      capsys):
    import train

    argv = [f"--model={tiny_lm_dir}", f"--hookpoint={HOOKPOINT}", f"--data.dataset={text_file}", f"--data.ctx_len={CTX}",
            "--batch_size=64", "--max_tokens=192", "--sae.n_latents=64", "--sae.k=4", f"--out_dir={tmp_path}",
            "--run_name=run", "--variants=[{name: a}, {name: b, k: 2}]", f"--finetune_tokens={32 * CTX}"]
    assert train.main(argv) == 0
    for name in ("a", "b"):
        record = json.loads((tmp_path / f"run-finetuned-{name}" / HOOKPOINT / "cfg.json").read_text())["finetune"]
        assert record["source"] == str(tmp_path / "run" / name) and record["steps"] == 1
    (tmp_path / "again-finetuned-a").mkdir()
    (tmp_path / "again-finetuned-a" / "log.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train.main([*argv[:-3], "--run_name=again", *argv[-2:]]))
    assert exit_info.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()  # refused before training


def test_a_fine_tune_that_does_not_fit_is_refused_naming_its_remedy(lm64):
    from sae.finetune.memory import estimate
    from sae.memory import OutOfMemoryPlan, check_fits

    model, _ = lm64
    plan = estimate(model, HOOKPOINT, SaeConfig(d_in=32, n_latents=64, k=4), 4, CTX, torch.device("cpu"))
    assert plan.total > plan.lm > 0 and plan.layers > 0 and plan.logits > 0
    with pytest.raises(OutOfMemoryPlan, match="the fine-tune needs about .* lower --batch_windows"):
        check_fits(plan, torch.device("cpu"), 1024, "the fine-tune", "lower --batch_windows")
    assert check_fits(plan, torch.device("cpu"), 2**40, "the fine-tune", "lower --batch_windows").endswith("free")
