"""One client update done the way Flower's FlowerTune LLM template does it, for `make bench` to compare.

The template's ClientApp (examples/flowertune-llm in adap/flower, and `flwr new`'s FlowerTune
template) handles every train message the same way: it loads the base model, wraps it with a LoRA
adapter on every layer (`get_peft_model`), copies the received adapter in, trains with a Hugging Face
trainer for `max-steps` steps on the client's examples as plain text (its collator masks nothing: the
loss covers every token, prompt included) and replies with the adapter. The template uses trl's
SFTTrainer, a `Trainer` subclass; trl is not installed here, so the plain `Trainer` runs its loop with
the causal-LM collator. Not done here, in the peer's favour: 4-bit quantization and gradient
checkpointing (GPU memory savers that cost time on a CPU).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from common.adapters import AdapterSpec, StateDict, with_adapter
from common.model import load_base_model


def flowertune_client_update(
    model_name: str,
    spec: AdapterSpec,
    adapter: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_len: int,
    bf16: bool,
    seed: int,
) -> tuple[StateDict, float]:
    """Load, adapt, train with `Trainer` on `texts` (prompt + answer each), return (adapter, seconds)."""
    started = time.perf_counter()
    model, tokenizer = load_base_model(model_name)
    peft = with_adapter(model, spec)
    set_peft_model_state_dict(peft, dict(adapter))
    tokenizer.padding_side = "right"
    rows = [tokenizer(text + tokenizer.eos_token, truncation=True, max_length=max_len) for text in texts]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the trainer's per-run notices are not the benchmark's output
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            arguments = TrainingArguments(
                output_dir=output_dir,
                max_steps=steps,
                per_device_train_batch_size=batch_size,
                learning_rate=learning_rate,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                bf16=bf16,
                use_cpu=True,
                seed=seed,
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            trainer = Trainer(model=peft, args=arguments, train_dataset=rows, data_collator=collator)
            trainer.remove_callback(PrinterCallback)  # its summary line is not the benchmark's output
            trainer.train()
    finally:
        hf_logging.set_verbosity(verbosity)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}
    return state, time.perf_counter() - started
