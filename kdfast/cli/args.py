"""Argument dataclasses of the ``kdfast`` commands (HF ``run_qa.py`` names; dash spellings work too)."""
from __future__ import annotations

import dataclasses
from dataclasses import field


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "local model directory: the model fine-tune trains, or the student distill starts from"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer directory (default: the model's, else <train_file dir>/tokenizer as generate-data saves)"})
    model_preset: str = field(default="teacher", metadata={
        "help": "built-in config when there is no --model_name_or_path: teacher or student"})


@dataclasses.dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "SQuAD JSON / JSON lines training questions"})
    validation_file: str | None = field(default=None, metadata={"help": "SQuAD JSON / JSON lines dev questions"})
    dataset_name: str | None = field(default=None, metadata={"help": "hub dataset (squad, squad_v2); needs network"})
    max_seq_length: int = field(default=384, metadata={"help": "tokens per window"})
    doc_stride: int = field(default=128, metadata={"help": "overlap of consecutive windows of a long context"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use the first N training questions"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use the first N dev questions"})
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2: unanswerable questions"})
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    fix_spans: bool = field(default=False, metadata={
        "help": "relocate answers whose text is elsewhere in the context (reports fixed / dropped counts)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for windowing"})


@dataclasses.dataclass
class DistillArguments:
    teacher_name_or_path: str | None = field(default=None, metadata={"help": "fine-tuned QA teacher directory"})
    student_layers: str | None = field(default=None, metadata={
        "help": "student from teacher layers: a count ('3', uniform) or 0-based layers ('0,2,4')"})
    student_config: str | None = field(default=None, metadata={
        "help": "student config: a config.json path or 'student' (the built-in small config); random init"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the soft term"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft term; the hard term gets 1 - alpha"})
    layer_losses: str | None = field(default=None, metadata={
        "help": "LayerKD terms, e.g. 'hidden:1,attention_kl:1' (embedding, hidden, hidden_cosine, attention_score, "
                "attention_kl, value_relation)"})
    layer_mapping: str = field(default="mean", metadata={
        "help": "teacher layers the student layers match: mean (default), uniform, skip, first_k, last_k, random, learned, "
                "or one 1-based teacher layer per student layer ('2,4,6')"})
    attention_mapping: str | None = field(default=None, metadata={
        "help": "mapping of the attention terms only (default: --layer_mapping)"})
    hidden_mapping: str | None = field(default=None, metadata={
        "help": "mapping of the hidden-state terms only (default: --layer_mapping)"})
    logit_loss: str = field(default="kl", metadata={"help": "kl (fused kernel), reverse_kl, jsd or mse"})
    layer_weight_schedule: str = field(default="constant", metadata={
        "help": "constant, or two_stage:F (layer terms only for the first fraction F of steps, then logits only)"})
    term_weighting: str = field(default="fixed", metadata={
        "help": "fixed, or ema[:decay] (each term divided by its running magnitude before its weight)"})
    teacher_top_k: int | None = field(default=None, metadata={"help": "cache only the teacher's top-k logits"})
    unlabeled_file: str | None = field(default=None, metadata={
        "help": "SQuAD JSON / JSON lines questions to distil on with the teacher's soft labels only (a transfer "
                "set: their answers are never read; write \"answers\": [] where there are none); ids must differ "
                "from the training questions'"})
    no_teacher_cache: bool = field(default=False, metadata={"help": "run the teacher every step (stock way)"})


@dataclasses.dataclass
class RecipeArguments:
    target_sparsity: float = field(default=0.7, metadata={
        "help": "fraction of the encoder's heads + FFN to prune, counted as --prune_cost says"})
    prune_cost: str = field(default="flops", metadata={
        "help": "flops (multiply-adds per token at the mean window length, attention included: what CPU "
                "latency follows) or params (prunable weights)"})
    prune_epochs: float = 2.0
    ternary_epochs: float = 1.0
    ternary_method: str = field(default="twn", metadata={"help": "twn, absmean or lat"})
    ternary_act_bits: int = field(default=8, metadata={"help": "8: W2A8 integer kernels; 0: float activations"})
    ternary_embeddings: str = field(default="all", metadata={
        "help": "embedding tables to ternarize: all, word (the input word embedding), none, or comma-separated "
                "module-name patterns"})
    ternary_float_dtype: str = field(default="float16", metadata={
        "help": "storage of the tensors that stay full precision in the ternary model: float16 or float32"})
    ternary_teacher: str = field(default="teacher", metadata={
        "help": "who teaches the ternary stage: teacher (the cached teacher logits) or source (TernaryBERT: the "
                "full-precision model the stage starts from, run live)"})
    ternary_layer_losses: str | None = field(default=None, metadata={
        "help": "LayerKD terms of the ternary stage, e.g. 'hidden:1,attention_score:1' (TernaryBERT's); with "
                "--ternary_teacher source student layer m matches source layer m"})
    stages: str = field(default="distil,prune,ternary", metadata={"help": "comma-separated subset of the stages"})


@dataclasses.dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "a QA model directory (dense, pruned or ternary)"})
    validation_file: str = field(metadata={"help": "SQuAD JSON / JSON lines questions with answers"})
    output_dir: str | None = field(default=None, metadata={"help": "writes predictions, n-best, metrics here"})
    tokenizer_name: str | None = None
    version_2_with_negative: bool = False
    per_device_eval_batch_size: int = 32
    max_seq_length: int = 384
    doc_stride: int = 128
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    max_eval_samples: int | None = None
    fix_spans: bool = False
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa (default; faster on AVX2-only CPUs), kdfast (with the unpadded encoder) or eager"})


@dataclasses.dataclass
class GenerateArguments:
    output_dir: str = field(metadata={"help": "writes train.json, dev.json and tokenizer/ here"})
    num_train: int = 2000
    num_dev: int = 500
    domains: str | None = field(default=None, metadata={
        "help": "comma-separated domains (default: biography,geography,science,history; also sport, near "
                "biography, for transfer studies)"})
    version_2_with_negative: bool = False
    seed: int = 0
    vocab_size: int = 4000


@dataclasses.dataclass
class DemoArguments:
    output_dir: str = field(default="demo-output", metadata={"help": "where every stage writes its model"})
    num_train: int = field(default=1200, metadata={"help": "generated training questions"})
    num_dev: int = field(default=200, metadata={"help": "generated dev questions (unseen entities)"})
    seed: int = 0
    teacher_num_train: int | None = field(default=None, metadata={
        "help": "train the teacher on this many generated questions and the students on a random num_train of "
                "them (a teacher that knows more than the students' labels; default: num_train)"})
    kd_unlabeled: bool = field(default=False, metadata={
        "help": "with --teacher_num_train: the recipe also distils on the teacher's other questions, answers dropped "
                "(teacher soft labels only; the student without KD cannot use them)"})
    teacher_epochs: float = 2.0
    student_epochs: float = field(default=1.5, metadata={"help": "epochs of the no-KD baseline and of distillation"})
    distil_epochs: float | None = field(default=None, metadata={
        "help": "epochs of the distil stage (default --student_epochs; with --kd_unlabeled an epoch also covers the "
                "unlabelled questions)"})
    prune_epochs: float = 1.5
    ternary_epochs: float = 1.0
    target_sparsity: float = 0.7
    ternary_embeddings: str = field(default="all", metadata={
        "help": "embedding tables to ternarize: all, word, none, or comma-separated module-name patterns"})
    ternary_float_dtype: str = field(default="float16", metadata={
        "help": "storage of the tensors that stay full precision in the ternary model: float16 or float32"})
    fresh: bool = field(default=False, metadata={"help": "delete output_dir first (else a rerun resumes)"})
