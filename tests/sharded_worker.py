"""Run by tests/test_sharded.py under torchrun: latent-sharded training equals one process.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/sharded_worker.py OUT_DIR SHARDS[,SHARDS...]

For each layout (world = N/SHARDS replicas x SHARDS shards) and each case below whose n_latents the
layout divides, every rank trains a sharded SAE on its replica's rows of fixed global batches and,
beside it, a single-process `SparseAutoencoder` on the whole global batches with the trainer's own
`training_step` / `initialize_from_first_batch` (the same functions: one code path for every layout). It checks the selection at
every step and the parameters, Adam state and dead counters at the end, writes the gathered SAE
(`sae_from_full_state`) and the reference as ordinary SAE folders, and continues one step from the gathered
state loaded into a fresh sharded SAE. Any mismatch fails an assert (non-zero exit); rank 0 writes
OUT_DIR/summary.json for the test's own checks.
"""

import json
import sys
from pathlib import Path

# Run as a script, sys.path[0] is tests/, where tests/eval would shadow the real `eval` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from safetensors.torch import load_file, save_file

from sae import SaeConfig, SparseAutoencoder, checkpoint, trainer
from sae.config import TrainConfig
from sae.distributed import barrier, init_distributed, shutdown
from sae.model import LATENT_MAJOR_PARAMETERS
from sae.full_state import gather_full_state, load_from_full_state, sae_from_full_state
from sae.parallel import ShardLayout
from sae.trainer import initialize_from_first_batch, training_step

F64 = torch.float64
CASES = {
    # AuxK active with k_aux capped by the dead count at some steps, Multi-TopK on.
    "auxk": dict(cfg=SaeConfig(d_in=12, n_latents=64, k=4, k_aux=48, dead_tokens=32, multi_topk=True), batch=32, steps=6),
    # a latent count that is not a power of two
    "odd": dict(cfg=SaeConfig(d_in=10, n_latents=90, k=5, k_aux=16, dead_tokens=32, multi_topk=True), batch=32, steps=5),
    "k1": dict(cfg=SaeConfig(d_in=8, n_latents=48, k=1, k_aux=6, dead_tokens=16, multi_topk=True), batch=16, steps=5),
    # a non-GPT-2 family's activations (a random-init Llama's residual stream), for many steps: in float64 the
    # trajectories stay together; in float32 a run's rounding is amplified over long runs (docs/distributed.md)
    "llama": dict(cfg=SaeConfig(d_in=32, n_latents=64, k=4, k_aux=32, dead_tokens=64), batch=64, steps=60,
                  batches="llama"),
    # a skip transcoder: the target is another function of the input; W_skip replicated like b_dec
    "skiptc": dict(cfg=SaeConfig(d_in=12, n_latents=64, k=4, k_aux=48, dead_tokens=32, multi_topk=True, transcode=True,
                                 skip_connection=True), batch=32, steps=6),
    # BatchTopK: the threshold over the global batch and every shard; 2 shards' 16 candidates per row may
    # not cover a row (then they double), 4 shards' 16 are all of a shard's latents
    "batchtopk": dict(cfg=SaeConfig(d_in=12, n_latents=64, k=4, k_aux=48, dead_tokens=32, activation="batchtopk"),
                      batch=32, steps=6),
    # Matryoshka prefixes (one within the first shard, one across shards), on BatchTopK
    "matryoshka": dict(cfg=SaeConfig(d_in=12, n_latents=64, k=4, k_aux=48, dead_tokens=32, activation="batchtopk",
                                     matryoshka=(16, 40)), batch=32, steps=6),
}
LR, CLIP, TOL = 1e-2, 0.05, dict(rtol=1e-9, atol=1e-9)


def dense_codes(acts, indices, n_latents):
    """(N, n_latents): the values that fired, each at its latent."""
    acts = acts.detach()
    return torch.zeros(len(acts), n_latents, dtype=acts.dtype).scatter_add_(1, indices, acts.where(acts > 0, 0))


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def state_bytes(sae, optimizer, only=None) -> dict[str, int]:
    """Bytes of the SAE's parameters and of its optimiser's state tensors (of the parameters `only`, if
    given; Adam's 0-d step counters, one per parameter on every rank, left out)."""
    params = [p for p in sae.parameters() if only is None or any(p is q for q in only)]
    return {"parameters": sum(p.nbytes for p in params),
            "optimizer": sum(t.nbytes for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.dim())}


def llama_residual_rows(n_batches: int, batch: int, d_in: int):
    """(n_batches, batch, d_in) float64: the output of layer 1 of a seeded random-init 2-layer Llama (hidden
    d_in) on seeded random tokens, rows shuffled; the same on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=d_in, intermediate_size=2 * d_in, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = LlamaForCausalLM(config).to(F64).eval()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, config.vocab_size, (-(-n_batches * batch // 31), 32), generator=generator)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[2][:, 1:]  # output of model.layers.1
    rows = hidden.reshape(-1, d_in)
    rows = rows[torch.randperm(len(rows), generator=generator)][: n_batches * batch]
    return rows.reshape(n_batches, batch, d_in)


def run_case(name, spec, layout, info, out_dir):
    cfg, batch, steps = spec["cfg"], spec["batch"], spec["steps"]
    tag = f"{name}-{layout.replicas}x{layout.shards}"
    torch.manual_seed(0)
    ref = SparseAutoencoder(cfg, dtype=F64)
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg, dtype=F64, layout=layout)
    lo, hi = sae.latent_start, sae.latent_stop
    for pname, param in sae.named_parameters():
        full = ref.get_parameter(pname)
        assert torch.equal(param, full[lo:hi] if pname in LATENT_MAJOR_PARAMETERS else full), f"{tag}: init of {pname} is not the slice"

    if spec.get("batches") == "llama":
        batches = llama_residual_rows(steps + 1, batch, cfg.d_in)
    else:
        batches = torch.randn(steps + 1, batch, cfg.d_in, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3 + 1
    rows = slice(layout.replica * batch // layout.replicas, (layout.replica + 1) * batch // layout.replicas)
    # a transcoder's targets: a nonlinear function of its inputs (None for an SAE, which reconstructs them)
    mixing = torch.randn(cfg.d_in, cfg.d_in, dtype=F64, generator=torch.Generator().manual_seed(4))
    targets = torch.tanh(batches @ mixing) * 2 + 0.5 if cfg.transcode else None
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, eps=6.25e-10)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, eps=6.25e-10)
    if cfg.transcode:
        ref_scale, ref_out_scale = trainer.initialize_transcoder_from_first_batch(ref, batches[0], targets[0], TrainConfig())
        scale, out_scale = trainer.initialize_transcoder_from_first_batch(sae, batches[0, rows], targets[0, rows],
                                                                          TrainConfig())
        assert abs(out_scale - ref_out_scale) <= 1e-12 * ref_out_scale, (out_scale, ref_out_scale)
    else:
        ref_scale = trainer.initialize_from_first_batch(ref, batches[0], TrainConfig())
        scale = initialize_from_first_batch(sae, batches[0, rows], TrainConfig())
        out_scale = ref_out_scale = None
    assert abs(scale - ref_scale) <= 1e-12 * ref_scale, (scale, ref_scale)

    def target(step, replica_rows, output_scale):
        return None if targets is None else layout.broadcast_rows(targets[step, replica_rows]) * output_scale
    close(sae.b_dec, ref.b_dec, f"{tag}: b_dec init")
    close(sae.encoder.weight, ref.encoder.weight[lo:hi], f"{tag}: fitted encoder scale")
    ref_counters = torch.zeros(cfg.n_latents, dtype=torch.long)
    counters = torch.zeros(sae.n_local, dtype=torch.long)

    record = {"tag": tag, "k_aux": cfg.k_aux, "dead": [], "auxk": [], "clipped": []}

    def step_both(step, model, optimizer, model_counters):
        x = layout.broadcast_rows(batches[step, rows]) * scale
        return training_step(model, optimizer, x, model_counters, LR, CLIP, target(step, rows, out_scale))

    for step in range(steps):
        ref_out = trainer.training_step(ref, ref_opt, batches[step] * ref_scale, ref_counters, LR, CLIP,
                                        target(step, slice(None), ref_out_scale))
        dead = ref_counters >= cfg.dead_tokens  # the dead set AuxK used: after this batch was counted
        out = step_both(step, sae, opt, counters)
        if cfg.activation == "batchtopk":  # (N, c) candidates, c by layout: compare what fired
            ref_codes = dense_codes(ref_out.latent_acts[rows], ref_out.latent_indices[rows], cfg.n_latents)
            codes = dense_codes(out.latent_acts, out.latent_indices, cfg.n_latents)
            assert torch.equal(codes > 0, ref_codes > 0), f"{tag} step {step}: a different batch-top selection"
            close(codes, ref_codes, f"{tag} step {step}: acts")
            close(out.batch_threshold, ref_out.batch_threshold, f"{tag} step {step}: batch threshold")
        else:
            ref_indices, order = ref_out.latent_indices[rows].sort(1)
            indices, my_order = out.latent_indices.sort(1)
            assert torch.equal(indices, ref_indices), f"{tag} step {step}: a different top-k selection"
            ref_acts = ref_out.latent_acts[rows].gather(1, order).detach()
            close(out.latent_acts.gather(1, my_order), ref_acts, f"{tag} step {step}: acts")
        # each replica's losses are its share of the global batch's: they sum to the reference's
        losses = [(o.fvu, o.auxk_loss, o.multi_topk_fvu, o.prefix_fvu, o.loss) for o in (out, ref_out)]
        shares, expected = (torch.stack(values).detach() for values in losses)
        close(layout.sum_over_replicas(shares), expected, f"{tag} step {step}: losses")
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
        record["dead"].append(int(dead.sum()))
        record["auxk"].append(ref_out.auxk_loss.item())
        record["clipped"].append(abs(grad_norm.item() - CLIP) < 1e-4)

    for pname, param in sae.named_parameters():
        full = ref.get_parameter(pname)
        close(param, full[lo:hi] if pname in LATENT_MAJOR_PARAMETERS else full, f"{tag}: {pname} after {steps} steps")
    # what the rank holds: its rows of every latent-major parameter and of their Adam state, b_dec whole
    record["bytes"] = {"rank": state_bytes(sae, opt), "one_process": state_bytes(ref, ref_opt),
                       "replicated": state_bytes(ref, ref_opt, only=[ref.b_dec, ref.W_skip, ref.threshold])}
    assert torch.equal(counters, ref_counters[lo:hi]), f"{tag}: dead counters"

    # one full state (params + Adam + counters) on rank 0, named as a single-process run's
    full = gather_full_state(sae, opt, extra={"tokens_since_fired": counters})
    path = out_dir / tag
    folder = sae_from_full_state(full, sae.cfg).save(path / "sharded", input_scale=scale, metadata={"layout": tag},
                                                     output_scale=out_scale) \
        if layout.is_main else None
    if layout.is_main:
        ref_flat, _ = checkpoint.optimizer_to_flat(ref_opt)
        expected = {**ref.state_dict(), **ref_flat, "tokens_since_fired": ref_counters}
        assert set(full) == set(expected), (sorted(full), sorted(expected))
        for key, value in expected.items():
            close(full[key], value, f"{tag}: full state '{key}'")
        assert folder == path / "sharded"
        ref.save(path / "ref", input_scale=ref_scale, output_scale=ref_out_scale)
        save_file(full, str(path / "full.safetensors"))
    else:
        assert full is None and folder is None
    barrier(info)

    # continue from the gathered state in a fresh sharded SAE (another init, another RNG state)
    torch.manual_seed(123)
    resumed = SparseAutoencoder(cfg, dtype=F64, layout=layout)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=LR, eps=6.25e-10)
    resumed_counters = torch.zeros_like(counters)
    saved = load_file(str(path / "full.safetensors"))
    load_from_full_state(resumed, saved, resumed_opt, extra={"tokens_since_fired": resumed_counters})
    trainer.training_step(ref, ref_opt, batches[steps] * ref_scale, ref_counters, LR, CLIP,
                          target(steps, slice(None), ref_out_scale))
    step_both(steps, sae, opt, counters)
    step_both(steps, resumed, resumed_opt, resumed_counters)
    for (pname, param), resumed_param in zip(sae.named_parameters(), resumed.parameters()):
        assert torch.equal(param, resumed_param), f"{tag}: resumed {pname} differs from the uninterrupted run"
        full_param = ref.get_parameter(pname)
        close(param, full_param[lo:hi] if pname in LATENT_MAJOR_PARAMETERS else full_param, f"{tag}: {pname} after resume")
    assert torch.equal(counters, resumed_counters) and torch.equal(counters, ref_counters[lo:hi])
    return record


def main(out_dir: str, shard_counts: str) -> None:
    info = init_distributed(timeout_s=60)
    out_dir = Path(out_dir)
    records = []
    for shards in map(int, shard_counts.split(",")):
        layout = ShardLayout(info.rank, info.world_size, shards)
        if shards > 1:
            try:
                SparseAutoencoder(SaeConfig(d_in=4, n_latents=shards * 5 + 1, k=2), layout=layout)
            except ValueError as error:
                assert "not divisible" in str(error), error
            else:
                raise AssertionError("n_latents not divisible by shards was accepted")
        for name, spec in CASES.items():
            if spec["cfg"].n_latents % shards == 0:
                records.append(run_case(name, spec, layout, info, out_dir))
    if info.is_main:
        (out_dir / "summary.json").write_text(json.dumps(records, indent=1))
    barrier(info)
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
