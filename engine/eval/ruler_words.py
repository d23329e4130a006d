"""The words and text of the RULER tasks, built in code (RULER itself downloads them).

- ``key_words()``: the needle keys of the niah tasks, "adjective-noun" pairs (RULER: wonderwords'
  adjective x noun lists), here from the adjectives and nouns below (218 x 292 = 63,656 keys).
- ``plain_words()``: the words of cwe (RULER: wonderwords' nouns + adjectives + verbs, ~3,300 of them),
  here the same three lists (621 distinct words). A cwe prompt that needs more distinct words than that draws from
  ``coined_words`` instead (RULER falls back to a list of ~1M random English words).
- ``essay_words(n)``: the first n words of a fixed essay-like text, the "essay" haystack when no
  ``--haystack FILE`` is given (RULER: Paul Graham's essays). Sentences are made from the same lists
  with a fixed seed; they hold no digits and no hyphens, so no needle value or key can appear in them.
"""
from __future__ import annotations

import functools
from itertools import product

import numpy as np

ADJECTIVES = tuple("""
able abundant acid active actual adorable afraid agile alert alive ancient angry anxious arctic aromatic
ashamed awake basic bitter blank bold brave breezy brief bright brisk broad broken bumpy busy calm capable
careful casual cheap chilly civil clean clever close cloudy clumsy coastal cold common cool cosmic costly
cozy crisp crooked cruel curious curly damp dark dear deep dense direct dizzy dry dull dusty eager early
easy elastic elegant empty endless equal exact faint fair false famous fancy fast fierce final firm flat
fluffy fond formal fragile free fresh friendly frozen funny gentle giant glad global golden graceful grand
green gray hairy handy happy hard harsh heavy hidden high hollow honest huge humble hungry icy idle
immense jolly juicy keen kind large late lazy legal light little lively local lonely long loud lovely low
loyal lucky major messy mild minor modern moist narrow nasty neat nervous noble noisy normal odd
old open orange plain polite poor proud purple quick quiet rapid rare raw ready real rich rigid ripe
rough round royal rural rusty sad safe salty scarlet secret sharp shiny short shy silent silly simple
sleepy slim slow small smooth soft solid sour spicy steady steep sticky stormy strange strict strong
sunny super sweet swift tall tame tender thick thin tidy tiny tough tricky urban useful vague vast
""".split())

NOUNS = tuple("""
acorn actor airport album alley anchor angle ankle apple apron arch arrow artist atlas attic avenue
badge bakery balcony ballet banana band banker barn barrel basket beach beacon bean beard bee bell bench
berry bicycle bird blanket blossom boat bonnet book boot bottle boulder bowl branch bread brick bridge
brook broom brush bucket buffalo bugle cabin cactus cake camel camera candle canoe canyon captain carpet
carrot castle cattle cave cellar chair chalk channel chapel cheese cherry chimney circle citizen city
cliff clock closet cloud coach coast coat coffee coin comet compass cookie copper corner cottage cotton
council county cousin crab cradle crayon creek crown cup curtain cushion daisy dancer deer desert desk
diamond dinner doctor dolphin donkey door dragon drawer dream drum eagle earth engine envelope fabric
falcon farm feather fence ferry field finger fire fish flag flute fog forest fork fountain fox frog
garden garlic gate giraffe glacier glove goat grape grass guitar hammer harbor harvest hat hawk helmet
hill honey horse hotel island jacket jelly jewel kettle kitten ladder lake lamp lantern lemon letter
library lily lion lizard lobster lodge magnet mango map marble market meadow melon mirror monkey moon
mountain mouse museum needle nest noodle ocean office olive onion orchard otter owl oyster paddle palace
panda parrot pasta peach pearl pebble pencil pepper piano pillow pilot pine planet plum pocket pond
potato pumpkin puppy quilt rabbit radio rainbow raven ribbon river robin rocket saddle sailor salmon
sand scarf school shadow sheep shell ship shovel singer sled snail soup sparrow spider spoon squirrel
stable stamp statue stone storm stove stream street sugar summit swan table teapot tent thunder tiger
toast tomato tower tractor train tree trumpet tulip tunnel turtle umbrella valley vase violin wagon
walnut whale wheel window wizard wolf
""".split())

VERBS = tuple("""
accept admire allow answer arrange arrive bake balance believe borrow bounce build burn carry chase
check cheer collect count cover crawl cross dance deliver describe divide drift earn enjoy escape explain
fetch fill float fold follow gather guard guide hammer hope hover hunt imagine invent join juggle kneel
knock laugh learn lift listen march measure melt mend move notice offer open paint pause plant polish
pour praise pull push question reach relax remember repair rescue return rush scatter search settle
shiver sign skip smile sneeze solve sort spark spell spill squeeze stir stretch suggest supply support
surround switch tame taste thank travel trust tumble visit wander warm wash watch whisper wink wonder
wrap yawn
""".split())

# essay-like sentences: {a} adjective, {n} noun, {v} verb (base form)
_SENTENCES = (
    "The {a} {n} would {v} the {n} before the {a} {n} could {v}.",
    "Most people {v} a {n} only when the {n} is {a}.",
    "If you {v} the {n}, the {a} {n} will {v} as well.",
    "A {a} {n} rarely tries to {v} anything that is {a}.",
    "We learned to {v} the {n} long after the {n} had become {a}.",
    "Nobody expected the {n} to {v} so quickly, yet it did.",
    "Every {n} has a {a} side, and every {n} has a reason to {v}.",
    "In the end, the {a} {n} and the {a} {n} both chose to {v}.",
    "It is easier to {v} a {a} {n} than to {v} a {n}.",
    "That is why the {n} near the {n} seemed so {a}.",
)
_ESSAY_SEED = 20240101
_ESSAY_BLOCK = 4096  # sentences generated per extension of the cached essay


@functools.cache
def key_words() -> tuple[str, ...]:
    """Sorted 'adjective-noun' needle keys."""
    return tuple(sorted(f"{a}-{n}" for a, n in product(ADJECTIVES, NOUNS)))


@functools.cache
def plain_words() -> tuple[str, ...]:
    """Sorted distinct nouns, adjectives and verbs."""
    return tuple(sorted(set(ADJECTIVES + NOUNS + VERBS)))


def coined_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct pronounceable made-up words of three consonant-vowel syllables (e.g. 'tobaki'),
    none a part of another (all have six letters); up to 15^3 * 5^3 = 421,875 of them."""
    consonants, vowels = "bdfghklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    total = len(syllables) ** 3
    if n > total:
        raise ValueError(f"at most {total} coined words, {n} asked")
    picks = rng.choice(total, size=n, replace=False)
    s = len(syllables)
    return [syllables[i // (s * s)] + syllables[(i // s) % s] + syllables[i % s] for i in picks]


@functools.cache
def _essay_block(index: int) -> tuple[str, ...]:
    """Block `index` of the essay: _ESSAY_BLOCK sentences as a tuple of words (a fixed seed per block)."""
    rng = np.random.default_rng([_ESSAY_SEED, index])
    pools = {"a": ADJECTIVES, "n": NOUNS, "v": VERBS}
    words: list[str] = []
    for template in rng.choice(len(_SENTENCES), size=_ESSAY_BLOCK):
        parts = []
        for piece in _SENTENCES[template].split(" "):
            for slot, pool in pools.items():
                marker = "{" + slot + "}"
                while marker in piece:
                    piece = piece.replace(marker, pool[rng.integers(len(pool))], 1)
            parts.append(piece)
        words.extend(parts)
    return tuple(words)


def essay_words(n: int) -> list[str]:
    """The first n words of the generated essay (always the same text)."""
    words: list[str] = []
    index = 0
    while len(words) < n:
        words.extend(_essay_block(index))
        index += 1
    return words[:n]
