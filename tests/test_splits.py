"""The per-document split rule (sae/splits.py) shared by the embedded corpus and local files."""

import hashlib
import random
import string

from sae.splits import SPLITS, document_split


def bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 1000


def test_held_out_documents_are_the_first_five_percent_of_the_hash_range_split_in_halves():
    """train is exactly what the embedded corpus' train split was before the test split existed (the
    first 5% of the range held out), so the embedded LM never trained on a validation or test document."""
    rng = random.Random(0)
    texts = ["".join(rng.choices(string.printable, k=rng.randint(1, 80))) for _ in range(20_000)] + ["", "é ü 中文"]
    counts = dict.fromkeys(SPLITS, 0)
    for text in texts:
        split = document_split(text)
        counts[split] += 1
        assert split == ("validation" if bucket(text) < 25 else "test" if bucket(text) < 50 else "train"), text
        assert document_split(text) == split  # deterministic
    assert 0.02 < counts["validation"] / len(texts) < 0.03 and 0.02 < counts["test"] / len(texts) < 0.03
