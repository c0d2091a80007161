from dataclasses import dataclass
from typing import List, Optional

from configs.paths import TINY_STUDENT


@dataclass
class train_config:
    """The student, the optimisation and the run. Undotted flags (`--lr 1e-6`) land here."""

    project_name: Optional[str] = None  # free-form run label, recorded in run_config.json
    model_name: str = TINY_STUDENT  # student: local path or hub id
    tokenizer_name: Optional[str] = None  # defaults to model_name
    trust_remote_code: bool = False  # only on request: runs code shipped with the model
    encoder_decoder: bool = False  # student is a seq2seq model (AutoModelForSeq2SeqLM)
    attn_implementation: Optional[str] = None  # "sdpa", "eager", "flash_attention_2"; None: transformers' default
    use_fast_kernels: bool = False  # llama-recipes alias for attn_implementation="sdpa"

    # precision of the student
    mixed_precision: bool = False  # bf16 autocast over fp32 weights
    pure_bf16: bool = False  # bf16 weights and optimizer state
    use_fp16: bool = False  # fp16 autocast with a gradient scaler (CUDA only)

    # multi-process (see fsdp_config for the sharding details)
    enable_fsdp: bool = False  # shard the student with FSDP2 under torchrun (DDP otherwise)
    low_cpu_fsdp: bool = False  # not supported (refused): every process loads the weights, then shards them

    # data
    batch_size_training: int = 4  # examples per micro-batch per process
    val_batch_size: int = 4  # examples per evaluation batch per process
    batching_strategy: str = "padding"  # only padding: packing would break teacher/student pairing
    context_length: Optional[int] = None  # longer examples are dropped (counted and reported)
    num_workers_dataloader: int = 0  # DataLoader worker processes collating batches

    # optimisation
    num_epochs: int = 1  # passes over the training split, each in a new seeded order
    max_train_step: int = 0  # optimizer steps; 0 = no limit
    max_eval_step: int = 0  # eval batches; 0 = all
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (loss normalised over all of them)
    gradient_clipping: bool = True  # clip the global gradient norm
    gradient_clipping_threshold: float = 1.0  # the norm it is clipped to
    optimizer: str = "AdamW"  # AdamW | SGD | Adafactor
    lr: float = 1e-4  # peak learning rate (llama-recipes default; the ULD runs passed --lr 1e-6 to 2e-6)
    weight_decay: float = 0.1  # decoupled weight decay; biases and norms are not decayed
    momentum: float = 0.9  # SGD only
    scheduler: str = "onecycle"  # onecycle | cosine | linear | constant
    pct_start: float = 0.1  # onecycle
    div_factor: float = 2  # onecycle
    final_div_factor: float = 5  # onecycle
    warmup_ratio: float = 0.0  # cosine / linear / constant
    warmup_steps: int = 0  # cosine / linear / constant; overrides warmup_ratio when > 0
    seed: int = 42  # data order, dropout, everything random

    # what is trained
    distillation: bool = False  # load the teacher and add its distillation term
    use_peft: bool = False  # train a LoRA adapter (see lora_config) instead of all weights
    peft_method: str = "lora"  # only lora
    freeze_layers: bool = False  # freeze the first num_freeze_layers transformer blocks
    num_freeze_layers: int = 1  # how many blocks --freeze_layers freezes
    freeze_regex: Optional[List[str]] = None  # freeze parameters whose name matches one of these regexes (re.search; a,b or [a,b])
    unfreeze_regex: Optional[List[str]] = None  # train only parameters whose name matches one of these regexes (re.search)
    spectrum_yaml: Optional[str] = None  # Spectrum YAML: train only its unfrozen_parameters (re.match); combines with the above
    quantization: bool = False  # not supported (refused): use pure_bf16 or LoRA

    # output
    output_dir: str = "output"  # checkpoints/, best, last, metrics.jsonl, run_config.json
    run_validation: bool = True  # evaluate at every save_step and epoch end
    save_model: bool = True  # write checkpoints
    save_step: int = 1000  # optimizer steps between validation + checkpoint; 0 = only at epoch ends
    save_all: bool = False  # keep every checkpoint (default: the best by eval loss and the last)
    save_optimizer: bool = True  # optimizer state in checkpoints, needed to resume exactly
    resume_from: Optional[str] = None  # checkpoint folder to continue from
    log_every: int = 1  # optimizer steps between metrics lines
    logits_chunk_size: int = 1024  # answer rows per chunk when computing logits and losses
