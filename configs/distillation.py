from dataclasses import dataclass
from typing import Optional

from configs.paths import TINY_TEACHER


@dataclass
class distillation_config:
    """The teacher and the distillation term. Flags: `--distillation_config.<field>`
    (or `--distillation_config_<field>`, as the MultiLevelOT README writes them)."""

    model_name: str = TINY_TEACHER  # teacher: local path or hub id
    tokenizer_name: Optional[str] = None
    encoder_decoder: bool = False  # teacher is a seq2seq model
    trust_remote_code: bool = False  # only on request: runs code shipped with the teacher

    # teacher placement and precision
    enable_fsdp: bool = False  # shard the teacher with FSDP2 too (frozen, never in the optimizer)
    low_cpu_fsdp: bool = False  # not supported (refused): every process loads the teacher, then shards it
    pure_bf16: bool = False  # teacher weights in bf16
    mixed_precision: bool = False  # teacher forward under bf16 autocast
    use_fp16: bool = False
    quantization: bool = False
    use_fast_kernels: bool = False
    sharding_strategy: str = "FULL_SHARD"  # as fsdp_config.sharding_strategy; NO_SHARD keeps a full teacher per process
    fsdp_cpu_offload: bool = False  # keep the sharded teacher in CPU memory
    fsdp_activation_checkpointing: bool = False  # unused for a frozen teacher; accepted for compatibility

    # total loss = cross_entropy_factor * CE + distil_factor * term
    loss: str = "auto"  # auto | uld | multilevel_ot | kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd
    cross_entropy_factor: float = 1.0
    distil_factor: Optional[float] = None  # None: 1.5 (ULD/KL, the seeds' value), 0.15 for multilevel_ot (paper)
