"""Data augmentation for low-data tasks: EDA and paraphrasing with the model itself.

EDA (Wei & Zou, 2019, "Easy Data Augmentation") makes a noisy copy of a text with one of
four word operations: synonym replacement, random insertion of a synonym, random swap,
random deletion. Synonyms come from :data:`SYNONYMS` (a small hand-written list of common
English words) or from the model's own input-embedding neighbours
(:func:`embedding_synonyms`: cosine similarity between whole-word tokens; note that
embedding neighbours can be antonyms, "good" ~ "bad"). Paraphrasing asks the loaded LLM
for "Paraphrase: ..." with seeded sampling.

Only training rows are augmented: :func:`augment_rows` takes a single list, the training
split, and peftlab's data preparation calls it after splitting and after the leakage check
(peftlab.tasks.sft.prepare_sft_data), so no validation row and nothing derived from one is
ever modified or copied. By default only the prompt side is changed (instruction, input,
user turns): noisy *answers* would teach the model to write noisy text.

Everything is seeded (``random.Random(seed)``; sampling under a forked torch RNG), so the
same seed gives the same rows.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from peftlab.config import AugmentConfig

# A small synonym list of common English words (written for peftlab).
SYNONYMS: dict[str, list[str]] = {
    # adjectives
    "good": ["fine", "great", "nice", "decent"],
    "bad": ["poor", "awful", "terrible"],
    "big": ["large", "huge", "sizable"],
    "small": ["little", "tiny", "minor"],
    "large": ["big", "huge", "vast"],
    "little": ["small", "tiny", "slight"],
    "fast": ["quick", "rapid", "speedy"],
    "quick": ["fast", "rapid", "swift"],
    "slow": ["sluggish", "unhurried", "gradual"],
    "happy": ["glad", "cheerful", "pleased"],
    "sad": ["unhappy", "sorrowful", "gloomy"],
    "easy": ["simple", "effortless", "straightforward"],
    "simple": ["easy", "plain", "basic"],
    "hard": ["difficult", "tough", "demanding"],
    "difficult": ["hard", "tough", "challenging"],
    "important": ["significant", "crucial", "essential"],
    "new": ["fresh", "recent", "novel"],
    "old": ["aged", "ancient", "former"],
    "beautiful": ["lovely", "pretty", "attractive"],
    "ugly": ["unattractive", "unsightly", "hideous"],
    "smart": ["clever", "intelligent", "bright"],
    "clever": ["smart", "bright", "shrewd"],
    "strong": ["powerful", "sturdy", "robust"],
    "weak": ["feeble", "frail", "fragile"],
    "rich": ["wealthy", "affluent", "prosperous"],
    "poor": ["needy", "impoverished", "deprived"],
    "angry": ["mad", "furious", "irritated"],
    "calm": ["peaceful", "quiet", "serene"],
    "quiet": ["silent", "calm", "hushed"],
    "loud": ["noisy", "booming", "deafening"],
    "clean": ["spotless", "tidy", "neat"],
    "dirty": ["filthy", "grimy", "unclean"],
    "cheap": ["inexpensive", "affordable", "economical"],
    "expensive": ["costly", "pricey", "dear"],
    "correct": ["right", "accurate", "exact"],
    "wrong": ["incorrect", "mistaken", "false"],
    "true": ["correct", "accurate", "factual"],
    "great": ["excellent", "superb", "wonderful"],
    "excellent": ["superb", "outstanding", "great"],
    "terrible": ["awful", "dreadful", "horrible"],
    "awful": ["terrible", "dreadful", "horrible"],
    "interesting": ["fascinating", "engaging", "intriguing"],
    "boring": ["dull", "tedious", "monotonous"],
    "funny": ["amusing", "humorous", "comical"],
    "strange": ["odd", "unusual", "peculiar"],
    "common": ["usual", "ordinary", "frequent"],
    "rare": ["uncommon", "unusual", "scarce"],
    "brief": ["short", "concise", "succinct"],
    "short": ["brief", "concise", "compact"],
    "long": ["lengthy", "extended", "prolonged"],
    "main": ["primary", "chief", "principal"],
    "whole": ["entire", "complete", "full"],
    "entire": ["whole", "complete", "total"],
    "clear": ["plain", "obvious", "evident"],
    "possible": ["feasible", "achievable", "viable"],
    "useful": ["helpful", "handy", "valuable"],
    "helpful": ["useful", "beneficial", "supportive"],
    "safe": ["secure", "protected", "harmless"],
    "dangerous": ["risky", "hazardous", "unsafe"],
    "famous": ["well-known", "renowned", "celebrated"],
    "friendly": ["kind", "warm", "amiable"],
    "kind": ["caring", "gentle", "friendly"],
    "polite": ["courteous", "respectful", "civil"],
    "rude": ["impolite", "disrespectful", "discourteous"],
    "busy": ["occupied", "engaged", "active"],
    "tired": ["weary", "exhausted", "sleepy"],
    "hungry": ["starving", "famished", "ravenous"],
    "cold": ["chilly", "cool", "freezing"],
    "hot": ["warm", "heated", "scorching"],
    "wet": ["damp", "moist", "soaked"],
    "dry": ["arid", "parched", "dehydrated"],
    "bright": ["shiny", "brilliant", "vivid"],
    "dark": ["dim", "gloomy", "shadowy"],
    "various": ["several", "diverse", "assorted"],
    "similar": ["alike", "comparable", "akin"],
    "different": ["distinct", "dissimilar", "unlike"],
    # verbs
    "make": ["create", "produce", "build"],
    "create": ["make", "produce", "generate"],
    "build": ["construct", "make", "assemble"],
    "get": ["obtain", "acquire", "receive"],
    "give": ["provide", "offer", "supply"],
    "provide": ["give", "supply", "offer"],
    "show": ["display", "present", "reveal"],
    "explain": ["describe", "clarify", "illustrate"],
    "describe": ["explain", "portray", "depict"],
    "tell": ["inform", "notify", "say"],
    "say": ["state", "mention", "remark"],
    "ask": ["inquire", "request", "query"],
    "answer": ["reply", "respond", "response"],
    "help": ["assist", "aid", "support"],
    "use": ["employ", "apply", "utilize"],
    "find": ["discover", "locate", "identify"],
    "write": ["compose", "draft", "pen"],
    "begin": ["start", "commence", "initiate"],
    "start": ["begin", "commence", "launch"],
    "end": ["finish", "conclude", "stop"],
    "finish": ["complete", "end", "conclude"],
    "stop": ["halt", "cease", "end"],
    "buy": ["purchase", "acquire", "obtain"],
    "choose": ["select", "pick", "opt"],
    "keep": ["retain", "hold", "maintain"],
    "change": ["alter", "modify", "adjust"],
    "improve": ["enhance", "better", "refine"],
    "increase": ["raise", "boost", "expand"],
    "reduce": ["decrease", "lower", "cut"],
    "think": ["believe", "consider", "suppose"],
    "know": ["understand", "realize", "recognize"],
    "understand": ["comprehend", "grasp", "follow"],
    "want": ["desire", "wish", "need"],
    "need": ["require", "want", "lack"],
    "like": ["enjoy", "appreciate", "love"],
    "love": ["adore", "cherish", "enjoy"],
    "hate": ["detest", "loathe", "dislike"],
    "try": ["attempt", "endeavor", "seek"],
    "look": ["glance", "gaze", "peer"],
    "see": ["observe", "notice", "view"],
    "walk": ["stroll", "stride", "march"],
    "run": ["sprint", "dash", "race"],
    "talk": ["speak", "chat", "converse"],
    "speak": ["talk", "converse", "communicate"],
    "list": ["enumerate", "itemize", "name"],
    "summarize": ["sum up", "condense", "outline"],
    "translate": ["convert", "render", "interpret"],
    "classify": ["categorize", "sort", "group"],
    "identify": ["recognize", "determine", "spot"],
    "suggest": ["propose", "recommend", "advise"],
    "allow": ["permit", "let", "enable"],
    "fix": ["repair", "mend", "correct"],
    "leave": ["depart", "exit", "go"],
    "arrive": ["come", "reach", "appear"],
    "move": ["shift", "transfer", "relocate"],
    # nouns
    "car": ["automobile", "vehicle", "auto"],
    "house": ["home", "residence", "dwelling"],
    "home": ["house", "residence", "dwelling"],
    "job": ["work", "occupation", "position"],
    "work": ["labor", "job", "task"],
    "task": ["job", "assignment", "duty"],
    "problem": ["issue", "difficulty", "trouble"],
    "issue": ["problem", "matter", "concern"],
    "idea": ["notion", "concept", "thought"],
    "way": ["method", "manner", "approach"],
    "method": ["approach", "technique", "way"],
    "result": ["outcome", "consequence", "effect"],
    "example": ["instance", "sample", "case"],
    "story": ["tale", "narrative", "account"],
    "text": ["passage", "writing", "content"],
    "sentence": ["statement", "phrase", "line"],
    "question": ["query", "inquiry", "problem"],
    "reason": ["cause", "motive", "basis"],
    "people": ["persons", "individuals", "folks"],
    "person": ["individual", "human", "someone"],
    "child": ["kid", "youngster", "youth"],
    "friend": ["companion", "pal", "buddy"],
    "city": ["town", "metropolis", "municipality"],
    "country": ["nation", "state", "land"],
    "world": ["globe", "earth", "planet"],
    "money": ["cash", "funds", "currency"],
    "food": ["meal", "cuisine", "nourishment"],
    "movie": ["film", "picture", "motion picture"],
    "film": ["movie", "picture", "motion picture"],
    "book": ["volume", "publication", "text"],
    "company": ["firm", "business", "corporation"],
    "time": ["moment", "period", "while"],
    "place": ["location", "spot", "site"],
    "part": ["portion", "piece", "section"],
    "plan": ["scheme", "strategy", "proposal"],
    "goal": ["aim", "objective", "target"],
    "error": ["mistake", "fault", "bug"],
    "mistake": ["error", "blunder", "slip"],
    "topic": ["subject", "theme", "matter"],
    "information": ["data", "details", "facts"],
    # adverbs
    "quickly": ["rapidly", "swiftly", "fast"],
    "slowly": ["gradually", "leisurely", "unhurriedly"],
    "very": ["really", "extremely", "highly"],
    "really": ["truly", "very", "genuinely"],
    "often": ["frequently", "regularly", "commonly"],
    "usually": ["typically", "generally", "normally"],
    "always": ["constantly", "forever", "invariably"],
    "also": ["too", "additionally", "likewise"],
    "completely": ["entirely", "totally", "fully"],
    "carefully": ["cautiously", "attentively", "thoroughly"],
    "briefly": ["concisely", "shortly", "succinctly"],
    "almost": ["nearly", "practically", "virtually"],
    "mostly": ["largely", "mainly", "chiefly"],
}

_STRIP = ".,;:!?\"'()[]{}"
_WORD = re.compile(r"^[A-Za-z][A-Za-z-]*$")


# ----------------------------------------------------------------------------- EDA


def eda(text: str, rng: random.Random, alpha: float = 0.1,
        synonyms: dict[str, list[str]] | None = None, operation: str | None = None) -> str:
    """One EDA copy of ``text``: ``operation`` (sr | ri | rs | rd) or a random one.

    ``n = max(1, round(alpha * words))`` words are replaced / inserted / swapped, or each
    word is deleted with probability ``alpha`` (at least one word is kept).
    Whitespace-split words keep their punctuation and capitalisation.
    """
    synonyms = SYNONYMS if synonyms is None else synonyms
    words = text.split()
    if not words:
        return text
    op = operation or rng.choice(("sr", "ri", "rs", "rd"))
    n = max(1, round(alpha * len(words)))
    if op == "sr":
        return " ".join(synonym_replacement(words, n, rng, synonyms))
    if op == "ri":
        return " ".join(random_insertion(words, n, rng, synonyms))
    if op == "rs":
        return " ".join(random_swap(words, n, rng))
    if op == "rd":
        return " ".join(random_deletion(words, alpha, rng))
    raise ValueError(f"unknown EDA operation {op!r} (sr, ri, rs, rd)")


def synonym_replacement(words: list[str], n: int, rng: random.Random,
                        synonyms: dict[str, list[str]]) -> list[str]:
    """Replace up to ``n`` distinct words that have synonyms (every occurrence)."""
    out = list(words)
    candidates = sorted({_core(w)[1].lower() for w in words} & set(synonyms))
    rng.shuffle(candidates)
    for key in candidates[:n]:
        choice = rng.choice(synonyms[key])
        out = [_replace(w, choice) if _core(w)[1].lower() == key else w for w in out]
    return out


def random_insertion(words: list[str], n: int, rng: random.Random,
                     synonyms: dict[str, list[str]]) -> list[str]:
    """Insert a synonym of a random word at a random position, ``n`` times."""
    out = list(words)
    keys = [_core(w)[1].lower() for w in words if _core(w)[1].lower() in synonyms]
    if not keys:
        return out
    for _ in range(n):
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms[rng.choice(keys)]))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``p``; keep one random word if all would go."""
    if len(words) == 1:
        return list(words)
    out = [w for w in words if rng.random() >= p]
    return out or [rng.choice(words)]


def _core(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation)."""
    core = word.strip(_STRIP)
    if not core:
        return word, "", ""
    start = word.index(core)
    return word[:start], core, word[start + len(core):]


def _replace(word: str, new: str) -> str:
    lead, core, trail = _core(word)
    if core[:1].isupper():
        new = new[:1].upper() + new[1:]
    return lead + new + trail


# ----------------------------------------------------------------------------- embeddings


def whole_word_tokens(tokenizer: Any) -> dict[str, int]:
    """Lower-cased word -> token id, for tokens that are one whole word with its leading
    space marker (byte-level BPE ``Ġword``, SentencePiece ``▁word``), letters only, >= 3."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words: dict[str, int] = {}
    for token, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tid in special or token[:1] not in ("Ġ", "▁"):
            continue
        word = token[1:]
        if len(word) >= 3 and word.isascii() and word.isalpha():
            words.setdefault(word.lower(), tid)
    return words


@torch.no_grad()
def embedding_synonyms(model: torch.nn.Module, tokenizer: Any, words: Iterable[str],
                       k: int = 3, min_similarity: float = 0.3) -> dict[str, list[str]]:
    """Synonyms for ``words`` from the model's input embeddings: the ``k`` whole-word
    tokens with the highest cosine similarity (>= ``min_similarity``), the word excluded."""
    vocab = whole_word_tokens(tokenizer)
    wanted = sorted({w.lower() for w in words if w.lower() in vocab})
    if not wanted:
        return {}
    names = sorted(vocab)
    table = model.get_input_embeddings().weight.detach().float()
    cand = torch.nn.functional.normalize(table[[vocab[w] for w in names]], dim=-1)
    index = {w: i for i, w in enumerate(names)}
    out: dict[str, list[str]] = {}
    for start in range(0, len(wanted), 256):
        chunk = wanted[start:start + 256]
        sims = cand[[index[w] for w in chunk]] @ cand.T
        top = sims.topk(min(k + 1, len(names)), dim=-1)
        for w, values, ids in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            near = [names[i] for v, i in zip(values, ids, strict=True)
                    if names[i] != w and v >= min_similarity][:k]
            if near:
                out[w] = near
    return out


# ----------------------------------------------------------------------------- paraphrase


# Sampled chat replies to a list of conversations. The caller binds the model and sampling
# settings (peftlab.evaluation.generate.generate_replies): data preparation sits below the
# generation code and never imports it.
Replier = Callable[[list[list[dict[str, str]]]], list[str]]


def paraphrase(texts: list[str], reply: Replier, seed: int) -> list[str]:
    """The sampled reply to "Paraphrase: <text>" for each text ("" if it failed).

    Sampling runs under a forked torch RNG seeded with ``seed``: same inputs, same seed,
    same paraphrases, and the caller's RNG state is left alone.
    """
    conversations = [[{"role": "user", "content": f"Paraphrase: {t}"}] for t in texts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        replies = reply(conversations)
    return [_clean_reply(r) for r in replies]


def _clean_reply(reply: str) -> str:
    reply = reply.strip()
    if reply.lower().startswith("paraphrase:"):
        reply = reply[len("paraphrase:"):].strip()
    if len(reply) >= 2 and reply[0] == reply[-1] and reply[0] in "\"'":
        reply = reply[1:-1].strip()
    return reply


# ----------------------------------------------------------------------------- rows


def augment_rows(
    train_rows: list[dict[str, Any]],
    cfg: AugmentConfig,
    seed: int,
    fields: list[str],
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    reply: Replier | None = None,
) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    """New rows made from the *training* rows: ``cfg.copies`` per row, changed in ``fields``.

    A field holding a string is augmented as text; a field holding a list of chat messages
    (or such a list as a JSON string) has its user turns augmented. Returns the new rows
    (the caller appends them to the training rows), the index of each one's source row,
    and a report. A copy identical to its source is dropped and counted as ``unchanged``.
    """
    rng = random.Random(f"peftlab-augment:{seed}")
    if cfg.method == "none":
        return [], [], {"method": "none", "rows_in": len(train_rows), "rows_added": 0}
    if cfg.method == "paraphrase":
        if reply is None:
            raise ValueError("data.augment.method 'paraphrase' needs a replier (the model's "
                             "sampled replies)")
        rewrite = _paraphraser(train_rows, fields, cfg, seed, reply)
    elif cfg.method == "eda":
        synonyms = SYNONYMS
        if cfg.synonyms == "embedding":
            if model is None or tokenizer is None:
                raise ValueError("data.augment.synonyms 'embedding' needs the model and tokenizer")
            words = {_core(w)[1] for text in _texts(train_rows, fields) for w in text.split()}
            synonyms = embedding_synonyms(model, tokenizer, (w for w in words if _WORD.match(w)))
        def rewrite(text: str) -> str:
            return eda(text, rng, cfg.alpha, synonyms)
    else:
        raise ValueError(f"data.augment.method: unknown method {cfg.method!r}")

    new_rows: list[dict[str, Any]] = []
    sources: list[int] = []
    unchanged = 0
    for _copy in range(cfg.copies):
        for i, row in enumerate(train_rows):
            new = _map_fields(row, fields, rewrite)
            if new == row:
                unchanged += 1
                continue
            new_rows.append(new)
            sources.append(i)
    report = {"method": cfg.method, "rows_in": len(train_rows), "copies": cfg.copies,
              "rows_added": len(new_rows), "unchanged": unchanged, "fields": list(fields)}
    if cfg.method == "eda":
        report["synonyms"] = cfg.synonyms
        if cfg.synonyms == "embedding":
            report["synonym_words"] = len(synonyms)
    return new_rows, sources, report


def _paraphraser(rows: list[dict[str, Any]], fields: list[str], cfg: AugmentConfig, seed: int,
                 reply: Replier) -> Callable[[str], str]:
    """Paraphrase every text (for every copy) in one batched, seeded generation call;
    the returned function hands them out in the order :func:`augment_rows` asks for them."""
    texts = [t for _ in range(cfg.copies) for t in _texts(rows, fields)]
    replies = iter(paraphrase(texts, reply, seed))

    def rewrite(text: str) -> str:
        reply = next(replies)
        return reply if reply else text

    return rewrite


def _texts(rows: list[dict[str, Any]], fields: list[str]) -> list[str]:
    """The non-empty texts :func:`_map_fields` would rewrite, in the same order."""
    found: list[str] = []

    def collect(text: str) -> str:
        found.append(text)
        return text

    for row in rows:
        _map_fields(row, fields, collect)
    return found


def _map_fields(row: dict[str, Any], fields: list[str], fn: Callable[[str], str]) -> dict[str, Any]:
    new = copy.deepcopy(row)
    for name in fields:
        value = new.get(name)
        if isinstance(value, str) and value.strip():
            messages = _json_messages(value)
            if messages is None:
                new[name] = fn(value)
            else:
                mapped = _map_messages(messages, fn)
                new[name] = value if mapped == messages else mapped
        elif isinstance(value, list):
            new[name] = _map_messages(value, fn)
    return new


def _map_messages(messages: list[Any], fn: Callable[[str], str]) -> list[Any]:
    out = []
    for m in messages:
        if (isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
                and m["content"].strip()):
            m = {**m, "content": fn(m["content"])}
        out.append(m)
    return out


def _json_messages(value: str) -> list[Any] | None:
    """A chat conversation stored as a JSON string (CSV cells), else None."""
    if not value.lstrip().startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
        return parsed
    return None
