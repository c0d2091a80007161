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

    # loss constants (docs/losses.md); defaults are the papers' values
    # ULD and MultiLevelOT
    student_temperature: float = 1.0  # q = softmax(z_s / T_s)
    teacher_temperature: float = 1.0  # p = softmax(z_t / T_t)
    skip_student_eos: bool = True  # the student's last answer token (its EOS) only counts in CE
    uld_top_k: int = 0  # 0: exact ULD (full sort); k > 0: top-k + one tail bucket (faster, lower bound)
    # MultiLevelOT (paper: k=50, beta=0.1, gamma=0.1, tau_SL=1, tau_SD=2, lambda=0.1, N=20, alpha=0.15)
    multilevel_ot_mode: str = "fast"  # fast (--f 1) | greedy (--f 2)
    top_k: int = 50  # columns kept after the ranking
    sl_weight: float = 0.1  # beta, sequential logarithmic loss
    sd_weight: float = 0.1  # gamma, Sinkhorn distance
    sl_temperature: float = 1.0
    sd_temperature: float = 2.0
    sinkhorn_reg: float = 0.1  # lambda in exp(-C / lambda)
    sinkhorn_iters: int = 20  # public code: 10
    multilevel_ot_ranking: str = "sequence"  # sequence (paper) | token (public code before Feb 2026)
    multilevel_ot_logit_norm: str = "none"  # none (paper) | std (public code: z / (std(z) + 1e-4))
    multilevel_ot_sl_form: str = "paper"  # paper: -sum T log S | public: -sum softmax(S) log softmax(T)
    sd_scale: float = 1.0  # public code: 0.001
    # same-tokenizer family (kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd); the term is x T^2
    temperature: float = 1.0
    jsd_beta: float = 0.5  # m = beta p + (1 - beta) q
    skew_alpha: float = 0.1  # skew_kl: KL(p || a p + (1-a) q); skew_reverse_kl: KL(q || a q + (1-a) p)

    # token selection (docs/methods.md): the logit term only at each answer's top positions
    token_selection: str = "none"  # none | teacher_entropy | student_entropy | student_ce | divergence (highest kept)
    token_selection_ratio: float = 0.5  # fraction of each answer's paired positions kept: ceil(ratio * m), at least 1

    # hidden-state distillation (DistillKit): total += hidden_weight * hidden term (docs/methods.md)
    hidden_weight: float = 0.0  # 0: off; weight of the hidden-state term
    hidden_layer_map: Optional[str] = None  # "s:t,s:t" hidden_states indices (0 embeddings, L last, -1 = L); None: student i=1..L_s -> teacher round(i*L_t/L_s)
    hidden_distance: str = "mse"  # mse: ||P h_s - h_t||^2 / d_t | cosine: 1 - cos(P h_s, h_t); P = learned Linear(d_s, d_t) when widths differ
    hidden_positions: str = "answer"  # answer: answer-predicting rows | all: every non-pad position (identical inputs only)
    hidden_alignment: str = "none"  # none: same tokenizer, paired answer tokens must be identical | answer_index: i-th answer token with i-th (ULD's pairing); also for the feature term

    # feature selection (seed 003, fixed): total += feature_weight * correlation term (docs/methods.md)
    feature_weight: float = 0.0  # 0: off; weight of the correlation term on the teacher's top-attributed units
    feature_layer_map: Optional[str] = None  # "s:t,s:t" as hidden_layer_map; None: the last layers (L_s:L_t)
    feature_attribution: str = "abs"  # abs: sum |d log p(y) / d h_t| | signed: sum d log p(y) / d h_t (the seed's ranking)
    feature_offdiag_weight: float = 0.005  # w in sum_i (C_ii - 1)^2 + w sum_{i != j} C_ij^2
