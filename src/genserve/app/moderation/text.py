"""The text classifier tiers of the moderation layer, cheapest first.

Every tier implements ``base.TextClassifier`` (``name``, ``scores(text) -> {category: score}``) over
the output of ``normalize``, so they all see the same folded text:

``normalize``
    NFKC (per character), casefold, zero-width / format characters (Unicode ``Cf``) and non-spacing
    or enclosing combining marks (``Mn``, ``Me``) removed, curly quotes folded to ASCII, leetspeak
    folded inside words (table below), whitespace runs collapsed to one space; lone surrogates become
    U+FFFD. It also returns, for every normalised character, the index of the original character it
    came from, so a match in the normalised text maps back to an original span.

``TermMatcher`` ("blocked_terms", per policy, not a default tier)
    The operator's blocked terms: literal phrases (normalised like the text, matched at word
    boundaries, whitespace inside a phrase matching any run of whitespace/punctuation) or regexes
    (``re:PATTERN``, case-insensitive, on the normalised text). A match scores its ``category``
    ("illicit" unless configured) 1.0. *Weakness*: only what the operator wrote; separators inserted
    inside a word ("k.i.l.l") are not collapsed.

``WordListClassifier`` ("wordlist")
    better-profanity 0.7's bundled word list, split by hand into identity slurs ("hate" 1.0),
    explicit sexual terms ("sexual" 0.8), milder sexual terms ("sexual" 0.35), general profanity
    ("harassment" 0.4: profanity alone is not harassment, so plain swearing stays below the default
    0.5 threshold) and words whose ordinary meaning dominates (ignored: "kill", "god", "breasts",
    "meth", ...), plus a few slurs the list lacks. Whole words (and their "-s"/"-es" plurals) on the
    normalised text, by set lookup on tokens. *Weakness*: no context at all: a reclaimed or quoted
    slur ("the word 'x' is a slur") scores like an insult; misspellings beyond the leet table and
    words split by separators are missed.

``SonarClassifier`` ("hatesonar")
    hatesonar's TF-IDF + logistic-regression model (trained on Davidson et al.'s tweets) via ONNX.
    ``hate_speech`` → "hate", ``offensive_language`` → "harassment", both rescaled (see the class).
    Identity words the model scores as hateful on their own ("white", "jew", "gay", "israel",
    "feminist", ...) are masked before scoring. *Weakness*: a bag of words with ~100 non-zero hate
    features: it knows slurs and a few hostile words, not meaning; dehumanising sentences without
    slurs ("<group> are vermin") score low; "offensive" is mostly profanity, so it is only reported as
    harassment above 0.3 when the text addresses someone ("you", "your", ...).

``PhraseRuleClassifier`` ("rules")
    A readable table of regexes over the normalised text for what the other tiers miss: first- and
    second-person threats, self-harm intent and instructions, graphic violence, sexual content
    involving minors, dehumanising or threatening statements about identity groups, weapon and drug
    recipes, and second-person insults. Written for precision: benign look-alikes ("kill the
    process", "I could die laughing", "shoot me an email", third-person clinical discussion of
    suicide) do not match. *Weakness*: English only, phrasing-bound (paraphrases, misspellings and
    long-distance dependencies are missed), sarcasm and quotation are not understood, and a joke
    threat ("if you spoil the ending I'll kill you") is flagged like a real one.

Leetspeak table (``normalize``): ``0→o 1→i 3→e 4→a 5→s 7→t @→a $→s !→i |→l +→t``. Folding is applied
only inside a "word run" (a maximal run of word characters and those symbols) that contains at least
one letter, so plain numbers ("911", "2010", "$100") are kept. In such a run a digit that belongs to
the run's leading digits is kept too (numbers with units: "14yo", "50mg", "3rd"), and "!" and "+" are
folded only between two run characters and when followed by a letter or digit ("sh!t" → "shit", but
"wow!" and "c++" stay). "1" folds to "i" ("k1ll" → "kill"), never to "l".
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from genserve.app.moderation.categories import CATEGORIES

if TYPE_CHECKING:
    from genserve.app.moderation.base import TextClassifier
    from genserve.app.moderation.semantic import SemanticClassifier

__all__ = [
    "ClassifierError", "PhraseRuleClassifier", "Rule", "SonarClassifier", "TermHalt", "TermMatch", "TermMatcher",
    "WordListClassifier", "default_text_classifiers", "normalize", "term_matcher",
    "written_to",
]


class ClassifierError(RuntimeError):
    """A classifier could not score a text (its model failed to load or run): the service fails closed."""


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l",
         "+": "t"}
_INNER_ONLY = frozenset("!+")  # folded only between two run characters, before a letter or digit
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u02bc": "'", "\u2032": "'", "\u201c": '"', "\u201d": '"',
           "\u201f": '"', "\u2033": '"'}
_RUN = re.compile(r"[\w@$!|+]+")
_LEET_CHARS = re.compile(r"[0-9@$!|+]")
_SPACES = re.compile(r"\s+")
_DROP_MARKS = frozenset(("Mn", "Me"))
_CACHE_MAX = 65536


def _fold_char(c: str) -> str:
    """One original character's normalised text (before leet folding and whitespace collapsing)."""
    o = ord(c)
    if 0xD800 <= o <= 0xDFFF:
        return "\ufffd"
    if c in _QUOTES:
        return _QUOTES[c]
    if unicodedata.category(c) == "Cf":
        return ""
    s = unicodedata.normalize("NFKC", c).casefold()
    if s.isascii():
        return s
    s = "".join(ch for ch in unicodedata.normalize("NFD", s)
                if unicodedata.category(ch) not in _DROP_MARKS and unicodedata.category(ch) != "Cf")
    s = unicodedata.normalize("NFC", s)
    return "".join(_QUOTES.get(ch, ch) for ch in s)


class _FoldTable(dict[int, str]):
    """``str.translate`` table computing (and caching, up to a bound) each code point's folding."""

    def __missing__(self, key: int) -> str:
        s = _fold_char(chr(key))
        if len(self) < _CACHE_MAX:
            self[key] = s
        return s


_TABLE = _FoldTable()


def _fold_run(m: re.Match[str]) -> str:
    run = m.group()
    if run.isalpha() or not any(ch.isalpha() for ch in run):
        return run
    out = list(run)
    leading_digits = True
    last = len(run) - 1
    for k, ch in enumerate(run):
        if leading_digits and ch.isdigit():
            continue
        leading_digits = False
        rep = _LEET.get(ch)
        if rep is None:
            continue
        if ch in _INNER_ONLY and (k == 0 or k == last or not run[k + 1].isalnum()):
            continue
        out[k] = rep
    return "".join(out)


_RUN_CHARS = frozenset("@$!|+")


def _leet(s: str) -> str:
    """Fold leetspeak in the runs that contain a leet character (each run scanned once: linear)."""
    out: list[str] = []
    pos = 0  # s[:pos] is handled
    for m in _LEET_CHARS.finditer(s):
        p = m.start()
        if p < pos:
            continue
        start = p
        while start > pos and (s[start - 1].isalnum() or s[start - 1] == "_" or s[start - 1] in _RUN_CHARS):
            start -= 1
        run = _RUN.match(s, start)
        if run is None:  # unreachable: s[p] is a run character
            continue
        out.append(s[pos:start])
        out.append(_fold_run(run))
        pos = run.end()
    if not out:
        return s
    out.append(s[pos:])
    return "".join(out)


def normalize_text(text: str) -> str:
    """``normalize(text)[0]``, without building the index map (the classifiers' fast path)."""
    return _SPACES.sub(" ", _leet(text.translate(_TABLE)))


def normalize(text: str) -> tuple[str, list[int]]:
    """The normalised text and, for each of its characters, the index of the original character it came
    from (an NFKC expansion maps all its characters to the one original index; a collapsed whitespace run
    maps to its first character). Never raises on a ``str``. See the module docstring for the steps."""
    index: list[int]
    if text.isascii():  # every ASCII character folds to exactly one character
        folded = _leet(text.translate(_TABLE))
        index = list(range(len(text)))
    else:
        pieces: list[str] = []
        index = []
        table = _TABLE
        for i, c in enumerate(text):
            s = table[ord(c)]
            if s:
                pieces.append(s)
                index.extend([i] * len(s))
        folded = _leet("".join(pieces))  # leet folding is one character for one: the index is unchanged
    if not _SPACES.search(folded):
        return folded, index
    out: list[str] = []
    out_index: list[int] = []
    pos = 0
    for m in _SPACES.finditer(folded):
        out.append(folded[pos:m.start()])
        out_index.extend(index[pos:m.start()])
        out.append(" ")
        out_index.append(index[m.start()])
        pos = m.end()
    out.append(folded[pos:])
    out_index.extend(index[pos:])
    return "".join(out), out_index


# --------------------------------------------------------------------------------------------------
# Blocked terms
# --------------------------------------------------------------------------------------------------


MAX_SEPARATORS = 3  # between the words of a literal term: "kill, you" and "kill - you" match "kill you"


class TermMatch(NamedTuple):
    """A blocked term found in a text: ``start``/``end`` index the ORIGINAL text (end exclusive)."""

    term: str
    start: int
    end: int


def _literal_pattern(norm: str) -> str:
    """A normalised literal phrase as a regex: whitespace matches a run of up to ``MAX_SEPARATORS``
    whitespace/punctuation characters (bounded, so that a match is never longer than the stream
    hold-back window: ``TermMatcher.max_literal_len``), and the phrase's ends are word boundaries where
    the phrase itself starts/ends with a word character."""
    body = rf"[\W_]{{1,{MAX_SEPARATORS}}}".join(re.escape(tok) for tok in norm.split())
    head = r"(?<!\w)" if re.match(r"\w", norm[0]) and norm[0] != "_" else ""
    tail = r"(?!\w)" if re.match(r"\w", norm[-1]) and norm[-1] != "_" else ""
    return head + body + tail


class TermMatcher:
    """An operator's blocked terms (see the module docstring); also a ``TextClassifier`` named
    "blocked_terms" scoring ``category`` 1.0 when any term matches, ``{}`` otherwise."""

    name = "blocked_terms"

    def __init__(self, terms: list[str], category: str = "illicit") -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown moderation category {category!r} for blocked terms")
        self.category = category
        self.terms = list(terms)
        self._regexes: list[tuple[str, re.Pattern[str]]] = []
        literals: list[tuple[str, str]] = []
        self.max_literal_len = 0
        for term in self.terms:
            if term.startswith("re:"):
                try:
                    pattern = re.compile(term[3:], re.IGNORECASE)
                except re.error as e:
                    raise ValueError(f"blocked term {term!r} is not a valid regex: {e}") from None
                if pattern.fullmatch(""):
                    raise ValueError(f"blocked term {term!r} matches the empty string")
                self._regexes.append((term, pattern))
            else:
                norm = normalize_text(term).strip()
                if not norm:
                    raise ValueError(f"blocked term {term!r} is empty once normalised")
                literals.append((term, _literal_pattern(norm)))
                # The longest normalised span it can match: each gap between words at its widest.
                gaps = len(norm.split()) - 1
                self.max_literal_len = max(self.max_literal_len, len(norm) + gaps * (MAX_SEPARATORS - 1))
        self._literal_terms = [t for t, _ in literals]
        self.has_regexes = bool(self._regexes)
        self._literal: re.Pattern[str] | None = None
        if literals:
            self._literal = re.compile("|".join(f"(?P<t{k}>{p})" for k, (_, p) in enumerate(literals)))

    def _find_normalised(self, norm: str) -> tuple[str, int, int] | None:
        best: tuple[str, int, int] | None = None
        if self._literal is not None:
            m = self._literal.search(norm)
            if m is not None and m.lastgroup is not None:
                best = (self._literal_terms[int(m.lastgroup[1:])], m.start(), m.end())
        for term, pattern in self._regexes:
            for m in pattern.finditer(norm):
                if m.end() > m.start():
                    if best is None or (m.start(), -m.end()) < (best[1], -best[2]):
                        best = (term, m.start(), m.end())
                    break
        return best

    def find(self, text: str) -> TermMatch | None:
        """The earliest match (the longest on a tie) in ``text``, as an original-text span, or None."""
        if not self.terms:
            return None
        norm, index = normalize(text)
        hit = self._find_normalised(norm)
        if hit is None:
            return None
        term, start, end = hit
        return TermMatch(term, index[start], index[end - 1] + 1)

    def scores(self, text: str) -> dict[str, float]:
        if not self.terms or self._find_normalised(normalize_text(text)) is None:
            return {}
        return {self.category: 1.0}


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def written_to(text: str, start: int = 0) -> int:
    """Where ``text[start:]`` stops being final: before a word still being written at its end ("ass" may
    become "assert"), so a check never judges half a word."""
    end = len(text)
    while end > start and _word_char(text[end - 1]):
        end -= 1
    return end


class TermHalt:
    """Blocked terms checked where the text is made (``SamplingParams.halt``): the engine finishes a
    sequence with ``content_filter`` in the step that writes one, as at a stop string, instead of some
    steps later when the gateway's abort arrives. The gateway's gate still decides what is released (it
    sees the same text with the same matcher); this only stops generation sooner.

    A call judges only what a new word boundary made final (none in the new characters: nothing to do),
    in the text's last ``lookback`` characters up to its last complete word, from just after a space
    (never from inside a word: "grass" is not "ass", nor "gr@$s" "$s"). A term longer than that, spread by
    many invisible characters, is left to the gate. Pickles as its terms; the matcher is built once per
    process and term list."""

    def __init__(self, terms: tuple[str, ...], lookback: int) -> None:
        self.terms, self.lookback = tuple(terms), lookback

    @classmethod
    def for_terms(cls, terms: tuple[str, ...], window: int) -> TermHalt:
        """The look-back for ``terms``: twice the longest span a literal term can match (room for invisible
        characters), or twice the policy's ``window`` when a regex has no such bound, plus 32."""
        matcher = term_matcher(terms)
        longest = window if matcher.has_regexes else min(window, matcher.max_literal_len)
        return cls(terms, 2 * longest + 32)

    def __reduce__(self) -> tuple:
        return TermHalt, (self.terms, self.lookback)

    def __call__(self, text: str, added: int) -> bool:
        if all(map(_word_char, text[len(text) - added:])):
            return False  # no word finished: the last call saw all there is to judge
        end = written_to(text)
        start = max(0, end - self.lookback)
        while 0 < start < end and not text[start - 1].isspace():
            start += 1
        return term_matcher(self.terms).find(text[start:end]) is not None


@functools.lru_cache(maxsize=1024)
def term_matcher(terms: tuple[str, ...]) -> TermMatcher:
    """One matcher per term list and process (policies share theirs)."""
    return TermMatcher(list(terms))


# --------------------------------------------------------------------------------------------------
# Word list
# --------------------------------------------------------------------------------------------------

def _split(words: str) -> frozenset[str]:
    return frozenset(words.split())


# How the entries of better-profanity 0.7's list were split (by reading all 916 of them):
# - SLURS: words whose only or overwhelmingly dominant use is to demean people for race, ethnicity,
#   religion, sexual orientation, gender identity or disability, with their leet/misspelt variants
#   as they appear in the file. Left out when a benign sense is common: "paddy", "pollock", "slope",
#   "hebe", "negro" (historical names), "gay", "queer", "homo", "lesbians", "lesbos", and mild or
#   dated ethnic nicknames ("gringo", "kraut", "whitey", "ruski", "guido": general profanity below).
# - SEXUAL_EXPLICIT: sex acts and pornographic genres. SEXUAL_MILD: words that are sexual but also
#   used in ordinary, medical or educational text ("porn", "nude", "horny", "cum", "bondage").
# - IGNORED: words whose ordinary meaning dominates (anatomy, medicine, drugs, weapons, history,
#   violence verbs, mild exclamations, names): scoring them would only add noise.
# - Everything else is general profanity: "harassment" 0.4.
SLURS = _split("""
chink coon dyke dykes fag fagg fagged fagging faggit faggitt faggot faggs fagot fagots fags faig faigt
fudgepacker gook gooks heeb injun jap japs kike kikes kyke lesbo lezbo lezbos lezzie lezzies lezzy moolie
n1g n1gg n1gga n1gger nig nigg nigg3r nigg4h nigga niggah niggas niggaz nigger niggers niglet paki
pillowbiter polack retard reetard r-tard rtard ritard tard spac spic spick spik spiks wetback wigger wop
honky shemale heshe
""") | {"carpet muncher", "she male"}
# Slurs better-profanity lacks (normalised, whole words).
EXTRA_SLURS = _split("beaner raghead towelhead sandnigger zipperhead chinaman tranny trannies")
SEXUAL_EXPLICIT = _split("""
assfuck assfucker assfukka ass-fucker autoerotic bestiality beastiality blowjob blowjobs bukake
bukkake cumshot cunilingus cunillingus cunnilingus kunilingus deepthroat doggiestyle doggie-style
doggystyle doggy-style ejaculate ejaculated ejaculates ejaculating ejaculatings ejaculation ejakulate
felch felcher felching fellate fellatio feltch feltcher fingerfuck fingerfucked fingerfucker fingerfuckers
fingerfucking fingerfucks fistfuck fistfucked fistfucker fistfuckers fistfucking fistfuckings fistfucks
fisting footjob gangbang gangbanged gangbangs gang-bang gaysex gokkun goldenshower handjob hardcoresex
hentai hotsex jackoff jack-off jerkoff jerk-off jerk0ff j3rk0ff jism jiz jizm jizz jizzed m45terbate
ma5terb8 masterb8 masterbat3 masterbate masterbating masterbation masterbations master-bate masturbate
masturbating masturbation muffdiver orgasim orgasims orgasm orgasmic orgasms orgies orgy phonesex rimjob
rimjaw rimming teabagging threesome titfuck tittyfuck tittyfucker tittiefucker tittywank titwank
femdom futanari futanary masterbat*
""") | {"2 girls 1 cup", "blow job", "deep throat", "dog style", "doggie style", "doggy style",
                "foot job", "gang bang", "golden shower", "hand job", "jack off", "jerk off", "three some",
                "brown shower", "brown showers", "blue waffle"}
SEXUAL_MILD = _split("""
anal bdsm bondage boner busty clit clitoris clits cum cuming cummer cumming cums dildo dildos erotic
erotism erection horny horniest hump humped humping incest kinky kinbaku kum kummer kumming kums lube milf
nude nudes nympho p0rn porn porno pornography pornos pron shibari shibary smut smutty spooge stripclub
voyeur xxx yaoi naked g-spot gspot fondle seduce raunch quicky nooky poontang
""") | {"booty call", "strip club", "auto erotic"}
IGNORED = _split("""
anus areole arian aryan asanchez breasts cipa crotch drunk enlargement erect extacy extasy
facial fat flange foobar foreskin gai gay gays glans god gonad gonads hell hemp heroin herp herpes herpy
hitler hiv homo homoerotic homey hooch hookah hootch hymen inbred kill kinkyjesus kkk klan labia len leper
lesbians lesbos lezbian lezbians lmao lmfao loin loins lust lusting lusty maxi menses menstruate
menstruation meth molest murder napalm nappy nazi nazism negro nipple nipples omg opiate opium oral orally
organ ovary ovum ovums paddy pastie pasty pawn pcp penetrate penetration penial penile penis peyote phalli
phallic playboy pms pollock pot potty prostitute prude pubic pubis queer queers racy rape raped raper
raping rapist reefer reich rectal rectum rectus revue rum rump sadism sadist sandbar scantily schizo
seaman seamen semen sex sexual slope sniper snuff sodom souse soused sperm steamy stoned strip stroke
tampon tawdry teat teste testee testes testical testicle testis thrust tinkle toke transsexual undies
unwed urinal urine uterus uzi v14gra v1gra valium viagra virgin vixen vodka vomit voyeur vulgar vulva
weed womb hebe massa yury gringo ganja dong masochist perversion hoar ugly dummy dopey weirdo cowgirl cowgirls
""")
SLUR_SCORE, EXPLICIT_SCORE, MILD_SEXUAL_SCORE, PROFANITY_SCORE = 1.0, 0.8, 0.35, 0.4
# A slur word in one of these contexts is benign ("Maine Coon" cats, the "Spic and Span" cleaner).
_SLUR_BENIGN_CONTEXT = re.compile(r"\bmaine coons?\b|\bcoon ?(?:hounds?|dogs?)\b|\bspic (?:and|n|&) span\b")
_TOKEN = re.compile(r"[^\W_]+")


def _wordlist_entries() -> list[str]:
    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


def _entry_key(entry: str) -> str:
    """A list entry as the tokens ``_TOKEN`` finds in normalised text, joined by single spaces."""
    return " ".join(_TOKEN.findall(normalize_text(entry.rstrip("*"))))


class WordListClassifier:
    """Whole-word lookup of better-profanity's list, split into slurs, sexual terms and profanity (see
    the module docstring and the lists above). Thread-safe (read-only after construction)."""

    name = "wordlist"

    def __init__(self) -> None:
        entries = _wordlist_entries()
        words: dict[str, tuple[str, float]] = {}
        prefixes: list[tuple[str, tuple[str, float]]] = []

        def verdict(e: str) -> tuple[str, float] | None:
            low = e.casefold()
            if low in SLURS:
                return ("hate", SLUR_SCORE)
            if low in SEXUAL_EXPLICIT:
                return ("sexual", EXPLICIT_SCORE)
            if low in SEXUAL_MILD:
                return ("sexual", MILD_SEXUAL_SCORE)
            if low in IGNORED:
                return None
            return ("harassment", PROFANITY_SCORE)

        def add(key: str, v: tuple[str, float]) -> None:
            old = words.get(key)
            if old is None or (old[0] != "hate" and (v[0] == "hate" or v[1] > old[1])):
                words[key] = v

        for e in entries:
            v = verdict(e)
            key = _entry_key(e)
            if v is None or not key:
                continue
            if e.endswith("*"):
                prefixes.append((key, v))
            else:
                add(key, v)
        for e in EXTRA_SLURS:
            add(_entry_key(e), ("hate", SLUR_SCORE))
        self._words = words
        self._prefixes = tuple(prefixes)
        self._max_ngram = max(k.count(" ") + 1 for k in words)
        self._ngram_heads = frozenset(k.split(" ")[0] for k in words if " " in k)

    def _lookup(self, tok: str) -> tuple[str, float] | None:
        v = self._words.get(tok)
        if v is None and len(tok) > 3 and tok[-1] == "s":
            v = self._words.get(tok[:-1])
            if v is None and tok.endswith("es") and tok[:-2].endswith(("s", "sh", "ch", "x", "z")):
                v = self._words.get(tok[:-2])
        if v is None:
            for p, pv in self._prefixes:
                if tok.startswith(p):
                    return pv
        return v

    def matches(self, text: str) -> list[tuple[str, str, float]]:
        """The (normalised word or phrase, category, score) hits in ``text``."""
        norm = normalize_text(text)
        tokens = _TOKEN.findall(norm)
        hits: list[tuple[str, str, float]] = []
        slur_context_checked: bool | None = None
        for k, tok in enumerate(tokens):
            v = self._lookup(tok)
            if v is not None:
                if v[0] == "hate":
                    if slur_context_checked is None:
                        slur_context_checked = _SLUR_BENIGN_CONTEXT.search(norm) is not None
                    if slur_context_checked and _SLUR_BENIGN_CONTEXT.search(" ".join(tokens[max(0, k - 1):k + 3])):
                        continue
                hits.append((tok, *v))
            if tok in self._ngram_heads:
                for n in range(2, self._max_ngram + 1):
                    if k + n > len(tokens):
                        break
                    phrase = " ".join(tokens[k:k + n])
                    pv = self._words.get(phrase)
                    if pv is not None:
                        hits.append((phrase, *pv))
        return hits

    def scores(self, text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, cat, s in self.matches(text):
            out[cat] = max(out.get(cat, 0.0), s)
        return out


# --------------------------------------------------------------------------------------------------
# hatesonar
# --------------------------------------------------------------------------------------------------

# Words the model's hate class weighs positively on their own although they are neutral mentions of
# identities, places or topics (read off its coefficients): masked before scoring, so "I am a Jew" or
# "a white paper" are not hate. Slurs and hostile words ("kill", "hate", "stupid") are kept.
SONAR_MASKED = _split("""
white black jew jews jewish israel israeli america american feminist feminists gay gays queer race racist
racism human people country here his uncle store trailer allowed support folk loud kieffer_jason jrise88
wassup
""")
_SONAR_TOKEN = re.compile(r"[a-z0-9_]+")
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself|youre|you're|u|ur|ya|yall|y'all)\b")
# Rescaling: score = max(0, (p - base) / (1 - base)). The bases were measured on a probe set of 26
# benign sentences (questions, code, idioms, identity mentions, casual swearing): after masking, the
# highest benign hate probability was ~0.31 ("I hate Mondays", "kill -9 the process") → base 0.4 keeps
# benign hate under 0.1. Offensive probability is ~0.25-0.35 on any neutral text and ~0.7-1.0 with any
# profanity → base 0.4, and it only counts as harassment when the text addresses someone; otherwise
# it is capped at 0.3 (swearing at a printer is not harassment).
SONAR_HATE_BASE = 0.4
SONAR_OFFENSIVE_BASE = 0.4
SONAR_UNADDRESSED_CAP = 0.3
SONAR_MAX_CHARS = 20_000  # a bag of words: the first 20k characters are plenty, and bound the cost


def _rescale(p: float, base: float) -> float:
    return max(0.0, min(1.0, (p - base) / (1.0 - base)))


class SonarClassifier:
    """hatesonar's ONNX model (``hate_speech`` → "hate", ``offensive_language`` → "harassment"),
    masked and rescaled (see the constants above). The ONNX session is created on first use (once,
    under a lock) and shared: onnxruntime sessions are thread-safe. Any failure of the model is raised
    as ``ClassifierError``."""

    name = "hatesonar"

    def __init__(self) -> None:
        self._sonar: Any = None
        self._lock = threading.Lock()

    def _model(self) -> Any:
        if self._sonar is None:
            with self._lock:
                if self._sonar is None:
                    try:
                        from hatesonar import Sonar  # type: ignore[import-untyped,unused-ignore]

                        self._sonar = Sonar()
                    except Exception as e:
                        raise ClassifierError(
                            f"hatesonar could not load ({type(e).__name__}: {e}); it needs the en_US.UTF-8 "
                            "locale (locale-gen en_US.UTF-8)") from e
        return self._sonar

    def probabilities(self, text: str) -> tuple[float, float, float]:
        """The model's (hate_speech, offensive_language, neither) probabilities for ``text`` (masked)."""
        norm = normalize_text(text[:SONAR_MAX_CHARS])
        masked = " ".join(t for t in _SONAR_TOKEN.findall(norm) if t not in SONAR_MASKED)
        sonar = self._model()
        try:
            result = sonar.ping(masked)
            probs = {c["class_name"]: float(c["confidence"]) for c in result["classes"]}
            return probs["hate_speech"], probs["offensive_language"], probs["neither"]
        except Exception as e:
            raise ClassifierError(f"hatesonar failed: {type(e).__name__}: {e}") from e

    def scores(self, text: str) -> dict[str, float]:
        p_hate, p_off, _ = self.probabilities(text)
        harassment = _rescale(p_off, SONAR_OFFENSIVE_BASE)
        if not _SECOND_PERSON.search(normalize_text(text[:SONAR_MAX_CHARS])):
            harassment = min(harassment, SONAR_UNADDRESSED_CAP)
        return {"hate": _rescale(p_hate, SONAR_HATE_BASE), "harassment": harassment}


# --------------------------------------------------------------------------------------------------
# Phrase rules
# --------------------------------------------------------------------------------------------------


class Rule(NamedTuple):
    """One phrase rule: when ``pattern`` matches the normalised text, each of ``categories`` scores
    ``score``."""

    categories: tuple[str, ...]
    score: float
    pattern: str
    comment: str


# Building blocks (all on normalised text: casefolded, ASCII apostrophes, single spaces).
_I_WILL = (r"(?:i ?'?ll|i will|i shall|i'?m (?:gonna|gunna|going to|about to|coming to|fixing to)|"
           r"i am (?:gonna|going to|about to|coming to)|imma|i'?ma|i'?d (?:love|like) to|i (?:want|wanna|need) to|"
           r"i wanna|we ?'?ll|we will|we'?re (?:gonna|going to)|we are (?:gonna|going to)|someone (?:will|should"
           r"|is gonna))")
_ADV = (r"(?:(?:fucking|f\*+cking|f\*+king|fking|fkin|freaking|effing|really|just|literally|actually|personally|"
        r"seriously|totally|so|gonna|go|come|and|swear i'?ll|swear to god i'?ll) )*")
_HARM = (r"(?:kill|murder|stab|shoot|strangle|choke|rape|torture|behead|hurt|beat|slaughter|butcher|gut|"
         r"burn|end|destroy|bury|skin|cut|punch|slap|smack|kick|drown|hang|lynch|poison|execute|hunt|eliminate)")
_YOU = r"(?:you|u|ya|your (?:family|kids|children|wife|husband|mother|mom|dad|son|daughter|dog|ass))"
# What follows "you" in a benign use: "shoot you an email", "beat you at chess", "cut you a slice".
_NOT_BENIGN_OBJ = r"(?! (?:an?|the|some|at|to it|to the|there|home|in on|off|slack|over|back|my|this|that|guys)\b)"
_SELF_END = (r"(?:kill (?:my ?self|me)|end (?:my (?:own )?life|it all)|take my (?:own )?life|"
             r"commit suicide|hang my ?self|slit my (?:wrists?|throat)|overdose|od|off my ?self|shoot my ?self|"
             r"jump (?:off|from|in front of) (?:a|the|this|that) (?:bridge|roof|building|cliff|train))")
# Only after a verb of desire ("i want to die"; not "i'm going to die of embarrassment", "i'll die if...").
_WISH_END = (r"(?:die(?! (?:laughing|of (?:laughter|embarrassment|boredom|shame|cringe)|happy|old|rich|in my sleep at|"
             r"on this hill|a little inside|for (?:a|some|one|this|that|it)|with (?:dignity|you|my)|young and))|be dead"
             r"|"
             r"not (?:be alive|exist|wake up)|disappear forever|stop (?:living|existing))")
_I_WISH = (r"(?:i (?:really |just |honestly |seriously |still |sometimes |often |kind of |kinda )?(?:want|wanna|need|"
           r"wish i could|am ready|'m ready|m ready|have decided|decided|'d rather|d rather|would rather)(?: to)?|"
           r"i'?d rather)")
_I_INTEND = (r"(?:i(?: really| just| honestly| seriously| still)? (?:want|wanna|need|plan|intend|will|have decided|"
             r"decided|wish i could|tried|attempted|keep thinking about|feel like i (?:want|need))(?: to)?|"
             r"i(?:'m| am|m) (?:going|gonna|about|ready|planning|thinking about|fixing)(?: to)?|i ?'?ll|"
             r"i(?:'ve| have) been thinking about|i think i(?: ?'?ll| will)|i'?d rather|imma|i'?ma)")
_GROUPS = (r"(?:jews|jewish people|muslims|muslim people|blacks|black people|whites|white people|gays|gay people|"
           r"homosexuals|lesbians|trans people|transgender people|trannies|immigrants|migrants|refugees|mexicans|"
           r"asians|chinese people|chinese|arabs|christians|hindus|sikhs|catholics|women|females|africans|"
           r"latinos|hispanics|indians|pakistanis|gypsies|roma|disabled people|the disabled|retards|"
           r"niggers|niggas|kikes|faggots|fags|spics|chinks|wetbacks|gooks|dykes|pakis|beaners|ragheads|"
           r"towelheads|queers|jew|muslim|black|gay|mexican|immigrant)")
_DEHUMANISE = (r"(?:animals|vermin|subhuman|sub-human|parasites|cockroaches|rats|roaches|filth|scum|savages|apes|"
               r"monkeys|pigs|dogs|inferior|a plague|a cancer|a disease|a virus|disgusting|evil|all terrorists|"
               r"all criminals|all rapists|worthless|not human|less than human|trash|garbage|an infestation|"
               r"a blight|diseased|degenerates|abominations?|genetically inferior)")
_GROUP_DEATH = (r"(?:die|burn|hang|rot|be (?:killed|exterminated|gassed|shot|hanged|hung|lynched|burned|burnt|wiped out"
                r"|"
                r"eradicated|executed|put down|eliminated|slaughtered|massacred|sterilized|sterilised)|"
                r"not (?:exist|be allowed to live))")
_GROUP_KILL = (r"(?:kill|exterminate|gas|lynch|hang|shoot|burn|slaughter|massacre|wipe out|eradicate|eliminate|"
               r"get rid of|murder|nuke|bomb)")
_MINOR = (r"(?:child|children|kids?|minors?|underage|under-age|under age|preteens?|pre-teens?|toddlers?|infants?|"
          r"babies|schoolgirls?|schoolboys?|little (?:girls?|boys?)|young (?:girls?|boys?)|teen (?:girls?|boys?)|"
          r"(?:[1-9]|1[0-7])[ -]?(?:yo|y/o|years? old|year-old|yr old)|(?:five|six|seven|eight|nine|ten|eleven|"
          r"twelve|thirteen|fourteen|fifteen|sixteen|seventeen)[ -]years?[ -]old|jailbait|lolis?|lolicon|shota|"
          r"middle schoolers?|elementary schoolers?|(?:my|her|his) (?:daughter|son|niece|nephew|stepdaughter|stepson))")
_SEXUAL = (r"(?:sexy|sexually|porn\w*|nudes?|naked|erotic|explicit|horny|seduc\w+|fondl\w+|grop\w+|undress\w*|lewd|"
           r"hentai|nsfw|blowjobs?|handjobs?|masturbat\w+|orgasm\w*|intercourse|have sex|having sex|had sex|"
           r"sex (?:with|scene|story|video|tape|pics?)|sext\w*|rape|raping|molest\w*|touch(?:ing)? (?:her|him|them) "
           r"(?:inappropriately|sexually|down there)|aroused|turned on|fuck\w*|suck(?:ing)? (?:his|my|her) \w+)")
_EXPLOSIVE = (r"(?:(?:pipe |nail |car |dirty |fertilizer |fertiliser |letter |homemade |suicide )?bombs?|ieds?|"
              r"explosives?|molotovs?(?: cocktails?)?|grenades?|napalm|nerve (?:gas|agent)|sarin|ricin|vx|anthrax|"
              r"bioweapons?|chemical weapons?|detonators?|tatp|thermite charges?|silencers?|suppressors?|ghost guns?|"
              r"untraceable guns?|(?:an? )?(?:gun|rifle|ar-?15) (?:at home|without a serial))")
_DRUG = (r"(?:meth|methamphetamine|crystal meth|crack(?: cocaine)?|heroin|fentanyl|lsd|mdma|ecstasy|cocaine|ghb|"
         r"dmt|pcp|ketamine|krokodil|desomorphine|oxy(?:codone|contin)?)")
_HOW = (r"(?:how (?:do|can|could|would|should|to|does one|do you|might) (?:i |we |you |one )?|"
        r"(?:instructions|recipe|guide|steps|tutorial|directions|walk me through|teach me|show me|tell me)"
        r" (?:for |to |on |how to )?(?:how to )?)")
_MAKE = r"(?:make|build|construct|assemble|create|cook|synthesi[sz]e|manufacture|produce|brew|making|building)"

RULES: tuple[Rule, ...] = (
    # --- threats against the reader or someone close to them ------------------------------------------
    Rule(("harassment/threatening", "violence"), 0.9,
         rf"\b{_I_WILL} {_ADV}(?:{_HARM} {_YOU}\b{_NOT_BENIGN_OBJ}|(?:f(?:uc)?k|mess|beat|rough) (?:you|u) up\b)",
         "first person intends harm to the second person: 'i will kill you', 'i'm going to hurt your family'"),
    Rule(("harassment/threatening", "violence"), 0.9,
         r"\b(?:you'?re|you are|ur|your|u r) (?:so |fucking |already |gonna be )?(?:dead|a dead (?:man|woman|person)"
         r"|dead meat|"
         r"going to die|gonna die|done for|next on my list)\b(?! (?:right|wrong|on|serious|tired|set|last|center|centre"
         r"|"
         r"ahead|even|weight|end|sure|certain|to me|inside|on arrival|battery|in the water))",
         "'you're dead', 'you're dead meat' — not 'you're dead right', 'you're dead to me'"),
    Rule(("harassment/threatening", "violence"), 0.85,
         r"\b(?:you|u)(?: will|'ll| are going to| are gonna| r gonna| gonna) (?:die|be (?:dead|killed|sorry)"
         r"|pay for (?:this|that|it)|"
         r"regret (?:this|that|it|the day)|bleed|suffer)\b(?! (?:if|when|of|from|in|after|before|eventually|someday|"
         r"one day|laughing|with|without|for (?:a|the)))",
         "'you will die', 'you'll pay for this' — not 'you will die if you step in the lava'"),
    Rule(("harassment/threatening",), 0.85,
         r"\b(?:i|we)(?: know| found out| ?'?ll find(?: out)?| will find(?: out)?|'?m gonna find(?: out)?|"
         r"(?:'?m| am|'?re| are) going to find(?: out)?) where (?:you|u|your (?:family|kids|children)) (?:live|lives"
         r"|sleep|work|go to school)\b",
         "'i know where you live'"),
    Rule(("harassment/threatening",), 0.85,
         r"\b(?:watch your back|sleep with one eye open|you won'?t see (?:it|me|us) coming|i'?m coming for you|"
         r"i am coming for you|we'?re coming for you|your days are numbered|you have (?:\d+|one|two|three|24) "
         r"(?:hours|days) to live|say goodbye to your (?:life|family|kids)|you'?ll never see (?:it|me) coming)\b",
         "stock intimidation phrases"),
    Rule(("harassment/threatening", "violence"), 0.9,
         rf"\b{_I_WILL} {_ADV}(?:find|get|track) (?:you|u)(?: down)? and {_ADV}{_HARM}\b",
         "'i'll find you and kill you'"),
    Rule(("harassment/threatening", "violence"), 0.85,
         r"\b(?:i'?ll|i will|i'?m gonna|i'?m going to|i am going to) (?:put|send) (?:you|u) (?:in|into|to) "
         r"(?:the hospital|the ground|a grave|an early grave|a body bag|a coffin|the morgue)\b|"
         r"\b(?:i'?ll|i will) (?:make|leave) (?:you|u) (?:bleed|suffer|six feet under|pay)\b|"
         r"\bput a bullet (?:in|through) (?:you|your)\b|\bblow your (?:head|brains) (?:off|out)\b",
         "euphemistic death threats"),
    Rule(("harassment/threatening", "harassment"), 0.85,
         r"\b(?:i )?hope (?:you|u) (?:die|get (?:raped|killed|cancer|shot|stabbed|run over|hit by a)|burn|rot|choke)\b"
         r"|\b(?:you|u) (?:should|deserve to|need to|ought to) (?:just )?(?:go )?(?:die|kill (?:your ?self|urself)|"
         r"hang (?:your ?self|urself)|drink bleach|get raped|be raped|be shot)\b|\b(?:go )?(?:kill|hang) (?:your ?self"
         r"|urself)\b|"
         r"\bkys\b|\bgo die\b",
         "wishing death or telling someone to kill themselves"),
    Rule(("violence", "illicit/violent"), 0.9,
         r"\b(?:i'?m going to|i am going to|i'?m gonna|i am gonna|i'?ll|i will|gonna|planning to|i plan to|i want to) "
         r"(?:shoot up|bomb|blow up|attack|set fire to|burn down) (?:the|my|your|our|this|a) "
         r"(?:school|office|workplace|church|mosque|synagogue|temple|mall|concert|class|campus|parade|hospital"
         r"|station)\b",
         "planned attacks on places"),
    Rule(("violence",), 0.85,
         r"\b(?:i (?:want|wanna|need|am going|'m going|m going|'m gonna|am gonna) to|i'?ll|i will|how (?:do|can|could"
         r"|would|should) i|"
         r"how to) (?:kill|murder|strangle|poison|stab|shoot|torture|dismember) (?:someone|somebody|a (?:person|human"
         r"|child|kid|"
         r"woman|man)|people|him|her|them|my (?:wife|husband|boss|neighbou?r|mom|mother|dad|father|brother|sister|ex|"
         r"teacher|coworker|co-worker|roommate|girlfriend|boyfriend|family|son|daughter|classmates?))\b(?! (?:in (?:a"
         r"|my) "
         r"(?:game|dream|novel|story)|with kindness))",
         "intent or how-to for killing a person — not 'kill a process'"),
    Rule(("violence", "illicit/violent"), 0.9,
         r"\bhow (?:to|do i|can i|could i) (?:kill|murder|poison|hurt) (?:someone|somebody|a person|him|her|my \w+) "
         r"(?:without|and not|and get away|and make it look)",
         "how to kill without getting caught"),
    # --- graphic violence ------------------------------------------------------------------------------
    Rule(("violence/graphic",), 0.8,
         r"\b(?:disembowel\w*|eviscerat\w*|dismember(?:ed|ing|s)?|decapitat\w*|flay(?:ed|ing)? alive|skinn?ed alive|"
         r"burn(?:ed|t) alive|gouged? out (?:his|her|their|its|your|my) eyes?)\b",
         "explicit mutilation"),
    Rule(("violence/graphic",), 0.8,
         r"\b(?:blood|guts|brains?|intestines|entrails|bowels|viscera|organs|brain matter|gore) (?:spill(?:ed|ing)|"
         r"splatter(?:ed|ing)|spray(?:ed|ing)|gush(?:ed|ing)|ooz(?:ed|ing)|pour(?:ed|ing) out|(?:were |was )?everywhere"
         r"|all over)\b"
         r"|\b(?:ripped|tore|torn|sliced|cut|hacked|slit) (?:open |out )?(?:his|her|their|its|your|the (?:victim'?s?"
         r"|man'?s?|"
         r"woman'?s?|body'?s?)) (?:throat|guts|intestines|entrails|belly|stomach|face|eyes|chest|skull"
         r"|tongue)\b(?! (?:out )?"
         r"(?:with (?:a|his|her) (?:comment|remark|joke|words))\b)"
         r"|\bskull (?:cracked|caved|split|smashed) (?:open|in)\b|\b(?:severed|decapitated|rotting|mangled|mutilated) "
         r"(?:heads?|limbs?|bod(?:y|ies)|corpses?|torsos?|fingers|hands)\b",
         "gore described: spilled organs, slit throats, mangled bodies"),
    # --- self-harm --------------------------------------------------------------------------------------
    Rule(("self-harm/intent", "self-harm"), 0.9,
         rf"\b{_I_INTEND} {_SELF_END}\b|\b{_I_WISH} {_WISH_END}\b",
         "first-person intent: 'i want to kill myself', 'i'm going to end my life', 'i want to die'"),
    Rule(("self-harm/intent", "self-harm"), 0.9,
         r"\b(?:i'?m|i am|i feel|i'?ve been|i have been|i keep feeling|feeling) (?:so |very |really |extremely |pretty "
         r"|"
         r"kind of |kinda |a bit |)?(?:suicidal|like (?:killing|ending|hurting) my ?self|like i (?:want|need) to die|"
         r"like dying|ready to die)\b"
         r"|\bi(?:'m| am) having (?:suicidal|self-harm) (?:thoughts|urges|ideation)\b"
         r"|\bi(?:'m| am|'ve been| have been| keep)? thinking (?:about|of) (?:killing my ?self|ending (?:my life"
         r"|it all)|"
         r"suicide|taking my (?:own )?life)\b"
         r"|\b(?:i have|i'?ve got|there'?s|i see|i have) no (?:reason|point|will) (?:to live|in living|to go on)\b"
         r"|\bi (?:have|'ve got|got) nothing (?:left )?to live for\b"
         r"|\b(?:everyone|everybody|my family|they|the world|people) (?:would be|will be|'d be|are|is) better off "
         r"(?:without me|if i (?:was|were) (?:dead|gone)|with me dead)\b"
         r"|\bi (?:don'?t|do not|dont) want to (?:live|be alive|exist|wake up)(?: anymore| any more)?\b"
         r"|\bi wish i (?:was|were) (?:dead|never born)\b|\bi wish i could (?:just )?(?:die|disappear)\b"
         r"|\b(?:i'?ve|i have) (?:written|wrote) (?:my|a) suicide note\b|\bgoodbye cruel world\b"
         r"|\bi (?:can'?t|cannot|cant) (?:go on|do this|take (?:it|this)|keep going) (?:any ?more|much longer)\b",
         "first-person suicidal ideation"),
    Rule(("self-harm",), 0.9,
         r"\bi(?:'ve| have)? (?:been |keep |started |start |am |'m |m |)(?:cutting|burning|hurting|harming|starving|"
         r"scratching|hitting|punishing) my ?self\b(?! (?:on|with|while|by accident|accidentally|shaving|cooking))"
         r"|\bi (?:cut|burn|hurt|harm|starve) my ?self (?:again|on purpose|every|to feel|when|because|so)\b"
         r"|\bi (?:relapsed|relapse) (?:on|into|with) self[- ]?harm\b|\bmy (?:fresh |new )?(?:self[- ]?harm )?"
         r"(?:cuts|scars) (?:are|from cutting)\b",
         "first-person self-harm behaviour — not 'i cut myself shaving'"),
    Rule(("self-harm/instructions", "self-harm"), 0.9,
         r"\bhow (?:many|much)(?: \w+){0,5} (?:to|would|will|do i need to|does it take to|should i take to|"
         r"is needed to|until i) (?:overdose|od|die|kill (?:me|my ?self|you|your ?self|a person|someone)|be (?:fatal"
         r"|lethal)|"
         r"never wake up|not wake up)\b",
         "overdose quantities: 'how many pills to overdose'"),
    Rule(("self-harm/instructions", "self-harm"), 0.9,
         r"\b(?:best|easiest|quickest|fastest|most painless|painless|surest|least painful|quick|easy|reliable|"
         r"effective) (?:way|method|ways|methods|place) (?:to|of|for) (?:kill(?:ing)? (?:my ?self|your ?self|oneself)|"
         r"d(?:ie|ying)(?! (?:laughing|in (?:a|the|this) (?:\w+ )?game))|commit(?:ting)? suicide|suicide"
         r"|end(?:ing)? (?:my|one'?s|your) (?:own )?life|"
         r"hang(?:ing)? (?:my ?self|your ?self)|overdos(?:e|ing)|slit(?:ting)? (?:my|your) wrists?|self[- ]?harm|"
         r"cut(?:ting)? (?:my ?self|your ?self))\b",
         "method shopping: 'best way to kill myself'"),
    Rule(("self-harm/instructions", "self-harm/intent", "self-harm"), 0.9,
         r"\bhow (?:do|can|should|would|could) i (?:kill my ?self|commit suicide|end my (?:own )?life|hang my ?self|"
         r"slit my wrists?|overdose|cut my ?self|hurt my ?self|take my (?:own )?life|od)\b"
         r"|\bhow to (?:kill (?:your ?self|oneself)|commit suicide|hang (?:your ?self|oneself)|slit (?:your|my"
         r"|one'?s) wrists?|"
         r"cut (?:your ?self|my ?self)(?: deep| deeper| without)|end (?:your|one'?s) (?:own )?life)\b"
         r"|\bhow (?:deep|hard) (?:do|should|can) i cut\b|\bhow to hide (?:my )?(?:self[- ]?harm|cuts|scars) from\b",
         "asking for self-harm instructions"),
    Rule(("self-harm/instructions",), 0.6,
         r"\b(?:lethal|fatal|deadly) (?:dose|amount|quantity) of\b",
         "lethal-dose questions (often curiosity, so below 'instructions' certainty)"),
    # --- sexual content involving minors ---------------------------------------------------------------
    Rule(("sexual/minors", "sexual"), 0.9,
         rf"\b{_SEXUAL}\b[^.!?]{{0,80}}?\b{_MINOR}\b|\b{_MINOR}\b[^.!?]{{0,80}}?\b{_SEXUAL}\b",
         "a sexual term and a minor term in the same sentence"),
    Rule(("sexual/minors", "sexual"), 0.95,
         r"\b(?:child|kiddie|kiddy|underage|teen|preteen|toddler) (?:porn\w*|sex|nudes?|erotica)\b|\bcsam\b"
         r"|\bjailbait\b"
         r"|\blolicon\b|\bpedo (?:porn|pics|videos)\b",
         "named categories of sexual material involving minors"),
    # --- hate: dehumanising or threatening statements about identity groups ----------------------------
    Rule(("hate/threatening", "hate", "violence"), 0.9,
         rf"\b{_GROUP_KILL} (?:all (?:the |of the |those |these )?|the |those |these |every |more )?{_GROUPS}\b"
         rf"(?! (?:in (?:a|the) game|jokes?))",
         "calls to kill a group: 'kill all the x', 'gas the x'"),
    Rule(("hate/threatening", "hate", "violence"), 0.9,
         rf"\b{_GROUPS} (?:should|must|need to|deserve to|ought to|have to|will|are going to|gotta) (?:all "
         rf"|just )?{_GROUP_DEATH}\b"
         rf"|\bdeath to (?:all |the )?{_GROUPS}\b|\bthe only good \w+ is a dead \w+\b"
         rf"|\b{_GROUPS} (?:don'?t|do not|dont) deserve to (?:live|exist)\b",
         "'x should all die', 'death to x', 'the only good x is a dead x'"),
    Rule(("hate",), 0.85,
         rf"\b{_GROUPS} (?:are|r|is) (?:all |just |nothing but |literally |basically |such |fucking |dirty "
         rf"|filthy )*{_DEHUMANISE}\b",
         "dehumanising generalisation: 'x are vermin'"),
    Rule(("hate",), 0.75,
         rf"\bi (?:hate|despise|can'?t stand|loathe) (?:all |those |these |the |fucking |filthy |dirty )*{_GROUPS}\b"
         rf"|\b{_GROUPS} (?:should|must|need to|ought to) (?:all )?(?:go back (?:to|where)|be deported|be banned|"
         rf"not be allowed to (?:vote|marry|work|live here|exist))\b"
         r"|\bwomen (?:belong in the kitchen|are (?:too )?(?:stupid|inferior|property|only good for))",
         "hostility or exclusion aimed at a group"),
    Rule(("hate/threatening", "hate", "violence"), 0.9,
         r"\b(?:kill|shoot|hang|lynch|burn|gas|stab|exterminate|beat) (?:that |the |those |these |all |every |some |a "
         r"|you )?"
         r"(?:fucking |dirty |filthy )?(?:niggers?|niggas?|kikes?|faggots?|fags?|spics?|chinks?|wetbacks?|gooks?|"
         r"dykes?|pakis?|beaners?|ragheads?|towelheads?|trann(?:y|ies)|coons?)\b",
         "a threat aimed at people called by a slur"),
    # --- weapons and drugs -------------------------------------------------------------------------------
    Rule(("illicit/violent", "illicit"), 0.9,
         rf"\b{_HOW}{_MAKE} (?:a |an |my own |your own |some |homemade |the )?{_EXPLOSIVE}\b",
         "weapon or explosive recipes: 'how do i make a pipe bomb' — not 'bath bomb' or 'bomb-sniffing dog'"),
    Rule(("illicit/violent", "illicit"), 0.85,
         r"\bwhere (?:can|do|could) i (?:buy|get|find) (?:an? )?(?:illegal |untraceable |unregistered |stolen )?"
         r"(?:guns?|firearms?|pistols?|rifles?|ak-?47s?|ar-?15s?|handguns?|weapons?|explosives?) "
         r"(?:without (?:a |any )?(?:background check|license|licence|id|paperwork|serial)|illegally|on the dark ?web|"
         r"off the books|with cash no questions)\b",
         "buying weapons around the law"),
    Rule(("illicit",), 0.85,
         rf"\b{_HOW}{_MAKE} (?:some |my own |homemade |pure )?{_DRUG}\b",
         "drug synthesis: 'how to make meth'"),
    Rule(("illicit",), 0.85,
         r"\b(?:buy|get|find|purchase|sell|use) (?:some )?(?:stolen|cloned|skimmed|hacked|dumped|fullz) "
         r"(?:credit cards?|debit cards?|cards?|card numbers|cc numbers|ccs?|accounts?|identities|passports"
         r"|bank logins?)\b"
         r"|\bwhere (?:can|do|could) i (?:buy|get|score|find) (?:some )?(?:cocaine|coke|heroin|meth|fentanyl|crack|"
         r"mdma|molly|ecstasy|lsd|drugs|pills|oxy|xanax)(?! prescription)\b"
         r"|\bhow (?:do i|to|can i|could i) (?:launder money|launder (?:the )?(?:cash|money|proceeds)|"
         r"hack (?:into )?(?:someone'?s|my (?:ex|wife|husband|girlfriend|boyfriend)'?s?|his|her|a stranger'?s) "
         r"(?:account|email|phone|instagram|facebook|snapchat|whatsapp|icloud|gmail|wifi|computer)|"
         r"steal (?:a car|someone'?s identity|an identity|credit cards?|a credit card|from (?:a|the) store|packages)|"
         r"hotwire (?:a|someone'?s) car|shoplift|make (?:fake|counterfeit) (?:ids?|money|bills|passports?|cash)|"
         r"counterfeit (?:money|bills|cash)|evade taxes|smuggle (?:drugs|guns|people|weapons)|"
         r"sell drugs|buy drugs (?:online|on the dark ?web)|get away with (?:shoplifting|stealing|fraud))\b",
         "stolen cards, buying drugs, laundering, account takeover, theft and forgery how-tos"),
    # --- harassment ------------------------------------------------------------------------------------
    Rule(("harassment",), 0.8,
         r"\b(?:you'?re|you are|ur|u r|you r|youre|you) (?!not |never |no )(?:such |so |a |an |the |fucking |total "
         r"|complete |"
         r"absolute |stupid |pathetic |worthless |dumb |ugly |fat |little |useless |disgusting |real |utter )*"
         r"(?:idiot|moron|loser|retard|imbecile|piece of (?:shit|garbage|trash|crap)|waste of (?:space|oxygen|air|skin)"
         r"|"
         r"bitch|cunt|whore|slut|skank|dumbass|asshole|dipshit|jackass|prick|dickhead|twat|wanker|scumbag|"
         r"failure|parasite|scum|freak|degenerate|subhuman|retarded|worthless|pathetic|disgusting|ugly|stupid|"
         r"dumb|useless|trash|garbage|pig|cow|clown)s?\b(?! (?:to|at|for|mistake|question|decision|idea)\b)",
         "second-person insults: 'you're a worthless piece of shit'"),
    Rule(("harassment",), 0.7,
         r"\b(?:go )?f(?:uc)?k (?:you|u|yourself|urself|off)\b|\bshut (?:the fuck |the hell "
         r"|your (?:fucking )?mouth )?up,? "
         r"(?:you|u) \w+|\bnobody (?:likes|loves|cares about|wants) (?:you|u)\b|\bno one (?:likes|loves"
         r"|cares about) (?:you|u)\b"
         r"|\byou (?:should be|ought to be) ashamed of (?:your ?self|existing)\b|\bugly (?:bitch|cunt|whore|slut"
         r"|pig)\b",
         "abuse aimed at the reader"),
)


class PhraseRuleClassifier:
    """The ``RULES`` table over the normalised text: each matching rule scores its categories; the highest
    score per category wins. Thread-safe (compiled patterns are immutable)."""

    name = "rules"

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        for r in rules:
            for c in r.categories:
                if c not in CATEGORIES:
                    raise ValueError(f"rule {r.comment!r}: unknown category {c!r}")
        self.rules = rules
        self._compiled = [(r, re.compile(r.pattern)) for r in rules]

    def matches(self, text: str) -> list[tuple[Rule, str]]:
        """The rules that match ``text``, each with the normalised text it matched."""
        norm = normalize_text(text)
        out = []
        for rule, pattern in self._compiled:
            m = pattern.search(norm)
            if m is not None:
                out.append((rule, m.group()))
        return out

    def scores(self, text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for rule, _ in self.matches(text):
            for c in rule.categories:
                out[c] = max(out.get(c, 0.0), rule.score)
        return out


def default_text_classifiers() -> list[TextClassifier]:
    """The default tiers: word list, hatesonar, phrase rules (blocked terms are per policy)."""
    return [WordListClassifier(), SonarClassifier(), PhraseRuleClassifier()]


@functools.cache
def shared_text_tiers() -> tuple[TextClassifier, ...]:
    """The default tiers, built once per process: the stream gate and every moderation model share them
    (they are thread-safe)."""
    return tuple(default_text_classifiers())


@functools.cache
def shared_semantic() -> SemanticClassifier:
    """The semantic tier (``moderation.semantic``), built once per process."""
    from genserve.app.moderation.semantic import SemanticClassifier

    return SemanticClassifier()


@functools.cache
def shared_input_tiers() -> tuple[TextClassifier, ...]:
    """The fast tiers and the semantic one: what checks inputs."""
    return (*shared_text_tiers(), shared_semantic())
