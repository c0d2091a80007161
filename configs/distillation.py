from dataclasses import dataclass
from typing import Optional

from configs.paths import TINY_TEACHER
from configs.fields import option


def _distillation(default, help):
    return option(default, help, group="distillation")


@dataclass(frozen=True)
class distillation_config:
    """The teacher and the distillation term. Flags: `--distillation_config.<field>`
    (or `--distillation_config_<field>`, as the MultiLevelOT README writes them)."""

    model_name: str = _distillation(TINY_TEACHER, "teacher: local path or hub id")
    tokenizer_name: Optional[str] = _distillation(None, "teacher tokenizer; None: the teacher model's own")
    encoder_decoder: bool = _distillation(False, "teacher is a seq2seq model")
    trust_remote_code: bool = _distillation(False, "only on request: runs code shipped with the teacher")
    teacher_cache: Optional[str] = _distillation(
        None, "a folder written by python -m llm_distillation.cache_teacher: the teacher's cached top-K distributions "
              "replace its forward pass (its weights are never loaded; its tokenizer comes from the cache)")

    # teacher placement and precision
    enable_fsdp: bool = option(False, "shard the teacher with FSDP2 too (frozen, never in the optimizer)",
                               group="distributed")
    pure_bf16: bool = _distillation(False, "teacher weights in bf16")
    mixed_precision: bool = _distillation(False, "teacher forward under bf16 autocast")
    use_fp16: bool = _distillation(False, "teacher forward under fp16 autocast (CUDA only)")
    use_fast_kernels: bool = _distillation(False, 'teacher attention with attn_implementation="sdpa"')
    sharding_strategy: str = option(
        "FULL_SHARD", "as fsdp_config.sharding_strategy; NO_SHARD keeps a full teacher per process",
        group="distributed")
    fsdp_cpu_offload: bool = option(False, "keep the sharded teacher in CPU memory", group="distributed")

    # total loss = cross_entropy_factor * CE + distil_factor * term
    loss: str = _distillation(
        "auto", "auto | uld | multilevel_ot | projected | hybrid | kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | "
                "tvd (auto: kl with one tokenizer; across tokenizers projected, or uld with "
                "--distillation_config.alignment index)")
    cross_entropy_factor: float = _distillation(1.0, "weight of the student's cross-entropy on the labels")
    alignment: str = _distillation(
        "auto", "auto | text | index: how answer tokens pair across tokenizers; text: tokens that start the same text "
                "(llm_recipes/alignment/), index: the i-th with the i-th (the seeds' ULD); auto: text across "
                "tokenizers")
    distil_factor: Optional[float] = _distillation(
        None, "weight of the distillation term; None: the loss's default (1.5, 0.15 for multilevel_ot)")

    # loss constants (docs/losses.md); defaults are the papers' values
    # ULD and MultiLevelOT
    student_temperature: float = _distillation(1.0, "ULD / MultiLevelOT: q = softmax(z_s / T_s)")
    teacher_temperature: float = _distillation(1.0, "ULD / MultiLevelOT: p = softmax(z_t / T_t)")
    skip_student_eos: bool = _distillation(True, "the student's last answer token (its EOS) only counts in CE")
    uld_top_k: int = _distillation(0, "0: exact ULD (full sort); k > 0: top-k + one tail bucket (faster, lower bound)")
    # MultiLevelOT (paper: k=50, beta=0.1, gamma=0.1, tau_SL=1, tau_SD=2, lambda=0.1, N=20, alpha=0.15)
    multilevel_ot_mode: str = _distillation("fast", "fast (--f 1) | greedy (--f 2)")
    top_k: int = _distillation(50, "MultiLevelOT: columns kept after the ranking")
    sl_weight: float = _distillation(0.1, "MultiLevelOT beta: weight of the sequential logarithmic loss")
    sd_weight: float = _distillation(0.1, "MultiLevelOT gamma: weight of the Sinkhorn distance")
    sl_temperature: float = _distillation(1.0, "MultiLevelOT tau_SL: temperature of the logarithmic loss")
    sd_temperature: float = _distillation(2.0, "MultiLevelOT tau_SD: temperature of the Sinkhorn distance")
    sinkhorn_reg: float = _distillation(0.1, "MultiLevelOT lambda in exp(-C / lambda)")
    sinkhorn_iters: int = _distillation(20, "MultiLevelOT Sinkhorn iterations (public code: 10)")
    multilevel_ot_ranking: str = _distillation("sequence", "sequence (paper) | token (public code before Feb 2026)")
    multilevel_ot_logit_norm: str = _distillation("none", "none (paper) | std (public code: z / (std(z) + 1e-4))")
    multilevel_ot_sl_form: str = _distillation(
        "paper", "paper: -sum T log S | public: -sum softmax(S) log softmax(T)")
    sd_scale: float = _distillation(1.0, "MultiLevelOT: extra factor on the Sinkhorn distance (public code: 0.001)")
    # projected: the teacher's distribution on the student's vocabulary (docs/losses.md)
    projected_divergence: str = _distillation(
        "kl", "projected: the KL-family loss comparing the student with the projected target (kl | jsd | skew_kl | "
              "skew_reverse_kl | tvd); its constants: temperature, jsd_beta, skew_alpha")
    # hybrid (TRL GOLD): jsd_beta on the shared tokens, ULD on the rest
    hybrid_matched_weight: Optional[float] = _distillation(
        None, "hybrid: weight of the JSD on shared tokens; None: GOLD's default, the shared share of the teacher's "
              "vocabulary")
    hybrid_unmatched_weight: Optional[float] = _distillation(
        None, "hybrid: weight of ULD on the other tokens; None: 1 - the matched weight")
    # same-tokenizer family (kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd); the term is x T^2
    temperature: float = _distillation(1.0, "KL family: p = softmax(z_t / T), q = softmax(z_s / T); the term x T^2")
    jsd_beta: float = _distillation(0.5, "jsd: m = beta p + (1 - beta) q")
    skew_alpha: float = _distillation(
        0.1, "skew_kl: KL(p || a p + (1-a) q); skew_reverse_kl: KL(q || a q + (1-a) p)")

    # on-policy distillation (docs/on_policy.md): the student answers the prompts, the teacher scores its answers
    lmbda: float = _distillation(
        0.0, "probability that an optimizer step trains on the student's own sampled answers instead of the data "
             "set's (GKD's lmbda; 0: never, 1: always); the CE is skipped on sampled answers; needs the live teacher")
    on_policy_max_new_tokens: int = _distillation(128, "on-policy: the longest answer the student samples, in tokens")
    on_policy_temperature: float = _distillation(
        1.0, "on-policy: the temperature the student samples at (the loss's is --distillation_config.temperature)")
    on_policy_top_p: float = _distillation(1.0, "on-policy: nucleus sampling of the student's answers (1: off)")
    on_policy_start: float = _distillation(
        0.0, "on-policy: the share of the run's optimizer steps trained on the data set's answers before the first "
             "on-policy step (0.5: the first half; GKD starts from a student already fine-tuned on the task); best/ is "
             "chosen among the evaluations from then on")
    on_policy_ce: bool = _distillation(
        False, "on-policy: an on-policy step also trains the CE of the data set's answers to the same prompts "
               "(weighted by cross_entropy_factor; MiniLLM's language-modelling term beside the on-policy one): one "
               "more student forward and backward per micro-batch, no teacher")
    distill_eos: Optional[bool] = _distillation(
        None, "distil the end of the answer: the teacher's answers end with its EOS, the two EOS rows pair, and the "
              "projected teacher's EOS probability goes to the student's EOS; None: on with lmbda > 0 (a sampled "
              "answer learns when to stop from the teacher alone), off otherwise (the seeds': no teacher EOS)")
    projected_continuation: Optional[bool] = _distillation(
        None, "projected loss: at a student token that starts a new text group, the target also holds the longer "
              "teacher tokens that would have continued the previous group (from the row that predicted its first "
              "token), so a student that stops or breaks off inside a word is not told the teacher agrees; None: on "
              "with lmbda > 0 (sampled answers end and break where the teacher would not), off otherwise")

    # token selection (docs/methods.md): the logit term only at each answer's top positions
    token_selection: str = _distillation(
        "none", "none | teacher_entropy | student_entropy | student_ce | divergence (highest kept)")
    token_selection_ratio: float = _distillation(
        0.5, "fraction of each answer's paired positions kept: ceil(ratio * m), at least 1")

    # hidden-state distillation (DistillKit): total += hidden_weight * hidden term (docs/methods.md)
    hidden_weight: float = _distillation(0.0, "0: off; weight of the hidden-state term")
    hidden_layer_map: Optional[str] = _distillation(
        None, '"s:t,s:t" hidden_states indices (0 embeddings, L last, -1 = L); None: student i=1..L_s -> teacher '
              'round(i*L_t/L_s)')
    hidden_distance: str = _distillation(
        "mse", "mse: ||P h_s - h_t||^2 / d_t | cosine: 1 - cos(P h_s, h_t); P = learned Linear(d_s, d_t) when widths "
               "differ")
    hidden_positions: str = _distillation(
        "answer", "answer: answer-predicting rows | all: every non-pad position (identical inputs only)")
    hidden_alignment: str = _distillation(
        "none", "none: same tokenizer, paired answer tokens must be identical | answer_index: i-th answer token with "
                "i-th (ULD's pairing) | text: the first tokens of text-aligned groups; also for the feature term")

    # feature selection: total += feature_weight * correlation term (docs/methods.md)
    feature_weight: float = _distillation(
        0.0, "0: off; weight of the correlation term on the teacher's top-attributed units")
    feature_layer_map: Optional[str] = _distillation(
        None, '"s:t,s:t" as hidden_layer_map; None: the last layers (L_s:L_t)')
    feature_attribution: str = _distillation(
        "abs", "abs: sum |d log p(y) / d h_t| | signed: sum d log p(y) / d h_t (the published code's ranking)")
    feature_offdiag_weight: float = _distillation(0.005, "w in sum_i (C_ii - 1)^2 + w sum_{i != j} C_ij^2")
