"""Vocabulary extension: new tokens added to the tokenizer, the embedding rows to the model, soundly initialised.

Why: a new domain or language splits its frequent words into many old sub-tokens (longer sequences, more
compute per word, and knowledge spread over pieces). Adding its frequent words as tokens shortens the text;
the rows they get must start somewhere sensible, not at the init noise of ``resize_token_embeddings``.

- :func:`learn_new_tokens` finds the N words of a corpus that save the most tokens: the tokenizer's own
  pre-tokenizer splits the text into words (so a learned token never spans a word boundary the tokenizer
  keeps), and a word's saving is ``count * (pieces - 1)``. Words are whole pre-tokens (with their leading
  space for byte-level tokenizers, e.g. ``" return"``) because added tokens are matched in the raw text
  before pre-tokenization: a sub-word piece such as ``"ation"`` would be cut out of every word holding it;
  for the same reason a word is only taken when it occurs nowhere in the corpus but as itself.
- :func:`add_new_tokens` adds them (``tokenizer.add_tokens``), resizes the embeddings (padded to a multiple
  of 64, tied stays tied, never shrunk), initialises the new rows, and marks them (and the padding rows it
  made) fresh (fresh_rows.py), so the optimizer trains them at their own rate and healing leaves them
  alone. Old token ids are unchanged.

Init ``"subtoken_mean"``: a new token's row is the mean of the rows of the sub-tokens the old tokenizer
splits it into (input and output matrix each), so the model starts out reading and predicting it roughly
as the pieces it replaces. ``"mean"``: the mean of the trained rows (rows of the old tokenizer's ids that
are not marked fresh). Padding rows (beyond ``len(tokenizer)``) get that mean too.

Everything is checked before anything changes; a bad input is a CPTConfigError naming the token and the fix.
With the Trainer, extension happens in the user's script (the data is tokenized before any callback runs):
:func:`check_trainer_vocabulary` says so for the config keys, and :func:`keep_adapter_saves_lean` keeps
PEFT from saving every embedding matrix again in each adapter of an extended model.
Known limit (tokenizers issues #1392, #1915): a byte-level decoder reads an added token made only of
byte-map characters as raw bytes, so ``"Straße"`` (ß is the byte map's 0xDF) encodes right but decodes as
``"Stra�e"``; ``" Straße"`` (a space is no byte-map character) decodes right. Every token is checked (it
must encode to its one id and decode back): :func:`add_new_tokens` refuses one that fails, naming it, and
:func:`learn_new_tokens` skips it.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from cpt_plugin.config import CPTConfigError, did_you_mean
from cpt_plugin.model_parts import embeddings_tied, input_embeddings, output_embeddings
from cpt_plugin.vocabulary.fresh_rows import fresh_rows, mark_fresh_rows

logger = logging.getLogger(__name__)

INITS = ("subtoken_mean", "mean")
PAD_TO_MULTIPLE_OF = 64
MIN_COUNT = 2  # a word seen once in the corpus is not worth a row
MAX_CHARS = 20_000_000  # learn_new_tokens reads this much of the corpus (0.5 M characters/s on one CPU core)
ADDED_ATTRIBUTE = "cpt_added_token_ids"  # on the base model: the ids add_new_tokens added


# --- learning new tokens ------------------------------------------------------------------------
def _backend(tokenizer: Any, key: str) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CPTConfigError(
            f"cpt-plugin config '{key}': the tokenizer {type(tokenizer).__name__} is not a fast tokenizer "
            "(tokenizers library). Load it with AutoTokenizer.from_pretrained(..., use_fast=True), or list "
            "the tokens yourself in new_tokens."
        )
    return backend


def _read(texts: Iterable[str], max_chars: int | None) -> list[str]:
    """The texts, up to ``max_chars`` characters in all (the last one cut)."""
    out: list[str] = []
    read = 0
    for text in texts:
        if not isinstance(text, str):
            raise CPTConfigError(
                f"cpt-plugin config 'extend_vocabulary': the corpus gave a {type(text).__name__}, not a str. "
                "Pass the documents' texts."
            )
        if max_chars is not None and read + len(text) > max_chars:
            text = text[: max_chars - read]
        out.append(text)
        read += len(text)
        if max_chars is not None and read >= max_chars:
            break
    return out


def _batches(texts: list[str], size: int = 256) -> Iterable[list[str]]:
    return (texts[i : i + size] for i in range(0, len(texts), size))


def _word_counts(tokenizer: Any, texts: list[str]) -> tuple[Counter[str], dict[str, int]]:
    """How often each pre-token word occurs in ``texts``, and how many old tokens it takes."""
    backend = _backend(tokenizer, "extend_vocabulary")
    if backend.pre_tokenizer is None:
        raise CPTConfigError(
            "cpt-plugin config 'extend_vocabulary': the tokenizer has no pre-tokenizer (a legacy SentencePiece "
            "tokenizer.json), so it has no words to learn from. List the tokens yourself in new_tokens."
        )
    counts: Counter[str] = Counter()
    pieces: dict[str, int] = {}

    for batch in _batches(texts):
        for text, encoding in zip(batch, backend.encode_batch(batch, add_special_tokens=False), strict=True):
            spans: dict[int, list[int]] = {}
            for word, (start, end) in zip(encoding.word_ids, encoding.offsets, strict=True):
                if word is None:
                    continue
                span = spans.setdefault(word, [start, end, 0])
                span[0], span[1], span[2] = min(span[0], start), max(span[1], end), span[2] + 1
            for start, end, n in spans.values():
                word = text[start:end]
                counts[word] += 1
                pieces[word] = n
    return counts, pieces


def learn_new_tokens(
    tokenizer: Any,
    texts: Iterable[str],
    n: int,
    *,
    exclude: Iterable[str] = (),
    min_count: int = MIN_COUNT,
    max_chars: int | None = MAX_CHARS,
) -> list[str]:
    """The ``n`` words of ``texts`` whose own token would save the most tokens (deterministic).

    A candidate is a pre-token word the tokenizer splits into two or more tokens, seen at least
    ``min_count`` times, not whitespace only, not in ``exclude``; ranked by tokens saved
    (``count * (pieces - 1)``), then count, then the text itself. It is taken when, added, it matches the
    corpus only where it is a whole word (an added token is found anywhere in the raw text: ``"234"`` would
    also cut ``"12345"`` into worse pieces) and decodes back.
    Only the first ``max_chars`` characters are read (None: all): frequent words show early, and a
    corpus of many GB would take hours to tokenize.
    Raises CPTConfigError naming ``extend_vocabulary`` when the corpus gives fewer than ``n`` candidates.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise CPTConfigError(f"cpt-plugin config 'extend_vocabulary': got {n!r}. Use a whole number > 0.")
    corpus = _read(texts, max_chars)
    read = sum(map(len, corpus))
    counts, pieces = _word_counts(tokenizer, corpus)
    excluded = set(exclude)
    ranked = sorted(
        (word for word, count in counts.items() if count >= min_count and pieces[word] >= 2),
        key=lambda word: (-counts[word] * (pieces[word] - 1), -counts[word], word),
    )
    ranked = [word for word in ranked if word.strip() and word not in excluded]
    chosen = _take(tokenizer, ranked, n, counts, corpus)
    if len(chosen) < n:
        raise CPTConfigError(
            f"cpt-plugin config 'extend_vocabulary': asked for {n} new tokens, but the training corpus "
            f"supports only {len(chosen)} (words split into 2+ tokens, seen at least {min_count} times in its "
            f"first {read:,} characters, and found nowhere else). "
            + (f"Set extend_vocabulary: {len(chosen)} or lower" if chosen else "Set extend_vocabulary: 0")
            + ", or give more new-domain text."
        )
    saved = sum(counts[word] * (pieces[word] - 1) for word in chosen)
    total = sum(counts[word] * pieces[word] for word in counts)
    logger.info(
        "cpt-plugin: learned %d new tokens from %s characters of text (they shorten it by about %.1f%%)",
        n,
        f"{read:,}",
        100 * saved / max(total, 1),
    )
    return chosen


def _take(tokenizer: Any, ranked: list[str], n: int, counts: Counter[str], corpus: list[str]) -> list[str]:
    """The first ``n`` of ``ranked`` that, added to a copy of the tokenizer (a window of candidates at a
    time), match the corpus no more often than they occur as words, and encode and decode back."""
    chosen: list[str] = []
    start = 0
    while start < len(ranked) and len(chosen) < n:
        window = ranked[start : start + 4 * (n - len(chosen)) + 64]
        start += len(window)
        probe = copy.deepcopy(tokenizer)
        probe.add_tokens(window)
        ids = {int(probe.convert_tokens_to_ids(word)): word for word in window}
        matches: Counter[int] = Counter()
        for batch in _batches(corpus):
            for encoding in probe.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
                matches.update(i for i in encoding.ids if i in ids)
        for token_id, word in ids.items():
            if len(chosen) < n and matches[token_id] <= counts[word] and _problem(probe, word) is None:
                chosen.append(word)
    return chosen


def _problem(extended: Any, token: str) -> str | None:
    """Why ``token`` does not work in the extended tokenizer (None when it encodes to its id and back)."""
    token_id = extended.convert_tokens_to_ids(token)
    ids = extended.encode(token, add_special_tokens=False)
    if ids != [token_id]:
        return f"the tokenizer still splits it into {len(ids)} tokens (its normalizer changes the text)"
    decoded = extended.decode(ids)
    if decoded != token:
        why = f"it decodes as {decoded!r}"
        if " " not in token:
            why += (
                " (a byte-level tokenizer reads an added token without a space as raw bytes, tokenizers issue "
                f"#1915; with its leading space, {' ' + token!r}, it decodes right)"
            )
        return why
    return None


# --- adding tokens to a model --------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if hasattr(model, "peft_config") or hasattr(model, "get_base_model"):
        raise CPTConfigError(
            "cpt-plugin add_new_tokens: the model is already a PeftModel (prepared for training). Add tokens to "
            "the base model first, then call prepare_model / create the Trainer with CPTCallback."
        )
    config = getattr(model, "config", None)
    quantized = (
        getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(config, "quantization_config", None) is not None
    )
    if quantized:
        raise CPTConfigError(
            "cpt-plugin add_new_tokens: the model is loaded quantized (bitsandbytes 4/8-bit); resizing its "
            "embeddings needs unquantized weights. Load it in 16-bit (dtype=torch.bfloat16), add the tokens, "
            "save it (save_pretrained, with the tokenizer), and load that checkpoint quantized for training."
        )
    if input_embeddings(model) is None or output_embeddings(model) is None:
        raise CPTConfigError(
            f"cpt-plugin add_new_tokens: {type(model).__name__} has no input embeddings or LM head to resize; "
            "new tokens need a causal LM (AutoModelForCausalLM)."
        )


def _check_tokens(tokenizer: Any, new_tokens: Any) -> list[str]:
    if isinstance(new_tokens, str) or not isinstance(new_tokens, Sequence) or not new_tokens:
        raise CPTConfigError(
            f"cpt-plugin config 'new_tokens': expected a non-empty list of strings, got {new_tokens!r}. "
            'Give the tokens to add, e.g. new_tokens=["Kubernetes", " kubectl"].'
        )
    tokens = list(new_tokens)
    seen: set[str] = set()
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise CPTConfigError(
                f"cpt-plugin config 'new_tokens': every token must be a non-empty string, got {token!r}. "
                "Remove it."
            )
        if token in seen:
            raise CPTConfigError(
                f"cpt-plugin config 'new_tokens': {token!r} is listed twice. Remove the duplicate."
            )
        seen.add(token)
        ids = tokenizer.encode(token, add_special_tokens=False)
        if token in vocab or len(ids) == 1:
            token_id = vocab.get(token, ids[0] if ids else None)
            raise CPTConfigError(
                f"cpt-plugin config 'new_tokens': {token!r} is already in the vocabulary (as "
                f"{tokenizer.convert_ids_to_tokens(token_id)!r}, id {token_id}). Remove it from the list."
            )
    probe = copy.deepcopy(tokenizer)
    probe.add_tokens(tokens)
    for token in tokens:
        problem = _problem(probe, token)
        if problem is not None:
            raise CPTConfigError(
                f"cpt-plugin config 'new_tokens': {token!r} cannot be added: {problem}. Remove it from the list."
            )
    return tokens


def _trained_rows(model: Any, old_size: int, rows: int) -> torch.Tensor:
    """ids of the rows the base trained: the old tokenizer's ids that are not marked fresh."""
    keep = torch.ones(min(old_size, rows), dtype=torch.bool)
    marked = fresh_rows(model)
    if marked is not None:
        keep[marked[marked < keep.numel()]] = False
    if not keep.any():  # every row fresh: the mean of all of them is the best there is
        keep[:] = True
    return keep.nonzero().flatten()


def _initialise(
    weight: torch.Tensor,
    pieces: list[list[int]],
    new_ids: list[int],
    trained: torch.Tensor,
    size: int,
    init: str,
) -> None:
    """Writes the new rows (and the padding rows from ``size`` on) of one embedding matrix, in fp32 math."""
    old = weight.detach()
    mean = old[trained].float().mean(dim=0)
    with torch.no_grad():
        for token_id, ids in zip(new_ids, pieces, strict=True):
            row = old[ids].float().mean(dim=0) if init == "subtoken_mean" and ids else mean
            weight[token_id] = row.to(weight.dtype)
        if weight.shape[0] > size:
            weight[size:] = mean.to(weight.dtype)


def add_new_tokens(
    model: Any, tokenizer: Any, new_tokens: Sequence[str], init: str = "subtoken_mean"
) -> list[int]:
    """Adds ``new_tokens`` to ``tokenizer`` and rows for them to ``model``; returns their ids.

    Call it on the base model, before the data is tokenized and before PEFT (``prepare_model`` or the
    Trainer with CPTCallback). The embeddings are resized to ``len(tokenizer)`` padded to a multiple of 64
    (never shrunk: ids that fit into existing spare rows use them); ``model.config.vocab_size`` follows.
    Save the tokenizer with the adapter (``Trainer(processing_class=tokenizer)`` does).
    """
    if init not in INITS:
        fix = did_you_mean(init, INITS, f"Choose one of {', '.join(INITS)}.")
        raise CPTConfigError(f"cpt-plugin config 'new_token_init': unknown init {init!r}. {fix}")
    _check_model(model)
    tokens = _check_tokens(tokenizer, new_tokens)
    tied = embeddings_tied(model)
    pieces = [tokenizer.encode(token, add_special_tokens=False) for token in tokens]
    old_size, old_rows = len(tokenizer), int(input_embeddings(model).weight.shape[0])
    trained = _trained_rows(model, old_size, old_rows)
    added = tokenizer.add_tokens(tokens)
    new_ids = [int(tokenizer.convert_tokens_to_ids(token)) for token in tokens]
    if added != len(tokens) or sorted(new_ids) != list(range(old_size, old_size + len(tokens))):
        raise RuntimeError(  # _check_tokens rules this out; a tokenizer that disagrees is a bug to report
            f"cpt-plugin add_new_tokens: the tokenizer added {added} of {len(tokens)} tokens at ids {new_ids}."
        )
    size = len(tokenizer)
    if size > old_rows:
        model.resize_token_embeddings(size, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=False)
    matrices = [input_embeddings(model).weight]
    if tied and input_embeddings(model).weight is not output_embeddings(model).weight:
        raise RuntimeError(
            "cpt-plugin add_new_tokens: resize_token_embeddings untied the input embeddings and the LM head. "
            "Please report this with your transformers version."
        )
    if not tied:
        matrices.append(output_embeddings(model).weight)
    for weight in matrices:
        _initialise(weight, pieces, new_ids, trained, size, init)
    rows = int(matrices[0].shape[0])
    model.config.vocab_size = rows
    text_config = getattr(model.config, "get_text_config", None)
    if callable(text_config):
        text_config().vocab_size = rows
    # padding rows are fresh too: no token uses them, and healing must not count them as untrained base rows
    mark_fresh_rows(model, [*new_ids, *range(size, rows)])
    setattr(model, ADDED_ATTRIBUTE, [*getattr(model, ADDED_ATTRIBUTE, []), *new_ids])
    shown = ", ".join(repr(t) for t in tokens[:8]) + (", ..." if len(tokens) > 8 else "")
    logger.info(
        "cpt-plugin: added %d tokens (ids %d..%d, %s init; embedding rows %d -> %d): %s",
        len(tokens),
        min(new_ids),
        max(new_ids),
        init,
        old_rows,
        rows,
        shown,
    )
    return new_ids


# --- the Trainer path ----------------------------------------------------------------------------
def check_trainer_vocabulary(config: Any, model: Any) -> None:
    """Before the Trainer's first step: refuses what CPTCallback cannot do safely.

    The Trainer gets data its script has tokenized already, with the old tokenizer: adding tokens then
    would leave the new rows unused (and ``extend_vocabulary`` has no corpus to learn from). So the keys are
    for the CLI; a script calls :func:`add_new_tokens` itself, before tokenizing. Rows it added must train.
    """
    key = "new_tokens" if config.new_tokens else "extend_vocabulary" if config.extend_vocabulary else None
    if key is not None:
        raise CPTConfigError(
            f"cpt-plugin config '{key}': CPTCallback cannot add tokens, because the Trainer's data was tokenized "
            "with the old tokenizer before the callback runs. Call cpt_plugin.add_new_tokens(model, tokenizer, "
            "new_tokens=[...]) (cpt_plugin.learn_new_tokens(tokenizer, texts, n) finds them) before tokenizing "
            f"the data, and leave '{key}' unset."
        )
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    added = getattr(base, ADDED_ATTRIBUTE, None)
    if added and not config.train_embeddings:
        raise CPTConfigError(
            f"cpt-plugin config 'train_embeddings': add_new_tokens added {len(added)} tokens to this model, but "
            "train_embeddings is false, so their rows would never be trained. Set train_embeddings=True."
        )


def keep_adapter_saves_lean(peft_model: Any) -> None:
    """Saves of a PeftModel over an extended vocabulary keep only the trained embedding copies.

    Why: PEFT's ``save_pretrained`` sees the vocabulary differ from the base's config on disk and sets
    ``save_embedding_layers`` (with a UserWarning), which adds the frozen originals of embed_tokens and
    lm_head and their trained copies a second time: six matrices where the two trained copies, saved
    anyway as ``modules_to_save``, are all a reload and an export need.
    So, on a model :func:`add_new_tokens` extended, ``save_embedding_layers`` defaults to False (a caller
    may still pass True); the reload resizes the base first (``model.resize_token_embeddings(rows)``).
    """
    base = peft_model.get_base_model() if callable(getattr(peft_model, "get_base_model", None)) else None
    config = getattr(peft_model, "peft_config", {}).get("default")
    if (
        base is None
        or not getattr(base, ADDED_ATTRIBUTE, None)
        or not getattr(config, "modules_to_save", None)
    ):
        return
    save = peft_model.save_pretrained

    def save_pretrained(*args: Any, save_embedding_layers: Any = False, **kwargs: Any) -> Any:
        return save(*args, save_embedding_layers=save_embedding_layers, **kwargs)

    peft_model.save_pretrained = save_pretrained
