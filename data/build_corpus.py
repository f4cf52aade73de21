"""Build the bundled corpus ``data/corpus/bundled.txt`` deterministically.

``python -m data.build_corpus`` regenerates the committed file byte for byte. The
corpus is synthetic so it ships without a download and without licence questions:

- about half its documents are short English-like passages from a small
  probabilistic grammar (characters, places, times, actions, weather, a moral), so
  a language model has grammar and a lexicon of a few hundred words to learn but
  cannot memorise the random choices (the loss falls fast, never to ~0);
- the rest are question / worked-solution pairs from :mod:`data.tasks`
  (arithmetic, linear equations, string puzzles, small Python programs), the same
  families the RL stage later rewards.

Documents are separated by one blank line and contain no blank line themselves.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from data import tasks

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILE = CORPUS_DIR / "bundled.txt"
DOC_SEPARATOR = "\n\n"

NAMES = "Ada Ben Clara Dev Elena Farid Greta Hugo Iris Jonas Kira Leo Maya Nils Omar Priya Quinn Rosa Sami Tara".split()
ROLES = (
    "old fisherman", "young baker", "tired doctor", "curious student", "quiet farmer", "clever engineer",
    "kind teacher", "brave sailor", "patient gardener", "busy merchant", "retired soldier", "small child",
)
PLACES = (
    "the harbor", "the market", "a mountain village", "the library", "the old mill", "a narrow valley",
    "the train station", "the riverbank", "a crowded city", "the forest edge", "the school yard", "a quiet island",
)
TIMES = ("Early one morning", "Late in the evening", "On a cold winter day", "At noon", "One rainy afternoon",
         "In the spring", "Just before sunset", "On a bright summer day", "After the storm", "Long ago")
WEATHER = ("the wind was strong", "the sky was grey", "the sun was warm", "snow covered the roofs",
           "rain tapped on the windows", "a thick fog hid the hills", "the air smelled of salt")
ACTIONS = (
    ("found", "a {adj} {thing}"), ("lost", "a {adj} {thing}"), ("repaired", "the {adj} {thing}"),
    ("sold", "three {adj} {things}"), ("painted", "the {adj} {thing}"), ("carried", "a heavy {thing}"),
    ("counted", "{n} {things}"), ("planted", "{n} {adj} {things}"), ("wrote a letter about", "the {thing}"),
    ("built", "a {adj} {thing}"), ("measured", "the {adj} {thing}"), ("gave away", "{n} {things}"),
)
ADJECTIVES = ("small", "broken", "golden", "wooden", "shiny", "ancient", "strange", "green", "heavy", "tiny", "blue", "warm")
THINGS = ("lamp", "boat", "clock", "basket", "map", "bridge", "fence", "kettle", "bell", "chair", "wheel", "coin")
FEELINGS = ("happy", "worried", "surprised", "proud", "calm", "tired", "hopeful", "puzzled")
CONNECTIVES = ("Then", "After that", "Later", "Soon", "Meanwhile", "Because of this", "Still", "Finally")
MORALS = (
    "Small steps add up to long journeys.", "A kind word costs nothing.", "Patience often wins where speed fails.",
    "Curiosity opens many doors.", "Work shared is work halved.", "Every problem has a first step.",
)


def _character(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.6 else f"the {rng.choice(ROLES)}"


def _action(rng: random.Random) -> str:
    verb, obj = rng.choice(ACTIONS)
    thing = rng.choice(THINGS)
    return f"{verb} " + obj.format(adj=rng.choice(ADJECTIVES), thing=thing, things=thing + "s", n=rng.randint(2, 99))


def passage(rng: random.Random) -> str:
    """A short story: setting, 2-5 events with connectives, a feeling and sometimes a moral."""
    hero = _character(rng)
    friend = _character(rng)
    while friend == hero:
        friend = _character(rng)
    sentences = [f"{rng.choice(TIMES)}, {hero} went to {rng.choice(PLACES)}, and {rng.choice(WEATHER)}."]
    for _ in range(rng.randint(2, 5)):
        who = rng.choice([hero, friend, "they"])
        sentences.append(f"{rng.choice(CONNECTIVES)}, {who} {_action(rng)} near {rng.choice(PLACES)}.")
    sentences.append(f"{hero[0].upper() + hero[1:]} felt {rng.choice(FEELINGS)} and told {friend} about it.")
    if rng.random() < 0.4:
        sentences.append(rng.choice(MORALS))
    text = " ".join(sentences)
    return text[0].upper() + text[1:]


def task_document(problem: tasks.Problem) -> str:
    return f"Question: {problem.prompt.strip()}\nSolution: {problem.solution}"


def build_corpus(num_docs: int = 1800, seed: int = 2024) -> str:
    """The corpus text: ``num_docs`` documents, alternating passages and worked tasks."""
    rng = random.Random(seed)
    families = list(tasks.GENERATORS)
    docs = []
    for i in range(num_docs):
        if i % 2 == 0:
            docs.append(passage(rng))
        else:
            family = families[(i // 2) % len(families)]
            docs.append(task_document(tasks.GENERATORS[family](rng, rng.randint(1, 5))))
    return DOC_SEPARATOR.join(d.replace("\n\n", "\n") for d in docs) + "\n"


def read_documents(path: Path = CORPUS_FILE) -> list:
    """Documents of a corpus file written by :func:`build_corpus` (blank-line separated)."""
    return [d.strip("\n") for d in path.read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--output", default=str(CORPUS_FILE))
    args = parser.parse_args()
    text = build_corpus(args.num_docs, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {args.output}: {len(text)} characters")


if __name__ == "__main__":
    main()
