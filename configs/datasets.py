from dataclasses import dataclass
from typing import Optional

from configs.paths import TINY_QA_LOADER


@dataclass
class dataset:
    """What the loader file receives as `dataset_config`. Flags: `--dataset.<field>`.

    The loader file is user code: it is imported and run as is.
    """

    file: str = TINY_QA_LOADER  # Python file, or a folder holding load.py, defining get_split()
    source: Optional[str] = None  # hub id or local path of the raw data; None: the loader's default
    generated_by: Optional[str] = None  # teacher whose generated answers are the labels (ULD convention)
    answer_column: Optional[str] = None  # None: the loader's default (gold answers or answers_generated)
    training_size: float = 1.0  # seeded random fraction of the training split
    few_shot: Optional[int] = None  # teacher prompt shots; None: the task's default for that teacher
    seed: int = 42  # training_size sampling and the choice of few-shot examples

    # Set by the trainer before each get_split call, not by users:
    role: str = "student"  # "student" | "teacher"
    model_name: Optional[str] = None  # the model this tokenization is for
    encoder_decoder: bool = False  # whether that model is encoder-decoder
