"""Checks of CPTPlugin against the real Axolotl; run inside the Axolotl virtual environment.

Not collected by the main pytest run (no ``test_`` prefix): ``tests/integrations/test_axolotl.py`` runs it as
``.venv-axolotl/bin/python run_axolotl_checks.py WORKDIR`` and reads its JSON report (last stdout line).

It loads the plugin through Axolotl's own config loading (``load_cfg``: PluginManager, merged schema), then
runs a whole ``axolotl.train`` (2 steps) on a tiny random-weight Llama and tokenizer saved locally.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

PLUGIN = "cpt_plugin.integrations.axolotl.CPTPlugin"
REPORT: dict = {"checks": {}, "messages": []}


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        REPORT["messages"].append(record.getMessage())


def build_assets(work: Path) -> tuple[Path, Path]:
    """A tiny Llama (random weights) + word-level tokenizer + raw-text jsonl, all on disk."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data = work / "tiny-llama", work / "corpus.jsonl"
    if not (model_dir / "config.json").exists():
        words = [f"w{i}" for i in range(200)]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(vocab),
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(model_dir)
        fast.save_pretrained(model_dir)
        rows = [" ".join(words[(i * 7 + j) % 200] for j in range(40)) for i in range(64)]
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return model_dir, data


def base_config(work: Path, model_dir: Path, data: Path, **extra) -> dict:
    cfg = {
        "base_model": str(model_dir),
        "model_type": "LlamaForCausalLM",
        "tokenizer_type": "PreTrainedTokenizerFast",
        "plugins": [PLUGIN],
        "datasets": [{"path": str(data), "ds_type": "json", "type": "completion", "field": "text"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0.0,
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "optimizer": "adamw_torch",
        "output_dir": str(work / "out"),
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "special_tokens": {"pad_token": "<pad>"},
        "cpt": {"lora_r": 8, "lora_alpha": 16, "schedule": "wsd", "decay_ratio": 0.5},
    }
    cfg.update(extra)
    return cfg


def load(cfg: dict):
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    return load_cfg(DictDefault(cfg))


def expect_error(name: str, cfg: dict, *needles: str) -> None:
    try:
        load(cfg)
    except Exception as error:  # noqa: BLE001 - any Axolotl wrapper is fine if the message is ours
        text = str(error)
        ok = all(n in text for n in needles)
        REPORT["checks"][name] = {"ok": ok, "error": text[-600:]}
        return
    REPORT["checks"][name] = {"ok": False, "error": "no error raised"}


def check(name: str, ok: bool, **detail) -> None:
    REPORT["checks"][name] = {"ok": bool(ok), **{k: repr(v) for k, v in detail.items()}}


def main(work: Path) -> None:
    import axolotl
    import peft
    import torch
    import transformers

    REPORT["versions"] = {
        "axolotl": axolotl.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
    }
    logging.getLogger("cpt_plugin").addHandler(_Collect())
    logging.getLogger("cpt_plugin").setLevel(logging.INFO)
    model_dir, data = build_assets(work)

    # --- config validation through Axolotl's merged schema -----------------------------------------
    expect_error("typo_key", base_config(work, model_dir, data, cpt={"lora_rr": 8}), "lora_rr", "lora_r")
    expect_error(
        "bad_value", base_config(work, model_dir, data, cpt={"schedule": "cosin"}), "schedule", "cosine"
    )
    expect_error("stray_prefixed_key", base_config(work, model_dir, data, cpt_lora_r=8), "cpt_lora_r", "cpt:")
    expect_error("qlora_adapter", base_config(work, model_dir, data, adapter="qlora"), "adapter: qlora")
    no_plugin = base_config(work, model_dir, data)
    no_plugin.pop("plugins")
    from cpt_plugin.integrations.axolotl import check_config

    try:
        check_config(no_plugin)
        check("keys_without_plugin", False, error="no error")
    except Exception as error:  # noqa: BLE001
        check("keys_without_plugin", PLUGIN in str(error) and "plugins" in str(error), error=str(error))

    # --- overlapping Axolotl settings: cpt wins, with messages -------------------------------------
    REPORT["messages"].clear()
    cfg = load(
        base_config(
            work,
            model_dir,
            data,
            adapter="lora",
            lora_r=4,
            lora_alpha=8,
            peft_use_rslora=False,
            lora_modules_to_save=["embed_tokens"],
            embedding_lr_scale=0.5,
            gradient_checkpointing="offload",
        )
    )
    notes = list(REPORT["messages"])
    check(
        "precedence",
        cfg.adapter == "cpt"
        and cfg.lora_r == 8
        and cfg.embedding_lr_scale is None
        and not cfg.activation_offloading
        and cfg.gradient_checkpointing is True
        and cfg.lora_modules_to_save is None,
        adapter=cfg.adapter,
        lora_r=cfg.lora_r,
        gc=cfg.gradient_checkpointing,
        ao=cfg.activation_offloading,
    )
    for key in (
        "adapter: lora",
        "lora_r: 4",
        "peft_use_rslora",
        "lora_modules_to_save",
        "embedding_lr_scale",
        "gradient_checkpointing: offload",
    ):
        check(f"message[{key}]", any(key in n and "wins" in n or key in n and "→" in n for n in notes))

    # --- a whole axolotl.train run -------------------------------------------------------------------
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train
    from axolotl.utils.dict import DictDefault  # noqa: F401

    # muon: Axolotl's trainer would build its own optimizer (optimizer_cls_and_kwargs) without the plugin's pin
    REPORT["messages"].clear()
    cfg = load(base_config(work, model_dir, data, optimizer="muon", gradient_checkpointing=True))
    check("message[optimizer: muon]", any("optimizer: muon ignored" in n for n in REPORT["messages"]))
    captured: dict = {}
    from transformers import Trainer

    original_train = Trainer.train

    def spy_train(self, *args, **kwargs):
        captured["trainer"] = self
        return original_train(self, *args, **kwargs)

    Trainer.train = spy_train
    try:
        dataset_meta = load_datasets(cfg=cfg)
        model, _, trainer = train(cfg=cfg, dataset_meta=dataset_meta)
    finally:
        Trainer.train = original_train
    trainer = captured.get("trainer", trainer)
    from cpt_plugin.integrations.hf import find_cpt_callback
    from cpt_plugin.schedules import plan_of

    groups = {g.get("cpt_group"): g for g in trainer.optimizer.param_groups}
    peft_model = trainer.model
    check(
        "model_prepared_by_cpt_plugin",
        getattr(peft_model, "cpt_config", None) is not None,
        type=type(peft_model).__name__,
    )
    check("callback_attached", find_cpt_callback(trainer.callback_handler.callbacks) is not None)
    lora_lr = groups.get("lora", {}).get("initial_lr", groups.get("lora", {}).get("lr"))
    emb_lr = groups.get("embeddings", {}).get("initial_lr", groups.get("embeddings", {}).get("lr"))
    check(
        "param_groups",
        lora_lr is not None and emb_lr is not None and abs(emb_lr - lora_lr / 10) < 1e-12,
        groups=sorted(str(k) for k in groups),
        lora=lora_lr,
        embeddings=emb_lr,
    )
    plan = plan_of(trainer.lr_scheduler)
    check(
        "cpt_schedule",
        plan is not None and plan.name == "wsd",
        plan=plan,
        scheduler=type(trainer.lr_scheduler).__name__,
    )
    lora_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    scale = lora_layer.scaling["default"]
    check("rslora_scale", abs(scale - 16 / 8**0.5) < 1e-6, scale=scale)
    cfg_peft = peft_model.peft_config["default"]
    check(
        "modules_to_save",
        set(cfg_peft.modules_to_save or []) == {"embed_tokens", "lm_head"},
        modules=cfg_peft.modules_to_save,
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    check(
        "trained_steps",
        trainer.state.global_step == 2 and len(losses) >= 1 and all(x == x for x in losses),
        steps=trainer.state.global_step,
        losses=losses,
    )
    logged = [h for h in trainer.state.log_history if "embedding_learning_rate" in h]
    check("cpt_metrics_logged", bool(logged), history=trainer.state.log_history[:2])
    check(
        "checkpointing_on",
        any(getattr(m, "gradient_checkpointing", False) is True for m in peft_model.modules()),
    )
    check(
        "adapter_saved",
        any((work / "out").glob("adapter_config.json")),
        files=sorted(p.name for p in (work / "out").glob("*")),
    )


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        main(workdir)
    except Exception:  # noqa: BLE001 - reported to the outer test
        REPORT["crash"] = traceback.format_exc()[-4000:]
    print("CPT_AXOLOTL_REPORT " + json.dumps(REPORT, default=repr))
