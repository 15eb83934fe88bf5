"""Fine-tune the base once per task (full, or LoRA via PEFT) with a task-specific head.

Users bring their own fine-tuned models; this exists so the demo, the benchmark and the tests can make
real ones from the packaged MiniLM offline. Output is what users would have: a Hugging Face
``*ForSequenceClassification`` dir (safetensors) or a PEFT adapter dir, written atomically.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from supermerge.merge_core.data import TaskData, require_labelled
from supermerge.merge_core.errors import CheckpointError
from supermerge.merge_core.max_length import write_finetune_record
from supermerge.merge_core.model import _quiet_transformers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0
    lr: float = 5e-5
    """5e-5 suits a full fine-tune; LoRA wants ~1e-3."""
    batch_size: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    lora_rank: int | None = None
    """None: full fine-tune. An int: LoRA of that rank on attention and FFN projections."""
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")


def finetune_classifier(
    base_dir: str | Path,
    train: TaskData,
    num_labels: int,
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    max_length: int | None = None,
    progress: bool = False,
) -> Path:
    """Train ``AutoModelForSequenceClassification`` on ``train``; save to ``out_dir`` atomically.

    ``max_length``: the tokens per example ``train`` was cut to, recorded beside the weights
    (``supermerge.merge_core.max_length``) so a merge of this fine-tune scores at the length it was trained on;
    None (ready-made token ids) records nothing."""
    from transformers import AutoModelForSequenceClassification

    require_labelled("fine-tune", train, "training")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists; remove it or pick another output dir")
    torch.manual_seed(config.seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=num_labels, dtype=torch.float32
        )
    if config.lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=2 * config.lora_rank,
                target_modules=list(config.lora_targets),
                modules_to_save=["classifier"],
                lora_dropout=0.0,
            ),
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, int(config.epochs * -(-len(train) // config.batch_size)))
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(int(config.epochs) + 1)])
    bar = tqdm(range(steps), desc=f"fine-tuning -> {out_dir.name}", disable=not progress, leave=False)
    for step in bar:
        idx = order[step * config.batch_size % len(order):][: config.batch_size]
        batch = train.take(idx)
        loss = torch.nn.functional.cross_entropy(model(**batch.inputs).logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if max_length is not None:
            write_finetune_record(tmp, max_length)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fine-tuned %s: %d steps", out_dir, steps)
    return out_dir
