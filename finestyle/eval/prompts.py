"""Evaluation prompts: content text plus an optional superclass, completed with the style text.

The paper's form is "A cat, animals, in STYLE style". A prompt file has one prompt per line, optionally
followed by a TAB and its superclass; blank lines and lines starting with # are ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from finestyle.core.errors import UserError

REAL_PROMPTS_FILE = Path(__file__).resolve().parent / "prompts_real.tsv"


@dataclass(frozen=True)
class Prompt:
    content: str
    superclass: str = ""

    def full(self, style: str) -> str:
        head = f"{self.content}, {self.superclass}" if self.superclass else self.content
        return f"{head}, in {style} style"

    def names(self, concept: str) -> bool:
        """Whether this prompt asks for `concept` (every word of the concept appears in the content)."""
        words = set(self.content.lower().replace(",", " ").split())
        return all(w in words for w in concept.lower().split())


def read_prompt_file(path: str | Path) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {str(p)!r} does not exist; give a text file with one prompt per line")
    prompts = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        content, _, superclass = line.partition("\t")
        prompts.append(Prompt(content.strip(), superclass.strip()))
    if not prompts:
        raise UserError(
            f"--prompts {str(p)!r} has no prompts; write one per line (optionally TAB and a superclass)"
        )
    return prompts


def real_prompts(n: int | None = None) -> list[Prompt]:
    """The project's prompt set for real models (CC0): content prompts over seven superclasses."""
    prompts = read_prompt_file(REAL_PROMPTS_FILE)
    return prompts[:n] if n else prompts


def world_prompts(
    reference_objects: set[str],
    objects: tuple[str, ...],
    colours: list[str],
    n: int,
    seed: int = 0,
    backgrounds: list[str] | None = None,
) -> list[Prompt]:
    """`n` prompts "a COLOUR OBJECT" over the world's objects that are NOT in the references, so that a
    reference object in an image is leakage. With `backgrounds` (phrases of world backgrounds other than
    the references', e.g. "on the grass"), each prompt also asks for one of them in turn: "a red cup on
    the grass", so that a reference background in an image is leakage too."""
    new = [o for o in objects if o not in reference_objects]
    if not new:
        raise UserError("the references contain every world object; no prompt can test for leakage")
    rng = random.Random(seed)
    # each object in turn, each time in a colour it has not had yet: no prompt repeats until every
    # (colour, object) pair has been used
    order = {o: rng.sample(colours, len(colours)) for o in new}
    picks = [
        (order[o][(i // len(new)) % len(colours)], o) for i, o in ((i, new[i % len(new)]) for i in range(n))
    ]
    texts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {o}" for c, o in picks]
    if backgrounds:
        texts = [f"{t} {backgrounds[i % len(backgrounds)]}" for i, t in enumerate(texts)]
    return [Prompt(t) for t in texts]
