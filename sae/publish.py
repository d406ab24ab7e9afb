"""Publish a training run's SAEs to the Hugging Face Hub: `python -m sae.publish RUN_DIR OWNER/REPO`.

    python -m sae.publish runs/gpt2 me/gpt2-saes                        # upload (one commit)
    python -m sae.publish runs/gpt2 me/gpt2-saes --private --revision v1 --report report.json
    python -m sae.publish runs/gpt2 me/gpt2-saes --dry_run staged/       # write the repo tree here, upload nothing

RUN_DIR is a run folder (its SAE folders RUN_DIR/HOOKPOINT or RUN_DIR/VARIANT, as train.py writes them) or
one SAE folder. The repo it writes (docs/hub.md):

    NAME/cfg.json, NAME/sae.safetensors      each SAE folder as it is: our layout is sparsify's, so
                                             sparsify.SparseCoder.load_from_hub(REPO, hookpoint=NAME) reads it
    saelens/NAME/cfg.json, .../sae_weights.safetensors
                                             a SAELens copy (sae/convert.py --to saelens; not for transcoders,
                                             which SAELens has no TopK form of): SAE.from_pretrained(REPO, "saelens/NAME")
    README.md                                the model card: front matter (library_name, tags), a table from each
                                             cfg.json, the eval report's numbers (--report), the load calls
    eval_report.json                         the --report file, when given

Only an SAE folder's cfg.json and sae.safetensors are published (not checkpoints or explain records beside
them). The upload is huggingface_hub's (`HfApi.create_repo`, `create_branch`, `upload_folder`: one commit),
with its login (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from .convert import convert
from .errors import MissingFileError, UsageError, run_cli
from .files import atomic_folder, read_json
from .folder import CONFIG_FILE, WEIGHTS_FILE, is_sae_folder, read_sae_files, read_sae_metadata
from .hub import one_line

SAELENS_FOLDER = "saelens"
CARD_FILE = "README.md"
REPORT_FILE = "eval_report.json"
RESERVED_NAMES = (SAELENS_FOLDER, CARD_FILE, REPORT_FILE)
REPORT_KEYS = ("fvu", "delta_ce", "kl", "l0", "never_fired_frac", "dense_frac")
LIBRARY_NAME = "saelens"
"""The card's library_name: the Hub knows "saelens" (huggingface.js model-libraries.ts; SAELens's own uploads
write it: sae_lens/training/upload_saes_to_huggingface.py) and has no "sparsify"; sparsify writes no card."""
TAGS = ("sparse-autoencoder", "saelens", "sparsify", "topk-sae", "interpretability")
HYGIENE_KEYS = ("exclude_special_tokens", "outlier_norm_ratio")


@dataclass(frozen=True)
class Member:
    """One published SAE folder: its repo folder `name`, its cfg.json, and whether a SAELens copy exists."""

    name: str
    metadata: dict[str, Any]
    saelens: bool


def find_sae_folders(run_dir: Path) -> list[Path]:
    """The SAE folders (our layout: sae.safetensors) of the run folder `run_dir` by name, or [`run_dir`] when it
    is one; one line when there is none, or when one's name is a file of the repo's own."""
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir}")
    folders = [run_dir] if is_sae_folder(run_dir) else sorted(p for p in run_dir.iterdir() if is_sae_folder(p))
    if not folders:
        found = sorted(child.name for child in run_dir.iterdir())[:10]
        raise UsageError(f"{run_dir}: no SAE folder (cfg.json + {WEIGHTS_FILE}) there or in its subfolders "
                         f"(found: {', '.join(found) or 'nothing'})")
    for folder in folders:
        if folder.name in RESERVED_NAMES:
            raise UsageError(f"{folder}: an SAE folder named {folder.name!r} would collide with the repo's own "
                             f"{folder.name}; rename it")
    return folders


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is OWNER/REPO as the Hub takes it (huggingface_hub's `validate_repo_id`), else one line."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"repo id {repo_id!r}: {one_line(error)}") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"repo id {repo_id!r}: expected OWNER/REPO (a user or organisation, then the repo's name)")
    return repo_id


def read_report(path: Path) -> list[dict[str, Any]]:
    """The reports in `python -m eval --out` output `path`: one object or a list of them, each naming its "sae"."""
    raw = read_json(path, "eval report")
    reports = raw if isinstance(raw, list) else [raw]
    if not reports or not all(isinstance(report, dict) and "sae" in report for report in reports):
        raise UsageError(f"{path}: expected a python -m eval report (a JSON object with 'sae', or a list of them)")
    return reports


def stage_repo(folders: list[Path], repo_id: str, out: Path, report_path: Path | None = None) -> list[Member]:
    """Write the repo tree (module docstring) of the SAE folders `folders` into the empty folder `out`."""
    members = [stage_member(folder, out) for folder in folders]
    reports = read_report(report_path) if report_path else []
    if report_path:
        shutil.copyfile(report_path, out / REPORT_FILE)
    (out / CARD_FILE).write_text(model_card(repo_id, members, reports))
    return members


def stage_member(folder: Path, out: Path) -> Member:
    """Copy `folder`'s cfg.json and weights (checked to load: `read_sae_files`) to out/NAME, and write its
    SAELens copy to out/saelens/NAME unless it is a transcoder."""
    files = read_sae_files(folder)
    (out / folder.name).mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(folder / name, out / folder.name / name)  # bit for bit: what sparsify reads
    saelens = not files.cfg.transcode
    if saelens:
        convert(folder, out / SAELENS_FOLDER / folder.name, "saelens")
    return Member(folder.name, read_sae_metadata(folder), saelens)


def model_card(repo_id: str, members: list[Member], reports: list[dict[str, Any]]) -> str:
    """README.md: YAML front matter (huggingface_hub's `ModelCardData`), a table of the SAEs from their
    cfg.json, the eval numbers, and each library's load call."""
    models = sorted({str(m.metadata.get("model")) for m in members if m.metadata.get("model")})
    datasets = sorted({str(m.metadata.get("dataset")) for m in members if m.metadata.get("dataset")})
    tags = list(TAGS) + sorted({kind(m.metadata).replace(" ", "-") for m in members} - {"SAE"})
    card = ModelCardData(library_name=LIBRARY_NAME, tags=tags,
                         base_model=[m for m in models if is_hub_id(m)] or None,
                         datasets=[d for d in datasets if is_hub_id(d) and "/" in d] or None)
    summary = (f"{len(members)} sparse coder(s) trained with topk-sae (TopK SAEs, Gao et al. 2024, arXiv 2406.04093). "
               "Each folder is in EleutherAI sparsify's layout (cfg.json + sae.safetensors); "
               f"`{SAELENS_FOLDER}/NAME` holds a SAELens copy of each SAE (not of transcoders).")
    lines = ["---", card.to_yaml(), "---", "", f"# Sparse autoencoders on {', '.join(models) or 'a language model'}",
             "", summary, ""]
    lines += markdown_table(["folder", "model", "hookpoint", "kind", "n_latents", "k", "activation", "tokens trained",
                             "dataset", "token hygiene"], [member_row(m) for m in members])
    if reports:
        lines += ["", "## Evaluation", "", f"From `python -m eval` ({REPORT_FILE}), on held-out text.", ""]
        lines += markdown_table(["sae", *REPORT_KEYS, "data"], [report_row(r) for r in reports])
    lines += ["", "## Load", "", *load_calls(repo_id, members)]
    return "\n".join(lines) + "\n"


def member_row(member: Member) -> list[str]:
    cfg = member.metadata
    hygiene = ", ".join(f"{key}={json.dumps(cfg[key])}" for key in HYGIENE_KEYS if key in cfg)
    tokens = cfg.get("tokens_trained")
    return [f"`{member.name}`", str(cfg.get("model") or "–"), str(cfg.get("hookpoint") or "–"), kind(cfg),
            str(cfg.get("num_latents", "–")), str(cfg.get("k", "–")), str(cfg.get("activation", "topk")),
            f"{tokens:,}" if isinstance(tokens, int) else "–", str(cfg.get("dataset") or "–"), hygiene or "–"]


def report_row(report: dict[str, Any]) -> list[str]:
    values = [f"{report[key]:.4g}" if isinstance(report.get(key), (int, float)) else "–" for key in REPORT_KEYS]
    data = report.get("data")
    if isinstance(data, dict):
        data = " ".join(str(data[key]) for key in ("dataset", "split") if data.get(key)) or json.dumps(data)
    return [f"`{Path(str(report['sae'])).name}`", *values, str(data or "–")]


def kind(cfg: dict[str, Any]) -> str:
    """The kind of coder cfg.json describes: SAE, transcoder or skip transcoder (sparsify's keys)."""
    if cfg.get("transcode"):
        return "skip transcoder" if cfg.get("skip_connection") else "transcoder"
    return "SAE"


def is_hub_id(name: str) -> bool:
    """Whether `name` (a model or dataset from cfg.json) reads as a Hub id rather than a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists() and name.count("/") <= 1


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]


def load_calls(repo_id: str, members: list[Member]) -> list[str]:
    """The card's code block: each library's call that reads this repo's first SAE (and all of them)."""
    first = members[0].name
    names = ", ".join(repr(m.name) for m in members)
    lines = ["```python", "from sae import SparseAutoencoder  # topk-sae",
             f'sae = SparseAutoencoder.load("hf://{repo_id}/{first}")', "",
             "from sparsify import SparseCoder", f'sae = SparseCoder.load_from_hub("{repo_id}", hookpoint="{first}")',
             f'saes = SparseCoder.load_many("{repo_id}", layers=[{names}])']
    saelens = [m.name for m in members if m.saelens]
    if saelens:
        lines += ["", "from sae_lens import SAE",
                  f'sae = SAE.from_pretrained(release="{repo_id}", sae_id="{SAELENS_FOLDER}/{saelens[0]}")']
    # sparsify's load_many reads every top-level folder without layers=, saelens/ too (and its pattern= matches none)
    note = ("`SparseCoder.load_many` needs `layers=`: without it, it reads every top-level folder as a coder, "
            f"`{SAELENS_FOLDER}/` too, and fails there.")
    return [*lines, "```", "", note]


def upload(staged: Path, repo_id: str, private: bool, revision: str | None, message: str, api: HfApi | None = None):
    """Upload the folder `staged` to the model repo `repo_id` (created if new; private if asked, else the
    owner's default) on the branch `revision` (created from main if new; default main), in one commit.
    Returns huggingface_hub's CommitInfo. The Hub's refusals (login, permissions) are one line."""
    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(staged), revision=revision,
                                 commit_message=message)
    except OfflineModeIsEnabled:
        raise UsageError("HF_HUB_OFFLINE is set: uploading needs the Hub; unset it, or stage the repo locally with "
                         "--dry_run OUT_DIR") from None
    except HfHubHTTPError as error:
        raise UsageError(f"the Hub refused the upload to {repo_id}: {one_line(error)} (log in with `hf auth login` "
                         "or set HF_TOKEN to a token with write access)") from None


def publish(run_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
            dry_run: str | Path | None = None, commit_message: str | None = None, report: str | Path | None = None,
            api: HfApi | None = None) -> tuple[list[Member], Any]:
    """Publish `run_dir`'s SAE folders to `repo_id` (module docstring): (the members, huggingface_hub's
    CommitInfo, or the folder written for `dry_run`). Every input is checked before anything is written."""
    run_dir, report_path = Path(run_dir), Path(report) if report else None
    folders, repo_id = find_sae_folders(run_dir), check_repo_id(repo_id)
    if report_path:
        read_report(report_path)
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists():
            raise UsageError(f"{out} already exists; --dry_run never overwrites: remove it or choose another OUT_DIR")
        members: list[Member] = []
        atomic_folder(out, lambda tmp: members.extend(stage_repo(folders, repo_id, tmp, report_path)))
        return members, out
    message = commit_message or f"Upload {len(folders)} SAE folder(s) from {run_dir.resolve().name} (topk-sae)"
    with tempfile.TemporaryDirectory(prefix="sae-publish-") as tmp:
        staged = Path(tmp) / "repo"
        staged.mkdir()
        members = stage_repo(folders, repo_id, staged, report_path)
        return members, upload(staged, repo_id, private, revision, message, api)


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m sae.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's folder (its SAE folders are published) or one SAE folder")
    parser.add_argument("repo_id", help="the Hub model repo, OWNER/REPO (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (created from main if new; default main)")
    parser.add_argument("--dry_run", metavar="OUT_DIR", help="write the repo tree to this new folder and upload nothing")
    parser.add_argument("--commit_message", metavar="MESSAGE", help="the commit's message (default: names the run)")
    parser.add_argument("--report", metavar="FILE", help="a python -m eval --out report: its numbers go into the model card")
    args = parser.parse_args(argv)
    members, result = publish(args.run_dir, args.repo_id, args.private, args.revision, args.dry_run,
                              args.commit_message, args.report)
    names = ", ".join(member.name for member in members)
    if args.dry_run is not None:
        print(f"staged {len(members)} SAE folder(s) ({names}) for {args.repo_id} in {result}; nothing uploaded")
    else:
        print(f"uploaded {len(members)} SAE folder(s) ({names}) to {args.repo_id}: {getattr(result, 'commit_url', result)}")
        print(f"load one with SparseAutoencoder.load('hf://{args.repo_id}/{members[0].name}')")
    return result


if __name__ == "__main__":
    run_cli(main)
