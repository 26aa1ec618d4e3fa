"""Judges: what an image shows, scored for the three axes of `finestyle eval`.

- `world` (`world` = builtin:world-judge, or `world:FOLDER`): the world's trained classifier. Prompt
  fidelity: every object the prompt names is detected. Style fidelity: the judge's most likely style is
  the target (plus its mean probability). Concepts: the reference objects it detects (probability ≥ 0.5).
- `clip:MODEL` (a hub id such as openai/clip-vit-large-patch14, a local folder, or builtin:tiny-clip).
  Prompt fidelity: CLIP-T, the cosine between the image and the prompt's content text. Style fidelity:
  CLIP-I, the mean cosine to the reference images, and a Gram-matrix similarity of mid-layer vision
  features (style rather than content). Concepts: zero-shot cosine to "a photo of a CONCEPT", present
  above a per-concept threshold calibrated on base-model images of prompts that do not name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finestyle.core.errors import UserError
from finestyle.core.models import load_clip, load_judge
from finestyle.world.judge import OBJECT_THRESHOLD, judge_probs
from finestyle.world.scene import OBJECTS, STYLES

from .prompts import Prompt

# A concept is present in a CLIP judge's view when its score exceeds this quantile of the scores of
# base-model images whose prompts do not name it.
CLIP_CALIBRATION_QUANTILE = 0.95


@dataclass
class Scores:
    """Per image: the three axes' raw scores, and one column per judged concept."""

    prompt: np.ndarray
    style: np.ndarray
    style_extra: np.ndarray  # world: probability of the target style; clip: Gram similarity
    concepts: np.ndarray  # (n_images, n_concepts)
    extra: dict[str, Any] = field(default_factory=dict)


class WorldJudge:
    kind = "world"
    prompt_metric = "share of images where the judge finds every object the prompt names"
    style_metric = "share of images the judge assigns to the target style (argmax)"

    def __init__(self, spec: str, device: str = "cpu"):
        folder = spec.split(":", 1)[1] if spec.startswith("world:") else "builtin:world-judge"
        self.name = folder
        self.model = load_judge(folder, device=device)

    def concepts(self, concepts: list[str]) -> tuple[list[str], list[str]]:
        """(judged concepts: world objects named by the dataset's concepts, concepts it cannot judge)."""
        judged, other = [], []
        for c in concepts:
            hits = [o for o in OBJECTS if o in c.lower().split()]
            (judged if hits else other).extend(hits or [c])
        return sorted(set(judged)), sorted(set(other))

    def target(self, style: str) -> str:
        hits = [s for s in STYLES if s in style.lower().split()]
        if not hits:
            raise UserError(
                f"--judge world: the style {style!r} names no world style ({', '.join(STYLES)}); use a "
                "clip judge for other styles"
            )
        return hits[0]

    def score(
        self, images: list[Any], prompts: list[Prompt], concepts: list[str], style: str, refs: Any
    ) -> Scores:
        p = judge_probs(self.model, images)
        objs = p[:, : len(OBJECTS)]
        styles = p[:, len(p[0]) - len(STYLES) :]
        t = STYLES.index(self.target(style))
        asked = [[o for o in OBJECTS if o in pr.content.lower().split()] for pr in prompts]
        prompt_ok = np.array(
            [
                all(objs[i, OBJECTS.index(o)] >= OBJECT_THRESHOLD for o in a) and bool(a)
                for i, a in enumerate(asked)
            ],
            dtype=float,
        )
        # the control for leakage: world objects neither asked for nor among the references' concepts
        others = [k for k, o in enumerate(OBJECTS) if o not in concepts]
        unasked = np.array([[OBJECTS[k] not in a for k in others] for a in asked], dtype=bool)
        return Scores(
            prompt=prompt_ok,
            style=(styles.argmax(1) == t).astype(float),
            style_extra=styles[:, t],
            concepts=np.stack([objs[:, OBJECTS.index(c)] for c in concepts], 1)
            if concepts
            else np.zeros((len(images), 0)),
            extra={"other_objects": (objs[:, others] >= OBJECT_THRESHOLD) & unasked.reshape(len(images), -1)},
        )

    def thresholds(self, base: Scores, prompts: list[Prompt], concepts: list[str]) -> np.ndarray:
        return np.full(len(concepts), OBJECT_THRESHOLD)


class ClipJudge:
    kind = "clip"
    prompt_metric = "CLIP-T: mean cosine between image and the prompt's content text"
    style_metric = "CLIP-I: mean cosine between image and the reference images"

    def __init__(self, spec: str, device: str = "cpu"):
        self.name = spec.split(":", 1)[1]
        self.device = torch.device(device)
        self.model, self.proc = load_clip(self.name, device=self.device)

    def concepts(self, concepts: list[str]) -> tuple[list[str], list[str]]:
        return sorted(set(concepts)), []

    def target(self, style: str) -> str:
        return style

    @torch.inference_mode()
    def _images(self, images: list[Any], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image embeddings, normalised Gram vectors of mid-layer patch features)."""
        embs, grams = [], []
        for i in range(0, len(images), batch):
            px = self.proc(images=[im.convert("RGB") for im in images[i : i + batch]], return_tensors="pt")
            px = px["pixel_values"].to(self.device)
            out = self.model.vision_model(pixel_values=px, output_hidden_states=True)
            emb = self.model.visual_projection(out.pooler_output)
            embs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
            mid = out.hidden_states[len(out.hidden_states) // 2][:, 1:].float()  # patch tokens
            g = mid.transpose(1, 2) @ mid / mid.shape[1]
            grams.append(torch.nn.functional.normalize(g.flatten(1), dim=-1).cpu())
        return torch.cat(embs), torch.cat(grams)

    @torch.inference_mode()
    def _texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.proc.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        emb = self.model.get_text_features(**tok)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    def references(self, refs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._images(refs)

    def score(
        self, images: list[Any], prompts: list[Prompt], concepts: list[str], style: str, refs: Any
    ) -> Scores:
        ref_emb, ref_gram = refs
        emb, gram = self._images(images)
        text = self._texts([p.content for p in prompts])
        concept_text = self._texts([f"a photo of a {c}" for c in concepts]) if concepts else None
        return Scores(
            prompt=(emb * text).sum(-1).numpy(),
            style=(emb @ ref_emb.T).mean(1).numpy(),
            style_extra=(gram @ torch.nn.functional.normalize(ref_gram.mean(0), dim=-1)).numpy(),
            concepts=(emb @ concept_text.T).numpy()
            if concept_text is not None
            else np.zeros((len(images), 0)),
        )

    def thresholds(self, base: Scores, prompts: list[Prompt], concepts: list[str]) -> np.ndarray:
        out = []
        for j, c in enumerate(concepts):
            rows = [i for i, p in enumerate(prompts) if not p.names(c)]
            vals = base.concepts[rows, j] if rows else base.concepts[:, j]
            out.append(float(np.quantile(vals, CLIP_CALIBRATION_QUANTILE)) if len(vals) else np.inf)
        return np.array(out)


def check_judge_spec(spec: str) -> str:
    """'world' or 'clip' for a valid --judge value; a UserError otherwise (before anything loads)."""
    if spec == "world" or (spec.startswith("world:") and len(spec) > 6):
        return "world"
    if spec.startswith("clip:") and len(spec) > 5:
        return "clip"
    raise UserError(
        f"--judge {spec!r}: use world, world:FOLDER or clip:MODEL (e.g. clip:openai/clip-vit-large-patch14)"
    )


def load_eval_judge(spec: str, device: str = "cpu") -> WorldJudge | ClipJudge:
    return WorldJudge(spec, device) if check_judge_spec(spec) == "world" else ClipJudge(spec, device)


def leak_matrix(
    scores: Scores, thresholds: np.ndarray, prompts: list[Prompt], concepts: list[str]
) -> np.ndarray:
    """(n_images, n_concepts): whether each reference concept is present although its prompt does not
    name it."""
    present = scores.concepts > thresholds[None, :] if concepts else np.zeros((len(prompts), 0), bool)
    not_asked = np.array([[not p.names(c) for c in concepts] for p in prompts], dtype=bool).reshape(
        present.shape
    )
    return present & not_asked


def leaked(scores: Scores, thresholds: np.ndarray, prompts: list[Prompt], concepts: list[str]) -> np.ndarray:
    """Per image: whether a reference concept that its prompt does not name is present."""
    return leak_matrix(scores, thresholds, prompts, concepts).any(1)
