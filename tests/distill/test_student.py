"""Student initialisation: parse_student_layers, student_from_teacher (copied weights), check_compatible."""
from __future__ import annotations

import copy

import pytest
import torch

from .conftest import TEACHER_LAYERS, make_tokenizer, tiny_config


@pytest.mark.parametrize("spec, n, want", [
    ("3", 6, [0, 2, 4]), (3, 6, [0, 2, 4]), ("0,2,4", 6, [0, 2, 4]), (" 2 ", 4, [0, 2]), ("6", 6, list(range(6))),
    ("1", 4, [0]), ("1,3", 4, [1, 3]), ("2,", 4, [2]), ([0, 3], 4, [0, 3]), ("4", 12, [0, 3, 6, 9]),
])
def test_parse_student_layers(spec, n, want):
    from kdfast.distill.student import parse_student_layers
    assert parse_student_layers(spec, n) == want


@pytest.mark.parametrize("spec, n, match", [
    ("7", 6, "cannot be deeper than the teacher"),
    ("0", 6, "at least 1 layer"),
    ("0,6", 6, r"layers \[6\] are outside the teacher's 0..5"),
    ("-1,2", 6, r"outside the teacher's 0..5"),
    ("2,1", 6, "strictly increasing"),
    ("1,1", 6, "strictly increasing"),
    ("two", 6, "expected a layer count"),
    ("1.5", 6, "expected a layer count"),
    ("0,x", 6, "expected a layer count"),
    ("", 6, "empty list"),
    (",", 6, "empty list"),
])
def test_parse_student_layers_errors(spec, n, match):
    from kdfast.distill.student import parse_student_layers
    with pytest.raises(ValueError, match=match) as e:
        parse_student_layers(spec, n)
    assert "--student_layers" in str(e.value)


def test_student_from_teacher_copies_the_chosen_layers(teacher):
    from kdfast.distill.student import student_from_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    layers = [1, 3]
    student = student_from_teacher(teacher, layers)
    assert student.training and type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == TEACHER_LAYERS
    assert len(student.bert.encoder.layer) == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    compared = 0
    for k, v in s_sd.items():
        if ".encoder.layer." in k:
            head, rest = k.split(".encoder.layer.")
            i, tail = rest.split(".", 1)
            src = f"{head}.encoder.layer.{layers[int(i)]}.{tail}"
        else:
            src = k
        assert torch.equal(v, t_sd[src]), f"{k} is not a copy of the teacher's {src}"
        compared += 1
    assert compared == len(s_sd)
    assert any(k.startswith("bert.embeddings.") for k in s_sd) and "qa_outputs.weight" in s_sd
    # copies, not shared storage: changing the student leaves the teacher as it was
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"
    assert teacher.config.num_hidden_layers == TEACHER_LAYERS


def test_student_from_teacher_same_function_as_teacher_when_all_layers(teacher, tok):
    from kdfast.distill.student import student_from_teacher
    student = student_from_teacher(teacher, list(range(TEACHER_LAYERS))).eval()
    enc = tok(["who was it"], ["it was the king of the north"], return_tensors="pt")
    with torch.no_grad():
        a, b = teacher(**enc), student(**enc)
    torch.testing.assert_close(a.start_logits, b.start_logits)
    assert student.config._attn_implementation == teacher.config._attn_implementation


def test_student_from_teacher_attention_override(teacher):
    from kdfast.distill.student import student_from_teacher
    s = student_from_teacher(teacher, [0], attn_implementation="eager")
    assert s.config._attn_implementation == "eager"
    assert teacher.config._attn_implementation == "kdfast"


def test_check_compatible(tok, qa_records):
    from kdfast.distill.student import check_compatible
    check_compatible(tok, copy.deepcopy(tok))  # same vocabulary: fine
    other = make_tokenizer([r["question"] for r in qa_records["train"]], vocab_size=300)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_compatible(tok, other)
    a = tiny_config(len(tok))
    check_compatible(None, None, a, tiny_config(len(tok), hidden_size=16, num_attention_heads=2))
    with pytest.raises(ValueError, match=f"teacher vocab_size {len(tok)} != student vocab_size 300"):
        check_compatible(None, None, a, tiny_config(300))
