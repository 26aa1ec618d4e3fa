"""Concept extraction: which regions of a reference image belong to which words.

Methods (`prepare.concepts`):
- `attention`: concept phrases from the BLIP caption (+ user words), located with the base model's
  own cross-attention maps (the DAAM idea, Tang et al. 2022). The complement of
  the found concepts becomes a `background` region.
- `grid`: multi-scale proposals (quadrants, thirds, centre), each captioned by BLIP later.
- `boxes`: user-supplied boxes from a JSON file.
- `none`: whole images only (the plain style-tuning baseline).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from finestyle.core.errors import UserError
from finestyle.core.geometry import fit_size
from finestyle.core.sd import encode_texts, native_size, pack_cond, unet_kwargs

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive), pixels

# Words that separate noun phrases in a caption. Splitting on them turns "a red boat on a lake
# with trees" into ["red boat", "lake", "trees"] with no parser model to download.
_SPLIT_WORDS = {
    "a",
    "an",
    "the",
    "of",
    "with",
    "and",
    "on",
    "in",
    "at",
    "near",
    "under",
    "over",
    "by",
    "its",
    "is",
    "are",
    "has",
    "have",
    "to",
    "from",
    "for",
    "into",
    "onto",
    "behind",
    "beside",
    "next",
    "while",
    "that",
    "which",
    "it",
    "this",
    "there",
    "some",
    "two",
    "three",
    "or",
    ",",
    ".",
}
# Words that describe the medium rather than a concept in the picture.
_MEDIUM_WORDS = {
    "painting",
    "picture",
    "photograph",
    "photo",
    "drawing",
    "illustration",
    "image",
    "art",
    "artwork",
    "background",
    "texture",
    "pattern",
    "style",
}


@dataclass
class Region:
    """A concept of a reference image: its box, and the crop cut around it (None: the box itself)."""

    concept: str
    bbox: Box
    method: str
    score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    crop: Box | None = None


def phrases_from_caption(caption: str, extra: list[str] | None = None, limit: int = 8) -> list[str]:
    """Concept phrases: user words first, then caption noun phrases (deduplicated, in order)."""
    out: list[str] = []
    for w in extra or []:
        w = " ".join(w.lower().split())
        if w and w not in out:
            out.append(w)
    tokens = re.findall(r"[a-z0-9'-]+|[,.]", caption.lower())
    cur: list[str] = []
    groups: list[list[str]] = []
    for t in tokens + ["."]:
        if t in _SPLIT_WORDS:
            if cur:
                groups.append(cur)
            cur = []
        else:
            cur.append(t)
    for g in groups:
        g = [w for w in g if w not in _MEDIUM_WORDS]
        # A noun phrase is at most a head noun with two modifiers; longer runs (a caption with
        # no function words) are cut into pieces of three from the end, where heads usually are.
        pieces = [g[max(0, i - 3) : i] for i in range(len(g), 0, -3)][::-1]
        for piece in pieces:
            phrase = " ".join(piece)
            if phrase and phrase not in out:
                out.append(phrase)
    return out[:limit]


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between = np.nan_to_num(between)
    return float(centers[int(np.argmax(between))])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (plain BFS; masks here are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, cur = 0, 0, 0
    for sy in range(h):
        for sx in range(w):
            if not mask[sy, sx] or labels[sy, sx]:
                continue
            cur += 1
            stack = [(sy, sx)]
            labels[sy, sx] = cur
            size = 0
            while stack:
                y, x = stack.pop()
                size += 1
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = cur
                        stack.append((ny, nx))
            if size > best_size:
                best, best_size = cur, size
    return labels == best if best else np.zeros_like(mask)


def box_from_heatmap(heat: np.ndarray, image_size: tuple[int, int], threshold: float) -> tuple[Box, float]:
    """Threshold a [0,1] heatmap (any grid), keep its largest component, scale its box to pixels.

    Returns (box, mean heat inside the mask) — the mean is a confidence score.
    """
    t = otsu_threshold(heat.ravel()) if threshold <= 0 else threshold * float(heat.max())
    mask = largest_component(heat >= t)
    if not mask.any():
        mask = heat >= heat.max()
    ys, xs = np.nonzero(mask)
    gh, gw = heat.shape
    w, h = image_size
    box = (
        int(xs.min() * w / gw),
        int(ys.min() * h / gh),
        int(math.ceil((xs.max() + 1) * w / gw)),
        int(math.ceil((ys.max() + 1) * h / gh)),
    )
    return box, float(heat[mask].mean())


def largest_free_rectangle(occupied: np.ndarray) -> tuple[int, int, int, int] | None:
    """Largest axis-aligned rectangle of False cells (histogram method). Returns grid box or None."""
    h, w = occupied.shape
    heights = np.zeros(w, dtype=np.int64)
    best, best_area = None, 0
    for y in range(h):
        heights = np.where(occupied[y], 0, heights + 1)
        stack: list[int] = []
        for x in range(w + 1):
            cur = heights[x] if x < w else 0
            while stack and heights[stack[-1]] >= cur:
                top = stack.pop()
                height = heights[top]
                left = stack[-1] + 1 if stack else 0
                area = height * (x - left)
                if area > best_area:
                    best_area, best = area, (left, y - height + 1, x, y + 1)
            stack.append(x)
    return best


def background_region(
    size: tuple[int, int], boxes: list[Box], min_crop: int, grid: int = 32
) -> Region | None:
    """The complement of the concept boxes: the largest rectangle that avoids all of them."""
    w, h = size
    occ = np.zeros((grid, grid), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        gx0, gy0 = int(x0 * grid / w), int(y0 * grid / h)
        gx1, gy1 = int(math.ceil(x1 * grid / w)), int(math.ceil(y1 * grid / h))
        occ[gy0:gy1, gx0:gx1] = True
    r = largest_free_rectangle(occ)
    if r is None:
        return None
    gx0, gy0, gx1, gy1 = r
    box = (int(gx0 * w / grid), int(gy0 * h / grid), int(gx1 * w / grid), int(gy1 * h / grid))
    if min(box[2] - box[0], box[3] - box[1]) < min(min_crop, w, h):
        return None
    return Region("background", box, "attention", extra={"kind": "complement"})


# ------------------------------------------------------------------------------------------------
# grid proposals


def grid_regions(size: tuple[int, int], scales: list[int]) -> list[Region]:
    """Multi-scale proposals: n×n cells for each n, plus a centre crop (the full image is separate)."""
    w, h = size
    out: list[Region] = []
    for n in scales:
        for j in range(n):
            for i in range(n):
                out.append(
                    Region(
                        "",
                        (w * i // n, h * j // n, w * (i + 1) // n, h * (j + 1) // n),
                        "grid",
                        extra={"scale": n},
                    )
                )
    out.append(Region("", (w // 4, h // 4, w * 3 // 4, h * 3 // 4), "grid", extra={"scale": "centre"}))
    return out


# ------------------------------------------------------------------------------------------------
# user boxes


def load_boxes_file(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read {"image name or relative path": [{"concept": str, "bbox": [x0, y0, x1, y1]}, ...]}."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"boxes file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise UserError(f"boxes file {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"boxes file {str(p)!r}: expected an object keyed by image file name")
    for key, entries in data.items():
        if not isinstance(entries, list):
            raise UserError(f"boxes file {str(p)!r}: entry {key!r} must be a list of boxes")
        for k, e in enumerate(entries):
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("concept"), str)
                and e["concept"].strip()
                and isinstance(e.get("bbox"), list)
                and len(e["bbox"]) == 4
                and all(isinstance(v, (int, float)) for v in e["bbox"])
            )
            if not ok:
                raise UserError(
                    f"boxes file {str(p)!r}: {key}[{k}] must be "
                    '{"concept": "boat", "bbox": [x0, y0, x1, y1]}'
                )
    return data


def user_regions(
    entries: list[dict[str, Any]], size: tuple[int, int], source: str
) -> tuple[list[Region], list[str]]:
    """Validate user boxes against the image; return (regions, problems)."""
    w, h = size
    out, problems = [], []
    for k, e in enumerate(entries):
        x0, y0, x1, y1 = (int(round(v)) for v in e["bbox"])
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            problems.append(f"{source}[{k}] bbox {e['bbox']} is outside the {w}x{h} image or empty")
            continue
        out.append(Region(" ".join(e["concept"].lower().split()), (x0, y0, x1, y1), "boxes"))
    return out, problems


# ------------------------------------------------------------------------------------------------
# cross-attention localisation


class _CaptureCrossAttention:
    """Attention processor for `attn2` that computes softmax(QKᵀ/√d) explicitly and keeps it.

    Same maths as diffusers' AttnProcessor; the probabilities (summed over heads) are stored in
    `store[name]` with shape (batch, query_len, key_len).
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        heads = attn.heads
        self.store[self.name] = probs.reshape(batch, heads, *probs.shape[1:]).sum(1).float().cpu()
        hidden = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


def token_spans(tokenizer: Any, prompt: str, phrases: list[str]) -> dict[str, list[int]]:
    """Token positions of each phrase inside the tokenized prompt (BOS at position 0)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    spans: dict[str, list[int]] = {}
    for ph in phrases:
        sub = tokenizer(ph, add_special_tokens=False).input_ids
        if not sub:
            continue
        for i in range(1, len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                spans[ph] = list(range(i, i + len(sub)))
                break
    return spans


@torch.inference_mode()
def attention_heatmaps(
    pipe: Any,
    image: Image.Image,
    prompt: str,
    phrases: list[str],
    timestep: int = 400,
    seed: int = 0,
    resolution: int | None = None,
) -> dict[str, np.ndarray]:
    """Cross-attention heatmaps (values in [0,1], on the latent grid) for each phrase found in `prompt`.

    1. Encode the image with the VAE and noise it to `timestep`.
    2. Run the UNet once with the prompt, capturing softmax(QKᵀ/√d) in every attn2 layer.
    3. Per phrase: sum its tokens' columns, resize each layer's map to the latent grid, average.
    4. Normalise to [0, 1].
    Phrases whose tokens are not in the (truncated) prompt get no map.
    """
    if getattr(pipe, "unet", None) is None:  # SD 3.x / FLUX.1: the joint blocks' image-to-text attention
        return _joint_heatmaps(pipe, image, prompt, phrases, timestep, seed, resolution)
    unet, vae, tok = pipe.unet, pipe.vae, pipe.tokenizer
    device, dtype = unet.device, unet.dtype
    spans = token_spans(tok, prompt, phrases)
    if not spans:
        return {}
    res = resolution or unet.config.sample_size * pipe.vae_scale_factor
    pw, ph = fit_size(image.size, res, multiple=8 * pipe.vae_scale_factor)
    x = torch.from_numpy(np.asarray(image.resize((pw, ph), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0)
    x = x.permute(2, 0, 1)[None].to(device=device, dtype=vae.dtype)
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(device=device, dtype=latents.dtype)
    t = torch.tensor([timestep], device=device, dtype=torch.long)
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    hidden, pooled = encode_texts(pipe, [prompt], device)
    # SDXL: both encoders' hidden states side by side (the token positions are shared), plus the
    # pooled embedding and the uncropped image's time ids
    cond_kw = unet_kwargs(unet.config, pack_cond(hidden, pooled).to(dtype), (ph, pw))
    store: dict[str, torch.Tensor] = {}
    original = dict(unet.attn_processors)
    procs = {
        name: (_CaptureCrossAttention(name, store) if ".attn2." in name else p)
        for name, p in original.items()
    }
    try:
        unet.set_attn_processor(procs)
        unet(noisy.to(dtype), t, **cond_kw)
    finally:
        unet.set_attn_processor(original)
    lh, lw = latents.shape[-2:]
    out: dict[str, np.ndarray] = {}
    for ph, idx in spans.items():
        acc = torch.zeros(lh, lw)
        n = 0
        for probs in store.values():
            q = probs.shape[1]
            # this layer's grid: same aspect as the latent, q = gh*gw
            down = int(round(math.sqrt(lh * lw / q)))
            gh, gw = max(1, lh // down), max(1, lw // down)
            if gh * gw != q:
                continue
            m = probs[0, :, idx].sum(-1).reshape(1, 1, gh, gw)
            acc += F.interpolate(m, size=(lh, lw), mode="bilinear", align_corners=False)[0, 0]
            n += 1
        if n:
            acc = acc / n
            acc = acc - acc.min()
            out[ph] = (acc / acc.max()).numpy() if float(acc.max()) > 0 else acc.numpy()
    return out


def _joint_heatmaps(
    pipe: Any,
    image: Image.Image,
    prompt: str,
    phrases: list[str],
    timestep: int,
    seed: int,
    resolution: int | None,
) -> dict[str, np.ndarray]:
    """`attention_heatmaps` for SD 3.x / FLUX.1: the noise level is timestep / 1000 (a flow model's
    sigma), and each phrase's T5 tokens are read from the image queries' joint attention."""
    from finestyle.core.mmdit import joint_attention_maps

    vae = pipe.vae
    res = resolution or native_size(pipe)
    pw, ph = fit_size(image.size, res, multiple=2 * pipe.vae_scale_factor)
    x = torch.from_numpy(np.asarray(image.resize((pw, ph), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0)
    x = x.permute(2, 0, 1)[None].to(device=vae.device, dtype=vae.dtype)
    shift = float(vae.config.get("shift_factor") or 0.0)
    latents = (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor
    maps = joint_attention_maps(pipe, latents.float(), prompt, phrases, timestep / 1000, seed)
    lh, lw = latents.shape[-2:]
    out: dict[str, np.ndarray] = {}
    for p, m in maps.items():
        acc = F.interpolate(m[None, None].float(), size=(lh, lw), mode="bilinear", align_corners=False)[0, 0]
        acc = acc - acc.min()
        out[p] = (acc / acc.max()).numpy() if float(acc.max()) > 0 else acc.numpy()
    return out


def attention_regions(
    pipe: Any,
    image: Image.Image,
    caption: str,
    phrases: list[str],
    *,
    timestep: int,
    threshold: float,
    seed: int,
    min_crop: int,
    max_concepts: int,
    background: bool,
) -> list[Region]:
    """Locate each phrase with cross-attention (its box, without context: the crop around it is cut
    later, by the recipe's rules); add the background complement."""
    # Read the phrases in the context of the caption when they all fit in the text encoder's window;
    # otherwise (long captions, truncation) from a prompt of the phrases alone.
    prompt = caption if all(p in caption for p in phrases) else f"{caption}, {', '.join(phrases)}"
    if len(token_spans(pipe.tokenizer, prompt, phrases)) < len(phrases):
        prompt = ", ".join(phrases)
    maps = attention_heatmaps(pipe, image, prompt, phrases, timestep=timestep, seed=seed)
    regions: list[Region] = []
    for ph in phrases:
        if ph not in maps:
            continue
        box, score = box_from_heatmap(maps[ph], image.size, threshold)
        if any(iou(box, r.bbox) > 0.85 for r in regions):
            continue  # same place as a phrase already kept
        regions.append(Region(ph, box, "attention", score=score))
        if len(regions) >= max_concepts:
            break
    if background and regions:
        bg = background_region(image.size, [r.bbox for r in regions], min_crop)
        if bg is not None:
            regions.append(bg)
    return regions
