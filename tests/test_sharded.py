"""Latent sharding (sae/parallel.py, sae/full_state.py): 2 and 4 CPU processes (gloo) launched with torchrun equal one
process; the gathered SAE is one ordinary SAE folder. The checks themselves run in
tests/sharded_worker.py (it fails on any mismatch); here we launch it and check what it wrote."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import REPO, run_script
from sae import SparseAutoencoder
from sae.distributed import DistInfo
from sae.parallel import ShardLayout

WORKER = "tests/sharded_worker.py"


def torchrun_worker(out_dir: Path, nproc: int, shards: str) -> list[dict]:
    run_script([WORKER, str(out_dir), shards], nproc=nproc)
    return json.loads((out_dir / "summary.json").read_text())


def check_records(records: list[dict], out_dir: Path, tags: set[str]) -> None:
    assert {r["tag"] for r in records} == tags
    generator = torch.Generator().manual_seed(5)
    for record in records:
        tag = record["tag"]
        # the run really exercised AuxK (also with k_aux capped by the dead count) and the clip
        assert any(value > 0 for value in record["auxk"]), tag
        assert all(record["clipped"]), tag
        if tag.startswith("auxk"):
            assert any(0 < dead < record["k_aux"] for dead in record["dead"]), tag
        # each rank holds 1/shards of every latent-major parameter and of its optimiser state (b_dec,
        # d_in numbers, whole): a sharded SAE is built and trained shard by shard, never whole
        shards = int(tag.rsplit("x", 1)[1])
        sizes = record["bytes"]
        for kind in ("parameters", "optimizer"):
            latent_major = sizes["one_process"][kind] - sizes["replicated"][kind]
            assert latent_major > 0 and latent_major % shards == 0, (tag, kind)
            assert sizes["rank"][kind] == latent_major // shards + sizes["replicated"][kind], (tag, kind, sizes)
        # the gathered folder is one ordinary SAE, equal to the single-process one
        sharded = SparseAutoencoder.load(out_dir / tag / "sharded")
        ref = SparseAutoencoder.load(out_dir / tag / "ref")
        assert sharded.cfg == ref.cfg
        assert json.loads((out_dir / tag / "sharded" / "cfg.json").read_text())["layout"] == tag
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(sharded.state_dict()[name], value, rtol=1e-9, atol=1e-9, msg=f"{tag} {name}")
        x = torch.randn(20, ref.cfg.d_in, generator=generator, dtype=torch.float64) * 3 + 1
        target = x.flip(1) if ref.cfg.transcode else None
        out, ref_out = sharded(x, target=target), ref(x, target=target)
        if ref.cfg.activation == "batchtopk":
            assert sharded.threshold > 0 and torch.equal(sharded.encode(x)[0] > 0, ref.encode(x)[0] > 0), tag
        else:
            assert torch.equal(out.latent_indices.sort(1).values, ref_out.latent_indices.sort(1).values), tag
        torch.testing.assert_close(out.x_hat, ref_out.x_hat, rtol=1e-9, atol=1e-9)


def test_two_ranks_two_shards_equal_one_process(tmp_path):
    records = torchrun_worker(tmp_path, nproc=2, shards="2")
    check_records(records, tmp_path, {"auxk-1x2", "odd-1x2", "k1-1x2", "llama-1x2", "skiptc-1x2", "batchtopk-1x2",
                                      "matryoshka-1x2"})


def test_four_ranks_replicas_times_shards_equal_one_process(tmp_path):
    # 2 replicas x 2 shards, 1 replica x 4 shards, 4 replicas x 1 shard (plain data parallelism)
    records = torchrun_worker(tmp_path, nproc=4, shards="2,4,1")
    expected = {"auxk-2x2", "odd-2x2", "k1-2x2", "llama-2x2", "auxk-1x4", "k1-1x4", "llama-1x4", "auxk-4x1", "odd-4x1",
                "k1-4x1", "llama-4x1",
                "skiptc-2x2", "skiptc-1x4", "skiptc-4x1", "batchtopk-2x2", "batchtopk-1x4", "batchtopk-4x1",
                "matryoshka-2x2", "matryoshka-1x4", "matryoshka-4x1"}
    check_records(records, tmp_path, expected)


def test_world_of_one_equals_a_plain_sae_without_any_communication(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import sharded_worker
    finally:
        sys.path.remove(str(REPO / "tests"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a world of one must not communicate")

    for name in ("all_reduce", "all_gather", "broadcast", "gather", "new_group", "barrier"):
        monkeypatch.setattr(dist, name, forbidden)
    layout = ShardLayout(0, 1, 1)
    assert (layout.shard_group, layout.replica_group) == (None, None)
    records = [sharded_worker.run_case(name, spec, layout, DistInfo(), tmp_path)
               for name, spec in sharded_worker.CASES.items()]
    check_records(records, tmp_path, {"auxk-1x1", "odd-1x1", "k1-1x1", "llama-1x1", "skiptc-1x1", "batchtopk-1x1",
                                      "matryoshka-1x1"})


def test_rank_sets_and_layout_checks():
    shard_sets, replica_sets = ShardLayout.rank_sets(world_size=8, shards=4)
    assert shard_sets == [[0, 1, 2, 3], [4, 5, 6, 7]]  # same replica: same rows, all latents
    assert replica_sets == [[0, 4], [1, 5], [2, 6], [3, 7]]  # same latent slice: data parallel
    assert ShardLayout.rank_sets(2, 1) == ([[0], [1]], [[0, 1]])
    layout = ShardLayout(0, 1, 1)
    assert (layout.shard, layout.replica, layout.replicas, layout.latent_range(90)) == (0, 0, 1, (0, 90))
    with pytest.raises(ValueError, match="cannot be split"):
        ShardLayout(0, 6, 4)
    with pytest.raises(ValueError, match="cannot be split"):
        ShardLayout(0, 1, 2)
