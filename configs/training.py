from dataclasses import dataclass
from typing import Optional

from configs.paths import TINY_STUDENT


@dataclass
class train_config:
    """The student, the optimisation and the run. Undotted flags (`--lr 1e-6`) land here."""

    project_name: Optional[str] = None
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
    enable_fsdp: bool = False
    low_cpu_fsdp: bool = False

    # data
    batch_size_training: int = 4
    val_batch_size: int = 4
    batching_strategy: str = "padding"
    context_length: Optional[int] = None  # longer examples are dropped (counted and reported)
    num_workers_dataloader: int = 0

    # optimisation
    num_epochs: int = 1
    max_train_step: int = 0  # optimizer steps; 0 = no limit
    max_eval_step: int = 0  # eval batches; 0 = all
    gradient_accumulation_steps: int = 1
    gradient_clipping: bool = True
    gradient_clipping_threshold: float = 1.0
    optimizer: str = "AdamW"  # AdamW | SGD | Adafactor
    lr: float = 1e-6
    weight_decay: float = 0.1
    momentum: float = 0.9  # SGD only
    scheduler: str = "onecycle"  # onecycle | cosine | linear | constant
    pct_start: float = 0.1  # onecycle
    div_factor: float = 2  # onecycle
    final_div_factor: float = 5  # onecycle
    warmup_ratio: float = 0.0  # cosine / linear / constant
    warmup_steps: int = 0  # cosine / linear / constant; overrides warmup_ratio when > 0
    seed: int = 42

    # what is trained
    distillation: bool = False
    use_peft: bool = False
    peft_method: str = "lora"
    freeze_layers: bool = False
    num_freeze_layers: int = 1
    quantization: bool = False

    # output
    output_dir: str = "output"
    run_validation: bool = True
    save_model: bool = True
    save_step: int = 1000  # optimizer steps between validation + checkpoint; 0 = only at epoch ends
    save_all: bool = False  # keep every checkpoint (default: the best by eval loss and the last)
    save_optimizer: bool = True  # optimizer state in checkpoints, needed to resume exactly
    resume_from: Optional[str] = None  # checkpoint folder to continue from
    log_every: int = 1  # optimizer steps between metrics lines
    logits_chunk_size: int = 1024  # answer rows per chunk when computing logits and losses
