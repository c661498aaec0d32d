"""The built-in offline QA data: synthetic SQuAD generator, WordPiece tokenizer, configs."""
import json
import re
import statistics
import unicodedata
from collections import Counter, defaultdict

import pytest

from kdfast.qa.configs import student_config, teacher_config
from kdfast.qa.synthetic import DOMAINS, NAME_TYPES, RELATED_DOMAINS, generate_domain, generate_squad, write_generated
from kdfast.qa.tokenizer import SPECIAL_TOKENS, builtin_tokenizer, train_wordpiece_tokenizer

STOP = set("the a an of in and to was is at by for from on with as its it his her he she which who "
           "that this were had has be been but not".split())
VOCAB = 3000  # one size for every test here, so builtin_tokenizer trains once
ALL = DOMAINS + tuple(RELATED_DOMAINS)  # the default mix and the domains near one of it


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def meta_records():
    """600 questions per domain, v1 and v2, with meta."""
    return {(d, v2): generate_domain(d, 600, seed=5, version_2=v2, with_meta=True)
            for d in ALL for v2 in (False, True)}


# ---------------------------------------------------------------- generator


def test_deterministic_by_seed():
    a = generate_squad(120, 40, domains=DOMAINS, version_2=True, seed=3)
    b = generate_squad(120, 40, domains=DOMAINS, version_2=True, seed=3)
    c = generate_squad(120, 40, domains=DOMAINS, version_2=True, seed=4)
    assert a == b
    assert a["train"] != c["train"] and a["validation"] != c["validation"]
    assert {r["context"] for r in a["train"]}.isdisjoint({r["context"] for r in c["train"]})


def test_counts_ids_layout():
    data = generate_squad(301, 77, domains=DOMAINS, seed=1)
    assert set(data) == {"train", "validation"}
    assert len(data["train"]) == 301 and len(data["validation"]) == 77
    ids = [r["id"] for split in data.values() for r in split]
    assert len(ids) == len(set(ids))
    for r in data["train"]:
        assert set(r) == {"id", "title", "context", "question", "answers"}
        assert set(r["answers"]) == {"text", "answer_start"}
        assert isinstance(r["answers"]["answer_start"][0], int)
    # Several questions per passage, like SQuAD.
    per_context = Counter(r["context"] for r in data["train"])
    assert max(per_context.values()) <= 6
    assert statistics.mean(per_context.values()) >= 3.5
    # Default domains: the first three; counts shared evenly.
    default = generate_squad(30, 9)
    assert Counter(r["id"][:3] for r in default["train"]) == {"bio": 10, "geo": 10, "sci": 10}
    assert len(generate_squad(0, 0)["train"]) == 0


@pytest.mark.parametrize("v2", [False, True])
def test_every_answer_is_a_whole_word_span(meta_records, v2):
    for d in ALL:
        recs = meta_records[(d, v2)]
        for r in recs:
            ctx, ans = r["context"], r["answers"]
            assert len(ans["text"]) == len(ans["answer_start"]) <= 1
            assert bool(ans["text"]) != r["meta"]["unanswerable"]
            for text, start in zip(ans["text"], ans["answer_start"]):
                assert text and text == text.strip()
                assert ctx[start:start + len(text)] == text, r
                assert start == 0 or not ctx[start - 1].isalnum(), (text, ctx[start - 1:start + len(text) + 1])
                end = start + len(text)
                assert end == len(ctx) or not ctx[end].isalnum(), (text, ctx[start:end + 1])
        words = [len(c.split()) for c in {r["context"] for r in recs}]
        assert 80 <= statistics.median(words) <= 250, (d, v2, statistics.median(words))
        assert min(words) >= 40 and max(words) <= 250, (d, v2, min(words), max(words))


def test_unanswerable_fraction():
    for rate in (0.2, 0.4):
        recs = generate_squad(2000, 0, domains=DOMAINS, version_2=True, unanswerable_rate=rate, seed=2)["train"]
        frac = sum(not r["answers"]["text"] for r in recs) / len(recs)
        assert abs(frac - rate) < 0.03, (rate, frac)
    recs = generate_squad(800, 200, domains=DOMAINS, seed=2)
    assert all(r["answers"]["text"] for split in recs.values() for r in split)


def test_unanswerable_questions_name_passage_entities(meta_records):
    # An unanswerable question is about an entity the passage names, not a stranger:
    # its capitalised names (after the first word) occur in the context.
    for d in ALL:
        un = [r for r in meta_records[(d, True)] if r["meta"]["unanswerable"]]
        assert len(un) > 60
        for r in un:
            for name in re.findall(r"(?<=\s)[A-Z][\w'-]*(?:\s[A-Z][\w-]*)*", r["question"]):
                assert name.removesuffix("'s") in r["context"], (name, r["question"])


def _ngrams(text, n_max=6):
    words = re.findall(r"\w+", text)
    return {tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}


def test_dev_entities_unseen_in_train():
    for d in ALL:
        train = generate_domain(d, 1500, split="train", seed=7)
        dev = generate_domain(d, 400, split="validation", seed=7, with_meta=True)
        grams = set().union(*(_ngrams(c) for c in {r["context"] for r in train}))
        names = {r["answers"]["text"][0] for r in dev
                 if r["answers"]["text"] and r["meta"]["answer_type"] in NAME_TYPES}
        assert len(names) > 100
        leaked = [n for n in names if tuple(re.findall(r"\w+", n)) in grams]
        assert not leaked, (d, leaked[:5])
        # and train name answers are, of course, seen in train contexts (the check can fail)
        tr_names = [r["answers"]["text"][0] for r in train[:50]]
        assert all(tuple(re.findall(r"\w+", n)) in grams for n in tr_names)


def _vocab(records, common_only):
    pattern = r"\b[a-z]+\b" if common_only else r"[^\W\d_]+"
    return {w.lower() for r in records for w in re.findall(pattern, r["context"] + " " + r["question"])} - STOP


def test_domains_have_different_vocabularies():
    # Jaccard of the word sets (stop words excluded). All words: names dominate and
    # are domain-specific, expected < 0.1. Lower-case words only (relations,
    # nouns: "melts", "soldiers", "inhabitants"): measured 0.07-0.12 across
    # domains vs 0.99 for one domain at two seeds; 0.3 leaves room for growth
    # while still saying "clearly different distributions".
    jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    recs = {d: generate_domain(d, 300, seed=0) for d in DOMAINS}
    other_seed = {d: generate_domain(d, 300, seed=1) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        assert jac(_vocab(recs[a], True), _vocab(other_seed[a], True)) > 0.8
        for b in DOMAINS[i + 1:]:
            assert jac(_vocab(recs[a], False), _vocab(recs[b], False)) < 0.1, (a, b)
            assert jac(_vocab(recs[a], True), _vocab(recs[b], True)) < 0.3, (a, b)
    total = set().union(*(_vocab(r, False) for r in recs.values()))
    assert len(total) > 2000


def test_no_doubled_articles(meta_records):
    # An article before a value that brings its own ("was a celebrated an engraver", a bug
    # the biography intro had until 2026-12-07).
    bad = [m for recs in meta_records.values() for r in recs
           for m in re.findall(r"\b(?:a|an|the) (?:\w+ )?(?:a|an|the) \w+", r["context"] + " " + r["question"],
                               flags=re.I)]
    assert not bad, sorted(set(bad))[:5]


def test_related_domain_is_near_its_relative_only():
    # sport shares biography's town syllables and its birth / marriage / rival /
    # biographer / death sentences and questions, and has its own names, clubs,
    # wins and phrasings: nearer biography than any two default domains, yet a
    # distribution of its own.
    assert set(RELATED_DOMAINS) == {"sport"} and RELATED_DOMAINS["sport"] == "biography"
    assert "sport" not in DOMAINS
    assert {r["id"][:3] for r in generate_squad(20, 0)["train"]} == {"bio", "geo", "sci"}  # default mix unchanged
    jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    recs = {d: generate_domain(d, 300, seed=0) for d in ALL}
    near = jac(_vocab(recs["sport"], True), _vocab(recs["biography"], True))
    far = max(jac(_vocab(recs[a], True), _vocab(recs[b], True))
              for i, a in enumerate(DOMAINS) for b in DOMAINS[i + 1:])
    assert near > 2 * far and near < 0.8, (near, far)
    # Question phrasings (names masked): a real share in common with biography, not all.
    bio_q = {_mask(r["question"]) for r in recs["biography"]}
    shared = sum(_mask(r["question"]) in bio_q for r in recs["sport"]) / len(recs["sport"])
    assert 0.25 < shared < 0.75, shared
    # Person names differ (their own syllables); towns are shared.
    bio_people = {r["answers"]["text"][0] for r in generate_domain("biography", 300, seed=0, with_meta=True)
                  if r["meta"]["answer_type"] == "person"}
    sport = generate_domain("sport", 300, seed=0, with_meta=True)
    sport_people = {r["answers"]["text"][0] for r in sport if r["meta"]["answer_type"] == "person"}
    assert len(sport_people) > 50 and not sport_people & bio_people
    assert {r["meta"]["domain"] for r in sport} == {"sport"} and all(r["id"].startswith("spo-") for r in sport)


def _mask(question):
    words = question.split()
    return " ".join(words[:1] + ["X" if w[:1].isupper() or w[:1].isdigit() else w for w in words[1:]])


def test_several_phrasings(meta_records):
    masked = {_mask(r["question"]) for (_, v2), recs in meta_records.items() if not v2 for r in recs}
    assert len(masked) > 200
    phrasings = defaultdict(set)
    for (d, _), recs in meta_records.items():
        for r in recs:
            name, t = r["meta"]["template"].rsplit(".", 1)
            phrasings[name].add(t)
    assert len(phrasings) > 80
    frequent = [n for n in phrasings if sum(r["meta"]["template"].startswith(n + ".")
                                            for recs in meta_records.values() for r in recs) >= 40]
    assert frequent and all(len(phrasings[n]) >= 3 for n in frequent), \
        [n for n in frequent if len(phrasings[n]) < 3]


def test_hard_questions_exist(meta_records):
    recs = [r for (_, v2), rs in meta_records.items() if not v2 for r in rs]
    n = len(recs)
    assert sum(r["meta"]["hops"] >= 2 for r in recs) / n > 0.03  # "Where was the discoverer of X born?"
    assert sum(r["meta"]["coref"] for r in recs) / n > 0.1  # answer sentence says "She" / "The city"
    named = [r for r in recs if r["meta"]["answer_type"] in NAME_TYPES]
    assert sum(r["meta"]["same_type_in_context"] >= 2 for r in named) / len(named) > 0.8
    # Checked directly on the text: year answers sit among other years.
    years = [r for r in recs if r["meta"]["answer_type"] == "year"]
    assert len(years) > 200
    with_other_years = [r for r in years
                        if len(set(re.findall(r"\b\d{3,4}\b", r["context"])) - set(r["answers"]["text"])) >= 1]
    assert len(with_other_years) / len(years) > 0.9
    assert {r["meta"]["answer_type"] for r in recs} >= {"person", "place", "org", "work", "object", "year",
                                                         "date", "number", "quantity"}


def test_generation_is_fast():
    import time

    t0 = time.perf_counter()
    data = generate_squad(8000, 2000, domains=DOMAINS)
    assert len(data["train"]) == 8000
    assert time.perf_counter() - t0 < 6.0  # ~1.5 s measured on one core


def test_bad_arguments():
    with pytest.raises(ValueError, match="domains"):
        generate_squad(10, 10, domains=("biography", "cooking"))
    with pytest.raises(ValueError, match="num_train"):
        generate_squad(-1, 10)
    with pytest.raises(ValueError, match="domain"):
        generate_domain("cooking", 5)
    with pytest.raises(ValueError, match="split"):
        generate_domain("science", 5, split="test")
    with pytest.raises(ValueError, match="unanswerable_rate"):
        generate_domain("science", 5, version_2=True, unanswerable_rate=1.5)


# ---------------------------------------------------------------- tokenizer


def _fold(text):
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


def test_tokenizer_lowercases_strips_accents_keeps_offsets():
    corpus = ["Café Zürich serves coffee.", "the cafe in zurich", "Zürich, a city!"] * 20
    t = train_wordpiece_tokenizer(corpus, vocab_size=120)
    text = "The CAFÉ Zürich, Café zurich!"
    enc = t(text, return_offsets_mapping=True, add_special_tokens=False)
    toks = enc.tokens()
    assert "[UNK]" not in toks and all(tk == _fold(tk) for tk in toks)
    assert "é" not in "".join(toks) and "ü" not in "".join(toks)
    for tk, (s, e) in zip(toks, enc["offset_mapping"]):
        assert _fold(text[s:e]) == tk.removeprefix("##"), (tk, text[s:e])
    # "CAFÉ" is covered by tokens whose offsets span exactly the original characters.
    spans = [(s, e) for s, e in enc["offset_mapping"] if 4 <= s < 8]
    assert spans[0][0] == 4 and spans[-1][1] == 8 and text[4:8] == "CAFÉ"
    assert t.decode(enc["input_ids"]).startswith("the cafe zurich")


def test_tokenizer_pairs_sequence_ids(tok):
    enc = tok("Where was Ada born?", "Ada Lindström was born in Velgrad in 1901.", return_offsets_mapping=True)
    ids = enc.sequence_ids()
    assert ids[0] is None and ids[-1] is None and ids.count(None) == 3
    sep = ids.index(1) - 1
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][sep] == tok.sep_token_id
    assert enc["token_type_ids"] == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)
    assert list(tok.model_input_names) == ["input_ids", "token_type_ids", "attention_mask"]
    assert tok.model_max_length == 512 and tok.padding_side == "right"
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4] and tok.pad_token_id == 0


def test_tokenizer_overflow_windows_with_stride(tok):
    context = generate_domain("geography", 1, seed=0)[0]["context"] * 3
    q = "How many people live there?"
    enc = tok([q], [context], truncation="only_second", max_length=64, stride=16,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    n = len(enc["input_ids"])
    assert n >= 4 and enc["overflow_to_sample_mapping"] == [0] * n
    q_len = len(tok(q, add_special_tokens=False)["input_ids"])
    windows = []
    for i in range(n):
        assert len(enc["input_ids"][i]) == 64
        seq = enc.sequence_ids(i)
        assert seq[1:q_len + 1] == [0] * q_len  # the question repeats in every window
        windows.append([o for o, s in zip(enc["offset_mapping"][i], seq) if s == 1])
    for a, b in zip(windows, windows[1:]):
        assert a[-16:] == b[:16]  # consecutive windows share `stride` context tokens
    assert windows[0][0][0] == 0 and windows[-1][-1][1] == len(context.rstrip())


def test_answers_map_to_token_boundaries(tok):
    # HF run_qa maps answer characters to tokens via offsets: whole-word answers
    # start and end exactly on token boundaries.
    for d in ALL:
        for r in generate_domain(d, 60, split="validation", seed=9):
            enc = tok(r["question"], r["context"], return_offsets_mapping=True)
            ctx_offsets = [o for o, s in zip(enc["offset_mapping"], enc.sequence_ids()) if s == 1]
            start = r["answers"]["answer_start"][0]
            end = start + len(r["answers"]["text"][0])
            assert start in {s for s, _ in ctx_offsets} and end in {e for _, e in ctx_offsets}, r["answers"]


def test_tokenizer_training_is_deterministic_across_processes():
    # The tokenizers trainer numbers "##c" continuations in hash-map order, which differs per
    # process and broke merge ties differently (tokenizers #1794): three runs gave three
    # vocabularies before train_wordpiece_tokenizer registered them up front.
    import subprocess
    import sys

    code = ("import hashlib, json\n"
            "from kdfast.qa.synthetic import generate_domain\n"
            "from kdfast.qa.tokenizer import train_wordpiece_tokenizer\n"
            "t = [r['context'] for r in generate_domain('biography', 300, seed=0)]\n"
            "v = train_wordpiece_tokenizer(t, vocab_size=800).get_vocab()\n"
            "print(len(v), hashlib.sha1(json.dumps(sorted(v.items())).encode()).hexdigest())\n")
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
           for _ in range(3)}
    assert len(out) == 1, out
    assert int(next(iter(out)).split()[0]) == 800


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    q, c = "Who discovered Borenine?", "Borenine was discovered in 1942 by Lenji Dubikawa."
    a, b = tok(q, c, return_offsets_mapping=True), loaded(q, c, return_offsets_mapping=True)
    assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
    assert b["token_type_ids"] == a["token_type_ids"]
    assert loaded.pad_token_id == tok.pad_token_id and loaded.padding_side == "right"
    assert len(loaded) == len(tok) and loaded.model_max_length == 512


def test_builtin_tokenizer_vocab_size_and_cache(tok):
    assert 0.95 * VOCAB <= len(tok) <= VOCAB
    again = builtin_tokenizer(vocab_size=VOCAB)
    assert again.get_vocab() == tok.get_vocab()
    again.add_tokens(["zzzqqq"])
    assert len(builtin_tokenizer(vocab_size=VOCAB)) == len(tok)  # callers get copies
    small = builtin_tokenizer(["one two three four five six seven"] * 5, vocab_size=60)
    assert len(small) <= 60
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece_tokenizer(["a b"], vocab_size=3)
    with pytest.raises(ValueError, match="texts"):
        train_wordpiece_tokenizer([""], vocab_size=100)


# ---------------------------------------------------------------- write_generated


def test_write_generated_official_json(tmp_path, tok):
    from transformers import AutoTokenizer

    paths = write_generated(tmp_path / "v2", num_train=40, num_dev=13, domains=("science", "history"),
                            version_2=True, seed=0, tokenizer=True, vocab_size=VOCAB)
    assert set(paths) == {"train", "dev", "tokenizer"}
    expected = generate_squad(40, 13, domains=("science", "history"), version_2=True, seed=0)
    for name, split, n in (("train", "train", 40), ("dev", "validation", 13)):
        doc = json.loads(paths[name].read_text(encoding="utf-8"))
        assert doc["version"] == "v2.0"
        qas = [(p["context"], qa) for art in doc["data"] for p in art["paragraphs"] for qa in p["qas"]]
        assert len(qas) == n
        assert [qa["id"] for _, qa in qas] == [r["id"] for r in expected[split]]
        for (ctx, qa), rec in zip(qas, expected[split]):
            assert ctx == rec["context"] and qa["question"] == rec["question"]
            assert qa["is_impossible"] == (not qa["answers"])
            for a in qa["answers"]:
                assert ctx[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
        assert all(len(art["paragraphs"]) >= 1 and art["title"] for art in doc["data"])
    loaded = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    assert loaded.get_vocab() == tok.get_vocab()

    paths = write_generated(tmp_path / "v1", num_train=12, num_dev=6, tokenizer=False)
    assert set(paths) == {"train", "dev"} and not (tmp_path / "v1" / "tokenizer").exists()
    doc = json.loads(paths["dev"].read_text(encoding="utf-8"))
    qas = [qa for art in doc["data"] for p in art["paragraphs"] for qa in p["qas"]]
    assert doc["version"] == "v1.1" and len(qas) == 6
    assert all("is_impossible" not in qa and len(qa["answers"]) == 1 for qa in qas)


# ---------------------------------------------------------------- configs


def test_configs_from_tokenizer(tok):
    t = teacher_config(tok)
    s = student_config(tok)
    assert t.vocab_size == len(tok) == s.vocab_size and t.pad_token_id == tok.pad_token_id == s.pad_token_id
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.intermediate_size) == (6, 256, 4, 1024)
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.intermediate_size) == (2, 128, 2, 512)
    assert t.max_position_embeddings == 512 and t.type_vocab_size == 2
    assert teacher_config(1234).vocab_size == 1234 and teacher_config(1234).pad_token_id == 0
    assert student_config(tok, num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="num_attention_heads"):
        teacher_config(tok, hidden_size=250)
    with pytest.raises(TypeError, match="tokenizer_or_vocab_size"):
        teacher_config("bert-base-uncased")


def test_qa_models_forward(tok):
    import torch
    from transformers import BertForQuestionAnswering

    rec = generate_domain("biography", 1, seed=0)[0]
    enc = tok(rec["question"], rec["context"], return_tensors="pt")
    torch.manual_seed(0)
    for cfg in (teacher_config(tok), student_config(tok)):
        model = BertForQuestionAnswering(cfg).eval()
        with torch.no_grad():
            out = model(**enc)
        assert out.start_logits.shape == out.end_logits.shape == enc["input_ids"].shape
        assert torch.isfinite(out.start_logits).all()
    n_params = sum(p.numel() for p in BertForQuestionAnswering(teacher_config(tok)).parameters())
    assert 3e6 < n_params < 8e6
