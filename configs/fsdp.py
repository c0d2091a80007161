from dataclasses import dataclass


@dataclass
class fsdp_config:
    """How the student is sharded when `--enable_fsdp` (FSDP2, one unit per decoder layer)."""

    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
    fsdp_cpu_offload: bool = False
    fsdp_activation_checkpointing: bool = False
