"""fastText supervised training in a fresh process, so its weights start from defined memory.

fastText 0.9.3 (and the fastText wheels built from its master branch, e.g. fasttext-numpy2-wheel)
allocates the input embedding matrix with `posix_memalign` and never clears it: with one
training thread, `DenseMatrix::uniform` writes only the first tenth of the matrix (one block per
thread, ten blocks), so the rest holds whatever the heap held before (valgrind: "conditional jump
depends on uninitialised value", created by `FastText::createRandomMatrix`). In a fresh process a
matrix that large comes straight from `mmap` and reads as zeros, which is what fastText 0.9.2
gave (its matrix was a zero-filled `std::vector`); in a long-lived process (a test session,
a CLI that read files first) glibc reuses freed heap memory, and training then sees garbage:
"Encountered NaN" at any learning rate, different weights from run to run with the same seed.

`train_in_fresh_process` therefore runs fastText in a child interpreter started for the job,
with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so the matrix is always a fresh
zeroed mapping. Training is then repeatable: same data, seed and one thread give the same model
bit for bit. This file is also the child's script; it imports only fastText, not herd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NAN_EXIT = 3  # the child's exit status when fastText's SGD diverged ("Encountered NaN")
NO_TRAINING_EXIT = 4  # the installed `fasttext` module cannot train (fasttext-predict's build)


def train_in_fresh_process(train_file: str | Path, model_out: str | Path, params: dict,
                           progress: bool = False) -> str | None:
    """Train `fasttext.train_supervised(input=train_file, **params)` in a child process, save to model_out.

    progress: fastText's own progress line (percent done, words/s, lr, loss, ETA) goes to stderr.
    Returns None on success, "nan" when training diverged; raises RuntimeError with the child's
    message for anything else (including a `fasttext` module that can only predict: "predict-only").
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    params = dict(params, verbose=2 if progress else 0)
    proc = subprocess.run([sys.executable, __file__, str(train_file), str(model_out), json.dumps(params)],
                          env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode == 0:
        return None
    if proc.returncode == NAN_EXIT:
        return "nan"
    if proc.returncode == NO_TRAINING_EXIT:
        raise RuntimeError("predict-only")
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:]
    raise RuntimeError(tail[0] if tail else f"exit status {proc.returncode}; fastText's output is above")


def _main(train_file: str, model_out: str, params: str) -> int:
    import fasttext

    if not hasattr(fasttext, "train_supervised"):
        return NO_TRAINING_EXIT
    kwargs = json.loads(params)
    try:
        model = fasttext.train_supervised(input=train_file, **kwargs)
    except RuntimeError as e:
        if "NaN" in str(e):
            return NAN_EXIT
        raise
    model.save_model(model_out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
