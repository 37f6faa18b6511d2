"""Why the model predicted a code: the label attention of BERT-XML over a note's tokens (paper §4.5, Figure 3).

    bertxml explain NOTE_ID [--code C] [--model DIR] [--html FILE]

When the nightly job wrote `bertxml.evidence` rows for the note and model version (score.evidence), it
renders those: each predicted code's most attended sentence-ish spans, found in the scoring pass itself
(`bertxml.scoring.evidence.evidence_spans`), with the probability from `bertxml.predictions`; no model is loaded.
Otherwise (no rows, or --code names a code without rows) it recomputes: for each predicted code of the
note (or the one asked with --code) the most attended tokens and the spans (whole words, neighbours
merged) they form, from the attention a_ij of eq. 2 in the chunk that decided the note's probability (the
note's probability is the max over its chunks, so that chunk is the evidence). With --html it writes the
note with the attended text shaded, darker for higher weight, like the paper's Figure 3.

Note text is PHI. Explanations are opt-in: this command is the opt-in, it prints a one-line warning to
stderr, and nothing of the text is written to any table (its job_runs row holds the note id, the codes
and counts only). The HTML file is created readable by its owner only (0600). Library callers get the
text back in the returned dict: print it only where PHI may be shown.

Only models with the label-attention head ("bertxml") can be explained; a "cls" model has no per-code
attention and gets a clear error.
"""
from __future__ import annotations

import html
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from pyspark.sql import functions as F

from bertxml.config import Config, score_options
from bertxml.models.registry import resolve_model
from bertxml.platform import tables as t
from bertxml.platform.runs import job_run
from bertxml.scoring.predictors import make_predict_fn, read_model_info
from bertxml.text.tokenize import CHARS_PER_TOKEN_CAP, clean_text

log = logging.getLogger("bertxml.reports.explain")

PHI_WARNING = ("WARNING: bertxml explain shows clinical note text (PHI); view it only where you are "
               "allowed to, and do not paste it into tickets or chat.")


def explain_text(scorer, text: str, code: str | None = None, top_k: int = 10) -> dict:
    """Attention explanation of one note's text by a `BertScorer` with the "bertxml" head.

    Returns {"model_version", "n_chunks", "truncated", "codes": [{code, description, probability,
    threshold, predicted, chunk_index, special_share, top_tokens: [{token, text, start, end, weight}],
    spans: [{text, start, end, weight}]}]}; start/end are character offsets into `text`. Codes: `code`
    when given, else every predicted code, else (nothing predicted) the most probable one.
    """
    model, info = scorer.model, scorer.info
    if getattr(model, "head_type", None) != "bertxml":
        raise ValueError(f"{info.model_version} is a {info.model_kind!r} model without label attention: "
                         f"explain needs a 'bertxml' model")
    if code is not None and code not in info.codes:
        raise ValueError(f"code {code!r} is not in {info.model_version}'s label vocabulary "
                         f"({info.n_labels} codes, e.g. {list(info.codes[:5])})")
    text = clean_text(text)
    capped = text[:scorer.max_chunks * scorer.max_len * CHARS_PER_TOKEN_CAP]
    chunks, _, truncated = scorer.encode([text])
    chunks = chunks[0]
    enc = scorer.tokenizer.encode(capped, add_special_tokens=False)
    offsets, word_ids, pieces = enc.offsets, enc.word_ids, enc.tokens
    # encode_chunks cuts the same encoding into consecutive pieces: chunk c, position p (1..len-2) is
    # token first[c] + p - 1 of the note.
    first = np.concatenate([[0], np.cumsum([len(c) - 2 for c in chunks])[:-1]]).astype(int)
    if sum(len(c) - 2 for c in chunks) > len(enc.ids):
        raise RuntimeError("the scorer's chunks do not match the tokenizer's encoding of the note")

    logits, attention = [], []
    with torch.inference_mode():
        for ids in chunks:
            out = model(torch.tensor([ids], device=scorer.device), return_attention=True)
            logits.append(out["logits"][0].float().cpu())            # (M,)
            attention.append(out["attention"][0].float().cpu())      # (M, T)
    logits = torch.stack(logits)                                    # (n_chunks, M)
    probs = torch.sigmoid(logits.max(dim=0).values).numpy()         # (M,) max over chunks, as in scoring
    codes = list(info.codes)
    if code is not None:
        chosen = [codes.index(code)]
    else:
        chosen = [int(j) for j in np.flatnonzero(probs >= info.thresholds)]
        chosen = sorted(chosen, key=lambda j: -probs[j]) or [int(np.argmax(probs))]

    explained = []
    for j in chosen:
        c = int(torch.argmax(logits[:, j]))                          # the chunk that set the probability
        weights = attention[c][j].numpy()                           # (T,) eq. 2, sums to 1 over the chunk
        content = weights[1:len(chunks[c]) - 1]                     # without [CLS] and [SEP]
        tokens = np.arange(len(content)) + first[c]                 # note token index of each weight
        top = np.argsort(-content, kind="stable")[:top_k]
        top_tokens = [{"token": pieces[tokens[i]], "text": text[offsets[tokens[i]][0]:offsets[tokens[i]][1]],
                       "start": int(offsets[tokens[i]][0]), "end": int(offsets[tokens[i]][1]),
                       "weight": float(content[i])} for i in top]
        explained.append({
            "code": codes[j], "description": info.labels[j].get("description"), "probability": float(probs[j]),
            "threshold": float(info.thresholds[j]), "predicted": bool(probs[j] >= info.thresholds[j]),
            "chunk_index": c, "special_share": float(weights[0] + weights[len(chunks[c]) - 1]),
            "top_tokens": top_tokens,
            "spans": _spans(text, content, tokens, set(top.tolist()), offsets, word_ids)[:top_k],
            "_weights": {int(tok): float(w) for tok, w in zip(tokens, content)},
            "_shades": [(int(offsets[tok][0]), int(offsets[tok][1]), float(w)) for tok, w in zip(tokens, content)],
        })
    return {"model_version": info.model_version, "n_chunks": len(chunks), "truncated": bool(truncated[0]),
            "codes": explained, "source": "model", "_offsets": offsets}


def read_evidence(wh, note_id: str, model_version: str) -> dict | None:
    """The scoring job's evidence for one note and model version, without its text: {"run_id", "n_chunks",
    "truncated", "codes": [{code, probability, spans: [{rank, start, end, weight}]}]} (codes by falling
    probability, spans by rank), or None when `bertxml.evidence` has no row for them."""
    name = wh.name(t.EVIDENCE)
    if not wh.exists(name):
        return None
    rows = (wh.table(name).filter((F.col("note_id") == note_id) & (F.col("model_version") == model_version))
            .select("code", "rank", "char_start", "char_end", "weight", "run_id").collect())
    if not rows:
        return None
    run_id = max(r.run_id for r in rows)  # one run wrote them (replaceWhere); max() is only a safe pick
    pred = (wh.table(wh.name(t.PREDICTIONS)).filter((F.col("note_id") == note_id)
                                                    & (F.col("model_version") == model_version)
                                                    & (F.col("run_id") == run_id))
            .select("probabilities", "n_chunks", "truncated").first())
    labels = {r.code: r.label_index for r in wh.table(wh.name(t.MODEL_LABELS))
              .filter(F.col("model_version") == model_version).select("code", "label_index").collect()}
    codes = {}
    for r in rows:
        codes.setdefault(r.code, []).append({"rank": r.rank, "start": r.char_start, "end": r.char_end,
                                             "weight": float(r.weight)})
    out = []
    for code, spans in codes.items():
        probability = None
        if pred is not None and code in labels:
            probability = float(pred.probabilities[labels[code]])
        out.append({"code": code, "probability": probability, "spans": sorted(spans, key=lambda x: x["rank"])})
    out.sort(key=lambda c: (-(c["probability"] or 0.0), c["code"]))
    return {"run_id": run_id, "n_chunks": pred.n_chunks if pred else None,
            "truncated": bool(pred.truncated) if pred else False, "codes": out}


def explain_from_evidence(info, text: str, evidence: dict, code: str | None = None) -> dict:
    """`read_evidence`'s rows of a note rendered with its text: the shape `explain_text` returns (spans with
    their text; no per-token weights, so `top_tokens` is empty), source "evidence"."""
    text = text or ""
    codes = list(info.codes)
    explained = []
    for c in evidence["codes"]:
        if code is not None and c["code"] != code:
            continue
        j = codes.index(c["code"]) if c["code"] in codes else None
        threshold = float(info.thresholds[j]) if j is not None else None
        explained.append({
            "code": c["code"], "description": info.labels[j].get("description") if j is not None else None,
            "probability": c["probability"], "threshold": threshold, "predicted": True, "chunk_index": None,
            "special_share": None, "top_tokens": [],
            "spans": [{"text": text[x["start"]:x["end"]], **x} for x in c["spans"]],
            "_shades": [(x["start"], x["end"], x["weight"]) for x in c["spans"]],
        })
    return {"model_version": info.model_version, "n_chunks": evidence["n_chunks"],
            "truncated": evidence["truncated"], "codes": explained, "source": "evidence",
            "run_id": evidence["run_id"]}


def _spans(text, content, tokens, top: set, offsets, word_ids) -> list[dict]:
    """The words holding a top token, neighbouring words merged, as spans sorted by summed weight."""
    words = {word_ids[tokens[i]] for i in top if word_ids[tokens[i]] is not None}
    spans, current = [], None
    for i, tok in enumerate(tokens):
        word = word_ids[tok]
        if word in words:
            if current is not None and (word == current["word"] or word == current["word"] + 1):
                current.update(end=offsets[tok][1], word=word, weight=current["weight"] + float(content[i]))
            else:
                current = {"start": offsets[tok][0], "end": offsets[tok][1], "word": word,
                           "weight": float(content[i])}
                spans.append(current)
        else:
            current = None
    return sorted(({"text": text[s["start"]:s["end"]], "start": int(s["start"]), "end": int(s["end"]),
                    "weight": s["weight"]} for s in spans), key=lambda s: -s["weight"])


def format_explanation(result: dict, top_k: int = 10) -> str:
    """Plain-text rendering of run_explain's result for the terminal (contains note text: PHI)."""
    lines = [f"note {result['note_id']}  model {result['model_version']}  chunks {result['n_chunks']}"
             + ("  (truncated)" if result["truncated"] else "")]
    if result.get("source") == "evidence":
        lines.append(f"evidence written by scoring run {result['run_id']} (bertxml.evidence)")
    for c in result["codes"]:
        flag = "predicted" if c["predicted"] else "not predicted"
        where = f", chunk {c['chunk_index']}" if c["chunk_index"] is not None else ""
        lines.append(f"{c['code']}  {c['description'] or ''}  p={_fmt(c['probability'])} "
                     f"(threshold {_fmt(c['threshold'])}, {flag}){where}")
        if c["top_tokens"]:
            lines.append("  tokens: " + ", ".join(f"{x['text']!r} {x['weight']:.3f}" for x in c["top_tokens"][:top_k]))
        lines.append("  spans:  " + ", ".join(f"{x['text']!r} {x['weight']:.3f}" for x in c["spans"][:top_k]))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.3f}"


def render_html(text: str, result: dict, note_id: str) -> str:
    """The note once per explained code, each token of the deciding chunk (or each evidence span) shaded by
    its attention weight (alpha = weight / the largest), like the paper's Figure 3. Everything is
    HTML-escaped."""
    sections = []
    for c in result["codes"]:
        shades = sorted(c["_shades"])
        top = max((w for _, _, w in shades), default=1.0)
        parts, pos = [], 0
        for start, end, weight in shades:
            if start < pos or end <= start:
                continue
            parts.append(html.escape(text[pos:start]))
            alpha = weight / top if top > 0 else 0.0
            parts.append(f'<span style="background: rgba(200, 30, 30, {alpha:.3f})" '
                         f'title="{weight:.4f}">{html.escape(text[start:end])}</span>')
            pos = end
        parts.append(html.escape(text[pos:]))
        flag = "predicted" if c["predicted"] else "not predicted"
        origin = (f"attention of chunk {c['chunk_index']} (the chunk that set the probability)"
                  if c["chunk_index"] is not None else
                  f"its {len(shades)} most attended spans, from scoring run {result.get('run_id')}")
        sections.append(
            f"<h2>{html.escape(c['code'])} {html.escape(c['description'] or '')}</h2>"
            f"<p class=meta>p = {_fmt(c['probability'])}, threshold {_fmt(c['threshold'])} ({flag}); "
            f"{html.escape(origin)}</p>"
            f"<div class=note>{''.join(parts)}</div>")
    return ("<!doctype html><html><head><meta charset=utf-8><meta name=robots content=noindex>"
            f"<title>bertxml explain {html.escape(note_id)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            ".note{white-space:pre-wrap;font-family:monospace;line-height:1.6;border:1px solid #ccc;padding:1em}"
            ".phi{background:#fff3cd;padding:.5em}.meta{color:#555}</style></head><body>"
            f"<p class=phi>{html.escape(PHI_WARNING)}</p>"
            f"<h1>Note {html.escape(note_id)}, model {html.escape(result['model_version'])}</h1>"
            + "".join(sections) + "</body></html>")


def write_private(path: str | Path, content: str) -> Path:
    """Write a file readable by its owner only (0600): it holds PHI."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    os.chmod(path, 0o600)
    return path


def read_note_text(wh, cfg: Config, note_id: str, notes_source: str | None = None) -> str:
    """A note's text by id: from the notes SOURCE, else from bertxml.labeled_notes. Raises LookupError."""
    tried = []
    spec = notes_source or cfg.warehouse.notes
    try:
        notes, _ = wh.read_source(spec, t.NOTES_SCHEMA, "notes")
        texts = {r[0] for r in notes.filter(F.col("note_id") == note_id).select("text").limit(5).collect()}
        tried.append(spec)
    except FileNotFoundError:
        texts = set()
    if not texts and wh.exists(wh.name(t.LABELED_NOTES)):
        tried.append(wh.name(t.LABELED_NOTES))
        texts = {r[0] for r in wh.table(wh.name(t.LABELED_NOTES)).filter(F.col("note_id") == note_id)
                 .select("text").limit(5).collect()}
    if not texts:
        raise LookupError(f"note {note_id!r} not found in {', '.join(tried) or spec}")
    if len(texts) > 1:
        raise LookupError(f"note id {note_id!r} has {len(texts)} different texts in the source")
    return texts.pop()


def run_explain(wh, cfg: Config, note_id: str, code: str | None = None, model_dir: str | Path | None = None,
                html_path: str | Path | None = None, top_k: int = 10) -> dict:
    """Explain one note's predictions (see the module docstring). Prints the PHI warning to stderr; returns
    {"note_id", "model_version", "n_chunks", "truncated", "codes": [...], "source": "evidence" | "model",
    "html_path"} (with note text: PHI; render it with `format_explanation`). Writes the HTML only when
    html_path is given; no table ever receives the text."""
    print(PHI_WARNING, file=sys.stderr)
    with job_run(wh, "explain") as run:
        model_dir = resolve_model(cfg, wh.workdir, model_dir).model_dir  # a folder, models:/ URI or default
        run.inputs["model"] = str(model_dir)
        info = read_model_info(model_dir, cfg.score.threshold_default)
        evidence = read_evidence(wh, note_id, info.model_version)
        if evidence is not None and code is not None and code not in {c["code"] for c in evidence["codes"]}:
            evidence = None  # a code the scoring run wrote no evidence for (not predicted): recompute
        text = read_note_text(wh, cfg, note_id)
        if evidence is not None and max(x["end"] for c in evidence["codes"] for x in c["spans"]) > len(text or ""):
            log.warning("note %s is shorter than its evidence spans: changed since it was scored; recomputing",
                        note_id)
            evidence = None
        if evidence is not None:
            result = explain_from_evidence(info, text, evidence, code)
        else:
            scorer = make_predict_fn(model_dir, cfg.score.device, **score_options(cfg.score))
            result = explain_text(scorer, text, code, top_k)
        result["note_id"] = note_id
        if html_path:
            result["html_path"] = str(write_private(html_path, render_html(text, result, note_id)))
            run.outputs["html"] = "written"  # the path may name the patient: not recorded
        # The job_runs row: ids and counts only, never text.
        run.count("note_id", note_id)
        run.count("model_version", result["model_version"])
        run.count("codes_explained", [c["code"] for c in result["codes"]])
        run.count("n_chunks", result["n_chunks"])
        run.count("source", result["source"])
    for c in result["codes"]:
        c.pop("_weights", None)
        c.pop("_shades", None)
    result.pop("_offsets", None)
    return result
