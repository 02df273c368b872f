"""The caption grammar of the default model's training data: scenes, captions, and the
held-out combinations the model never sees in training.

A scene is one coloured shape on a plain neutral background. Its caption names any subset of
its attributes ("a small red circle on the left", "a square at the top", "something green"),
so the model learns partial prompts too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# (colour, shape, position) triples never rendered for training. Each pair inside a triple
# still occurs in training (with another third attribute), so the held-out prompts test
# composition, not unseen words.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("green", "square", "right"),
    ("blue", "triangle", "top"),
    ("yellow", "circle", "bottom"),
    ("red", "triangle", "center"),
    ("green", "circle", "top"),
    ("blue", "square", "bottom"),
    ("yellow", "triangle", "right"),
)

# Every word a caption can contain (the tokenizer merges each into one token).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COLOURS)
        | set(SHAPES)
        | set(SIZES)
        | {"a", "shape", "something", "on", "at", "in", "the"}
        | {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
    )
)


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``None`` in a :class:`Caption` means "not mentioned"."""

    colour: str
    shape: str
    position: str
    size: str

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.position) in HELD_OUT


@dataclass(frozen=True)
class Caption:
    """The attributes a prompt asks for; any of them may be left out."""

    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None

    @property
    def text(self) -> str:
        noun = self.shape or ("shape" if (self.colour or self.size) else "something")
        words = [w for w in (self.size, self.colour) if w]
        phrase = " ".join(["a", *words, noun]) if noun != "something" else "something"
        if self.position:
            phrase += " " + POSITION_PHRASES[self.position]
        return phrase

    def asked(self) -> dict[str, str]:
        """The attributes the prompt names, by attribute name."""
        return {
            k: v
            for k, v in (
                ("colour", self.colour),
                ("shape", self.shape),
                ("position", self.position),
                ("size", self.size),
            )
            if v
        }


def parse_caption(text: str) -> Caption:
    """The attributes named by a grammar caption (unknown words are ignored)."""
    words = text.lower().replace(",", " ").split()

    def first(options: tuple[str, ...]) -> str | None:
        return next((w for w in words if w in options), None)

    position = next((p for p, phrase in POSITION_PHRASES.items() if phrase in " ".join(words)), None)
    if position is None:
        position = first(POSITIONS)
    return Caption(colour=first(COLOURS), shape=first(SHAPES), position=position, size=first(SIZES))


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p, z) for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES]


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not s.held_out]


def caption_for(scene: Scene, rng: random.Random, keep: float = 0.75) -> Caption:
    """A caption of ``scene`` naming each attribute with probability ``keep`` (size less often:
    it is the least visible attribute)."""
    return Caption(
        colour=scene.colour if rng.random() < keep else None,
        shape=scene.shape if rng.random() < keep else None,
        position=scene.position if rng.random() < keep else None,
        size=scene.size if rng.random() < keep * 0.6 else None,
    )


def held_out_prompts() -> list[Caption]:
    """The fixed evaluation prompts: each held-out triple, fully named (size left free)."""
    return [Caption(colour=c, shape=s, position=p) for c, s, p in HELD_OUT]
