"""Shared test setup: the repository root on sys.path, the CPU numerics pinned, and never the Hugging Face Hub."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import helpers  # noqa: E402,F401  (pins the CPU numeric libraries before any test imports torch)
