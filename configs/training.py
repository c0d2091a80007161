from dataclasses import dataclass
from typing import List, Optional

from configs.paths import TINY_STUDENT
from configs.fields import option


@dataclass(frozen=True)
class train_config:
    """The student, the optimisation and the run. Undotted flags (`--lr 1e-6`) land here."""

    project_name: Optional[str] = option(None, "free-form run label, recorded in run_config.json", group="output")
    model_name: str = option(TINY_STUDENT, "student: local path or hub id", group="training")
    tokenizer_name: Optional[str] = option(None, "student tokenizer; None: the model's own", group="training")
    trust_remote_code: bool = option(False, "only on request: runs code shipped with the model", group="training")
    encoder_decoder: bool = option(False, "student is a seq2seq model (AutoModelForSeq2SeqLM)", group="training")
    attn_implementation: Optional[str] = option(
        None, '"sdpa", "eager", "flash_attention_2"; None: transformers\' default', group="training")
    use_fast_kernels: bool = option(False, 'llama-recipes alias for attn_implementation="sdpa"', group="training")

    # precision of the student
    mixed_precision: bool = option(False, "bf16 autocast over fp32 weights", group="training")
    pure_bf16: bool = option(False, "bf16 weights and optimizer state", group="training")
    use_fp16: bool = option(False, "fp16 autocast with a gradient scaler (CUDA only)", group="training")

    # multi-process (see fsdp_config for the sharding details)
    enable_fsdp: bool = option(False, "shard the student with FSDP2 under torchrun (DDP otherwise)",
                               group="distributed")
    dist_timeout_minutes: float = option(
        30.0, "how long a collective waits for the slowest process before the job fails (NCCL / gloo)",
        group="distributed")

    # data
    batch_size_training: int = option(4, "examples per micro-batch per process", group="training")
    val_batch_size: int = option(4, "examples per evaluation batch per process", group="training")
    context_length: Optional[int] = option(None, "longer examples are dropped (counted and reported)", group="data")
    num_workers_dataloader: int = option(0, "DataLoader worker processes collating batches", group="data")

    # optimisation
    num_epochs: int = option(1, "passes over the training split, each in a new seeded order", group="training")
    max_train_step: int = option(0, "optimizer steps; 0 = no limit", group="training")
    max_eval_step: int = option(0, "eval batches; 0 = all", group="training")
    gradient_accumulation_steps: int = option(
        1, "micro-batches per optimizer step (loss normalised over all of them)", group="training")
    gradient_clipping: bool = option(True, "clip the global gradient norm", group="training")
    gradient_clipping_threshold: float = option(1.0, "the norm it is clipped to", group="training")
    optimizer: str = option("AdamW", "AdamW | SGD | Adafactor", group="training")
    lr: float = option(1e-4, "peak learning rate (llama-recipes default; the ULD runs passed --lr 1e-6 to 2e-6)",
                       group="training")
    weight_decay: float = option(0.1, "decoupled weight decay; biases and norms are not decayed", group="training")
    momentum: float = option(0.9, "SGD only", group="training")
    scheduler: str = option("onecycle", "onecycle | cosine | linear | constant", group="training")
    pct_start: float = option(0.1, "onecycle: fraction of the steps spent warming up", group="training")
    div_factor: float = option(2, "onecycle: initial lr = lr / div_factor", group="training")
    final_div_factor: float = option(5, "onecycle: final lr = initial lr / final_div_factor", group="training")
    warmup_ratio: float = option(0.0, "cosine / linear / constant: fraction of the steps warming up", group="training")
    warmup_steps: int = option(0, "cosine / linear / constant; overrides warmup_ratio when > 0", group="training")
    seed: int = option(42, "data order, dropout, everything random", group="training")

    # what is trained
    distillation: bool = option(False, "load the teacher and add its distillation term", group="distillation")
    use_peft: bool = option(False, "train a LoRA adapter (see lora_config) instead of all weights", group="training")
    freeze_layers: bool = option(False, "freeze the first num_freeze_layers transformer blocks", group="training")
    num_freeze_layers: int = option(1, "how many blocks --freeze_layers freezes", group="training")
    freeze_regex: Optional[List[str]] = option(
        None, "freeze parameters whose name matches one of these regexes (re.search; a,b or [a,b])", group="training")
    unfreeze_regex: Optional[List[str]] = option(
        None, "train only parameters whose name matches one of these regexes (re.search)", group="training")
    spectrum_yaml: Optional[str] = option(
        None, "Spectrum YAML: train only its unfrozen_parameters (re.match); combines with the above", group="training")

    # output
    output_dir: str = option("output", "checkpoints/, best, last, metrics.jsonl, run_config.json", group="output")
    overwrite_output_dir: bool = option(
        False, "start over in an --output_dir that holds an earlier run (deletes its checkpoints and metrics)",
        group="output")
    run_validation: bool = option(True, "evaluate at every save_step and epoch end", group="output")
    save_model: bool = option(True, "write checkpoints", group="output")
    save_step: int = option(1000, "optimizer steps between validation + checkpoint; 0 = only at epoch ends",
                            group="output")
    save_all: bool = option(False, "keep every checkpoint (default: the best by eval loss and the last)",
                            group="output")
    save_optimizer: bool = option(True, "optimizer state in checkpoints, needed to resume exactly", group="output")
    resume_from: Optional[str] = option(
        None, "continue a run: its --output_dir (the last checkpoint) or one of its checkpoints/step-*", group="output")
    log_every: int = option(1, "optimizer steps between metrics lines", group="logging")
    use_wandb: bool = option(False, "also log metrics to Weights & Biases (see wandb_config; needs pip install wandb)",
                             group="logging")
    use_tensorboard: bool = option(
        False, "also log metrics for TensorBoard, in output_dir/tensorboard (needs pip install tensorboard)",
        group="logging")
    logits_chunk_size: int = option(1024, "answer rows per chunk when computing logits and losses", group="training")
