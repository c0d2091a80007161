"""Batching and pairing: the order is seeded, shared by both sides, new each epoch, and rank-consistent."""
import pytest
import torch

from llm_recipes import data


def test_epoch_order_is_seeded_and_changes_every_epoch():
    assert data.epoch_order(50, 0, 42) == data.epoch_order(50, 0, 42)
    assert data.epoch_order(50, 0, 42) != data.epoch_order(50, 1, 42)
    assert data.epoch_order(50, 0, 42) != data.epoch_order(50, 0, 43)
    assert sorted(data.epoch_order(50, 3, 42)) == list(range(50))


@pytest.mark.parametrize("world, batch, accumulation", [(2, 2, 1), (4, 1, 2), (2, 3, 2)])
def test_ranks_split_each_global_micro_batch_of_one_process(world, batch, accumulation):
    n = 37
    single = list(data.train_micro_batches(n, 1, 7, batch * world, accumulation, 1, 0))
    per_rank = [list(data.train_micro_batches(n, 1, 7, batch, accumulation, world, r)) for r in range(world)]
    assert all(len(p) == len(single) for p in per_rank)
    for i, micro in enumerate(single):
        assert sum((p[i] for p in per_rank), []) == micro
    used = sum(single, [])
    assert len(used) == len(set(used)) == data.steps_per_epoch(n, batch, accumulation, world) * batch * world * accumulation


def test_resume_position_skips_whole_steps():
    full = list(data.train_micro_batches(40, 0, 1, 2, 2, 1, 0))
    assert list(data.train_micro_batches(40, 0, 1, 2, 2, 1, 0, start_step=3)) == full[6:]


def test_eval_batches_cover_everything_once_with_placeholders_for_even_ranks():
    shards = [data.eval_batches(10, 3, 3, r) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s if b is not None for i in b]
    assert sorted(seen) == list(range(10))


def test_collate_pads_inputs_mask_and_labels_differently():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]}]
    batch = data.collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_placeholder_batch_counts_nothing(tiny):
    from transformers import AutoTokenizer

    from configs import dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    split = data.build_paired_split(data.import_loader(tiny["loader"]), dataset(), "validation",
                                    student_tokenizer=tokenizer, student_name="s", student_encoder_decoder=False,
                                    student_max=None)
    batch = data.PairedBatches(split, tokenizer.pad_token_id, None)[None]
    assert torch.all(batch["student"]["labels"] == -100)


def test_loader_folder_with_load_py(tmp_path, tiny):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "load.py").write_text(open(tiny["loader"]).read())
    assert callable(data.import_loader(str(folder)).get_split)
