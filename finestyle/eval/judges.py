"""Judges: what an image shows, scored for the three axes of `finestyle eval`.

- `world` (`world` = builtin:world-judge, or `world:FOLDER`): the world's trained classifier. Prompt
  fidelity: every object the prompt names is detected. Style fidelity: the judge's most likely style is
  the target (plus its mean probability). Objects: present above a per-object threshold calibrated on
  base-model images of prompts that do not name the object (the larger of 0.5 and the
  WORLD_CALIBRATION_QUANTILE of their probabilities), on calibration seeds of their own. Backgrounds:
  the judge's most likely background.
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
from finestyle.world.data import BACKGROUND_SLICE
from finestyle.world.judge import OBJECT_THRESHOLD, judge_probs
from finestyle.world.scene import BACKGROUNDS, OBJECTS, STYLES

from .prompts import Prompt

# A concept is present in a CLIP judge's view when its score exceeds this quantile of the scores of
# base-model images whose prompts do not name it.
CLIP_CALIBRATION_QUANTILE = 0.95
# A world object is present when its probability exceeds the larger of OBJECT_THRESHOLD and this
# quantile of its probabilities on base-model calibration images whose prompts do not name it.
WORLD_CALIBRATION_QUANTILE = 0.98


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
    object_thresholds = np.full(len(OBJECTS), OBJECT_THRESHOLD)  # until `calibrate`

    def __init__(self, spec: str, device: str = "cpu"):
        folder = spec.split(":", 1)[1] if spec.startswith("world:") else "builtin:world-judge"
        self.name = folder
        self.model = load_judge(folder, device=device)

    def calibrate(self, base: Scores, prompts: list[Prompt]) -> None:
        """Per world object: the larger of 0.5 and the WORLD_CALIBRATION_QUANTILE of its probability on
        `base` (base-model images, calibration seeds) whose prompts do not name it."""
        objs = base.extra["objects"]
        th = []
        for j, o in enumerate(OBJECTS):
            vals = objs[[i for i, p in enumerate(prompts) if not p.names(o)], j]
            q = float(np.quantile(vals, WORLD_CALIBRATION_QUANTILE)) if len(vals) else OBJECT_THRESHOLD
            th.append(max(OBJECT_THRESHOLD, q))
        self.object_thresholds = np.array(th)

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
        asked = np.array([[pr.names(o) for o in OBJECTS] for pr in prompts], dtype=bool).reshape(objs.shape)
        seen = objs > self.object_thresholds[None, :]
        prompt_ok = np.array([bool(a.any()) and bool(seen[i, a].all()) for i, a in enumerate(asked)], float)
        # the control for leakage: world objects neither asked for nor among the references' concepts
        others = [k for k, o in enumerate(OBJECTS) if o not in concepts]
        return Scores(
            prompt=prompt_ok,
            style=(styles.argmax(1) == t).astype(float),
            style_extra=styles[:, t],
            concepts=np.stack([objs[:, OBJECTS.index(c)] for c in concepts], 1)
            if concepts
            else np.zeros((len(images), 0)),
            extra={
                "other_objects": seen[:, others] & ~asked[:, others],
                "other_unasked": ~asked[:, others],
                "reference_unasked": asked[:, [OBJECTS.index(c) for c in concepts]] == 0,
                "objects": objs,
                "background": p[:, BACKGROUND_SLICE].argmax(1),
            },
        )

    def thresholds(self, base: Scores, prompts: list[Prompt], concepts: list[str]) -> np.ndarray:
        return np.array([self.object_thresholds[OBJECTS.index(c)] for c in concepts])


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


def object_leakage(
    tuned: Scores, base: Scores, leak: np.ndarray, base_leak: np.ndarray
) -> dict[str, np.ndarray]:
    """Per image, on the same prompt and seed (world judge): the share of the references' objects shown
    unasked (`leak`, a leak matrix) and of the control objects shown unasked (world objects neither
    asked for nor in the references), with the adapter and for the base model. `excess` is the
    reference rise minus the control rise: reference content, not extra objects of every kind."""
    ref_n, ctl_n = tuned.extra["reference_unasked"], tuned.extra["other_unasked"]
    rows = {
        "reference_tuned": _share(leak, ref_n),
        "reference_base": _share(base_leak, ref_n),
        "control_tuned": _share(tuned.extra["other_objects"], ctl_n),
        "control_base": _share(base.extra["other_objects"], ctl_n),
    }
    rows["excess"] = (rows["reference_tuned"] - rows["reference_base"]) - (
        rows["control_tuned"] - rows["control_base"]
    )
    return rows


def background_leakage(scores: Scores, backgrounds: list[str]) -> np.ndarray:
    """Per image (world judge): whether the judge reads one of the references' `backgrounds` (prompts
    that ask for another background)."""
    idx = [list(BACKGROUNDS).index(b) for b in backgrounds if b in BACKGROUNDS]
    return np.isin(scores.extra["background"], idx)


def _share(shown: np.ndarray, unasked: np.ndarray) -> np.ndarray:
    """Per image: the share of the unasked objects that are shown (0 where none is unasked)."""
    n = unasked.sum(1)
    return np.where(n > 0, (shown & unasked).sum(1) / np.maximum(n, 1), 0.0)
