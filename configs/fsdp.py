from dataclasses import dataclass

from configs.fields import option


@dataclass(frozen=True)
class fsdp_config:
    """How the student is sharded when `--enable_fsdp` (FSDP2, one unit per decoder layer)."""

    sharding_strategy: str = option(
        "FULL_SHARD", "FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD (docs/distributed.md)", group="distributed")
    sharding_group_size: int = option(0, "HYBRID_SHARD: processes per shard group; 0 = processes per node",
                                      group="distributed")
    fsdp_cpu_offload: bool = option(False, "keep sharded weights, gradients and optimizer state in CPU memory",
                                    group="distributed")
    fsdp_activation_checkpointing: bool = option(
        False, "recompute each decoder layer in backward (less memory)", group="distributed")
