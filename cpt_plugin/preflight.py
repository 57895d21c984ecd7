"""Pre-flight checks of the model and the Trainer's inputs: failures that would come late or deep become
clear errors before the first step.

Without them these surface as an index error deep in torch at step 1 (a tokenizer larger than the
embedding), an AttributeError inside PEFT (an encoder or a classification model), or a setting that
silently does nothing (``replay_ratio`` with a dataset that does no replay). Each check names the values
it saw and the fix. Data files are checked elsewhere (the data module); this module looks at the model,
the tokenizer and the configuration only.
"""

from __future__ import annotations

import logging
from typing import Any

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.model_parts import input_embeddings, output_embeddings

logger = logging.getLogger(__name__)

# An embedding LR above this multiple of the LoRA LR is legal but almost always a mistake.
SUSPICIOUS_EMBEDDING_LR_RATIO = 10.0


# --- the model ----------------------------------------------------------------------------------
def causal_lm_problem(model: Any) -> str | None:
    """Why cpt-plugin cannot train ``model`` as a causal LM (a short phrase), or None when it can.

    Judged by capability, not by name, so that any architecture (and remote code) that is a causal LM
    passes: it needs a next-token head (``get_output_embeddings``) and generation inputs
    (``prepare_inputs_for_generation``, which PEFT's causal-LM wrapper reads), and must not be an
    encoder-decoder.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model, not a causal language model"
    if output_embeddings(model) is None or not callable(
        getattr(model, "prepare_inputs_for_generation", None)
    ):
        return f"{name} is not a causal language model (it has no next-token head)"
    return None


def check_causal_lm(model: Any) -> None:
    """Raises a CPTConfigError when ``model`` is not a causal LM (PEFT would fail deep inside)."""
    problem = causal_lm_problem(model)
    if problem is not None:
        raise CPTConfigError(
            f"cpt-plugin: {problem}. cpt-plugin trains causal language models (continued pretraining by "
            "next-token prediction): load the model with AutoModelForCausalLM.from_pretrained(...) "
            "instead of AutoModel / AutoModelFor<Task>, or train this model without CPTCallback."
        )


def embedding_rows(model: Any) -> int | None:
    """Rows of the input embedding (the largest token id + 1 the model accepts), PEFT wrappers included."""
    embedding = input_embeddings(model)
    if embedding is None:
        return None
    for module in (
        embedding,
        getattr(embedding, "original_module", None),
        getattr(embedding, "base_layer", None),
    ):
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(weight, "ndim", 0) == 2:
            return int(weight.shape[0])
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows else None


def _tokenizer_length(processing_class: Any) -> int | None:
    tokenizer = processing_class
    if tokenizer is not None and not hasattr(tokenizer, "__len__"):
        tokenizer = getattr(tokenizer, "tokenizer", None)  # a multimodal processor wraps the tokenizer
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


def check_tokenizer_fits(model: Any, processing_class: Any) -> None:
    """A tokenizer with more tokens than the embedding has rows crashes deep in torch at step 1."""
    tokens, rows = _tokenizer_length(processing_class), embedding_rows(model)
    if tokens is None or rows is None or tokens <= rows:
        return
    raise CPTConfigError(
        f"cpt-plugin: the tokenizer has {tokens} tokens but the model's input embedding has only {rows} rows, "
        f"so any token id >= {rows} would crash the first step. Resize the embeddings before building the "
        "Trainer: model.resize_token_embeddings(len(tokenizer)) (cpt-plugin then trains the new rows with the "
        "embeddings)."
    )


# --- configuration values that are legal but cannot take effect or look wrong -------------------------
def check_replay(config: CPTConfig, train_dataset: Any) -> None:
    """``replay_ratio`` is done by CPTDataset; with any other dataset it would be silently ignored."""
    from cpt_plugin.data import CPTDataset

    for _ in range(4):  # a DataLoader's dataset may be wrapped (accelerate's IterableDatasetShard, ...)
        if isinstance(train_dataset, CPTDataset) or not hasattr(train_dataset, "dataset"):
            break
        train_dataset = train_dataset.dataset
    if not config.replay_ratio or train_dataset is None:
        return
    if isinstance(train_dataset, CPTDataset) and train_dataset.replay_ratio > 0:
        if abs(train_dataset.replay_ratio - config.replay_ratio) > 1e-12:
            raise CPTConfigError(
                f"cpt-plugin config 'replay_ratio': the callback says {config.replay_ratio} but the training "
                f"CPTDataset replays {train_dataset.replay_ratio}; the dataset's value is the one used. Set it in "
                "one place: drop replay_ratio from the CPTCallback/CPTConfig (the dataset does the replay)."
            )
        return
    kind = type(train_dataset).__name__
    raise CPTConfigError(
        f"cpt-plugin config 'replay_ratio': {config.replay_ratio} cannot take effect: the Trainer's train_dataset "
        f"({kind}) does no replay, and the callback does not change the data. Replay is mixed in by the dataset: "
        "train_dataset=cpt_plugin.data.CPTDataset(source, tokenizer, max_seq_length, replay_source=OLD_CORPUS, "
        f"replay_ratio={config.replay_ratio}) (with data_collator=cpt_plugin.data.collate_packed), and leave "
        "replay_ratio out of the CPTCallback."
    )


def warn_if_embedding_lr_suspicious(learning_rate: float, embedding_lr: float) -> bool:
    """Warns when the embedding LR is more than 10x the LoRA LR (legal, but embeddings want a smaller LR)."""
    if learning_rate <= 0 or embedding_lr <= SUSPICIOUS_EMBEDDING_LR_RATIO * learning_rate:
        return False
    logger.warning(
        "cpt-plugin: the embedding learning rate %.3g is %.0fx the LoRA learning rate %.3g. That is legal but "
        "unusual: fully trained embeddings normally take a smaller LR than LoRA (default: 0.1x). If this is not "
        "intended, check embedding_learning_rate / embedding_lr_ratio.",
        embedding_lr,
        embedding_lr / learning_rate,
        learning_rate,
    )
    return True


# --- what CPTCallback runs ---------------------------------------------------------------------------
def check_trainer_inputs(
    config: CPTConfig, model: Any, processing_class: Any = None, train_dataset: Any = None
) -> None:
    """The checks on what a Trainer was given, run at Trainer construction (before the model is wrapped)."""
    check_causal_lm(model)
    check_tokenizer_fits(model, processing_class)
    check_replay(config, train_dataset)
