"""The command line, `python -m sae.cache ...` (see the package docstring): `main` builds and/or verifies a cache."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import CONFIG_OPTION_HELP, TrainConfig, options_help, parse_args
from .format import DEFAULT_SHARD_TOKENS, MANIFEST, STORAGE_DTYPES, read_manifest
from .reader import ActivationCache
from .writer import BuildReport, build_cache

# ---------------------------------------------------------------- command line


def _count(text: str) -> int:
    """A positive whole number from '200000', '2e5' or '200_000'."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def _names(text: str) -> list[str]:
    """Hookpoint names from 'transformer.h.0,transformer.h.1' (distinct, none empty)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated module names, got {text!r}")
    return names


def _cache_arguments() -> argparse.ArgumentParser:
    """The cache's own options; everything else on the command line is a TrainConfig override."""
    parser = argparse.ArgumentParser(
        prog="python -m sae.cache", allow_abbrev=False,
        description="Write the activations of a config's LM hookpoints to a sharded on-disk cache.",
        epilog="A training run's options are accepted too: they say which LM, hookpoints and text to cache.\n"
               + CONFIG_OPTION_HELP + "\n" + options_help(TrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="cache folder (created; resumed if it holds a cache of the same config)")
    parser.add_argument("--hookpoints", type=_names, default=None, metavar="H1,H2,...",
                        help="the hookpoints to cache, in this order (default: those a training run of the config reads: "
                             "its variants' hookpoints, or --hookpoint)")
    parser.add_argument("--tokens", type=_count, default=None,
                        help="activation rows wanted, rounded up to whole windows (default: what training on the config reads)")
    parser.add_argument("--shard_tokens", type=_count, default=None, help=f"rows per shard (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--storage_dtype", choices=sorted(STORAGE_DTYPES), default=None,
                        help="dtype on disk (default float32; bfloat16/float16 halve the size, "
                             "but only float32 is bitwise equal to streaming)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build (also automatic for the same config)")
    parser.add_argument("--verify", action="store_true", help="check every shard's sha256; alone (no --tokens), only that")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m sae.cache ...`: build (and/or verify) a cache; prints a summary. Returns the exit status: 0, or
    INTERRUPTED_STATUS after Ctrl-C with one line saying what was kept and how to resume (a user's mistake is
    raised as sae.errors.UserError, which `run_cli` prints as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options, rest = _cache_arguments().parse_known_args(argv)
    verify_only = options.verify and options.tokens is None
    if not verify_only:
        cfg = parse_args(rest, TrainConfig)
        try:
            report = build_cache(cfg, options.out, options.tokens, options.shard_tokens, options.storage_dtype,
                                 options.resume, progress=not options.no_progress, hookpoints=options.hookpoints)
        except KeyboardInterrupt:  # Ctrl-C: the shards listed so far are whole and valid; say how to go on
            print(_interrupted(Path(options.out), argv), file=sys.stderr)
            return INTERRUPTED_STATUS
        print(_summary(report))
    if options.verify:
        cache = ActivationCache(options.out, verify=True)
        incomplete = "" if cache.complete else (" (an incomplete cache: the build that wrote it stopped early; "
                                                "rerun it to resume)")
        print(f"verified {len(cache.manifest['shards'])} shard(s) of {cache.directory}: sha256 match the manifest, "
              f"every activation is finite{incomplete}")
    return 0


INTERRUPTED_STATUS = 130
"""Exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a command that SIGINT stopped."""


def _interrupted(out: Path, argv: list[str]) -> str:
    """One line for a build stopped by Ctrl-C: what the cache holds (the shards its manifest lists, each whole
    and valid; a shard being written when it stopped is not listed) and the command that resumes it (the same
    one: `build_cache` resumes a cache of the same config by itself)."""
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    held = (f"{manifest['n_windows']:,} windows in {len(manifest['shards'])} complete shard(s), kept" if manifest
            else "nothing yet")
    return (f"interrupted: the cache in {out} holds {held}; to resume, rerun the same command: "
            f"python -m sae.cache {shlex.join(argv)}")


def _summary(report: BuildReport) -> str:
    """One paragraph: the cache's totals, what this run wrote, how fast."""
    lines = [
        f"cache {report.out}: {report.n_windows:,} windows, {report.n_tokens:,} tokens, {report.bytes_total / 1e9:.3f} GB",
        f"hookpoint(s): {', '.join(report.hookpoints)}",
        f"this run wrote {report.windows_written:,} windows ({report.tokens_written:,} tokens, "
        f"{report.bytes_written / 1e9:.3f} GB) in {report.seconds:.1f} s: {report.tokens_per_second:,.0f} tokens/s",
    ]
    if report.shards_rewritten:
        lines.append(f"rewrote corrupt shard(s): {', '.join(report.shards_rewritten)}")
    if report.files_removed:
        lines.append(f"removed leftover file(s): {', '.join(report.files_removed)}")
    return "\n".join(lines)
