"""Closed-question visual question answering from zero-shot (or image-text matching) scores.

Yes/no questions ("Is there a pleural effusion?") become a positive vs negative statement about the asked
finding; multiple-choice questions ("Which finding is present: effusion, nodule or pneumothorax?") pick the
option whose positive statement scores highest. Questions come from a VQA-RAD / SLAKE style JSON list
(``image_name, question, answer, answer_type CLOSED/OPEN, question_type``) or are generated from labels.
Open questions are skipped (counted) — they need a generative answerer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.errors import InputError
from medfm.tasks.vlm.prompts import SYNONYMS, Prompts, default_prompts, from_names
from medfm.tasks.vlm.zeroshot import ensemble_embedding

_YESNO = re.compile(
    r"^\s*(is|are|does|do|was|can|could|has|have)\s+(there\s+)?(any\s+|an?\s+|the\s+)?"
    r"(evidence of\s+|signs? of\s+)?(?P<x>.+?)(\s+(present|seen|visible|in the image|"
    r"in this image|show\w*))?\s*\?*\s*$",
    re.I,
)
_SHOW = re.compile(
    r"^\s*(does|do)\s+(the|this)\s+(image|x-?ray|film|radiograph|scan)\s+(show|demonstrate|"
    r"contain)\s+(any\s+|an?\s+)?(?P<x>.+?)\s*\?*\s*$",
    re.I,
)
REQUIRED = ("image_name", "question", "answer")


def load_vqa_json(path: str | Path) -> list[dict[str, Any]]:
    """A VQA-RAD / SLAKE question list; each item needs image_name, question, answer."""
    p = Path(path)
    try:
        items = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(p, "questions file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(p, f"invalid JSON ({e})") from None
    if not isinstance(items, list):
        raise InputError(p, "expected a JSON list of questions")
    out = []
    for i, q in enumerate(items):
        if not isinstance(q, dict) or any(k not in q for k in REQUIRED):
            raise InputError(p, f"item {i} lacks one of {REQUIRED}")
        out.append(
            {
                **q,
                "answer": str(q["answer"]).strip(),
                "answer_type": str(q.get("answer_type", "")).upper()
                or ("CLOSED" if str(q["answer"]).strip().lower() in ("yes", "no") else "OPEN"),
                "question_type": str(q.get("question_type", "other")),
            }
        )
    return out


def phantom_questions(
    labels: np.ndarray, names: list[str], seed: int = 0, n_choices: int = 3
) -> list[dict[str, Any]]:
    """Closed questions from multi-hot labels: one yes/no per case (finding chosen to balance yes/no) and a
    multiple-choice "which is present" for cases with exactly one positive among the options."""
    rng = np.random.default_rng(seed)
    qs: list[dict[str, Any]] = []
    for i, row in enumerate(labels):
        known = [j for j in range(len(names)) if row[j] >= 0]
        if not known:
            continue
        want_yes = rng.random() < 0.5
        pool = [j for j in known if (row[j] > 0) == want_yes] or known
        j = int(rng.choice(pool))
        name = SYNONYMS.get(names[j], [names[j]])[0]
        art = "an" if name[0] in "aeiou" else "a"
        qs.append(
            {
                "index": i,
                "question": f"Is there {art} {name}?",
                "answer": "yes" if row[j] > 0 else "no",
                "answer_type": "CLOSED",
                "question_type": "presence",
                "finding": names[j],
            }
        )
        pos = [j for j in known if row[j] > 0]
        neg = [j for j in known if row[j] == 0]
        if len(pos) >= 1 and len(neg) >= n_choices - 1:
            a = int(rng.choice(pos))
            opts = [a, *rng.choice(neg, n_choices - 1, replace=False).tolist()]
            rng.shuffle(opts)
            words = [SYNONYMS.get(names[o], [names[o]])[0] for o in opts]
            qs.append(
                {
                    "index": i,
                    "question": f"Which finding is present: {', '.join(words[:-1])} or {words[-1]}?",
                    "answer": SYNONYMS.get(names[a], [names[a]])[0],
                    "options": words,
                    "answer_type": "CLOSED",
                    "question_type": "choice",
                }
            )
    return qs


def _finding_key(phrase: str) -> str | None:
    ph = phrase.lower().strip(" ?.")
    for k, syn in SYNONYMS.items():
        if ph == k or ph in syn or any(ph == s or ph.endswith(" " + s) for s in syn):
            return k
    return None


def parse_question(q: dict[str, Any]) -> dict[str, Any]:
    """{"kind": "yesno", "phrase"} or {"kind": "choice", "options"} or {"kind": "open"}."""
    text = q["question"]
    ans = q["answer"].lower()
    if q.get("options"):
        return {"kind": "choice", "options": list(q["options"])}
    if ans in ("yes", "no"):
        m = _SHOW.match(text) or _YESNO.match(text)
        if m:
            return {"kind": "yesno", "phrase": m.group("x").strip()}
    if " or " in text and q.get("answer_type") == "CLOSED":
        if ":" in text:  # "Which finding is present: a, b or c?"
            opts = [o.strip(" ,?") for o in re.split(r",|\bor\b", text.split(":")[-1]) if o.strip(" ,?")]
        else:  # "Is the lesion on the left or right?"
            m = re.search(r"(\w[\w-]*)\s+or\s+(\w[\w-]*)\W*$", text)
            opts = [m.group(1), m.group(2)] if m else []
        if len(opts) >= 2:
            return {"kind": "choice", "options": opts}
    return {"kind": "open"}


class ClosedVQA:
    """Answers closed questions with a CLIP run: zero-shot prompt ensembles (default) or the ITM head.

    ``prompts``: ensembles to use for the findings they cover (e.g. the validation-selected or report-mined
    ones, see :mod:`medfm.tasks.vlm.prompts`); other phrases get the default templates."""

    def __init__(self, model: Any, method: str = "zeroshot", prompts: Prompts | None = None) -> None:
        self.model = model
        self.method = method
        self.prompts = prompts or {}
        self._cache: dict[str, tuple[list[str], list[str]]] = {}
        self._emb: dict[str, torch.Tensor] = {}

    def _statements(self, phrase: str) -> tuple[list[str], list[str]]:
        if phrase not in self._cache:
            key = _finding_key(phrase)
            if key in self.prompts:
                p = self.prompts[key]
            else:
                p = default_prompts([key])[key] if key else from_names([phrase])
            self._cache[phrase] = (p["positive"], p["negative"])
        return self._cache[phrase]

    def presence_prob(self, image: torch.Tensor, img_emb: torch.Tensor, phrase: str) -> float:
        pos, neg = self._statements(phrase)
        if self.method == "itm":
            s = self.model.match_scores(image.expand(len(pos) + len(neg), *image.shape[1:]), pos + neg)
            return float(s[: len(pos)].mean() / (s[: len(pos)].mean() + s[len(pos) :].mean() + 1e-8))
        if phrase not in self._emb:  # prompt ensembles are embedded once per phrase, not per question
            self._emb[phrase] = torch.stack(
                [ensemble_embedding(self.model, pos), ensemble_embedding(self.model, neg)]
            )
        e = self._emb[phrase]
        return float(((img_emb @ e.t()) * float(self.model.scale().detach())).softmax(-1)[..., 0])

    def answer(self, image: torch.Tensor, img_emb: torch.Tensor, q: dict[str, Any]) -> str | None:
        parsed = parse_question(q)
        if parsed["kind"] == "yesno":
            return "yes" if self.presence_prob(image, img_emb, parsed["phrase"]) > 0.5 else "no"
        if parsed["kind"] == "choice":
            scores = [self.presence_prob(image, img_emb, o) for o in parsed["options"]]
            return parsed["options"][int(np.argmax(scores))]
        return None


def evaluate_vqa(
    model: Any,
    images: torch.Tensor,
    questions: list[dict[str, Any]],
    method: str = "zeroshot",
    prompts: Prompts | None = None,
) -> dict[str, Any]:
    """Accuracy overall and per question type; ``images[q["index"]]`` is the image of question q.
    ``prompts``: finding -> ensembles to use instead of the default ones."""
    vqa = ClosedVQA(model, method, prompts)
    emb = model.encode_images(images)
    per: dict[str, list[int]] = {}
    skipped = 0
    answers = []
    for q in questions:
        i = int(q["index"])
        a = vqa.answer(images[i : i + 1], emb[i], q)
        if a is None:
            skipped += 1
            continue
        ok = int(a.strip().lower() == q["answer"].strip().lower())
        per.setdefault(q.get("question_type", "other"), []).append(ok)
        answers.append({**q, "predicted": a, "correct": bool(ok)})
    allv = [v for vs in per.values() for v in vs]
    return {
        "accuracy": float(np.mean(allv)) if allv else None,
        "n": len(allv),
        "skipped_open": skipped,
        "per_type": {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in per.items()},
        "answers": answers,
    }
