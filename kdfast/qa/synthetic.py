"""Synthetic extractive-QA data in SQuAD layout: the pipeline's offline demo set.

Each passage (~80-250 words) is about one main entity of a domain (a person, a
city, a chemical compound, a battle) and states a dozen or more facts, with
distractor entities of the same types: a teacher from another town, a port with
its own population, a related compound with its own melting point, two armies
with their own sizes. Sentences refer back with "She", "The city", "That city",
"The kingdom" where the referent is unambiguous (the previous sentence names no
other entity of that kind); some questions need two facts ("Where was the
discoverer of X born?", "Who ruled the kingdom that won the Battle of X?").
Every question has at least three phrasings, most using other words than the
passage ("birthplace", "inhabitants", "victorious").

Domains have their own name syllables, nouns, relations and templates, so two
domains are clearly different distributions. Every generated name part is given
to train or dev by a hash of its spelling (a fifth of the name space is dev's),
so dev entities never occur in train text, whatever the seed. All randomness
comes from one ``random.Random`` per (seed, domain, split).

SQuAD 2.0 style (``version_2``): sentences are dropped at random, and a question
whose fact (or one of whose hops) was dropped becomes unanswerable, asked about
an entity the passage names, among same-type distractors.
"""
from __future__ import annotations

import json
import random
import string
import zlib
from functools import lru_cache
from pathlib import Path

DOMAINS = ("biography", "geography", "science", "history")
"""Available topic domains."""

RELATED_DOMAINS = {"sport": "biography"}
"""Domains outside the default mix (``DOMAINS``), each near one of them: {name: its relative}.
A target domain for transfer studies (``bench/augment.py --target_domain sport``)."""

NAME_TYPES = frozenset({"person", "place", "org", "work", "object", "event"})
"""Answer types (``meta["answer_type"]``) that are generated names, split train/dev."""

_FMT = string.Formatter()


@lru_cache(maxsize=None)
def _parse(template):
    """template -> ((literal, key or None, possessive), ...)."""
    out = []
    for lit, field, _, _ in _FMT.parse(template):
        poss = field is not None and field.endswith("_s")
        out.append((lit, field[:-2] if poss else field, poss))
    return tuple(out)


@lru_cache(maxsize=None)
def _keys(template):
    return tuple(k for _, k, _ in _parse(template) if k is not None and k != "S")


def _is_dev_name(word):
    # By spelling, not by seed: the same name is dev's in every run.
    return zlib.crc32(word.lower().encode("utf-8")) % 5 == 0


class _V:
    """A value in a passage: text, answer type, article ("the", "a"), anaphor forms.

    ``ana`` is (nominative, possessive, group): the anaphor is used only when the
    previous sentence named this value and no other value of the same group.
    """

    __slots__ = ("text", "cls", "article", "ana")

    def __init__(self, text, cls, article="", ana=None):
        self.text, self.cls, self.article, self.ana = str(text), cls, article, ana


class _S:
    """A sentence spec: id, subject key (for ``{S}``), templates, droppable?"""

    __slots__ = ("sid", "subj", "templates", "drop")

    def __init__(self, sid, subj, *templates, drop=True):
        self.sid, self.subj, self.templates, self.drop = sid, subj, templates, drop


class _Q:
    """A question spec: answer key(s) ("a+b" = span from a to b), the sentence
    holding it ("@key": the sentence id is the text of vals[key]), other
    sentences it needs (hops), phrasings."""

    __slots__ = ("name", "answer", "sid", "needs", "templates")

    def __init__(self, name, answer, sid, *templates, needs=""):
        self.name, self.answer, self.sid = name, tuple(answer.split("+")), sid
        self.needs, self.templates = tuple(needs.split()), templates


class _Namer:
    """Draws names, numbers and nouns for one passage, without repeats in it."""

    def __init__(self, rng, dev):
        self.rng, self.dev, self.used = rng, dev, set()

    def _take(self, make, split):
        for _ in range(2000):
            w = make()
            if w not in self.used and (not split or _is_dev_name(w) == self.dev):
                self.used.add(w)
                return w
        raise RuntimeError("synthetic: name pool exhausted")

    def word(self, *parts):
        """A name made of one syllable from each part, from this split's half."""
        choice = self.rng.choice
        return self._take(lambda: "".join(choice(p) for p in parts), True)

    def phrase(self, fmt, *lists):
        """A multi-word name (a title), whole, from this split's half."""
        return self._take(lambda: fmt.format(*(self.rng.choice(x) for x in lists)), True)

    def pick(self, items):
        """A common noun or phrase, shared by the splits."""
        return self._take(lambda: self.rng.choice(items), False)

    def num(self, lo, hi, fmt="{:,}", step=1):
        """(value, text): a number in [lo, hi] (multiple of step) with a new text."""
        box = []

        def make():
            box[:] = [self.rng.randrange(lo, hi + 1, step)]
            return fmt.format(box[0])
        text = self._take(make, False)
        return box[0], text


def _cap(text):
    return text[:1].upper() + text[1:]


def _surface(v, poss, at_start):
    art = v.article + " " if v.article else ""
    text = art + v.text + ("'s" if poss else "")
    return (_cap(text) if at_start else text), len(art)


def _render(rng, sentences, vals):
    """Render the kept sentences.

    Returns (context, spans {(sid, value): (start, end)}, values named in the
    context, {sid: subject was an anaphor}, set of rendered sentence ids).
    """
    out, pos, prev = [], 0, ()
    spans, seen, coref = {}, set(), {}
    for sent in sentences:
        pieces, n, cur, ana_used = [], pos, [], False
        for lit, key, poss in _parse(rng.choice(sent.templates)):
            if lit:
                pieces.append(lit)
                n += len(lit)
            if key is None:
                continue
            is_subj = key == "S"
            v = vals[sent.subj if is_subj else key]
            at_start = n == pos
            if (is_subj and v.ana and v in prev and rng.random() < 0.65
                    and not any(o is not v and o.ana and o.ana[2] == v.ana[2] for o in prev)):
                text = v.ana[1] if poss else v.ana[0]
                text = text if at_start else text.lower()
                ana_used = True
                cur.append(v)
            else:
                text, skip = _surface(v, poss, at_start)
                spans.setdefault((sent.sid, v), (n + skip, n + skip + len(v.text)))
                if v.cls != "pron":
                    cur.append(v)
                    seen.add(v)
            pieces.append(text)
            n += len(text)
        text = "".join(pieces)
        out.append(text)
        coref[sent.sid] = ana_used
        prev = tuple(cur)
        pos += len(text) + 1
    return " ".join(out), spans, seen, coref, set(coref)


def _fill(template, vals):
    pieces = []
    for lit, key, poss in _parse(template):
        pieces.append(lit)
        if key is not None:
            pieces.append(_surface(vals[key], poss, not any(pieces))[0])
    return "".join(pieces)


def _words(**lists):
    return {k: v.split("|") if "|" in v else v.split() for k, v in lists.items()}


def _an(word):
    return "an" if word[0] in "aeiou" else "a"


_SHE, _HE = ("She", "Her", "she"), ("He", "His", "he")
_MONTHS = ("January February March April May June July August September October "
           "November December").split()
_NUM_WORDS = "two three four five six seven".split()


def _pron(female):
    return _V("she" if female else "he", "pron"), _V("her" if female else "his", "pron")


def _person(name, female):
    return _V(name, "person", ana=_SHE if female else _HE)


def _org(nm, forms, *parts):
    article, fmt = nm.rng.choice(forms)
    return _V(fmt.format(nm.word(*parts)), "org", article=article)


def _year(nm, lo, hi):
    return _V(nm.num(lo, hi, "{}")[1], "year")


def _noun(nm, items):
    word = nm.pick(items)
    return _V(word, "thing", article=_an(word))


# ---------------------------------------------------------------------------
# Domains: make(rng, namer) -> (title, vals), sentence blocks (the first opens
# the passage, the last closes it, the middle ones may be shuffled), questions.

_BIO = _words(
    fa="Ad Bri Cel Del El Fen Gwen Hel Is Jes Kat Lor Mar Nel Ros Sel Tam Vi Wil Ys Am Cor",
    fb="a ia ina ella ine ette wen ora issa",
    ma="Al Ber Cal Dor Ed Fal Gil Hal Iv Jas Kel Lor Mor Nor Os Per Ros Tam Ul Wil Bran Cy",
    mb="ric o on or us ard an ias el",
    la="Ash Black Brad Carr Dun Ell Fair Graf Hart Hol Lang Mer North Pen Ray Stan Thorn Wal "
       "Whit Hay Brom Cres Ald Fen",
    lb="by combe den field ford ham ley low mere more ridge ton well wick worth",
    ta="Am Bex Char Dal Ex Glen Hex Ket Lud Mal Nes Oak Pol Rud Sal Tew War Yel Bod Cam Pen Ross",
    tb="bury caster chester cott dale minster mouth sby stow thorpe wich stead",
    prof="painter composer poet sculptor novelist violinist photographer playwright pianist "
         "dancer cellist engraver essayist illustrator singer organist conductor potter",
    adj="Silent Golden Hidden Winter Broken Distant Quiet Burning Crimson Forgotten Wandering "
        "Pale Restless Faithful Hollow Scarlet Autumn Endless Velvet Lonely",
    noun="Harbour Garden Orchard Lantern Meadow Chorus Voyage Mirror Sonata Portrait Tide "
         "Window Fountain Procession Letters Ballad Elegy Harvest Sparrow Carnival",
)
_BIO_SCHOOLS = (("the", "{} Conservatory"), ("the", "Royal Academy of {}"), ("", "{} University"),
                ("the", "{} School of Art"))
_BIO_AWARDS = (("the", "{} Prize"), ("the", "{} Medal"), ("the", "{} Award"))
_BIO_VENUES = (("the", "{} Opera House"), ("the", "{} Gallery"), ("the", "Grand Hall of {}"),
               ("the", "{} Festival"))


def _life_maker(w, schools, awards, venues, work):
    """make(rng, namer) for a domain about one person's life (biography and its
    relatives): lexicon ``w`` (first-name, surname, town syllables; ``prof``),
    organisation forms (school, award, venue), and ``work(nm) -> _V``."""

    def make(rng, nm):
        def person(female):
            first = nm.word(w["fa"], w["fb"]) if female else nm.word(w["ma"], w["mb"])
            return _person(first + " " + nm.word(w["la"], w["lb"]), female)

        def town():
            return _V(nm.word(w["ta"], w["tb"]), "place")

        fem = rng.random() < 0.5
        by, _ = nm.num(1780, 1930, "{}")
        wky, _ = nm.num(by + 24, by + 45, "{}")
        ay, _ = nm.num(wky + 1, wky + 12, "{}")
        dy, _ = nm.num(ay + 2, min(by + 92, 2020), "{}")
        he, his = _pron(fem)
        v = dict(
            P=person(fem), M=person(rng.random() < 0.5), W=person(not fem), R=person(rng.random() < 0.5),
            G=person(rng.random() < 0.5), St=person(rng.random() < 0.5), he=he, his=his,
            prof=_noun(nm, w["prof"]), rprof=_noun(nm, w["prof"]),
            bt=town(), mt=town(), dt=town(), rt=town(), gt=town(), ct=town(),
            school=_org(nm, schools, w["ta"], w["tb"]), school2=_org(nm, schools, w["ta"], w["tb"]),
            award=_org(nm, awards, w["la"], w["lb"]), venue=_org(nm, venues, w["ta"], w["tb"]),
            work=work(nm),
            by=_V(by, "year"), bday=_V(f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}", "date"),
            sy=_year(nm, by + 16, by + 22), wy=_year(nm, by + 22, by + 35), my=_year(nm, by + 20, by + 40),
            dby=_year(nm, by + 18, by + 30), wky=_V(wky, "year"), ay=_V(ay, "year"), dy=_V(dy, "year"),
            age=_V(dy - by, "number"), kids=_V(rng.choice(_NUM_WORDS), "number"),
        )
        return v["P"].text, v
    return make


_bio_make = _life_maker(_BIO, _BIO_SCHOOLS, _BIO_AWARDS, _BIO_VENUES,
                        lambda nm: _V(nm.phrase("The {} {}", _BIO["adj"], _BIO["noun"]), "work"))


_BIO_BLOCKS = (
    (_S("intro", "P", "{S} was celebrated as {prof}.", "{S} was {prof} of considerable renown.",
        "{S} worked as {prof} for most of {his} life.", drop=False),),
    (_S("birth", "P", "{S} was born in {bt} in {by}.", "{S} was born on {bday} {by} in the town of {bt}.",
        "In {by}, {S} was born in {bt}, a small market town.",
        "{S} was born in {by} in {bt}, where {his} father kept a shop."),),
    (_S("study", "P", "{S} studied at {school}, where {his} teacher was {M}.",
        "At {school}, {S} trained under {M}.", "{S} was a pupil of {M} at {school}.",
        "In {sy}, {S} enrolled at {school} and studied under {M}.", "{S_s} teacher at {school} was {M}."),
     _S("mentor", "M", "{S} came from {mt}.", "{S} was a native of {mt} and already famous by then.",
        "{S} had grown up in {mt}, far from the capital.")),
    (_S("debut", "P", "{S_s} first public success came in {dby} at {venue}.",
        "In {dby}, {S} had a first triumph at {venue}.",
        "The first major success of {P} came at {venue} in {dby}."),),
    (_S("move", "P", "In {my}, {S} moved to {ct}, where {he} opened a studio.",
        "{S} settled in {ct} in {my} and opened a studio there.", "From {my}, {S} lived and worked in {ct}."),),
    (_S("marriage", "P", "In {wy}, {S} married {W}; they had {kids} children.", "{S} married {W} in {wy}.",
        "{S_s} marriage to {W} in {wy} produced {kids} children."),),
    (_S("work", "P", "{S_s} best-known work, {work}, appeared in {wky}.",
        "In {wky}, {S} completed {work}, the work for which {he} is best remembered.",
        "{S} is best remembered for {work}, first presented in {wky}."),),
    (_S("award", "P", "{S} received {award} in {ay}.", "In {ay}, {S} was awarded {award}.",
        "{award} was given to {P} in {ay}."),),
    (_S("pupil", "P", "Among {S_s} own pupils was {St}, who later taught at {school2}.",
        "{St}, a pupil of {P}, went on to teach at {school2}.",
        "{S} trained {St}, who later joined {school2} as a teacher."),),
    (_S("rival", "P", "{S_s} great rival was {R}, {rprof} from {rt}.",
        "{S} often competed with {R}, {rprof} from {rt}.",
        "Among the contemporaries of {P} was {R}, {rprof} from {rt}."),),
    (_S("biographer", "G", "{G}, a writer born in {gt}, later published a biography of {P}.",
        "The first biography of {P} was written by {G}, who was born in {gt}.",
        "{G}, born in {gt}, later wrote the life of {P}."),),
    (_S("death", "P", "{S} died in {dt} in {dy} at the age of {age}.", "{S} died in {dy} in {dt}, aged {age}.",
        "{S} spent {his} final years in {dt}, where {he} died in {dy}."),),
)
_BIO_QUESTIONS = (
    _Q("prof", "prof", "intro", "What was {P}'s profession?", "What did {P} do for a living?",
       "What kind of artist was {P}?", "{P} was famous as what?"),
    _Q("birthplace", "bt", "birth", "Where was {P} born?", "In which town was {P} born?",
       "What is the birthplace of {P}?", "{P} was born in which town?"),
    _Q("birthyear", "by", "birth", "In what year was {P} born?", "What year was {P} born in?",
       "In which year was {P} born?"),
    _Q("birthdate", "bday+by", "birth", "On what date was {P} born?", "What is {P}'s date of birth?",
       "On which day was {P} born?"),
    _Q("school", "school", "study", "Where did {P} study?", "Which institution did {P} attend?",
       "At which school was {P} trained?"),
    _Q("teacher", "M", "study", "Who taught {P}?", "Who was {P}'s teacher?", "Under whom did {P} study?",
       "Which master trained {P}?"),
    _Q("enrolled", "sy", "study", "In what year did {P} enrol at {school}?", "When did {P} enter {school}?",
       "When did {P} start studying at {school}?"),
    _Q("mentor_town", "mt", "mentor", "Where did {M} come from?", "What was {M}'s home town?",
       "Which town was {M} from?"),
    _Q("teacher_town", "mt", "mentor", "Where did {P}'s teacher come from?",
       "What was the home town of {P}'s teacher?", "Which town did the teacher of {P} come from?",
       needs="study"),
    _Q("debut_venue", "venue", "debut", "Where did {P} have a first public success?",
       "At which venue did {P} first triumph?", "Where did the first major success of {P} take place?"),
    _Q("debut_year", "dby", "debut", "When did {P} first achieve success?",
       "In what year did {P} have a first triumph?", "In which year did {P} first succeed at {venue}?"),
    _Q("move_town", "ct", "move", "Where did {P} settle?", "To which town did {P} move?",
       "In which town did {P} later live and work?"),
    _Q("move_year", "my", "move", "When did {P} move to {ct}?", "In what year did {P} settle in {ct}?",
       "Since which year did {P} live in {ct}?"),
    _Q("spouse", "W", "marriage", "Who did {P} marry?", "Who was {P}'s spouse?", "Whom did {P} wed?"),
    _Q("marriage_year", "wy", "marriage", "When did {P} marry {W}?", "In which year did {P} and {W} marry?",
       "What year did {P} get married?"),
    _Q("children", "kids", "marriage", "How many children did {P} and {W} have?",
       "How many children did {P} have?", "What was the number of {P}'s children?"),
    _Q("work", "work", "work", "What is {P}'s best-known work?", "For which work is {P} best remembered?",
       "What is the most famous work of {P}?"),
    _Q("work_year", "wky", "work", "When did {work} appear?", "In what year was {work} first presented?",
       "When was {work} completed?"),
    _Q("award", "award", "award", "Which prize did {P} receive?", "What honour was {P} given?",
       "Which award did {P} win?"),
    _Q("award_year", "ay", "award", "When did {P} receive {award}?", "In what year was {P} awarded {award}?",
       "In which year did {P} win {award}?"),
    _Q("pupil", "St", "pupil", "Who was a pupil of {P}?", "Whom did {P} train?",
       "Which student of {P} became a teacher?"),
    _Q("pupil_school", "school2", "pupil", "Where did {St} teach?", "At which institution did {St} later teach?",
       "Where did {P}'s pupil go on to teach?"),
    _Q("rival", "R", "rival", "Who was {P}'s rival?", "With whom did {P} compete?",
       "Which other artist is named as a contemporary of {P}?"),
    _Q("rival_town", "rt", "rival", "Where was {R} from?", "Which town did {R} come from?",
       "What was {R}'s home town?"),
    _Q("rival_prof", "rprof", "rival", "What was {R}'s profession?", "What kind of artist was {R}?",
       "What did {R} do for a living?"),
    _Q("biographer", "G", "biographer", "Who wrote a biography of {P}?", "Who was {P}'s biographer?",
       "Who wrote the life of {P}?"),
    _Q("biographer_town", "gt", "biographer", "Where was {G} born?", "What is the birthplace of {G}?",
       "In which town was {G} born?"),
    _Q("biographer_town2", "gt", "biographer", "Where was {P}'s biographer born?",
       "In which town was the biographer of {P} born?", "What is the birthplace of {P}'s biographer?"),
    _Q("death_year", "dy", "death", "When did {P} die?", "In what year did {P} die?",
       "What year did {P} pass away?"),
    _Q("death_place", "dt", "death", "Where did {P} die?", "In which town did {P} die?",
       "Where did {P} spend the last years of {his} life?"),
    _Q("age", "age", "death", "How old was {P} when {he} died?", "At what age did {P} die?",
       "How old was {P} at the time of death?"),
)



# Sport: a relative of biography (an athlete's life). It keeps biography's town
# syllables and its birth / marriage / rival / biographer / death sentences and
# questions, and has its own person names, professions, clubs, coaches, wins and
# titles with their own phrasings: a target domain near a source domain, for
# transfer studies (kdfast.augment). Not in DOMAINS (the default mix).
_SPORT = dict(_BIO, **_words(
    fa="Al Bri Dag Ei Fri Gun Hil In Jor Kar Lii Mai Ran Sig Sol Tu Val Yl Ast Bir",
    fb="da na run frid dis ja ka li hild",
    ma="Ag Bjo Ei Fin Gor Hak Ing Jar Kol Lei Mag Od Rag Sve Tor Ulf Vid Arn Bo Ste",
    mb="ne rn nar var mund stein ulf geir vald",
    la="Aas Berg Dahl Ek Frost Gran Holm Kvist Lind Lund Nord Sand Strand Vik Hed Sjo Alm Bru",
    lb="gren qvist strom blad mark sen rud haug lie dal",
    prof="sprinter|swimmer|cyclist|rower|boxer|fencer|wrestler|skier|skater|gymnast|archer|sailor|climber|"
         "marathon runner|high jumper|javelin thrower|hurdler|weightlifter",
    adj="Northern Royal Imperial Coastal Alpine Western Eastern Midsummer Harbour Autumn Winter Island",
    noun="Regatta|Marathon|Derby|Relay|Classic|Grand Prix|Challenge|Rally|Open|Games",
))
_SPORT_CLUBS = (("the", "{} Athletic Club"), ("", "{} Rowing Club"), ("the", "{} Sports Academy"),
                ("", "{} Harriers"))
_SPORT_TITLES = (("the", "{} Trophy"), ("the", "{} Cup"), ("the", "{} Shield"))
_SPORT_VENUES = (("the", "{} Stadium"), ("the", "{} Arena"), ("the", "{} Velodrome"), ("the", "{} Games"))
_sport_make = _life_maker(_SPORT, _SPORT_CLUBS, _SPORT_TITLES, _SPORT_VENUES,
                          lambda nm: _V(nm.phrase("{} {}", _SPORT["adj"], _SPORT["noun"]), "event",
                                        article="the"))
_BIO_S = {s.sid: block for block in _BIO_BLOCKS for s in block}
_BIO_Q = {q.name: q for q in _BIO_QUESTIONS}
_SPORT_BLOCKS = (
    (_S("intro", "P", "{S} was celebrated as {prof}.", "{S} competed as {prof} for most of {his} career.",
        "{S} was {prof} of considerable renown.", drop=False),),
    _BIO_S["birth"],
    (_S("study", "P", "{S} trained at {school}, where {his} coach was {M}.", "At {school}, {S} was coached by {M}.",
        "In {sy}, {S} joined {school} and trained under {M}.", "{S_s} coach at {school} was {M}."),
     _BIO_S["mentor"][1]),
    (_S("debut", "P", "{S_s} first victory came in {dby} at {venue}.", "In {dby}, {S} won for the first time at {venue}.",
        "The first major win of {P} came at {venue} in {dby}."),),
    (_S("move", "P", "In {my}, {S} moved to {ct}, where {he} opened a gym.",
        "{S} settled in {ct} in {my} and trained there.", "From {my}, {S} lived and trained in {ct}."),),
    _BIO_S["marriage"],
    (_S("work", "P", "{S_s} greatest victory, at {work}, came in {wky}.",
        "In {wky}, {S} won {work}, the race for which {he} is best remembered.",
        "{S} is best remembered for winning {work} in {wky}."),),
    (_S("award", "P", "{S} won {award} in {ay}.", "In {ay}, {S} took {award}.",
        "{award} went to {P} in {ay}."),),
    (_S("pupil", "P", "Among the athletes {S} later coached was {St}, who went on to coach at {school2}.",
        "{St}, coached by {P}, later became a coach at {school2}.",
        "{S} coached {St}, who later joined {school2} as a coach."),),
    _BIO_S["rival"],
    _BIO_S["biographer"],
    _BIO_S["death"],
)
_SPORT_QUESTIONS = tuple(_BIO_Q[n] for n in (
    "birthplace", "birthyear", "birthdate", "mentor_town", "move_town", "move_year", "spouse", "marriage_year",
    "children", "rival_town", "biographer", "biographer_town", "biographer_town2", "death_year",
    "death_place", "age")) + (
    _Q("prof", "prof", "intro", "What kind of athlete was {P}?", "What was {P}'s sport?",
       "{P} competed as what?"),
    _Q("school", "school", "study", "Which club did {P} join?", "Where did {P} train?",
       "At which club was {P} coached?"),
    _Q("teacher", "M", "study", "Who coached {P}?", "Who was {P}'s coach?", "Under whom did {P} train?"),
    _Q("enrolled", "sy", "study", "In what year did {P} join {school}?", "When did {P} start training at {school}?",
       "Since which year was {P} a member of {school}?"),
    _Q("teacher_town", "mt", "mentor", "Where did {P}'s coach come from?",
       "Which town did the coach of {P} come from?", "What was the home town of {P}'s coach?", needs="study"),
    _Q("debut_venue", "venue", "debut", "Where did {P} win for the first time?",
       "At which venue did {P} have a first victory?", "Where did the first major win of {P} take place?"),
    _Q("debut_year", "dby", "debut", "When did {P} first win?", "In what year did {P} have a first victory?",
       "In which year did {P} first win at {venue}?"),
    _Q("work", "work", "work", "What was {P}'s greatest victory?", "Which race is {P} best remembered for?",
       "Which event did {P} win in {wky}?"),
    _Q("work_year", "wky", "work", "When did {P} win {work}?", "In what year did {P} win {work}?", "When was {work} won by {P}?"),
    _Q("award", "award", "award", "Which title did {P} win?", "Which trophy did {P} take?", "What honour did {P} receive?"),
    _Q("award_year", "ay", "award", "When did {P} win {award}?", "In what year did {P} take {award}?", "In which year was {award} won by {P}?"),
    _Q("pupil", "St", "pupil", "Whom did {P} coach?", "Which athlete did {P} coach?", "Who was trained by {P}?"),
    _Q("pupil_school", "school2", "pupil", "Where did {St} coach?", "At which club did {St} later coach?",
       "Where did the athlete coached by {P} become a coach?"),
    _Q("rival", "R", "rival", "Who was {P}'s rival?", "With whom did {P} compete?",
       "Which other athlete is named as a contemporary of {P}?"),
    _Q("rival_prof", "rprof", "rival", "What kind of athlete was {R}?", "What was {R}'s sport?", "{R} competed as what?"),
)


_GEO = _words(
    ca="Bel Dra Gor Kar Lev Mir Nov Ost Pol Rad Sev Tar Vel Vol Zar Yas Kos Bra Cel Dun Tem Sor",
    cb="grad ova ava ets insk ara ovo ica ik enka opol ari",
    pa="Al Bes Cor Dal Es Fa Ha Ir La Ma Ne Or Pa Sa Ta Va Ze Ru", pb="ovia avia esia oria antia elia unia",
    ra="Ol Va Dre Is Mo Sa Ne Ta Vi Ur Ze Ko Lu", rb="sa va ma na ra tra ska nka",
    ma="Kel Gor Bar Sen Tor Hal Vis Dor Ruk Zel Bes", mb="an ek in os ara ir ul",
    fa="I Lu Mi Na Pe Ve Zo Du Bo Ra Ja Sve Dra Go", fb="vo ka la da tar ra ran sko na mir",
    la="Ko No Pa Ro Sto Vu Za Ma Le Hor Bel Kra", lb="vac rić lić vić nov jan ček šek",
    ind="copper mining|textile weaving|shipbuilding|wine making|salt production|timber processing|"
        "fishing|brewing|glassmaking|tourism|cattle farming|olive growing|coal mining|silk spinning|"
        "paper milling|sugar refining",
    dirs="north south east west north-east north-west south-east south-west",
)
_GEO_LANDMARKS = (("the", "{} Bridge"), ("the", "{} Cathedral"), ("the", "Tower of {}"), ("the", "{} Gate"),
                  ("the", "{} Fortress"))
_GEO_UNIS = (("the", "University of {}"), ("the", "{} Technical College"), ("the", "{} Academy of Mines"))


def _geo_make(rng, nm):
    w = _GEO

    def city(ana=None):
        return _V(nm.word(w["ca"], w["cb"]), "place", ana=ana)

    def person():
        return _person(nm.word(w["fa"], w["fb"]) + " " + nm.word(w["la"], w["lb"]), rng.random() < 0.5)

    v = dict(
        C=city(("The city", "The city's", "city")), D=city(("That city", "That city's", "city")),
        K=city(), orig=city(), prov=_V(nm.word(w["pa"], w["pb"]), "place"),
        river=_V(nm.word(w["ra"], w["rb"]) + " River", "place", article="the"),
        mount=_V("Mount " + nm.word(w["ma"], w["mb"]), "place"),
        lake=_V("Lake " + nm.word(w["ra"], w["mb"]), "place"),
        lm=_org(nm, _GEO_LANDMARKS, w["ca"], w["cb"]), uni=_org(nm, _GEO_UNIS, w["ca"], w["cb"]),
        arch=person(), mayor=person(),
        ind=_V(nm.pick(w["ind"]), "thing"), ind2=_V(nm.pick(w["ind"]), "thing"),
        dir=_V(nm.pick(w["dirs"]), "dir"), dir2=_V(nm.pick(w["dirs"]), "dir"), dir3=_V(nm.pick(w["dirs"]), "dir"),
        pop=_V(nm.num(20_000, 2_000_000, step=100)[1], "number"),
        dpop=_V(nm.num(5_000, 900_000, step=100)[1], "number"),
        students=_V(nm.num(800, 45_000, step=100)[1], "number"),
        elev=_V(nm.num(40, 1400, "{:,} metres", step=10)[1], "quantity"),
        mh=_V(nm.num(1500, 4800, "{:,} metres")[1], "quantity"),
        dist=_V(nm.num(12, 180, "{} kilometres")[1], "quantity"),
        kdist=_V(nm.num(20, 300, "{} kilometres")[1], "quantity"),
        ldist=_V(nm.num(5, 90, "{} kilometres")[1], "quantity"),
        area=_V(nm.num(3, 900, "{} square kilometres")[1], "quantity"),
        rain=_V(nm.num(300, 1900, "{:,} millimetres", step=10)[1], "quantity"),
        fy=_year(nm, 900, 1750), dfy=_year(nm, 900, 1750), ly=_year(nm, 1500, 1900), uy=_year(nm, 1600, 1990),
        mty=_year(nm, 1995, 2022),
    )
    return v["C"].text, v


_GEO_BLOCKS = (
    (_S("intro", "C", "{S} is a city in the province of {prov}.", "{S} is one of the oldest cities of {prov}.",
        "{S}, in the {dir} of {prov}, is a busy market city.", drop=False),),
    (_S("river", "C", "{S} lies on {river} at an elevation of {elev}.",
        "{river} flows through {C}, which sits {elev} above sea level.",
        "{S} is built along the banks of {river}, {elev} above the sea."),),
    (_S("pop", "C", "{S} has a population of {pop}.", "About {pop} people live in {C}.",
        "{S_s} population was estimated at {pop} in the last census.", "{S} is home to {pop} inhabitants."),),
    (_S("found", "C", "{S} was founded in {fy} by settlers from {orig}.",
        "Settlers from {orig} established {C} in {fy}.",
        "{S} dates from {fy}, when traders from {orig} built a fort there."),),
    (_S("port", None, "The nearest port is {D}, about {dist} to the {dir2}.",
        "Goods leave through {D}, a harbour {dist} to the {dir2}.", "The closest harbour, {D}, lies {dist} away."),
     _S("portinfo", "D", "{S} was founded in {dfy} and has about {dpop} inhabitants.",
        "{S} dates from {dfy} and is home to {dpop} people.",
        "{S} has {dpop} residents and a harbour built in {dfy}.")),
    (_S("mount", "C", "To the {dir3} rises {mount}, the highest peak of {prov} at {mh}.",
        "{mount}, which reaches {mh}, overlooks {C}.", "The highest mountain near {C} is {mount}, at {mh}."),),
    (_S("lake", "C", "{lake}, a lake of {area}, lies {ldist} from {C}.",
        "About {ldist} from {C} lies {lake}, which covers {area}.",
        "Anglers visit {lake}, {ldist} from {C}; it covers {area}."),),
    (_S("econ", "C", "{S_s} main industry is {ind}, while {ind2} is also important.",
        "{S} is best known for {ind}; {ind2} comes second.",
        "Most people in {C} work in {ind}, and many others in {ind2}."),),
    (_S("landmark", "C", "{S_s} most famous landmark is {lm}, completed in {ly} by {arch}.",
        "{lm}, designed by {arch} and finished in {ly}, stands in the centre of {C}.",
        "Visitors come to {C} to see {lm}, which {arch} built in {ly}."),),
    (_S("uni", "C", "{S} is home to {uni}, founded in {uy}, with about {students} students.",
        "{uni}, established in {uy}, teaches some {students} students in {C}.",
        "Some {students} students attend {uni} in {C}, which opened in {uy}."),),
    (_S("mayor", "C", "Since {mty}, {S} has been governed by mayor {mayor}.",
        "The current mayor of {C}, {mayor}, took office in {mty}.", "{mayor} became mayor of {C} in {mty}."),),
    (_S("capital", None, "The capital of {prov} is {K}, about {kdist} from {C}.",
        "{K}, the provincial capital, lies {kdist} away.",
        "Officials travel to {K}, the capital of {prov}, some {kdist} away."),),
    (_S("rain", "C", "{S} receives about {rain} of rain a year.", "Each year about {rain} of rain falls on {C}.",
        "{S_s} annual rainfall is close to {rain}."),),
)
_GEO_QUESTIONS = (
    _Q("province", "prov", "intro", "In which province is {C} located?", "Which province is {C} part of?",
       "{C} lies in which province?"),
    _Q("river", "river", "river", "Which river flows through {C}?", "On which river does {C} lie?",
       "What river runs through {C}?"),
    _Q("elevation", "elev", "river", "How high above sea level is {C}?", "At what elevation is {C}?",
       "What is the elevation of {C}?"),
    _Q("population", "pop", "pop", "What is the population of {C}?", "How many people live in {C}?",
       "How many inhabitants does {C} have?"),
    _Q("founded", "fy", "found", "When was {C} founded?", "In what year was {C} established?",
       "In which year did the history of {C} begin?"),
    _Q("origin", "orig", "found", "Where did the founders of {C} come from?",
       "From which town did the settlers of {C} come?", "The first settlers of {C} came from where?"),
    _Q("port", "D", "port", "What is the nearest port to {C}?", "Which harbour is closest to {C}?",
       "Through which port do goods from {C} leave?"),
    _Q("port_dist", "dist", "port", "How far is {D} from {C}?", "How far away is the nearest port?",
       "What is the distance to {D}?"),
    _Q("port_founded", "dfy", "portinfo", "When was {D} founded?", "In what year was {D} founded?",
       "Since when has {D} existed?"),
    _Q("port_founded2", "dfy", "portinfo", "When was the nearest port to {C} founded?",
       "In what year was the harbour closest to {C} founded?", "How old is the port nearest to {C}?",
       needs="port"),
    _Q("port_pop", "dpop", "portinfo", "How many people live in {D}?", "What is the population of {D}?",
       "How many inhabitants does {D} have?"),
    _Q("port_pop2", "dpop", "portinfo", "How many people live in the port nearest to {C}?",
       "What is the population of the harbour closest to {C}?",
       "How many inhabitants does the closest port to {C} have?", needs="port"),
    _Q("mountain", "mount", "mount", "What is the highest mountain near {C}?", "Which peak overlooks {C}?",
       "Which mountain rises near {C}?"),
    _Q("height", "mh", "mount", "How tall is {mount}?", "What is the height of {mount}?",
       "How high does {mount} rise?"),
    _Q("lake", "lake", "lake", "Which lake lies near {C}?", "What lake is close to {C}?",
       "Name the lake near {C}."),
    _Q("lake_area", "area", "lake", "How large is {lake}?", "What area does {lake} cover?",
       "How big is {lake}?"),
    _Q("lake_dist", "ldist", "lake", "How far is {lake} from {C}?", "What is the distance from {C} to {lake}?",
       "How far from {C} does {lake} lie?"),
    _Q("industry", "ind", "econ", "What is the main industry of {C}?",
       "What is {C} best known for economically?", "In which industry do most people in {C} work?"),
    _Q("industry2", "ind2", "econ", "What is the second industry of {C}?",
       "Besides {ind}, which industry matters in {C}?", "Apart from {ind}, what else do people in {C} work in?"),
    _Q("landmark", "lm", "landmark", "What is the most famous landmark of {C}?",
       "What do visitors come to {C} to see?", "Which landmark is {C} famous for?"),
    _Q("landmark_year", "ly", "landmark", "When was {lm} completed?", "In what year was {lm} built?",
       "When was {lm} finished?"),
    _Q("architect", "arch", "landmark", "Who designed {lm}?", "Which architect built {lm}?",
       "Who was the architect of {lm}?"),
    _Q("university", "uni", "uni", "Which university is in {C}?", "Where do students in {C} study?",
       "What is the name of the college in {C}?"),
    _Q("students", "students", "uni", "How many students does {uni} have?", "How many students attend {uni}?",
       "What is the number of students at {uni}?"),
    _Q("uni_year", "uy", "uni", "When was {uni} founded?", "In what year did {uni} open?",
       "When was {uni} established?"),
    _Q("mayor", "mayor", "mayor", "Who is the mayor of {C}?", "Who governs {C}?", "Who leads the city of {C}?"),
    _Q("mayor_year", "mty", "mayor", "When did {mayor} become mayor?", "In what year did {mayor} take office?",
       "Since when has {mayor} been mayor of {C}?"),
    _Q("capital", "K", "capital", "What is the capital of {prov}?", "Which city is the capital of {prov}?",
       "Name the capital of {prov}."),
    _Q("capital_dist", "kdist", "capital", "How far is {K} from {C}?", "How far away is the provincial capital?",
       "What is the distance from {C} to {K}?"),
    _Q("rain", "rain", "rain", "How much rain does {C} receive each year?", "What is the annual rainfall of {C}?",
       "How much rain falls on {C} in a year?"),
)


_SCI = _words(
    xa="Ter Vol Cal Nex Dyr Phl Quor Zet Mol Lux Xen Bor Cyr Hal Kryp Sel Thal Ver Plex Tam",
    xb="an ox yl en or ath im ur", xc="ium ine ate ol ase ide ene ite",
    fa="Ha In Ke A To Le Yu Ma Os E Ro Sa Ni Ay Jo", fb="na grid nji mara mas ila suf rta kar lif ko ra mi",
    la="Lind Sjö Berg Nak Ok Kov Dub Fer Hal Mor Tan Ich Sza Ibr",
    lb="ström gren ura afor ács ois reira dane eau aka ikawa ahim",
    ca="Ar Bel Cor Del Eri Gal Hav Lin Mon Ros Ux Tri Kal", cb="eno stad heim isle ona ano sund",
    kind="alkaloid|polymer|metal alloy|mineral salt|solvent|enzyme|pigment|catalyst|resin|rare earth oxide|"
         "organic acid|crystalline solid",
    colour="pale blue|deep red|bright yellow|dark green|violet|silvery white|orange|pale pink|jet black|golden brown",
    use="solar cells|rechargeable batteries|fertilisers|textile dyes|engine lubricants|antibiotics|rocket fuel|"
        "water purification|semiconductor chips|medical imaging|heat shields|optical fibres|paints|food preservation",
    field="chemist physicist biochemist engineer crystallographer geologist pharmacologist",
    solvent="ethanol|acetone|benzene|glycerol|dilute sulfuric acid|liquid ammonia|chloroform|hot toluene",
)
_SCI_INSTITUTES = (("the", "{} Institute of Technology"), ("the", "{} Laboratory"), ("", "{} Polytechnic"),
                   ("the", "University of {}"), ("the", "{} Research Centre"))
_SCI_FIRMS = (("", "{} Chemicals"), ("", "{} Industries"), ("the", "{} Works"))
_SCI_AWARDS = (("the", "{} Medal"), ("the", "{} Prize"))
_SCI_INSTRUMENTS = ("mass spectrometer|X-ray diffractometer|electron microscope|infrared spectrometer|calorimeter|"
                    "nuclear magnetic resonance scanner").split("|")


def _sci_make(rng, nm):
    w = _SCI

    def scientist():
        return _person(nm.word(w["fa"], w["fb"]) + " " + nm.word(w["la"], w["lb"]), rng.random() < 0.5)

    def city():
        return _V(nm.word(w["ca"], w["cb"]), "place")

    dyr, _ = nm.num(1850, 2000, "{}")
    x_ana = rng.choice((("The compound", "The compound's", "compound"), ("It", "Its", "compound")))
    instr = nm.pick(_SCI_INSTRUMENTS)
    v = dict(
        X=_V(nm.word(w["xa"], w["xb"], w["xc"]), "object", ana=x_ana),
        Y=_V(nm.word(w["xa"], w["xb"], w["xc"]), "object"), Sc=scientist(), Co=scientist(),
        I=_org(nm, _SCI_INSTITUTES, w["ca"], w["cb"]), U=_org(nm, _SCI_INSTITUTES, w["ca"], w["cb"]),
        firm=_org(nm, _SCI_FIRMS, w["la"], w["lb"]), award=_org(nm, _SCI_AWARDS, w["la"], w["lb"]),
        icity=city(), sct=city(), np=city(),
        kind=_noun(nm, w["kind"]), colour=_V(nm.pick(w["colour"]), "thing"),
        use=_V(nm.pick(w["use"]), "thing"), yuse=_V(nm.pick(w["use"]), "thing"),
        field=_noun(nm, w["field"]), solvent=_V(nm.pick(w["solvent"]), "thing"),
        instr=_V(instr, "thing", article="a" if instr[0] in "mcn" else "an"),
        dyr=_V(dyr, "year"), ify=_year(nm, 1700, dyr - 5), cy=_year(nm, dyr + 1, dyr + 15),
        py=_year(nm, dyr + 2, dyr + 24), ay=_year(nm, dyr + 3, dyr + 24),
        mp=_V(nm.num(40, 2900, "{:,} degrees Celsius")[1], "quantity"),
        ymp=_V(nm.num(40, 2900, "{:,} degrees Celsius")[1], "quantity"),
        dens=_V(f"{nm.num(11, 229, '{}')[0] / 10:.1f} grams per cubic centimetre", "quantity"),
    )
    v["I"].ana = ("The institute", "The institute's", "institute")
    return v["X"].text, v


_SCI_BLOCKS = (
    (_S("intro", "X", "{S} is {kind}, {colour} in colour.", "{S} is {kind} with a characteristic {colour} colour.",
        "{S}, {kind}, forms {colour} crystals.", drop=False),),
    (_S("disc", "X", "{S} was discovered in {dyr} by {Sc} at {I}.", "{Sc} first isolated {X} at {I} in {dyr}.",
        "In {dyr}, a team at {I} led by {Sc} identified {X}."),
     _S("inst", "I", "{S} is located in {icity}.", "{S}, founded in {ify}, is based in {icity}.",
        "{S} has been based in {icity} since {ify}.")),
    (_S("sci", "Sc", "{S} was born in {sct} and trained as {field}.",
        "{S}, {field} by training, was a native of {sct}.",
        "Born in {sct}, {S} had studied to become {field}."),
     _S("award", "Sc", "For this work, {S} received {award} in {ay}.", "{S} was awarded {award} in {ay}.",
        "In {ay}, {Sc} won {award} for the discovery.")),
    (_S("melt", "X", "{S} melts at {mp}.", "{S_s} melting point is {mp}.", "{S} becomes liquid at {mp}."),),
    (_S("dens", "X", "{S} has a density of {dens}.", "With a density of {dens}, {S} is heavier than water.",
        "{S_s} density is {dens}."),),
    (_S("solv", "X", "{S} dissolves readily in {solvent} but not in water.",
        "{S} is insoluble in water but dissolves in {solvent}.", "Chemists dissolve {X} in {solvent}."),),
    (_S("use", "X", "Today {S} is used mainly in {use}.", "{S_s} main application is in {use}.",
        "Manufacturers use {X} chiefly for {use}."),),
    (_S("industry", None, "In {py}, {firm} began producing {X} on an industrial scale.",
        "{firm} started industrial production of {X} in {py}.",
        "Industrial production of {X} began at {firm} in {py}."),),
    (_S("rel", None, "A related compound, {Y}, melts at {ymp} and is used in {yuse}.",
        "{Y}, a close relative of {X}, has a melting point of {ymp} and is used for {yuse}.",
        "Unlike {X}, the related {Y} melts at {ymp}; it is used in {yuse}."),),
    (_S("conf", None, "The structure of {X} was later confirmed by {Co} of {U}.",
        "{Co}, working at {U}, confirmed the structure of {X} in {cy}.",
        "It was {Co} at {U} who confirmed the structure of {X} in {cy}."),),
    (_S("instr", "X", "{S_s} structure was first studied with {instr}.", "Researchers studied {S} with {instr}.",
        "{instr} was used to study the structure of {X}."),),
    (_S("sample", "X", "The first samples of {X} were collected near {np}.", "{S} was first found in rocks near {np}.",
        "Early samples of {X} came from {np}."),),
)
_SCI_QUESTIONS = (
    _Q("kind", "kind", "intro", "What kind of substance is {X}?", "What type of compound is {X}?",
       "{X} belongs to which class of substances?"),
    _Q("colour", "colour", "intro", "What colour is {X}?", "What is the colour of {X}?", "Which colour does {X} have?"),
    _Q("discoverer", "Sc", "disc", "Who discovered {X}?", "Who first isolated {X}?", "Which scientist identified {X}?"),
    _Q("disc_year", "dyr", "disc", "When was {X} discovered?", "In which year was {X} first isolated?",
       "In what year was {X} identified?"),
    _Q("disc_inst", "I", "disc", "Where was {X} discovered?", "At which institution was {X} identified?",
       "Which laboratory first isolated {X}?"),
    _Q("inst_city", "icity", "inst", "Where is {I} located?", "In which city is {I} based?",
       "Which city is home to {I}?"),
    _Q("disc_city", "icity", "inst", "In which city was {X} discovered?", "In what city was {X} first isolated?",
       "Which city was {X} identified in?", needs="disc"),
    _Q("inst_year", "ify", "inst", "When was {I} founded?", "Since when has {I} been in {icity}?",
       "In what year was {I} founded?"),
    _Q("sci_town", "sct", "sci", "Where was {Sc} born?", "What is the birthplace of {Sc}?",
       "Where did {Sc} come from?"),
    _Q("disc_town", "sct", "sci", "Where was the discoverer of {X} born?",
       "In which city was the scientist who discovered {X} born?", "Where did the discoverer of {X} come from?",
       needs="disc"),
    _Q("field", "field", "sci", "What was {Sc}'s training?", "What did {Sc} train as?",
       "What profession had {Sc} trained for?"),
    _Q("award", "award", "award", "Which prize did {Sc} receive?", "What award did {Sc} win?",
       "Which honour was given to {Sc}?"),
    _Q("disc_award", "award", "award", "Which award did the discoverer of {X} receive?",
       "What prize was given to the scientist who identified {X}?",
       "Which honour went to the scientist who first isolated {X}?", needs="disc"),
    _Q("award_year", "ay", "award", "When did {Sc} receive {award}?", "In what year was {Sc} awarded {award}?",
       "In which year did {Sc} win {award}?"),
    _Q("melting", "mp", "melt", "What is the melting point of {X}?", "At what temperature does {X} melt?",
       "At which temperature does {X} become liquid?"),
    _Q("density", "dens", "dens", "What is the density of {X}?", "How dense is {X}?", "What density does {X} have?"),
    _Q("solvent", "solvent", "solv", "In what does {X} dissolve?", "Which solvent dissolves {X}?",
       "What liquid can dissolve {X}?"),
    _Q("use", "use", "use", "What is {X} mainly used for?", "What is the main application of {X}?",
       "For what purpose is {X} chiefly used?"),
    _Q("producer", "firm", "industry", "Which company first produced {X} industrially?",
       "Who began industrial production of {X}?", "Which firm manufactures {X} on a large scale?"),
    _Q("prod_year", "py", "industry", "When did industrial production of {X} begin?",
       "In what year did {firm} begin producing {X}?", "Since which year has {X} been made industrially?"),
    _Q("related", "Y", "rel", "Which compound is related to {X}?", "What is the name of the compound related to {X}?",
       "Name a close relative of {X}."),
    _Q("rel_melting", "ymp", "rel", "What is the melting point of {Y}?", "At what temperature does {Y} melt?",
       "How hot must {Y} get to melt?"),
    _Q("rel_use", "yuse", "rel", "What is {Y} used for?", "For what is {Y} used?", "What is the application of {Y}?"),
    _Q("confirmer", "Co", "conf", "Who confirmed the structure of {X}?", "Which researcher confirmed {X}'s structure?",
       "By whom was the structure of {X} confirmed?"),
    _Q("conf_inst", "U", "conf", "Where did {Co} work?", "At which institution did {Co} work?",
       "Which institution was {Co} working at?"),
    _Q("conf_year", "cy", "conf", "When was the structure of {X} confirmed?",
       "In what year did {Co} confirm the structure of {X}?", "In which year was {X}'s structure confirmed?"),
    _Q("instrument", "instr", "instr", "Which instrument was used to study {X}?",
       "What instrument did researchers use on {X}?", "With what was the structure of {X} studied?"),
    _Q("sample", "np", "sample", "Where were the first samples of {X} collected?",
       "Near which place was {X} first found?", "Where did early samples of {X} come from?"),
)


_HIST = _words(
    ka="Ael Bry Cael Dun Eir Gwyn Hrol Ith Mor Nal Ost Rhe Sar Thal Val Wes", kb="mar gard wyn dor heim land mark reth",
    ra="Al Os Ead Sig Hild Wulf Ber Cyn Ethel Rhod Aed Gun", rb="ric wyn red run mund gar helm bald",
    ca="Bert Cuth Dag Eg Frith Harl Leof Ord Tost Ulf Wig Sae", cb="win bert stan ric mer wald",
    titles="Duke Earl Marshal Lord Count",
    pa="Ash Bran Crow Dun Eld Fal Grim Hal Kil Lyn Mor Stag Wold Yar", pb="ford moor field hill beck holt tor mere",
    adj="Long Bitter Iron Last Red Grey Northern Winter Black Seventh",
    noun="March Campaign Siege Banner Crossing Road Retreat Shield Fields Frontier",
    dirs="north south east west",
    res="silver mines|salt marshes|timber|horses|grain fields|iron ore|fisheries|wool",
)
_KINGDOM = ("The kingdom", "The kingdom's", "kingdom")


def _hist_make(rng, nm):
    w = _HIST

    def ruler():
        fem = rng.random() < 0.3
        name = f"{'Queen' if fem else 'King'} {nm.word(w['ra'], w['rb'])} {rng.choice(('I', 'II', 'III', 'IV'))}"
        return _person(name, fem)

    def place():
        return _V(nm.word(w["pa"], w["pb"]), "place")

    byr, _ = nm.num(800, 1500, "{}")
    bp = place()
    v = dict(
        B=_V(f"Battle of {bp.text}", "event", article="the", ana=("The battle", "The battle's", "battle")),
        bp=bp, K1=_V(nm.word(w["ka"], w["kb"]), "place", ana=_KINGDOM),
        K2=_V(nm.word(w["ka"], w["kb"]), "place", ana=_KINGDOM), K3=_V(nm.word(w["ka"], w["kb"]), "place"),
        c1=_person(f"{rng.choice(w['titles'])} {nm.word(w['ca'], w['cb'])}", False),
        c2=_person(f"{rng.choice(w['titles'])} {nm.word(w['ca'], w['cb'])}", False),
        r1=ruler(), r2=ruler(), cap1=place(), cap2=place(), region=place(),
        T=_V(f"Treaty of {place().text}", "event", article="the", ana=("The treaty", "The treaty's", "treaty")),
        memo=_V(nm.phrase("The {} {}", w["adj"], w["noun"]), "work"), dir=_V(rng.choice(w["dirs"]), "dir"),
        res=_V(nm.pick(w["res"]), "thing"), days=_V(rng.choice(_NUM_WORDS) + " days", "quantity"),
        byr=_V(byr, "year"), ty=_year(nm, byr + 1, byr + 4), ry1=_year(nm, byr - 30, byr - 1),
        ry2=_year(nm, byr - 30, byr - 1),
        n1=_V(nm.num(2000, 40000, step=100)[1], "number"), n2=_V(nm.num(2000, 40000, step=100)[1], "number"),
        n3=_V(nm.num(200, 1900, step=50)[1], "number"), cas=_V(nm.num(150, 1900, step=10)[1], "number"),
        dist=_V(nm.num(5, 90, "{} kilometres")[1], "quantity"),
    )
    # Aliases (same objects) for the questions that depend on who won / wrote.
    side, mside, aside = rng.choice("12"), rng.choice("12"), rng.choice("12")
    v.update(win=v["K" + side], cwin=v["c" + side], rwin=v["r" + side], rwin_sid=_V("ruler" + side, "meta"),
             cm=v["c" + mside], Kcm=v["K" + mside], ally=v["K" + aside])
    return v["B"].text, v


_HIST_BLOCKS = (
    (_S("intro", "B", "{S} was fought in {byr} between {K1} and {K2}.",
        "In {byr}, the armies of {K1} and {K2} met in {B}.",
        "{S}, fought in {byr}, was the decisive clash between {K1} and {K2}.", drop=False),),
    (_S("cause", None, "The war began over control of {region}, a district rich in {res}.",
        "Both kingdoms claimed {region}, whose {res} made it valuable.",
        "At stake was {region}, famous for its {res}."),),
    (_S("armies", None, "{K1} fielded about {n1} soldiers, while {K2} brought {n2}.",
        "The army of {K1} numbered {n1} men against {n2} from {K2}.",
        "{K2} gathered {n2} troops, and {K1} answered with {n1}."),
     _S("ally", None, "{K3} sent {n3} archers to support {ally}.", "{ally} was aided by {n3} archers from {K3}.",
        "With {n3} archers, {K3} came to the aid of {ally}.")),
    (_S("command", None, "The army of {K1} was led by {c1}, and {c2} commanded the forces of {K2}.",
        "{c1} led the troops of {K1}; those of {K2} followed {c2}.",
        "{c2} commanded {K2}, while {c1} was in charge of the army of {K1}."),),
    (_S("duration", "B", "{S} lasted {days}.", "The fighting at {bp} went on for {days}.",
        "After {days} of fighting, {S} was over."),
     _S("outcome", "B", "{S} ended in a victory for {win}, which lost only {cas} men.",
        "{win} won the battle, losing {cas} soldiers.", "{S} was won by {win} at the cost of {cas} lives.")),
    (_S("ruler1", "K1", "At the time, {S} was ruled by {r1}.", "{r1} had ruled {K1} since {ry1}.",
        "{S} was then governed by {r1}, who had come to the throne in {ry1}."),
     _S("ruler2", "K2", "{S} was ruled by {r2}, crowned in {ry2}.", "{r2} had governed {K2} since {ry2}.",
        "The throne of {K2} was held by {r2}.")),
    (_S("capital", None, "The capital of {K1} was {cap1}, while {K2} was ruled from {cap2}.",
        "{K1} was governed from {cap1} and {K2} from {cap2}.",
        "{cap1} served as the capital of {K1}; {K2} had its seat at {cap2}."),),
    (_S("site", None, "{bp} lies {dist} {dir} of {cap1}.", "The battlefield near {bp} is {dist} {dir} of {cap1}.",
        "Today {bp} is a village {dist} {dir} of {cap1}."),),
    (_S("memoir", None, "{cm} later described the campaign in a memoir titled {memo}.",
        "Years later, {cm} published {memo}, an account of the war.",
        "The campaign is remembered through {memo}, a memoir by {cm}."),),
    (_S("treaty", "T", "The war ended with {T}, signed in {ty}.", "In {ty}, the two kingdoms signed {T}.",
        "{S}, agreed in {ty}, brought the war to an end."),),
)
_HIST_QUESTIONS = (
    _Q("year", "byr", "intro", "When was {B} fought?", "In what year did {B} take place?",
       "In which year was {B} fought?"),
    _Q("region", "region", "cause", "Over which district did the war begin?", "Which region did both kingdoms claim?",
       "What territory was at stake in the war between {K1} and {K2}?"),
    _Q("resource", "res", "cause", "What made {region} valuable?", "What was {region} rich in?",
       "For what was {region} famous?"),
    _Q("ally", "K3", "ally", "Which kingdom sent archers to support {ally}?", "Who came to the aid of {ally}?",
       "Which kingdom aided {ally}?"),
    _Q("allied", "ally", "ally", "Which kingdom did {K3} support?", "To whose aid did {K3} come?",
       "Which side received archers from {K3}?"),
    _Q("archers", "n3", "ally", "How many archers did {K3} send?", "How many archers came from {K3}?",
       "What was the number of archers sent by {K3}?"),
    _Q("duration", "days", "duration", "How long did {B} last?", "How long did the fighting at {bp} go on?",
       "What was the duration of {B}?"),
    _Q("winner", "win", "outcome", "Who won {B}?", "Which side was victorious at {B}?", "Which kingdom won {B}?"),
    _Q("losses", "cas", "outcome", "How many men did {win} lose in {B}?", "How many soldiers did the victors lose?",
       "What were the losses of {win} in {B}?"),
    _Q("ruler_win", "rwin", "@rwin_sid", "Who ruled the kingdom that won {B}?",
       "Who was the ruler of the victorious kingdom?", "Which monarch ruled the winners of {B}?", needs="outcome"),
    _Q("commander_win", "cwin", "command", "Who commanded the winning army at {B}?",
       "Who led the victorious side in {B}?", "Who was in command of the victors at {B}?", needs="outcome"),
    _Q("memoir", "memo", "memoir", "What is the title of {cm}'s memoir?",
       "What book did {cm} write about the campaign?",
       "Which account of the war did {cm} publish?"),
    _Q("memoir_author", "cm", "memoir", "Who wrote {memo}?", "Who is the author of {memo}?",
       "Which commander wrote {memo}?"),
    _Q("memoir_side", "Kcm", "command", "For which kingdom did the author of {memo} fight?",
       "Which kingdom's army did the author of {memo} lead?",
       "The author of {memo} commanded the forces of which kingdom?",
       needs="memoir"),
    _Q("site_dist", "dist", "site", "How far is {bp} from {cap1}?", "What is the distance between {bp} and {cap1}?",
       "How far from {cap1} does {bp} lie?"),
    _Q("treaty_year", "ty", "treaty", "When was {T} signed?", "In what year was {T} agreed?",
       "In which year did the war between {K1} and {K2} end?"),
    _Q("treaty", "T", "treaty", "Which treaty ended the war between {K1} and {K2}?", "What agreement ended the war?",
       "What was the name of the treaty that ended the war?"),
) + tuple(q for i in "12" for q in (
    _Q("soldiers" + i, "n" + i, "armies", f"How many soldiers did {{K{i}}} field?",
       f"How large was the army of {{K{i}}}?", f"How many men fought for {{K{i}}}?"),
    _Q("commander" + i, "c" + i, "command", f"Who commanded the army of {{K{i}}}?",
       f"Who led the forces of {{K{i}}}?", f"Who was in charge of the troops of {{K{i}}}?"),
    _Q("ruler" + i, "r" + i, "ruler" + i, f"Who ruled {{K{i}}} at the time of {{B}}?",
       f"Who was the ruler of {{K{i}}}?", f"Who governed {{K{i}}}?"),
    _Q("crowned" + i, "ry" + i, "ruler" + i, f"When did {{r{i}}} come to the throne?",
       f"Since when had {{r{i}}} ruled {{K{i}}}?", f"In what year did {{r{i}}} begin to rule?"),
    _Q("capital" + i, "cap" + i, "capital", f"What was the capital of {{K{i}}}?",
       f"From which city was {{K{i}}} governed?", f"Which city was the capital of {{K{i}}}?"),
))

# name: (make, blocks, questions, id prefix)
_DOMAIN_SPECS = {
    "biography": (_bio_make, _BIO_BLOCKS, _BIO_QUESTIONS, "bio"),
    "geography": (_geo_make, _GEO_BLOCKS, _GEO_QUESTIONS, "geo"),
    "science": (_sci_make, _SCI_BLOCKS, _SCI_QUESTIONS, "sci"),
    "history": (_hist_make, _HIST_BLOCKS, _HIST_QUESTIONS, "his"),
    "sport": (_sport_make, _SPORT_BLOCKS, _SPORT_QUESTIONS, "spo"),
}


# ---------------------------------------------------------------------------
# Generation


class _Quota:
    """Bernoulli(rate) nudged towards the running target, so the realised
    unanswerable fraction stays close even where a passage offers none."""

    def __init__(self, rng, rate):
        self.rng, self.rate, self.done, self.un = rng, rate, 0, 0

    def want(self):
        deficit = self.rate * (self.done + 1) - self.un
        return self.rng.random() < min(1.0, max(0.0, self.rate + 0.3 * deficit))

    def note(self, unanswerable):
        self.done += 1
        self.un += bool(unanswerable)


def _passage(rng, spec, dev, keep, quota, n_questions):
    """One passage: (title, vals, context, [(question spec, template, text, start)], coref, seen)."""
    make, blocks, questions, _ = spec
    title, vals = make(rng, _Namer(rng, dev))
    middle = list(blocks[1:-1])
    if rng.random() < 0.5:
        rng.shuffle(middle)
    sentences = [s for block in (blocks[0], *middle, blocks[-1]) for s in block
                 if not s.drop or rng.random() < keep]
    context, spans, seen, coref, present = _render(rng, sentences, vals)

    answerable, unanswerable = [], []
    for q in questions:
        # Phrasings whose names all occur in the passage (so that an
        # unanswerable question is about an entity the passage does name).
        ok = [i for i, t in enumerate(q.templates)
              if all(vals[k] in seen or vals[k].cls == "pron" for k in _keys(t))]
        if not ok:
            continue
        sid = vals[q.sid[1:]].text if q.sid[0] == "@" else q.sid
        ends = [spans.get((sid, vals[k])) for k in q.answer]
        if sid in present and all(s in present for s in q.needs):
            if all(ends):
                answerable.append((q, ok, sid, context[ends[0][0]:ends[-1][1]], ends[0][0]))
        else:
            unanswerable.append((q, ok, sid, None, None))

    chosen = []
    for _ in range(n_questions):
        pool = answerable
        if quota is not None and unanswerable and (not answerable or quota.want()):
            pool = unanswerable
        if not pool:
            break
        q, ok, sid, text, start = pool.pop(rng.randrange(len(pool)))
        chosen.append((q, rng.choice(ok), sid, text, start))
        if quota is not None:
            quota.note(text is None)
    return title, vals, context, chosen, coref, seen


def generate_domain(domain, n, *, split="train", seed=0, version_2=False, unanswerable_rate=0.2,
                    with_meta=False):
    """Generate ``n`` questions of one domain in HF SQuAD column layout.

    Args:
        domain: one of ``DOMAINS``.
        n: number of questions (records); each passage carries 3-6 of them.
        split: "train" or "validation" ("dev" accepted): which half of the name
            space the entities come from (dev names never occur in train text).
        seed: seed of the ``random.Random`` (combined with domain and split).
        version_2: SQuAD 2.0 style: about ``unanswerable_rate`` of the questions
            ask for a fact the passage does not state (empty answer lists).
        unanswerable_rate: target fraction of unanswerable questions, in [0, 1].
        with_meta: add ``rec["meta"]``: domain, answer_type (person, place, org,
            work, object, event, year, date, number, quantity, thing, dir),
            hops (sentences needed), coref (the answer sentence refers to its
            subject by an anaphor), same_type_in_context (values of the
            answer's type named in the passage), template, unanswerable.

    Returns:
        list of ``{"id", "title", "context", "question", "answers": {"text":
        [str], "answer_start": [int]}}`` with ``context[start:start+len(text)]
        == text``; passages' questions are consecutive.
    """
    if domain not in _DOMAIN_SPECS:
        raise ValueError(f"domain: unknown domain {domain!r}; available: {DOMAINS}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if split not in ("train", "validation", "dev"):
        raise ValueError(f"split: expected 'train' or 'validation', got {split!r}")
    if not 0.0 <= unanswerable_rate <= 1.0:
        raise ValueError(f"unanswerable_rate: expected a value in [0, 1], got {unanswerable_rate!r}")
    spec, dev = _DOMAIN_SPECS[domain], split != "train"
    tag = "dev" if dev else "train"
    rng = random.Random(f"kdfast-synthetic:{seed}:{domain}:{tag}")
    # Sentences after the first are kept with this probability: passage length
    # and content vary, and (v2) dropped facts give the unanswerable questions.
    keep = 0.8 if version_2 else 0.9
    quota = _Quota(rng, unanswerable_rate) if version_2 else None
    records, p = [], 0
    while len(records) < n:
        k = min(rng.randint(3, 6), n - len(records))
        title, vals, context, chosen, coref, seen = _passage(rng, spec, dev, keep, quota, k)
        for j, (q, t, sid, text, start) in enumerate(chosen):
            rec = {"id": f"{spec[3]}-{tag}-{seed}-{p:05d}-{j}", "title": title, "context": context,
                   "question": _fill(q.templates[t], vals),
                   "answers": {"text": [] if text is None else [text],
                               "answer_start": [] if start is None else [start]}}
            if with_meta:
                atype = "date" if len(q.answer) > 1 else vals[q.answer[0]].cls
                rec["meta"] = {"domain": domain, "answer_type": atype, "hops": 1 + len(q.needs),
                               "coref": bool(coref.get(sid)),
                               "same_type_in_context": sum(1 for v in seen if v.cls == atype),
                               "template": f"{domain}.{q.name}.{t}", "unanswerable": text is None}
            records.append(rec)
        p += 1
    return records


def _check_domains(domains):
    if isinstance(domains, str):
        domains = (domains,)
    domains = tuple(domains)
    bad = [d for d in domains if d not in _DOMAIN_SPECS]
    if bad or not domains:
        raise ValueError(f"domains: unknown or empty {bad or list(domains)}; available: {DOMAINS}")
    return domains


def generate_squad(num_train=2000, num_dev=500, *, domains=("biography", "geography", "science"),
                   version_2=False, unanswerable_rate=0.2, seed=0):
    """Generate a synthetic SQuAD-style data set (train and validation splits).

    Args:
        num_train, num_dev: questions per split, shared evenly over ``domains``
            (the first domains take the remainder).
        domains: names from ``DOMAINS`` (one name alone is accepted).
        version_2: add unanswerable questions (SQuAD 2.0 style).
        unanswerable_rate: their target fraction when ``version_2``.
        seed: same seed, identical output.

    Returns:
        ``{"train": records, "validation": records}`` in the column layout of HF
        ``datasets`` SQuAD: ``{"id", "title", "context", "question", "answers":
        {"text": [str], "answer_start": [int]}}`` (empty lists when
        unanswerable). Validation entities (people, places, organisations,
        titles) never occur in train.
    """
    domains = _check_domains(domains)
    out = {}
    for split, total, name in (("train", num_train, "num_train"), ("validation", num_dev, "num_dev")):
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {total!r}")
        per = [total // len(domains) + (i < total % len(domains)) for i in range(len(domains))]
        out[split] = [r for d, n in zip(domains, per)
                      for r in generate_domain(d, n, split=split, seed=seed, version_2=version_2,
                                               unanswerable_rate=unanswerable_rate)]
    return out


def _to_official(records, version_2):
    """HF-layout records -> the official nested SQuAD JSON dict."""
    articles, by_title = [], {}
    for r in records:
        art = by_title.get(r["title"])
        if art is None:
            art = by_title[r["title"]] = {"title": r["title"], "paragraphs": []}
            articles.append(art)
        paras = art["paragraphs"]
        if not paras or paras[-1]["context"] != r["context"]:
            paras.append({"context": r["context"], "qas": []})
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s}
                          for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        if version_2:
            qa["is_impossible"] = not qa["answers"]
        paras[-1]["qas"].append(qa)
    return {"version": "v2.0" if version_2 else "v1.1", "data": articles}


def write_generated(output_dir, *, num_train=2000, num_dev=500, domains=("biography", "geography", "science"),
                    version_2=False, unanswerable_rate=0.2, seed=0, tokenizer=True, vocab_size=4000):
    """Generate a data set and write it as official SQuAD JSON files.

    Writes ``output_dir/train.json`` and ``output_dir/dev.json`` in the official
    format (``{"version": "v1.1"|"v2.0", "data": [{"title", "paragraphs":
    [{"context", "qas": [{"id", "question", "answers": [{"text",
    "answer_start"}], "is_impossible"}]}]}]}``, ``is_impossible`` only for
    v2.0) and, when ``tokenizer``, the built-in WordPiece tokenizer
    (``kdfast.qa.tokenizer.builtin_tokenizer(vocab_size=..., seed=...)``,
    trained on generated text of all domains) into ``output_dir/tokenizer/``.
    Other arguments as in ``generate_squad``.

    Returns:
        ``{"train": Path, "dev": Path}`` plus ``"tokenizer": Path`` if written.
    """
    data = generate_squad(num_train, num_dev, domains=domains, version_2=version_2,
                          unanswerable_rate=unanswerable_rate, seed=seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split in (("train", "train"), ("dev", "validation")):
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(_to_official(data[split], version_2), ensure_ascii=False),
                               encoding="utf-8")
    if tokenizer:
        from kdfast.qa.tokenizer import builtin_tokenizer

        paths["tokenizer"] = out / "tokenizer"
        builtin_tokenizer(vocab_size=vocab_size, seed=seed).save_pretrained(str(paths["tokenizer"]))
    return paths
