"""`python -m eval.browse SAE_DIR --out DIR [--report PATH] [--force]`: a static HTML site of an SAE's latents.

    python -m eval SAE_DIR --explain 50 --out report.json     # writes SAE_DIR/explain.jsonl
    python -m eval.browse SAE_DIR --out site/ --report report.json
    # then open site/index.html: it works from file://, needs no server and fetches nothing

The index shows the run (cfg.json), headline numbers (the training's final metrics and, with --report,
the eval report's), training curves from the log SAE_DIR/../log.jsonl when there is one, and a table
of the explained latents and neurons (SAE_DIR/explain.jsonl; without it, as after an eval that did not
explain, the index is the whole site). Each unit gets a page (latent-N.html, neuron-N.html) with its
explanation, scores, activation histogram and excerpts, every token shaded by its activation.
Plots are inline SVG drawn here; the only script is a few lines that sort the index's tables.

From Python: `build_site(sae_dir, out_dir, report_path=None, force=False)` returns the index path.
"""

# Modules: inputs.py (cfg.json, explain.jsonl, the log, the report), svg.py (numbers, ticks, charts),
# pages.py (HTML pieces, CSS, unit pages), index.py (the index page), metrics.py and detection.py (its
# report sections; detection and fuzzing AUC), site.py (writing the site, build_site), __main__.py (the
# CLI; its --help prints the docstring above and the options).

from .inputs import BrowseError
from .site import build_site
from .svg import nice_ticks

__all__ = ["BrowseError", "build_site", "nice_ticks"]
