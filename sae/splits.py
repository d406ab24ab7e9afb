"""Which split a document belongs to, decided by a hash of its text: the rule for the embedded corpus
and for local data files, so held-out text is never training text.

A document's bucket is the first 8 bytes of its SHA-1, modulo 1000. Buckets 0-24 (2.5%) are
`validation` (defaults and ablations are chosen on it), 25-49 (2.5%) are `test` (the tables that
compare us with other tools report on it; nothing is tuned on it), the other 95% are `train`. The rule
depends on the text alone, so the same file gives the same splits on every machine and in every order,
and training (which reads `train` only) never sees a held-out document.
"""

from __future__ import annotations

import hashlib

SPLIT_PER_MILLE = {"validation": 25, "test": 25}
"""Share of documents (in 1/1000) held out in each split; the rest is `train`."""

SPLITS = ("train", "validation", "test")


def document_split(text: str) -> str:
    """"train", "validation" or "test" for a document's text (see the module docstring)."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 1000
    for split, share in SPLIT_PER_MILLE.items():
        if bucket < share:
            return split
        bucket -= share
    return "train"
