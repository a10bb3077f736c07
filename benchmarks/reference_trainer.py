"""The reference recipe: transformers ``Trainer`` + PEFT LoRA on Alpaca data, as LLM-Pruner's
``post_training.py`` and alpaca-lora's ``finetune.py`` run it.

This is what a user would run instead of lit-recover, written out so that the benchmark compares
against the recipe itself rather than a straw man. Its steps, in order:

1. load the pruned pickle with plain ``torch.load`` (``{'model', 'tokenizer'}``), pad id 0, left padding;
2. wrap the model with a PEFT ``LoraConfig`` (r, alpha, dropout, the seven projections);
3. load the Alpaca JSON with ``datasets``, shuffle it, and tokenize each record with the Alpaca template:
   the full prompt+response truncated at ``cutoff_len`` (an EOS appended when it fits), and, with
   ``train_on_inputs=False``, the prompt tokenized separately and its positions set to -100;
4. train with ``transformers.Trainer``: ``per_device_train_batch_size=micro_batch_size``,
   ``gradient_accumulation_steps=batch_size // micro_batch_size``, ``warmup_steps=100``,
   ``optim="adamw_torch"``, length grouping as a flag, ``DataCollatorForSeq2Seq(pad_to_multiple_of=8,
   padding=True)``; fp16 on CUDA as the recipe does, fp32 on CPU.

Differences from the published scripts, all of which leave the math alone: validation is off by
default (``val_set_size=0``: the benchmark times training), the shuffle is seeded, ``report_to`` is
``none`` (no wandb), and ``max_steps`` can cut a run short. LLM-Pruner's
``prepare_model_for_int8_training`` only freezes the base weights (PEFT does that too) and wraps
``lm_head`` in a cast to fp32 (a no-op in fp32); it turns on gradient checkpointing only for 8-bit
models, so the reference runs without it.

Usage, from the repository root: ``python -m benchmarks.reference_trainer --prune_model
prune_log/x/pruned_model.bin --data_path ../shared/data/alpaca/alpaca_data_cleaned.json --output_dir
results/reference``
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"

# alpaca-lora's templates/alpaca.json, which LLM-Pruner ships unchanged.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class ReferenceConfig:
    """The recipe's options (names as in LLM-Pruner's ``post_training.py``).

    Args:
        prune_model: the LLM-Pruner pickle ``{'model', 'tokenizer'}``.
        data_path: an Alpaca-format JSON file (list of ``instruction``/``input``/``output``).
        output_dir: where the Trainer writes checkpoints.
        batch_size: examples per optimizer step.
        micro_batch_size: examples per forward/backward.
        num_epochs: training epochs (``max_steps`` overrides).
        max_steps: stop after this many optimizer steps (-1: run the epochs).
        learning_rate: peak learning rate.
        cutoff_len: truncation length in tokens.
        val_set_size: held-out records (0: no validation).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: comma-separated module names that get adapters.
        train_on_inputs: also train on the prompt tokens.
        add_eos_token: the recipe's flag for the prompt-length correction (see ``tokenize_record``).
        group_by_length: length-grouped sampling.
        sequential: keep the file's order (no shuffle, no sampler shuffle): for comparing losses step by step.
        warmup_steps: linear warm-up steps.
        logging_steps: log the loss every N steps.
        seed: seed of the data shuffle, the sampler and the LoRA initialisation.
        limit: use only the first N records of the file.
        dataloader_num_workers: loader worker processes (the recipe's 0).
    """

    prune_model: str
    data_path: str
    output_dir: str = "results/reference"
    batch_size: int = 64
    micro_batch_size: int = 4
    num_epochs: int = 2
    max_steps: int = -1
    learning_rate: float = 1e-4
    cutoff_len: int = 256
    val_set_size: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = TARGET_MODULES
    train_on_inputs: bool = False
    add_eos_token: bool = False
    group_by_length: bool = False
    sequential: bool = False
    warmup_steps: int = 100
    logging_steps: int = 10
    seed: int = 42
    limit: int | None = None
    dataloader_num_workers: int = 0
    extra_training_args: dict[str, Any] = field(default_factory=dict)


def generate_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """The Alpaca prompt for a record, with the response appended when given."""
    text = PROMPT_INPUT.format(instruction=instruction, input=input) if input else PROMPT_NO_INPUT.format(
        instruction=instruction
    )
    return f"{text}{output}" if output else text


def _tokenize(tokenizer, text: str, cutoff_len: int, add_eos_token: bool = True) -> dict[str, list[int]]:
    result = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    ids, mask = list(result["input_ids"]), list(result["attention_mask"])
    # the recipe appends EOS only when the text was not cut off
    if add_eos_token and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}


def tokenize_record(
    tokenizer, record: dict[str, Any], cutoff_len: int = 256, train_on_inputs: bool = False,
    add_eos_token: bool = False,
) -> dict[str, list[int]]:
    """Tokenize one Alpaca record as the recipe does.

    The full text always gets an EOS when it fits. With ``train_on_inputs=False`` the prompt is
    tokenized on its own and its length masks the first labels; ``add_eos_token`` adds (and then
    discounts) an EOS on that prompt, exactly as in the published scripts.
    """
    full = _tokenize(
        tokenizer, generate_prompt(record["instruction"], record.get("input"), record["output"]), cutoff_len
    )
    if not train_on_inputs:
        prompt = _tokenize(
            tokenizer, generate_prompt(record["instruction"], record.get("input")), cutoff_len, add_eos_token
        )
        n = len(prompt["input_ids"]) - (1 if add_eos_token else 0)
        full["labels"] = [IGNORE_INDEX] * n + full["labels"][n:]
    return full


def load_model(path: str) -> tuple[torch.nn.Module, Any]:
    """``torch.load`` of an LLM-Pruner pickle (runs code named by the file: trusted files only).

    A pickle-free pruned folder (``lit_recover.models.folder``) is read by lit-recover's reader
    instead, giving the same model and tokenizer objects: the GPU check hands both sides one folder
    rather than writing a multi-GB pickle as well (loading is not timed).
    """
    if os.path.isdir(path):
        from lit_recover.models.load import load_pruned

        model, tokenizer = load_pruned(path, check=False)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        model, tokenizer = obj["model"], obj["tokenizer"]
    tokenizer.pad_token_id = 0  # unk on LLaMA: different from EOS
    tokenizer.padding_side = "left"
    if torch.cuda.is_available():
        model.half().cuda()
    return model, tokenizer


def wrap_lora(model: torch.nn.Module, cfg: ReferenceConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.lora_target_modules.split(","),
        lora_dropout=cfg.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_data(tokenizer, cfg: ReferenceConfig):
    """``(train, val)`` datasets: shuffled, tokenized with ``datasets.map`` (``val`` is ``None`` at size 0)."""
    from datasets import load_dataset

    data = load_dataset("json", data_files=cfg.data_path)["train"]
    if cfg.limit is not None:
        data = data.select(range(min(cfg.limit, len(data))))

    def tokenize(record: dict[str, Any]) -> dict[str, list[int]]:
        return tokenize_record(tokenizer, record, cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token)

    def shuffled(table):
        return table if cfg.sequential else table.shuffle(seed=cfg.seed)

    if cfg.val_set_size > 0:
        split = data.train_test_split(test_size=cfg.val_set_size, shuffle=True, seed=42)
        return shuffled(split["train"]).map(tokenize), shuffled(split["test"]).map(tokenize)
    return shuffled(data).map(tokenize), None


def training_arguments(cfg: ReferenceConfig):
    """The recipe's ``TrainingArguments`` (length grouping through whichever option this release has)."""
    import transformers

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kwargs: dict[str, Any] = dict(
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        fp16=torch.cuda.is_available(),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=200,
        save_total_limit=3,
        output_dir=cfg.output_dir,
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        disable_tqdm=True,
    )
    if cfg.val_set_size > 0:
        strategy = "eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"
        kwargs.update({strategy: "steps", "eval_steps": 200, "load_best_model_at_end": True})
    if "train_sampling_strategy" in fields:  # transformers 5
        if cfg.sequential:
            kwargs["train_sampling_strategy"] = "sequential"
        elif cfg.group_by_length:
            kwargs["train_sampling_strategy"] = "group_by_length"
    else:
        if cfg.sequential:
            raise ValueError("sequential order needs transformers >= 5 (train_sampling_strategy)")
        kwargs["group_by_length"] = cfg.group_by_length
    kwargs.update(cfg.extra_training_args)
    return transformers.TrainingArguments(**kwargs)


def build_trainer(model, tokenizer, train_data, val_data, cfg: ReferenceConfig, callbacks: Sequence = ()):
    """The recipe's ``Trainer`` with ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``."""
    import transformers

    trainer = transformers.Trainer(
        model=model,
        train_dataset=train_data,
        eval_dataset=val_data,
        args=training_arguments(cfg),
        data_collator=transformers.DataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True
        ),
        callbacks=list(callbacks),
    )
    model.config.use_cache = False
    return trainer


def run_reference(cfg: ReferenceConfig, callbacks: Sequence = (), on_model=None):
    """Run the recipe top to bottom; returns the finished ``Trainer``.

    ``on_model(peft_model)`` is called after wrapping, before training (the benchmark attaches its
    meters there).
    """
    import transformers

    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size}")
    model, tokenizer = load_model(cfg.prune_model)
    transformers.set_seed(cfg.seed)  # the LoRA initialisation, as Lightning's seed_everything does
    model = wrap_lora(model, cfg)
    model.print_trainable_parameters()
    train_data, val_data = load_data(tokenizer, cfg)
    if on_model is not None:
        on_model(model)
    trainer = build_trainer(model, tokenizer, train_data, val_data, cfg, callbacks)
    trainer.train()
    model.save_pretrained(cfg.output_dir)
    return trainer


def parse_args(argv: Sequence[str] | None = None) -> ReferenceConfig:
    parser = argparse.ArgumentParser(description="The reference recipe: transformers Trainer + PEFT LoRA.")
    defaults = ReferenceConfig(prune_model="", data_path="")
    for f in dataclasses.fields(ReferenceConfig):
        if f.name == "extra_training_args":
            continue
        default = getattr(defaults, f.name)
        if f.name in ("prune_model", "data_path"):
            parser.add_argument(f"--{f.name}", required=True)
        elif isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", default=default)
        elif f.name == "limit":
            parser.add_argument("--limit", type=int, default=None)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default)
    return ReferenceConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_reference(parse_args())
