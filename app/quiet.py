"""A quiet start: what TensorFlow, CUDA and faiss print while loading is kept out of the log
unless asked for (``two-tower -v``, or ``TWO_TOWER_VERBOSE=1`` in the environment).

On a CPU machine every command used to open with TensorFlow's ``failed call to cuInit``,
its oneDNN notes, SavedModel chatter, and faiss's eight loader lines (one per instruction
set it tries, with a ``ModuleNotFoundError`` for each it lacks). None of it says anything
wrong. This must run before TensorFlow or faiss is first imported: TensorFlow reads
TF_CPP_MIN_LOG_LEVEL once, when its C++ library loads.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "TWO_TOWER_VERBOSE"
# Python loggers whose INFO lines are load-time chatter: faiss's loader, absl's SavedModel
# notes ("Function `serve` contains input name(s) …"), TensorFlow's "Assets written to"
NOISY_LOGGERS = ("faiss.loader", "absl", "tensorflow")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_start(verbose: bool = False) -> None:
    """Quiet TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL 3: its errors too, which on CPU are
    the cuInit probe and oneDNN notes; a real failure still raises) and the NOISY_LOGGERS
    (WARNING and above pass). ``verbose`` (or TWO_TOWER_VERBOSE) keeps everything and is
    passed on to child processes. A TF_CPP_MIN_LOG_LEVEL already set is left as it is.
    CPU-only unless CUDA_VISIBLE_DEVICES is set: training.tf_env."""
    if verbose or is_verbose():
        os.environ[VERBOSE_ENV] = "1"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
