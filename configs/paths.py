"""Locations of the tiny assets shipped with the repository (the embedded default run)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_ASSETS = REPO_ROOT / "assets" / "tiny"
TINY_STUDENT = str(TINY_ASSETS / "student")
TINY_TEACHER = str(TINY_ASSETS / "teacher")
LOADERS_DIR = str(REPO_ROOT / "llm_distillation" / "datasets" / "loader")  # one loader file per shipped task
TINY_QA_LOADER = str(REPO_ROOT / "llm_distillation" / "datasets" / "loader" / "tiny_qa.py")
TINY_QA_DATA = TINY_ASSETS / "data"
