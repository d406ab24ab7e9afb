"""Writing the site: render every page, then replace a previous build in the output folder.

Each file goes through sae.files.atomic_write (a temporary file, fsync, rename), so a reader never
sees half a page. The marker file, written last, claims the folder for later rebuilds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sae.files import atomic_write

from .index import index_html
from .inputs import BrowseError, read_cfg, read_report, read_units
from .pages import unit_pages

MARKER_NAME = ".eval-browse.json"
"""Written last into the output folder: marks it as ours (so a rebuild may overwrite it) and lists its pages."""

SITE_FILE_PATTERN = re.compile(r"(index|[a-z][a-z_]*-\d+)\.html")
"""Names of the files a build writes; only these are ever removed from a previous build."""


def previous_site_files(out_dir: Path, force: bool) -> list[str]:
    """Files of a previous build in `out_dir` (to replace), refusing a folder that holds other things.

    An empty or missing folder is fine; so is one with our marker file. Anything else needs `force`
    so that a typo in --out cannot scatter files into (or later delete from) an unrelated folder.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BrowseError(f"--out {out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return []
    marker = out_dir / MARKER_NAME
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            files = []
        return [name for name in files if isinstance(name, str) and SITE_FILE_PATTERN.fullmatch(name)]
    if not force:
        raise BrowseError(f"--out {out_dir} is not empty and is not a previous eval.browse output; "
                          "pick another folder or pass --force to write into it anyway")
    return []


def write_site(out_dir: Path, files: dict[str, str], force: bool) -> None:
    """Write the pages, remove pages of a previous build that this one lacks, then the marker."""
    previous = previous_site_files(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write(out_dir / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for name in set(previous) - set(files):
        (out_dir / name).unlink(missing_ok=True)
    marker = {"generator": "python -m eval.browse", "files": sorted(files)}
    marker_text = json.dumps(marker, indent=1) + "\n"
    atomic_write(out_dir / MARKER_NAME, lambda tmp: Path(tmp).write_text(marker_text, encoding="utf-8"))


def read_scaling_svg(sae_dir: Path) -> str | None:
    """scaling.svg of `python -m eval.scaling` in the run folder above the SAE (runs/RUN/scaling.svg for
    runs/RUN/HOOKPOINT or runs/RUN/VARIANT/HOOKPOINT), if there is one."""
    for folder in list(sae_dir.resolve().parents)[:2]:
        if (folder / "scaling.svg").is_file():
            return (folder / "scaling.svg").read_text(encoding="utf-8")
    return None


def build_site(sae_dir: str | Path, out_dir: str | Path, report_path: str | Path | None = None,
               force: bool = False) -> Path:
    """Write the browsing site of the SAE in `sae_dir` into `out_dir`; returns the index's path.

    Reads SAE_DIR/cfg.json, SAE_DIR/explain.jsonl and SAE_DIR/../log.jsonl (if any) and the eval report
    at `report_path` (if given). Without explanations, the site is the index without the units' parts.
    Raises BrowseError naming whatever is missing or unreadable.
    """
    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    if not sae_dir.is_dir():
        raise BrowseError(f"SAE folder not found: {sae_dir}")
    cfg = read_cfg(sae_dir)
    explain_path = sae_dir / "explain.jsonl"
    units = read_units(explain_path)
    report = read_report(Path(report_path), sae_dir) if report_path else None
    previous_site_files(out_dir, force)  # refuse before the work of rendering
    files = unit_pages(units, cfg)
    files["index.html"] = index_html(cfg, units, explain_path, report, Path(report_path) if report_path else None,
                                     sae_dir.resolve().parent / "log.jsonl", read_scaling_svg(sae_dir))
    write_site(out_dir, files, force)
    return out_dir / "index.html"
