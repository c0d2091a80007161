"""Build (or check) the tiny assets in assets/tiny: QA data, two tokenizers, a trained teacher, two students.

    python -m examples.tiny.build_assets            # rebuild everything (a few CPU minutes), print the scores
    python -m examples.tiny.build_assets --check    # rebuild data and tokenizers in a temporary folder and
                                                    # compare them byte for byte with the shipped ones

Offline; deterministic (see examples/tiny/assets.py). Torch runs on one intra-op thread: the teacher's
weights then do not depend on the machine's core count, and these tiny matrices gain nothing from
more threads (a second one made training 4x slower on a busy 2-core machine).
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)  # before transformers / datasets read them

from configs.paths import TINY_ASSETS  # noqa: E402
from llm_recipes import flags  # noqa: E402
from llm_recipes.flags import option  # noqa: E402


@dataclass(frozen=True)
class BuildArgs:
    """Flags of `python -m examples.tiny.build_assets`."""

    output: str = option(str(TINY_ASSETS), "where to build (default: the shipped assets/tiny)")
    check: bool = option(False, "only verify that the shipped data and tokenizers are reproducible")
    loader: Optional[str] = option(None, "train the teacher with this loader file (default: the tiny_qa loader)")
    work_dir: Optional[str] = option(None, "keep the teacher's training run (checkpoints, metrics.jsonl) here")


COMMAND = flags.Command(program="python -m examples.tiny.build_assets", summary=__doc__.strip().splitlines()[0],
                        sections={"args": BuildArgs})


def build(args: BuildArgs) -> None:
    import torch

    from examples.tiny import assets

    torch.set_num_threads(1)
    root = Path(args.output)
    if args.check:
        differ = assets.check_reproducible(root)
        if differ:
            print(f"differ from a fresh build: {', '.join(differ)} (rebuild with python -m examples.tiny.build_assets)")
            sys.exit(1)
        print(f"data and tokenizers in {root} are reproducible ({len(assets.deterministic_files(root))} files)")
        return
    figures = assets.build(root, loader=args.loader, work_dir=args.work_dir)
    print(json.dumps(figures, indent=2))


main, cli = flags.entry_points(COMMAND, lambda parsed: build(parsed["args"]))

if __name__ == "__main__":
    cli()
