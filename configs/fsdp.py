from dataclasses import dataclass


@dataclass
class fsdp_config:
    """How the student is sharded when `--enable_fsdp` (FSDP2, one unit per decoder layer)."""

    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD (docs/distributed.md)
    sharding_group_size: int = 0  # HYBRID_SHARD: processes per shard group; 0 = processes per node
    fsdp_cpu_offload: bool = False  # keep sharded weights, gradients and optimizer state in CPU memory
    fsdp_activation_checkpointing: bool = False  # recompute each decoder layer in backward (less memory)
