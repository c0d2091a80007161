"""Build (or check) the tiny assets in assets/tiny: QA data, two tokenizers, a trained teacher, two students.

    python scripts/build_tiny_assets.py            # rebuild everything (a few CPU minutes), print the scores
    python scripts/build_tiny_assets.py --check    # rebuild data and tokenizers in a temporary folder and
                                                   # compare them byte for byte with the shipped ones

Offline; deterministic (see llm_distillation/tiny_assets.py). Torch runs on one intra-op thread:
the teacher's weights then do not depend on the machine's core count, and these tiny matrices gain
nothing from more threads (a second one made training 4x slower on a busy 2-core machine).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402

import fire  # noqa: E402

from configs.paths import TINY_ASSETS  # noqa: E402
from llm_distillation import tiny_assets  # noqa: E402


def main(output: str = str(TINY_ASSETS), check: bool = False, loader: str = None, work_dir: str = None) -> None:
    """Build into `output` (default assets/tiny); `--check` only verifies the shipped data and tokenizers.

    `--loader` trains the teacher with another loader file (default: the tiny_qa loader);
    `--work_dir` keeps the teacher's training run (checkpoints, metrics.jsonl) there.
    """
    import torch

    torch.set_num_threads(1)
    root = Path(output)
    if check:
        differ = tiny_assets.check_reproducible(root)
        if differ:
            print(f"differ from a fresh build: {', '.join(differ)} (rebuild with python scripts/build_tiny_assets.py)")
            sys.exit(1)
        print(f"data and tokenizers in {root} are reproducible ({len(tiny_assets.deterministic_files(root))} files)")
        return
    figures = tiny_assets.build(root, loader=loader, work_dir=work_dir)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
