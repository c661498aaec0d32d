import pytest
import torch


@pytest.fixture(scope="session")
def aug_data():
    from kdfast.augment.data import synthetic_domains

    return synthetic_domains(("geography", "science"), "biography", n_source=30, n_target=20, n_target_dev_pool=0,
                             n_eval=8, seed=0)


@pytest.fixture(scope="session")
def aug_tok(aug_data):
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    recs = aug_data["source"] + aug_data["target"]
    return train_wordpiece_tokenizer([r["context"] for r in recs] + [r["question"] for r in recs], vocab_size=500)


def tiny_model(tok, hidden=32, layers=1, seed=0):
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import student_config

    cfg = student_config(tok, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=2,
                         intermediate_size=2 * hidden, hidden_dropout_prob=0.1)
    return student_from_config(cfg, attn_implementation="sdpa", seed=seed)


@pytest.fixture(scope="session")
def aug_teacher(aug_tok):
    torch.manual_seed(0)
    return tiny_model(aug_tok, hidden=64, seed=1).eval()


@pytest.fixture(scope="session")
def aug_filler(aug_tok, aug_data):
    from kdfast.augment.mlm import WholeWordFiller, build_mlm, train_mlm

    mlm = build_mlm(aug_tok, hidden_size=32, num_hidden_layers=1, intermediate_size=64, seed=0)
    train_mlm(mlm, aug_tok, [r["context"] for r in aug_data["target"]], steps=5, batch_size=4)
    return WholeWordFiller(mlm, aug_tok)
