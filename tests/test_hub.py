"""The Hub, offline: `SparseAutoencoder.load("hf://...")` from a Hugging Face cache laid out as huggingface_hub
writes it (HF_HUB_OFFLINE=1: huggingface_hub itself resolves refs and snapshots), sparsify's and SAELens's own
Hub loaders reading a published tree from that cache, and `python -m sae.publish` staging (--dry_run) and
uploading against a recording stand-in for `HfApi`. Nothing here reaches the network."""

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants

from sae import SaeConfig, SparseAutoencoder
from sae import publish as publish_module
from sae.errors import MissingFileError, UsageError, run_cli
from sae.hub import parse_hub_path, resolve_sae_path
from sae.publish import main as publish_main
from sae.publish import publish

D_IN, N_LATENTS, K = 32, 64, 4
REPO = "owner/repo"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
METADATA = {"model": "gpt2", "dataset": "Skylion007/openwebtext", "split": "train", "ctx_len": 64,
            "tokens_trained": 4096, "exclude_special_tokens": True, "outlier_norm_ratio": 50.0}


def random_sae(seed: int, **cfg) -> SparseAutoencoder:
    """Every parameter random, so that every term of the math counts when two loads are compared."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=D_IN, n_latents=N_LATENTS, k=K, **cfg))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def save_run(run_dir: Path, seed: int = 0, layers: tuple[int, ...] = (0, 1)) -> Path:
    """A run folder as train.py writes one: an SAE folder per hookpoint."""
    for layer in layers:
        hookpoint = f"transformer.h.{layer}"
        random_sae(seed + layer).save(run_dir / hookpoint, metadata={**METADATA, "hookpoint": hookpoint})
    return run_dir


def put_in_cache(cache: Path, repo_id: str, tree: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Every file under `tree` into the Hugging Face cache `cache` as huggingface_hub's downloads leave it:
    models--OWNER--REPO/blobs/<sha256> (content-addressed), snapshots/<commit>/<path> symlinks to the
    blobs, refs/<branch or tag> holding the commit."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for file in (path for path in tree.rglob("*") if path.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / file.relative_to(tree)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into
    `constants` at import, and its functions read those attributes at call time: patch them there."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def published(tmp_path, hub_cache) -> dict:
    """A run published (--dry_run) at commit A on main, a second run at commit B on the tag v2, both in the
    cache: what `hf download` leaves after reading the repo at both revisions."""
    run_a, run_b = save_run(tmp_path / "run-a", seed=0), save_run(tmp_path / "run-b", seed=10)
    publish(run_a, REPO, dry_run=tmp_path / "tree-a")
    publish(run_b, REPO, dry_run=tmp_path / "tree-b")
    put_in_cache(hub_cache, REPO, tmp_path / "tree-a", COMMIT_A, refs=("main",))
    put_in_cache(hub_cache, REPO, tmp_path / "tree-b", COMMIT_B, refs=("v2",))
    return {"a": run_a, "b": run_b, "tree": tmp_path / "tree-a"}


def assert_same_tensors(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def dense(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(N, n_latents) codes from top-k (values, indices), both (N, k)."""
    return torch.zeros(len(values), N_LATENTS, dtype=torch.float64).scatter(1, indices, values.double())


def activations(n: int = 48) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---- loading -----------------------------------------------------------------------------------------

def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(published, hub_cache):
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT_A, COMMIT_B}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v2"}


def test_load_from_the_hub_cache_equals_the_saved_sae(published, hub_cache):
    local = SparseAutoencoder.load(published["a"] / "transformer.h.1")
    for path in ("hf://owner/repo/transformer.h.1", Path("hf://owner/repo/transformer.h.1"),  # a Path: hf:/...
                 f"hf://owner/repo/transformer.h.1@{COMMIT_A}", "hf://owner/repo/transformer.h.1@main",
                 "hf://owner/repo/saelens/transformer.h.1"):  # the SAELens copy: the same tensors, transposed back
        assert_same_tensors(SparseAutoencoder.load(path), local)
    assert resolve_sae_path("hf://owner/repo/transformer.h.1").is_relative_to(hub_cache / "models--owner--repo")


def test_a_revision_loads_that_revision(published):
    at_v2 = SparseAutoencoder.load(published["b"] / "transformer.h.0")
    for path in ("hf://owner/repo/transformer.h.0@v2", "hf://owner/repo@v2/transformer.h.0",
                 f"hf://owner/repo/transformer.h.0@{COMMIT_B}"):
        assert_same_tensors(SparseAutoencoder.load(path), at_v2)
    assert not torch.equal(SparseAutoencoder.load("hf://owner/repo/transformer.h.0").W_dec, at_v2.W_dec)


def test_a_repo_whose_root_is_the_sae_folder(tmp_path, hub_cache):
    random_sae(3).save(tmp_path / "sae", metadata={"model": "gpt2", "hookpoint": "transformer.h.2"})
    put_in_cache(hub_cache, "owner/one-sae", tmp_path / "sae", COMMIT_A, refs=("main",))
    assert_same_tensors(SparseAutoencoder.load("hf://owner/one-sae"), SparseAutoencoder.load(tmp_path / "sae"))


def test_what_is_not_there_is_one_line_naming_the_cache_and_the_fetch(published, hub_cache):
    storage = hub_cache / "models--owner--repo"
    cases = [("hf://owner/repo/transformer.h.7", ["'transformer.h.7'", str(storage), "HF_HUB_OFFLINE",
                                                   "hf download owner/repo --include 'transformer.h.7' --include 'transformer.h.7/*'"]),
             ("hf://owner/repo/transformer.h.0@v9", ["revision v9", "--revision v9"]),
             ("hf://owner/other/transformer.h.0", [str(hub_cache / "models--owner--other"), "hf download owner/other"])]
    for path, words in cases:
        with pytest.raises(MissingFileError) as error:
            SparseAutoencoder.load(path)
        assert all(word in one_line(error) for word in words), (words, one_line(error))


def test_a_malformed_hub_path_or_a_folder_without_an_sae_is_one_line(published, hub_cache, tmp_path):
    for path, words in [("hf://owner", ["hf://owner", "namespace/name", "hf://OWNER/REPO"]),
                        ("hf://owner/repo//x", ["empty segments"]),
                        ("hf://owner/repo@v1/transformer.h.0@v2", ["two revisions"]),
                        ("hf://owner/repo/transformer.h.0@", ["empty revision"])]:
        with pytest.raises(UsageError) as error:
            SparseAutoencoder.load(path)
        assert all(word in one_line(error) for word in words), one_line(error)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("nothing here\n")
    put_in_cache(hub_cache, "owner/notes", tmp_path, COMMIT_A, refs=("main",))
    with pytest.raises(UsageError) as error:
        SparseAutoencoder.load("hf://owner/notes/notes")
    assert "no SAE layout known" in one_line(error) and "todo.txt" in one_line(error)


def test_parse_hub_path_forms():
    assert parse_hub_path("hf://o/r/a/b@v1") == parse_hub_path("hf://o/r@v1/a/b") == parse_hub_path(Path("hf://o/r/a/b@v1"))
    hub = parse_hub_path("hf://o/r/a/b@v1")
    assert (hub.repo_id, hub.subfolder, hub.revision, str(hub)) == ("o/r", "a/b", "v1", "hf://o/r/a/b@v1")
    assert parse_hub_path("hf://o/r/").subfolder == "" and resolve_sae_path("runs/x") == Path("runs/x")


def test_sparsify_and_saelens_read_the_published_repo_with_their_own_hub_calls(published):
    """Their documented Hub loaders, pointed at the repo id, from the cache (offline): the same codes as ours."""
    sparsify = pytest.importorskip("sparsify")
    sae_lens = pytest.importorskip("sae_lens")
    ours = SparseAutoencoder.load("hf://owner/repo/transformer.h.1")
    x = activations()
    with torch.no_grad():
        values, indices = ours.encode(x)
        theirs = sparsify.SparseCoder.load_from_hub(REPO, hookpoint="transformer.h.1")
        their_values, their_indices, _ = theirs.encode(x)
        torch.testing.assert_close(dense(their_values, their_indices), dense(values, indices), rtol=0, atol=1e-5)
        many = sparsify.SparseCoder.load_many(REPO, layers=["transformer.h.0", "transformer.h.1"])
        assert list(many) == ["transformer.h.0", "transformer.h.1"]
        saelens_sae = sae_lens.SAE.from_pretrained(release=REPO, sae_id="saelens/transformer.h.1")
        torch.testing.assert_close(saelens_sae.encode(x).double(), dense(values, indices), rtol=0, atol=1e-5)


# ---- publishing --------------------------------------------------------------------------------------

def card_metadata(readme: Path) -> dict:
    """The model card's YAML front matter, as huggingface_hub parses it."""
    return huggingface_hub.ModelCard.load(readme).data.to_dict()


def test_dry_run_writes_the_repo_tree_each_library_loads(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    sae_lens = pytest.importorskip("sae_lens")
    run = save_run(tmp_path / "run")
    (run / "transformer.h.0" / "explain.jsonl").write_text("{}\n")  # beside an SAE: not published
    report = [{"sae": str(run / name), "fvu": 0.125, "delta_ce": 0.25, "kl": 0.2, "l0": 4.0, "never_fired_frac": 0.0,
               "data": {"dataset": "embedded", "split": "test"}} for name in ("transformer.h.0", "transformer.h.1")]
    (tmp_path / "report.json").write_text(json.dumps(report))
    publish_main([str(run), REPO, "--dry_run", str(tmp_path / "out"), "--report", str(tmp_path / "report.json")])
    out = tmp_path / "out"
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert files == ["README.md", "eval_report.json",
                     "saelens/transformer.h.0/cfg.json", "saelens/transformer.h.0/sae_weights.safetensors",
                     "saelens/transformer.h.1/cfg.json", "saelens/transformer.h.1/sae_weights.safetensors",
                     "transformer.h.0/cfg.json", "transformer.h.0/sae.safetensors",
                     "transformer.h.1/cfg.json", "transformer.h.1/sae.safetensors"]
    x = activations()
    with torch.no_grad():
        for name in ("transformer.h.0", "transformer.h.1"):
            ours = SparseAutoencoder.load(run / name)
            assert (out / name / "sae.safetensors").read_bytes() == (run / name / "sae.safetensors").read_bytes()
            codes = dense(*ours.encode(x))
            saelens_sae = sae_lens.SAE.load_from_disk(out / "saelens" / name)
            torch.testing.assert_close(saelens_sae.encode(x).double(), codes, rtol=0, atol=1e-5)
            their_values, their_indices, _ = sparsify.SparseCoder.load_from_disk(out / name).encode(x)
            torch.testing.assert_close(dense(their_values, their_indices), codes, rtol=0, atol=1e-5)
        loaded = sparsify.SparseCoder.load_many(str(out), local=True, layers=["transformer.h.0", "transformer.h.1"])
        assert list(loaded) == ["transformer.h.0", "transformer.h.1"]
    metadata = card_metadata(out / "README.md")
    assert metadata["library_name"] == "saelens" and {"saelens", "sparsify", "sparse-autoencoder"} <= set(metadata["tags"])
    assert metadata["base_model"] == ["gpt2"] and metadata["datasets"] == ["Skylion007/openwebtext"]
    card = (out / "README.md").read_text()
    for words in ["| `transformer.h.1` | gpt2 | transformer.h.1 | SAE | 64 | 4 | topk | 4,096 | Skylion007/openwebtext |",
                  "exclude_special_tokens=true, outlier_norm_ratio=50.0", "## Evaluation",
                  "| `transformer.h.0` | 0.125 | 0.25 | 0.2 | 4 | 0 | – | embedded test |",
                  'SparseAutoencoder.load("hf://owner/repo/transformer.h.0")',
                  'SparseCoder.load_from_hub("owner/repo", hookpoint="transformer.h.0")',
                  'SAE.from_pretrained(release="owner/repo", sae_id="saelens/transformer.h.0")']:
        assert words in card, words


def test_one_sae_folder_and_a_transcoder_without_a_saelens_copy(tmp_path):
    random_sae(5, transcode=True).save(tmp_path / "mlp", metadata={"model": "sae/embedded/gpt2-tiny",
                                                                   "hookpoint": "transformer.h.0.mlp"})
    members, out = publish(tmp_path / "mlp", REPO, dry_run=tmp_path / "out")
    assert [(m.name, m.saelens) for m in members] == [("mlp", False)]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "mlp"]
    card = (out / "README.md").read_text()
    assert "| transcoder |" in card and "saelens/" not in card.split("## Load")[1].split("```")[1]
    assert "base_model" not in card_metadata(out / "README.md")  # a local model folder is no Hub id


def test_dry_run_never_overwrites(tmp_path):
    run = save_run(tmp_path / "run", layers=(0,))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep\n")
    with pytest.raises(UsageError, match="already exists"):
        publish(run, REPO, dry_run=tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


class RecordingApi:
    """A stand-in for `huggingface_hub.HfApi`: records each call, and the staged files at upload time."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'c' * 40}",
                                          commit_message=kwargs["commit_message"], commit_description="",
                                          oid="c" * 40)


def test_upload_is_one_commit_of_the_staged_tree(tmp_path, monkeypatch, capsys):
    run = save_run(tmp_path / "run")
    api = RecordingApi()
    monkeypatch.setattr(publish_module, "HfApi", lambda: api)
    publish_main([str(run), REPO, "--private", "--revision", "v1", "--commit_message", "first SAEs"])
    (create, repo_id, create_args), branch, (upload, _, upload_args) = api.calls
    assert (create, repo_id, create_args) == ("create_repo", REPO, {"repo_type": "model", "private": True, "exist_ok": True})
    assert branch == ("create_branch", REPO, {"repo_type": "model", "branch": "v1", "exist_ok": True})
    assert upload == "upload_folder" and upload_args["revision"] == "v1" and upload_args["commit_message"] == "first SAEs"
    assert upload_args["files"] == ["README.md", "saelens/transformer.h.0/cfg.json",
                                    "saelens/transformer.h.0/sae_weights.safetensors", "saelens/transformer.h.1/cfg.json",
                                    "saelens/transformer.h.1/sae_weights.safetensors", "transformer.h.0/cfg.json",
                                    "transformer.h.0/sae.safetensors", "transformer.h.1/cfg.json",
                                    "transformer.h.1/sae.safetensors"]
    assert not Path(upload_args["folder_path"]).exists()  # the staging folder was temporary
    assert "/commit/" in capsys.readouterr().out
    api.calls.clear()
    publish(run, REPO, api=api)  # not private: the owner's default; no branch: main
    assert api.calls[0][2]["private"] is None and [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][2]["revision"] is None and "from run" in api.calls[1][2]["commit_message"]


# ---- command-line mistakes ---------------------------------------------------------------------------

def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: publish_main(argv))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, hub_cache, capsys):
    run = save_run(tmp_path / "run", layers=(0,))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("{}\n")
    (tmp_path / "bad-report.json").write_text('{"fvu": 1}')
    assert "run folder not found" in cli_error([str(tmp_path / "nowhere"), REPO, "--dry_run", str(tmp_path / "o")], capsys)
    assert "no SAE folder" in cli_error([str(tmp_path / "empty"), REPO], capsys)
    assert "log.jsonl" in cli_error([str(tmp_path / "empty"), REPO], capsys)
    for repo_id in ("owner/repo/extra", "no owner", "just-a-name"):
        assert f"repo id {repo_id!r}" in cli_error([str(run), repo_id], capsys)
    assert "eval report" in cli_error([str(run), REPO, "--report", str(tmp_path / "bad-report.json")], capsys)
    assert "HF_HUB_OFFLINE is set" in cli_error([str(run), REPO], capsys)  # the real HfApi, offline
    assert not (tmp_path / "o").exists()


def test_python_m_eval_reads_an_sae_from_the_hub_cache(tmp_path, hub_cache, tiny_lm_dir, text_file):
    from eval.__main__ import main as eval_main
    from sae.errors import UsageError

    tree = tmp_path / "tree"
    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "dataset": str(text_file), "split": "train",
                "ctx_len": 16, "exclude_special_tokens": True}
    random_sae(3).save(tree / "transformer.h.1", metadata=metadata)
    put_in_cache(hub_cache, "owner/tiny", tree, COMMIT_A, refs=("main",))
    [from_hub] = eval_main(["hf://owner/tiny/transformer.h.1", "--tokens", "480", "--split", "test"])
    [local] = eval_main([str(tree / "transformer.h.1"), "--tokens", "480", "--split", "test"])
    assert from_hub["fvu"] == local["fvu"] and from_hub["token_hygiene"]["exclude_special_tokens"]
    with pytest.raises(UsageError, match="--explain_out"):
        eval_main(["hf://owner/tiny/transformer.h.1", "--explain", "2"])
