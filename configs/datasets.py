from dataclasses import dataclass
from typing import Optional

from configs.paths import TINY_QA_LOADER
from configs.fields import option


@dataclass(frozen=True)
class dataset:
    """What the loader file receives as `dataset_config`. Flags: `--dataset.<field>`.

    The loader file is user code: it is imported and run as is.
    """

    file: str = option(TINY_QA_LOADER, "Python file, or a folder holding load.py, defining get_split()", group="data")
    source: Optional[str] = option(None, "hub id or local path of the raw data; None: the loader's default",
                                   group="data")
    generated_by: Optional[str] = option(
        None, "teacher whose generated answers are the labels (ULD convention)", group="data")
    answer_column: Optional[str] = option(
        None, "None: the loader's default (gold answers or answers_generated)", group="data")
    training_size: float = option(1.0, "seeded random fraction of the training split", group="data")
    few_shot: Optional[int] = option(None, "teacher prompt shots; None: the task's default for that teacher",
                                     group="data")
    seed: int = option(42, "training_size sampling and the choice of few-shot examples", group="data")

    # Set by the trainer before each get_split call, not by users:
    role: str = option("student", '"student" | "teacher"', flag=False)
    model_name: Optional[str] = option(None, "the model this tokenization is for", flag=False)
    encoder_decoder: bool = option(False, "whether that model is encoder-decoder", flag=False)
