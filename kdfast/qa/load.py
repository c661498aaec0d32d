"""SQuAD-format data -> HF ``datasets.Dataset`` in HF's SQuAD column layout.

Columns: ``id``, ``title``, ``context``, ``question`` (all str) and ``answers``
(``{"text": list[str], "answer_start": list[int]}``), plus a bool ``is_impossible``
column only for SQuAD v2-style data (unanswerable questions have empty answer lists,
as in HF's ``squad_v2``).

Local files are recognised from their content: the official nested SQuAD JSON
(v1.1 and v2.0), flattened JSON (a list of records, or ``{"data": [records]}`` as in
HF ``run_qa.py --train_file``) and JSON lines of the same records. Every record is
validated and a :class:`SquadFormatError` names the file, the record and the problem.
"""
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import datasets
import pyarrow as pa

logger = logging.getLogger(__name__)

#: The report of the most recent local :func:`load_squad` call:
#: ``{"fixed", "dropped_answers", "dropped_questions", "file"}`` (None after a hub load).
last_fix_report = None

#: Above this many questions a file is built with ``Dataset.from_generator`` (Arrow on disk)
#: instead of ``Dataset.from_dict``; a ``cache_dir`` always selects the on-disk path.
IN_MEMORY_MAX_QUESTIONS = 200_000

_SHOW = 40  # characters of text shown in error messages
_MISSING = object()
_RECORD_KEYS = ("context", "question", "answers", "id")
_FILE_SUFFIXES = (".json", ".jsonl", ".jsonlines", ".ndjson")


class SquadFormatError(ValueError):
    """A SQuAD file is malformed; the message names the file, the record and the problem."""


def squad_features(v2=False):
    """The ``datasets.Features`` of HF's SQuAD layout (with ``is_impossible`` when ``v2``)."""
    f = {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
    }
    if v2:
        f["is_impossible"] = datasets.Value("bool")
    return datasets.Features(f)


def _short(s):
    return repr(s if len(s) <= _SHOW else s[:_SHOW] + "...")


def _is_v2_version(v):
    return isinstance(v, (str, int, float)) and str(v).lstrip("vV").startswith("2")


def _nearest(context, text, start):
    """Offset of the occurrence of ``text`` in ``context`` closest to ``start`` (earlier on ties), or None."""
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        if pos >= start:  # later occurrences are only farther away
            break
        pos = context.find(text, pos + 1)
    return best


class _FileReader:
    """One pass over one local file: yields validated records as tuples
    ``(id, title, context, question, texts, starts, impossible)``.

    After the pass: ``report`` (fix counts), ``with_impossible`` (whether the Dataset gets the
    ``is_impossible`` column) and ``questions`` (records yielded).
    """

    def __init__(self, path, fix_spans=False, version_2=None):
        self.path, self.name = Path(path), str(path)
        self.fix_spans, self.version_2 = fix_spans, version_2
        self.report = {"fixed": 0, "dropped_answers": 0, "dropped_questions": 0, "file": str(path)}
        self.v2_style = False
        self.first_unanswered = None  # (key, id) of a question with no answers and no is_impossible
        self.seen = {}  # id -> locator key
        self.titles = []  # nested files: article titles, for locators
        self.questions = 0

    @property
    def with_impossible(self):
        return self.version_2 is True or (self.version_2 is None and self.v2_style)

    # -- messages -------------------------------------------------------------------
    def where(self, key, qid=None):
        if key[0] == "line":
            s = f"line {key[1]}"
        elif key[0] == "record":
            s = f"record {key[1]}"
        else:  # nested: ("q", article, paragraph, question) or shorter
            t = self.titles[key[1]] if len(self.titles) > key[1] else None
            s = f"article {key[1]}" + (f" {t!r}" if t is not None else "")
            if len(key) > 2:
                s += f", paragraph {key[2]}"
            if len(key) > 3:
                s += f", question {key[3]}"
        return s + (f" (id {qid!r})" if qid is not None else "")

    def fail(self, key, problem, qid=None):
        raise SquadFormatError(f"{self.name}: {self.where(key, qid)}: {problem}")

    def field(self, obj, name, types, key, qid=None, default=_MISSING):
        v = obj.get(name, default)
        if v is _MISSING:
            self.fail(key, f"missing field {name!r}", qid)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types)):
            want = " or ".join(t.__name__ for t in _tuple(types))
            self.fail(key, f"field {name!r} must be {want}, got {type(v).__name__}", qid)
        return v

    # -- the pass -------------------------------------------------------------------
    def records(self):
        if not self.path.is_file():
            raise FileNotFoundError(f"SQuAD file not found: {self.name}")
        with open(self.path, encoding="utf-8-sig") as f:
            n, line = 0, ""
            for n, line in enumerate(f, 1):
                if line.strip():
                    break
            if not line.strip():
                raise SquadFormatError(f"{self.name}: the file is empty")
            doc = _MISSING
            if line.lstrip().startswith("{"):
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    first = _MISSING  # a multi-line JSON document
                if isinstance(first, dict):  # JSON lines, or a one-line JSON document
                    record = "data" not in first and any(k in first for k in _RECORD_KEYS)
                    rest = None if record else f.read()
                    if record or rest.strip():  # more lines: JSON lines whose line 1 must be a record
                        yield from self._jsonl(first, n, f if record else rest.splitlines(True))
                        return self._finish()
                    doc = first
            if doc is _MISSING:
                f.seek(0)
                try:
                    doc = json.loads(f.read())
                except json.JSONDecodeError as e:
                    raise SquadFormatError(f"{self.name}: not valid JSON or JSON lines: {e.msg} "
                                           f"at line {e.lineno} column {e.colno}") from None
        yield from self._document(doc)
        self._finish()

    def _finish(self):
        if self.first_unanswered is not None and not self.with_impossible:
            key, qid = self.first_unanswered
            self.fail(key, "question has no answers: SQuAD v1 questions need at least one "
                           "(pass version_2=True to allow unanswerable questions)", qid)

    def _jsonl(self, first, n, lines):
        yield from self._flat(first, ("line", n))
        for n, line in enumerate(lines, n + 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                self.fail(("line", n), f"not valid JSON: {e.msg} (column {e.colno})")
            yield from self._flat(rec, ("line", n))

    def _document(self, doc):
        if isinstance(doc, list):
            data, version = doc, None
        elif isinstance(doc, dict) and "data" in doc:
            data, version = doc["data"], doc.get("version")
            if not isinstance(data, list):
                raise SquadFormatError(f"{self.name}: field 'data' must be a list, got {type(data).__name__}")
        else:
            raise SquadFormatError(f"{self.name}: not a SQuAD file: expected a JSON object with a 'data' list, "
                                   "a JSON list of records, or JSON lines")
        if not data:
            return
        head = data[0]
        if isinstance(head, dict) and "paragraphs" in head:
            if _is_v2_version(version):
                self.v2_style = True
            yield from self._nested(data)
        elif isinstance(head, dict) and "context" in head:
            for i, rec in enumerate(data):
                yield from self._flat(rec, ("record", i))
        else:
            raise SquadFormatError(f"{self.name}: data item 0: missing field 'paragraphs' (nested SQuAD) "
                                   "or 'context' (flattened records)")

    def _nested(self, data):
        for ai, art in enumerate(data):
            key = ("a", ai)
            if not isinstance(art, dict):
                self.fail(key, f"article must be a JSON object, got {type(art).__name__}")
            self.titles.append(None)
            title = self.field(art, "title", str, key)
            self.titles[ai] = title
            for pi, para in enumerate(self.field(art, "paragraphs", list, key)):
                key = ("a", ai, pi)
                if not isinstance(para, dict):
                    self.fail(key, f"paragraph must be a JSON object, got {type(para).__name__}")
                context = self._context(para, key)
                for qi, qa in enumerate(self.field(para, "qas", list, key)):
                    key = ("a", ai, pi, qi)
                    if not isinstance(qa, dict):
                        self.fail(key, f"question must be a JSON object, got {type(qa).__name__}")
                    r = self._question(qa, key, title, context)
                    if r is not None:
                        yield r

    def _flat(self, rec, key):
        if not isinstance(rec, dict):
            self.fail(key, f"record must be a JSON object, got {type(rec).__name__}")
        qid = rec.get("id") if isinstance(rec.get("id"), str) else None
        title = self.field(rec, "title", str, key, qid, default="")
        context = self._context(rec, key, qid)
        r = self._question(rec, key, title, context)
        if r is not None:
            yield r

    def _context(self, obj, key, qid=None):
        context = self.field(obj, "context", str, key, qid)
        if not context.strip():
            self.fail(key, "empty context", qid)
        return context

    def _answers(self, raw, key, qid):
        """(text, start) pairs from either answer layout, types checked."""
        if isinstance(raw, dict):
            texts = self.field(raw, "text", list, key, qid)
            starts = self.field(raw, "answer_start", list, key, qid)
            if len(texts) != len(starts):
                self.fail(key, f"answers has {len(texts)} texts but {len(starts)} answer_start values", qid)
            pairs = list(zip(texts, starts))
        elif isinstance(raw, list):
            pairs = []
            for i, a in enumerate(raw):
                if not isinstance(a, dict):
                    self.fail(key, f"answer {i} must be a JSON object, got {type(a).__name__}", qid)
                for name in ("text", "answer_start"):
                    if name not in a:
                        self.fail(key, f"answer {i}: missing field {name!r}", qid)
                pairs.append((a["text"], a["answer_start"]))
        else:
            self.fail(key, f"field 'answers' must be a list or a {{'text', 'answer_start'}} object, "
                           f"got {type(raw).__name__}", qid)
        for i, (t, s) in enumerate(pairs):
            if not isinstance(t, str):
                self.fail(key, f"answer {i}: text must be str, got {type(t).__name__}", qid)
            if not isinstance(s, int) or isinstance(s, bool):
                self.fail(key, f"answer {i}: answer_start must be int, got {type(s).__name__}", qid)
        return pairs

    def _question(self, qa, key, title, context):
        qid = self.field(qa, "id", str, key)
        if not qid:
            self.fail(key, "empty id")
        question = self.field(qa, "question", str, key, qid)
        if not question.strip():
            self.fail(key, "empty question", qid)
        prev = self.seen.get(qid)
        if prev is not None:
            self.fail(key, f"duplicate id {qid!r}: first seen at {self.where(prev)}", qid)
        self.seen[qid] = key
        pairs = self._answers(self.field(qa, "answers", (list, dict), key, qid), key, qid)
        imp = qa.get("is_impossible", _MISSING)
        if imp is not _MISSING:
            if not isinstance(imp, bool):
                self.fail(key, f"field 'is_impossible' must be bool, got {type(imp).__name__}", qid)
            self.v2_style = True
        if imp is True or not pairs:
            if imp is True and pairs:
                self.fail(key, f"unanswerable question (is_impossible: true) still has answers ({len(pairs)})", qid)
            if imp is False:
                self.fail(key, "question has no answers but is_impossible is false", qid)
            if self.version_2 is False:
                self.fail(key, "unanswerable question (no answers) but version_2=False", qid)
            if imp is _MISSING and self.first_unanswered is None:
                self.first_unanswered = (key, qid)
            self.questions += 1
            return (qid, title, context, question, [], [], True)
        texts, starts = [], []
        for i, (text, start) in enumerate(pairs):
            if not text.strip():
                self.fail(key, f"answer {i}: empty answer text", qid)
            if start < 0 or not context.startswith(text, start):
                if self.fix_spans:
                    pos = _nearest(context, text, start)
                    if pos is None:
                        self.report["dropped_answers"] += 1
                        continue
                    self.report["fixed"] += 1
                    start = pos
                elif start < 0:
                    self.fail(key, f"answer {i}: negative answer_start {start}", qid)
                elif start >= len(context):
                    self.fail(key, f"answer {i}: answer_start {start} is outside the context "
                                   f"(length {len(context)})", qid)
                else:
                    self.fail(key, f"answer {i}: text not at answer_start {start}: expected {_short(text)}, "
                                   f"found {_short(context[start:start + len(text)])}", qid)
            texts.append(text)
            starts.append(start)
        if not texts:
            self.report["dropped_questions"] += 1
            return None
        self.questions += 1
        return (qid, title, context, question, texts, starts, False)


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _row(r, with_impossible):
    d = {"id": r[0], "title": r[1], "context": r[2], "question": r[3],
         "answers": {"text": r[4], "answer_start": r[5]}}
    if with_impossible:
        d["is_impossible"] = r[6]
    return d


def _generate(path, fix_spans, version_2, with_impossible, stamp):
    """Generator for ``Dataset.from_generator``: a second pass over an already validated file."""
    for r in _FileReader(path, fix_spans, version_2).records():
        yield _row(r, with_impossible)


def _publish(report, fix_spans):
    global last_fix_report
    last_fix_report = report
    changed = report["fixed"] or report["dropped_answers"] or report["dropped_questions"]
    if not fix_spans:
        return
    msg = (f"fix_spans on {report['file']}: relocated {report['fixed']} answers, dropped "
           f"{report['dropped_answers']} answers not found in their context and "
           f"{report['dropped_questions']} questions left without answers")
    if changed:
        warnings.warn(msg, stacklevel=4)
        logger.warning(msg)
    else:
        logger.info(msg)


def _load_file(path, split, fix_spans, version_2, cache_dir):
    reader = _FileReader(path, fix_spans, version_2)
    on_disk = cache_dir is not None
    rows = []
    for r in reader.records():
        if not on_disk:
            rows.append(r)
            if len(rows) > IN_MEMORY_MAX_QUESTIONS:
                on_disk, rows = True, []  # keep validating; the Dataset is built from a second pass
    _publish(reader.report, fix_spans)
    v2 = reader.with_impossible
    features = squad_features(v2)
    if not on_disk:
        cols = {"id": [r[0] for r in rows], "title": [r[1] for r in rows], "context": [r[2] for r in rows],
                "question": [r[3] for r in rows],
                "answers": [{"text": r[4], "answer_start": r[5]} for r in rows]}
        if v2:
            cols["is_impossible"] = [r[6] for r in rows]
        schema = features.arrow_schema  # typed Arrow arrays: from_dict skips per-example encoding
        cols = {k: pa.array(v, type=schema.field(k).type) for k, v in cols.items()}
        return datasets.Dataset.from_dict(cols, features=features, split=split)
    st = os.stat(path)
    stamp = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"  # a str: datasets shards list kwargs
    key = json.dumps([stamp, bool(fix_spans), version_2, v2, str(split), "kdfast.qa.load/1"])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    kw = dict(path=str(path), fix_spans=fix_spans, version_2=version_2, with_impossible=v2, stamp=stamp)
    try:
        return datasets.Dataset.from_generator(_generate, features=features, cache_dir=cache_dir, gen_kwargs=kw,
                                               split=split or datasets.Split.TRAIN, fingerprint=fingerprint)
    except Exception as e:  # datasets wraps generator errors: surface ours
        cause = e
        while cause is not None and not isinstance(cause, (SquadFormatError, FileNotFoundError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _looks_like_path(s):
    return s.lower().endswith(_FILE_SUFFIXES) or s.startswith((".", "/", "~")) or os.sep + os.sep in s


def _network_error(e):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or any(
                w in name for w in ("Connect", "Timeout", "Offline", "LocalEntryNotFound")) \
                or "couldn't reach" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_hub(name, split, cache_dir, num_proc):
    global last_fix_report
    last_fix_report = None
    kw = {"split": split}
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    if num_proc is not None:
        kw["num_proc"] = num_proc
    try:
        return datasets.load_dataset(name, **kw)
    except Exception as e:
        if _network_error(e):
            raise RuntimeError(
                f"load_squad({name!r}): {name!r} is not a local file, and the Hugging Face Hub is unreachable "
                f"({type(e).__name__}: {e}). Give a local file path instead (SQuAD JSON or JSON lines), "
                f"e.g. load_squad('train-v1.1.json').") from e
        raise


def load_squad(source, *, split=None, fix_spans=False, version_2=None, cache_dir=None, num_proc=None):
    """Load SQuAD-format data as a ``datasets.Dataset`` (HF SQuAD columns).

    Args:
        source: a local file path (nested SQuAD JSON v1.1/v2.0, flattened JSON records or JSON lines,
            recognised from the content); a mapping ``{split_name: path}`` (returns a ``DatasetDict``);
            or a hub dataset name such as ``"squad"`` (any string that is not an existing path and does
            not look like one), loaded with ``datasets.load_dataset(name, split=split)`` as is
            (``fix_spans`` and ``version_2`` apply to local files only).
        split: split name given to a local file's Dataset; with a mapping, load only that split and
            return a ``Dataset``; for hub names, passed to ``load_dataset``.
        fix_spans: relocate an answer whose text is not at its ``answer_start`` to the occurrence
            nearest to it, drop answers whose text is not in the context and questions left with no
            answer. Counts go to :data:`last_fix_report`, ``warnings`` and ``logging``.
        version_2: None detects v2 from the data (any ``is_impossible`` field, or a nested file whose
            ``version`` is 2.x); True allows unanswerable questions; False rejects them.
            The ``is_impossible`` column is present exactly when the data is treated as v2.
        cache_dir: build the Dataset with ``Dataset.from_generator`` cached here (keyed by the file's
            path, size, mtime and the options). Without it, small files are built in memory.
        num_proc: passed to ``load_dataset`` for hub names (local parsing is single-process).

    Returns:
        ``datasets.Dataset``, or ``datasets.DatasetDict`` for a mapping (or a hub load without split).

    Raises:
        SquadFormatError: malformed data, naming file, record and problem.
        FileNotFoundError: a path that does not exist.
        RuntimeError: a hub name while the Hub is unreachable.
    """
    global last_fix_report
    if isinstance(source, dict):
        if not source:
            raise ValueError("load_squad: source mapping is empty (expected {split_name: path})")
        if split is not None:
            if split not in source:
                raise ValueError(f"load_squad: split {split!r} not in source mapping (has {sorted(source)})")
            return load_squad(source[split], split=split, fix_spans=fix_spans, version_2=version_2,
                              cache_dir=cache_dir)
        out, reports = {}, {}
        for name, path in source.items():
            if not isinstance(path, (str, os.PathLike)) or not Path(path).exists():
                raise FileNotFoundError(f"load_squad: split {name!r}: no such file: {path!r}")
            out[name] = load_squad(path, split=name, fix_spans=fix_spans, version_2=version_2,
                                   cache_dir=cache_dir)
            reports[name] = last_fix_report
        total = {k: sum(r[k] for r in reports.values()) for k in ("fixed", "dropped_answers", "dropped_questions")}
        last_fix_report = dict(total, file=[r["file"] for r in reports.values()], splits=reports)
        return datasets.DatasetDict(out)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and (
            os.path.exists(os.path.expanduser(source)) or _looks_like_path(source))):
        path = os.path.expanduser(os.fspath(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_squad: no such file: {os.fspath(source)!r}")
        return _load_file(path, split, fix_spans, version_2, cache_dir)
    if not isinstance(source, str):
        raise TypeError(f"load_squad: source must be a path, a {{split: path}} mapping or a hub name, "
                        f"got {type(source).__name__}")
    return _load_hub(source, split, cache_dir, num_proc)


def _answer_lists(rec, i):
    a = rec.get("answers", _MISSING)
    if isinstance(a, dict):
        return [str(t) for t in a.get("text", [])], [int(s) for s in a.get("answer_start", [])]
    if isinstance(a, list):
        return [str(x["text"]) for x in a], [int(x["answer_start"]) for x in a]
    raise ValueError(f"record {i} (id {rec.get('id')!r}): 'answers' must be {{'text', 'answer_start'}} "
                     f"lists or a list of answers, got {type(a).__name__ if a is not _MISSING else 'nothing'}")


def write_squad_json(dataset_or_records, path, *, version="1.1", title_field="title"):
    """Write HF-layout records as the official nested SQuAD JSON.

    Consecutive records with the same title form one article, consecutive records with the same
    context within it one paragraph, so loading the file gives back the same records in order.

    Args:
        dataset_or_records: a ``datasets.Dataset`` or an iterable of dicts with ``id``, ``context``,
            ``question``, ``answers`` and the title field.
        path: output file (parent folders are created).
        version: the file's ``version``; a 2.x version writes ``is_impossible`` on every question
            (true for records with no answers or ``is_impossible`` true). A 1.x file rejects records
            without answers.
        title_field: the record field holding the article title.

    Returns:
        The ``Path`` written.
    """
    v2 = _is_v2_version(version)
    data = []
    for i, rec in enumerate(dataset_or_records):
        for name in ("id", "context", "question", title_field):
            if name not in rec:
                raise ValueError(f"write_squad_json: record {i}: missing field {name!r}")
        texts, starts = _answer_lists(rec, i)
        impossible = bool(rec.get("is_impossible", False)) or not texts
        if impossible and not v2:
            raise ValueError(f"write_squad_json: record {i} (id {rec['id']!r}) has no answers; "
                             f"write unanswerable questions with version='2.0'")
        qa = {"id": rec["id"], "question": rec["question"],
              "answers": [] if impossible else [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]}
        if v2:
            qa["is_impossible"] = impossible
        title = rec[title_field]
        if not data or data[-1]["title"] != title:
            data.append({"title": title, "paragraphs": []})
        paras = data[-1]["paragraphs"]
        if not paras or paras[-1]["context"] != rec["context"]:
            paras.append({"context": rec["context"], "qas": []})
        paras[-1]["qas"].append(qa)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": str(version), "data": data}, f, ensure_ascii=False)
    return path


def write_jsonl(records, path):
    """Write records (a ``Dataset`` or dicts) as JSON lines in HF layout, one question a line.

    ``answers`` is written as ``{"text": [...], "answer_start": [...]}``; other fields are kept.
    Returns the ``Path`` written; :func:`load_squad` reads it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            texts, starts = _answer_lists(rec, i)
            out = dict(rec)
            out["answers"] = {"text": texts, "answer_start": starts}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return path


def count_questions(dataset):
    """Counts of a SQuAD-layout Dataset (or iterable of records); a DatasetDict gives one dict per split.

    Returns:
        ``{"questions", "answers", "unanswerable" (questions with no answer), "articles" (distinct titles),
        "paragraphs" (runs of consecutive records with the same title and context: the paragraphs of the
        nested file they were loaded from, and of what :func:`write_squad_json` writes),
        "distinct_paragraphs" (distinct (title, context) pairs; smaller when a file repeats a paragraph)}``.
    """
    if isinstance(dataset, datasets.DatasetDict):
        return {k: count_questions(v) for k, v in dataset.items()}
    if isinstance(dataset, datasets.Dataset):
        tbl = dataset.with_format("arrow")[:]  # honours select/shuffle indices
        titles = tbl.column("title").to_pylist() if "title" in tbl.column_names else [""] * len(tbl)
        answers = tbl.column("answers").combine_chunks().field("text").value_lengths().fill_null(0).to_pylist()
        cols = zip(titles, tbl.column("context").to_pylist(), answers)
    else:
        cols = ((r.get("title", ""), r["context"], r["answers"]) for r in dataset)
    q = a = unans = runs = 0
    arts, paras, last = set(), set(), None
    for t, c, ans in cols:
        n = ans if isinstance(ans, int) else len(ans["text"]) if isinstance(ans, dict) else len(ans)
        q += 1
        a += n
        unans += n == 0
        arts.add(t)
        paras.add((t, c))
        if last is None or last[0] != t or last[1] != c:
            runs += 1
            last = (t, c)
    return {"questions": q, "answers": a, "unanswerable": unans, "articles": len(arts), "paragraphs": runs,
            "distinct_paragraphs": len(paras)}
