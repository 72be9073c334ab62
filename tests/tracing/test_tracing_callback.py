"""`TokenGradTraceCallback`: training is bit-identical with and without tracing, nothing the trainer owns is
touched, the files follow the schema and agree with the core functions, resumed runs do not duplicate steps."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer
from tokensft.losses import TokenInputs, token_weights, weighted_lm_loss
from tokensft.tokens import readable_tokens
from tokensft.tracing.callback import (
    TokenGradTraceCallback,
    build_trace_callback,
    choose_sequences,
    row_tensors,
    trace_guard,
)
from tokensft.tracing.config import TraceConfig
from tokensft.tracing.core import (
    decoder_param_names,
    micro_batch_alignment,
    model_parts,
    per_token_loss_alignment,
    select_trace_modules,
    trace_per_position,
)
from tokensft.tracing.schema import iter_trace_steps, read_manifest, read_trace_step

from .conftest import lora_model


def collate(rows):
    """Right-pad `input_ids` (pad 0) and `labels` (-100)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], att[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}


def train_lora(tmp_path, name, *, trace: dict | None, ga=2, gc=True, steps=5, lora=True):
    """5 optimizer steps of TRL's SFTTrainer (+ LoRA) on a tiny model; returns (params, output dir, trainer)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = tiny_rows(24, seed=1)
    out = tmp_path / name
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=ga, max_steps=steps,
        learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, data_seed=0, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False, max_length=None, disable_tqdm=True, gradient_checkpointing=gc,
    )
    callbacks = []
    if trace is not None:
        cfg = TraceConfig(**trace)
        callbacks.append(TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(out), mode="sft",
                                                scheme_kwargs={}))
    trainer = SFTTrainer(
        model=tiny_model(0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
        data_collator=collate, callbacks=callbacks,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
        if lora else None,
    )
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return params, out, trainer


@pytest.mark.parametrize("ga,gc", [(2, True), (1, False)])
def test_training_is_bit_identical_with_tracing(tmp_path, ga, gc):
    plain, _, _ = train_lora(tmp_path, "plain", trace=None, ga=ga, gc=gc)
    traced, out, trainer = train_lora(
        tmp_path, "traced", ga=ga, gc=gc,
        trace={"trace_every_n_steps": 2, "trace_num_sequences": 2, "trace_store_projections": True,
               "trace_token_norms": "exact", "trace_proj_dim": 2},
    )
    assert plain.keys() == traced.keys()
    changed = 0
    for n in plain:
        assert torch.equal(plain[n], traced[n]), n
        changed += "lora_B" in n and bool(plain[n].abs().sum() > 0)
    assert changed > 0  # training moved the adapter, so equality is not vacuous
    steps = [e["step"] for e in read_manifest(out)]
    assert steps == [0, 2, 4]
    assert trainer.model.get_base_model().config._attn_implementation == "sdpa"
    ts = list(iter_trace_steps(out))
    assert [t.step for t in ts] == [0, 2, 4] and all(len(t.sequences) == 2 for t in ts)
    assert len(ts[0].meta["layers"]) == 12  # q, v, up LoRA A and B in 2 layers


def test_full_finetuning_is_bit_identical_with_tracing(tmp_path):
    """Without LoRA the traced q/v weights are trainable parameters themselves: still no effect on training."""
    plain, _, _ = train_lora(tmp_path, "plain", trace=None, ga=2, gc=False, steps=3, lora=False)
    traced, out, _ = train_lora(tmp_path, "traced", ga=2, gc=False, steps=3, lora=False,
                                trace={"trace_every_n_steps": 1, "trace_token_norms": "projection",
                                       "trace_norm_directions": 2})
    assert all(torch.equal(plain[n], traced[n]) for n in plain)
    assert [e["step"] for e in read_manifest(out)] == [0, 1, 2, 3]


def test_trace_leaves_grads_rng_and_modes_untouched(tmp_path):
    model = lora_model(0, attn="sdpa").train()
    model.base_model.model.model.layers[0].mlp.eval()  # a submodule in another mode than its parent
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    before = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    cb = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1, trace_num_sequences=2), tiny_rows(6),
                                tiny_tokenizer(), output_dir=str(tmp_path))
    cb.maybe_trace(3, model)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, (obj, val) in before.items():
        p = dict(model.named_parameters())[n]
        assert p.grad is obj and torch.equal(p.grad, val), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert [e["step"] for e in read_manifest(tmp_path)] == [3]


def test_trace_file_matches_core_functions_and_schema(tmp_path, monkeypatch):
    model = lora_model(0)
    # sft-align's d_t is the traced tokloss.dot (here over the LoRA weights, the trainable ones), not recomputed
    import tokensft.tracing.callback as callback

    monkeypatch.setattr(callback, "micro_batch_alignment", lambda *a, **k: pytest.fail("alignment recomputed"))
    rows = tiny_rows(8, seed=3)
    cfg = TraceConfig(trace_every_n_steps=1, trace_num_sequences=2, trace_store_projections=True,
                      trace_norm_directions=4, trace_token_norms="exact")
    cb = TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(tmp_path), mode="sft-antiop",
                                scheme_kwargs={"antiop_clip_mult": 2.0, "align_rule": "clip"})
    path = cb.trace_step(7, model)
    ts = read_trace_step(path)
    assert ts.step == 7 and ts.meta["mode"] == "sft-antiop" and ts.meta["quantities"] == ["per_position",
                                                                                           "per_token_loss"]
    assert ts.meta["scheme_params"]["antiop_clip_mult"] == 2.0
    assert ts.meta["projection"]["kind"] == "identity"
    chosen = choose_sequences(rows, 2, seed=0, step=7)
    mods = select_trace_modules(model)
    L = len(mods)
    for seq, row in zip(ts.sequences, chosen):
        ids, labels = row_tensors(rows[row], row, 1024)
        T = len(ids)
        assert seq.meta["example_index"] == row and seq.meta["length"] == T == len(seq.tokens) == len(seq.categories)
        mask = torch.tensor([False] + [lab != -100 for lab in labels[1:]])
        assert seq["token_ids"].tolist() == ids and seq["is_completion"].tolist() == mask.int().tolist()
        tl = per_token_loss_alignment(model, torch.tensor(ids), torch.tensor(labels), norms="exact")
        pp = trace_per_position(model, torch.tensor(ids), torch.tensor(labels), mods)
        f16 = dict(rtol=2e-3, atol=2e-3, equal_nan=True)  # pos: the last position has no gradient (NaN)
        for k in ("dot", "norm", "alignment"):
            torch.testing.assert_close(torch.from_numpy(seq[f"tokloss.{k}"])[mask], tl[k][mask], **f16)
            torch.testing.assert_close(torch.from_numpy(seq[f"pos.{k}"]), pp[k], **f16)  # all positions
            assert torch.isnan(torch.from_numpy(seq[f"tokloss.{k}"])[~mask]).all()
        assert seq["pos.layer.alignment"].shape == (L, T) and seq["pos.layer.G_norm"].shape == (L,)
        # prompt positions carry gradient: finite per-position values there, and only the last position is NaN
        pos_a = torch.from_numpy(seq["pos.alignment"])
        assert torch.isfinite(pos_a[:-1]).all() and torch.isnan(pos_a[-1]) and (~mask[:-1]).any()
        assert seq["pos.G_norm"][0] == pytest.approx(float(pp["G_norm"]), rel=1e-6)
        assert seq["tokloss.G_norm"][0] == pytest.approx(float(tl["G_norm"]), rel=1e-6)
        assert seq["pos.0.x_proj"].shape == (T, 32) and seq["pos.0.dy_proj"].shape == (T, 4)
        assert seq["tokloss.grad_proj"].shape == (T, 4)
        # loss / p / entropy and the scheme weights, against the loss module directly
        stats = tl["stats"]
        torch.testing.assert_close(torch.from_numpy(seq["loss"])[mask], stats["loss"][mask], **f16)
        torch.testing.assert_close(torch.from_numpy(seq["p"])[mask], stats["p"][mask], **f16)
        lp = stats["log_probs"][None]
        for key, mode in (("dft", "dft"), ("topk", "sft-topk"), ("antiop", "sft-antiop")):
            w = token_weights(mode, TokenInputs(lp, mask[None]), antiop_clip_mult=2.0)[0]
            torch.testing.assert_close(torch.from_numpy(seq[f"weight.{key}"])[mask], w[mask], **f16)
        lr = torch.from_numpy(seq["weight.lr"])[mask]
        assert torch.isfinite(lr).all() and (lr >= 0.1).all() and not torch.allclose(lr, torch.ones_like(lr))
        # every registered scheme is overlaid: sft-pk, and eaft / rho1 against the functional loss on full logits
        pk = token_weights("sft-pk", TokenInputs(lp, mask[None]))[0]
        torch.testing.assert_close(torch.from_numpy(seq["weight.sft-pk"])[mask], pk[mask], **f16)
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor([ids])).logits  # (1, T, V)
            with model.disable_adapter():
                ref_logits = model(input_ids=torch.tensor([ids])).logits
        for key in ("eaft", "rho1"):
            want = weighted_lm_loss(logits, torch.tensor([labels]), mode=key, ref_logits=ref_logits).weights[0]
            got = torch.from_numpy(seq[f"weight.{key}"])[1:]  # token frame: token t from the logits at t-1
            torch.testing.assert_close(got[mask[1:]], want[mask[1:]], **f16)
        rho = torch.from_numpy(seq["weight.rho1"])[mask]
        assert set(rho.tolist()) == {0.0, 1.0}
        # sft-align: the tracer's alignment is the trainer's producer (micro_batch_alignment over the trainable
        # weights), with this sequence as the micro-batch
        with trace_guard(model):
            d = micro_batch_alignment(model, torch.tensor([ids]), torch.tensor([labels]))  # (1, T-1)
        want = token_weights("sft-align", TokenInputs(lp[:, 1:], mask[None, 1:], alignment=d), align_rule="clip")[0]
        got = torch.from_numpy(seq["weight.align"])[1:]
        torch.testing.assert_close(got[mask[1:]], want[mask[1:]], **f16)  # clip: the scale of d_t matters too
        w = got[mask[1:]]
        assert ((w > 0) & (w < 1)).any()  # some opposing token clipped, not dropped: its d_t's scale is checked
        assert ts.meta["schemes"]["align"]["affects"] == "zero"
        assert seq.categories[0] in ("subword", "word") and seq.tokens[-1] == "</s>" and seq.categories[-1] == "special"


def test_full_model_lr_weight_is_nan(tmp_path):
    cb = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1, trace_quantities="per_position"), tiny_rows(4),
                                tiny_tokenizer(), output_dir=str(tmp_path))
    ts = read_trace_step(cb.trace_step(0, tiny_model(0).eval()))
    seq = ts.sequences[0]
    assert ts.meta["quantities"] == ["per_position"] and not any(k.startswith("tokloss") for k in seq.arrays)
    assert torch.isnan(torch.from_numpy(seq["weight.lr"])).all()
    assert torch.isnan(torch.from_numpy(seq["weight.rho1"])).all()  # rho1 needs a reference too
    assert "weight.sft" not in seq.arrays and "weight.asft" not in seq.arrays  # w = 1 / w = dft's: not traced
    # no per_token_loss quantity and a run that does not train on the alignment: sft-align's is not measured
    assert torch.isnan(torch.from_numpy(seq["weight.align"])).all()
    assert sorted(n.rsplit(".", 1)[1] for n in ts.meta["layers"]) == ["q_proj"] * 2 + ["v_proj"] * 2


def test_an_sft_align_run_traces_its_alignment_over_the_traced_weights(tmp_path):
    """Without the per_token_loss quantity, the tracer of an sft-align run measures d_t on each traced sequence
    (`micro_batch_alignment` over the traced weights, like every trace quantity): here full fine-tuning, q/v traced."""
    model, rows = tiny_model(0).eval(), tiny_rows(4)
    cfg = TraceConfig(trace_every_n_steps=1, trace_quantities="per_position", trace_num_sequences=4)
    cb = TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(tmp_path), mode="sft-align",
                                scheme_kwargs={"align_rule": "clip"})
    mods = select_trace_modules(model)
    ws = [m.weight for m in mods.values()]
    params = dict(zip(decoder_param_names(model_parts(model), ws), ws))
    lowest = 1.0
    for seq in read_trace_step(cb.trace_step(0, model)).sequences:
        ids, labels = row_tensors(rows[seq.meta["example_index"]], seq.meta["example_index"], 1024)
        with trace_guard(model):
            d = micro_batch_alignment(model, torch.tensor([ids]), torch.tensor([labels]), params=params)  # (1, T-1)
        mask = torch.tensor([lab != -100 for lab in labels[1:]])
        lp = torch.from_numpy(seq["p"])[1:].float().log()[None]
        want = token_weights("sft-align", TokenInputs(lp, mask[None], alignment=d), align_rule="clip")[0]
        got = torch.from_numpy(seq["weight.align"])[1:]
        torch.testing.assert_close(got[mask], want[mask], rtol=2e-3, atol=2e-3)
        lowest = min(lowest, float(got[mask].min()))
    assert lowest < 1  # some token opposes


def test_resume_does_not_duplicate_steps(tmp_path):
    model = lora_model(0)
    rows = tiny_rows(6)
    cfg = TraceConfig(trace_every_n_steps=2, trace_quantities="per_position")
    cb = TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(tmp_path))
    cb.maybe_trace(2, model)
    file = tmp_path / "traces" / "step_00000002.safetensors"
    mtime = file.stat().st_mtime_ns
    cb2 = TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(tmp_path))  # the resumed run
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    cb2.on_train_begin(SimpleNamespace(disable_tqdm=True), state, None, model=model)
    cb2.on_step_end(SimpleNamespace(disable_tqdm=True), state, None, model=model)
    state.global_step = 4
    cb2.on_step_end(SimpleNamespace(disable_tqdm=True), state, None, model=model)
    state.global_step = 5
    cb2.on_step_end(SimpleNamespace(disable_tqdm=True), state, None, model=model)
    cb3 = TokenGradTraceCallback(cfg, rows, tiny_tokenizer(), output_dir=str(tmp_path))  # resumed off the grid
    cb3.on_train_begin(SimpleNamespace(disable_tqdm=True), SimpleNamespace(global_step=5, is_world_process_zero=True),
                       None, model=model)
    assert [e["step"] for e in read_manifest(tmp_path)] == [2, 4]
    assert file.stat().st_mtime_ns == mtime
    # a torn last file is skipped with a warning by the reader
    (tmp_path / "traces" / "step_00000006.safetensors").write_bytes(b"\x00\x01torn")
    (tmp_path / "traces" / "step_00000006.json").write_text('{"step": 6, "sequ')
    with pytest.warns(UserWarning, match="skipping"):
        assert [t.step for t in iter_trace_steps(tmp_path)] == [2, 4]


def test_only_rank_zero_traces(tmp_path):
    cb = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1), tiny_rows(4), tiny_tokenizer(),
                                output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=1, is_world_process_zero=False)
    cb.on_step_end(SimpleNamespace(disable_tqdm=True), state, None, model=lora_model(0))
    assert not (tmp_path / "traces").exists()


def test_ddp_wrapped_model_is_unwrapped_without_collectives(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    import socket

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = lora_model(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        cb = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1), tiny_rows(4), tiny_tokenizer(),
                                    output_dir=str(tmp_path))
        cb.maybe_trace(1, ddp)
        a = read_trace_step(tmp_path / "traces" / "step_00000001.safetensors").sequences[0]
        cb2 = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1), tiny_rows(4), tiny_tokenizer(),
                                     output_dir=str(tmp_path / "plain"))
        b = read_trace_step(cb2.trace_step(1, model)).sequences[0]
        for k in a.arrays:
            assert (a[k].tobytes() == b[k].tobytes()), k
        assert all(p.grad is None for p in ddp.parameters())
    finally:
        dist.destroy_process_group()


def test_sequence_selection_is_seeded():
    rows = tiny_rows(30, seed=2)
    rows[5]["labels"] = [-100] * len(rows[5]["labels"])  # no target: never chosen
    a = choose_sequences(rows, 4, seed=1, step=10)
    assert a == choose_sequences(rows, 4, seed=1, step=10) and len(set(a)) == 4
    assert a != choose_sequences(rows, 4, seed=1, step=20)
    assert choose_sequences(rows, 4, seed=1, step=10, selection="fixed") == choose_sequences(
        rows, 4, seed=1, step=20, selection="fixed")
    assert 5 not in choose_sequences(rows, 29, seed=0, step=0) and len(choose_sequences(rows, 29, seed=0, step=0)) == 29
    # labels from a completion mask; bad rows are named
    ids, labels = row_tensors({"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, 0, 10)
    assert labels == [-100, 6, 7]
    assert row_tensors({"input_ids": [5, 6, 7, 8]}, 0, 3) == ([5, 6, 7], [5, 6, 7])
    with pytest.raises(ValueError, match="row 4: no 'input_ids'"):
        row_tensors({"text": "x"}, 4, 10)
    with pytest.raises(ValueError, match="row 2: column 'labels'"):
        row_tensors({"input_ids": [1, 2], "labels": [1]}, 2, 10)


def test_readable_tokens_and_categories():
    tok = tiny_tokenizer()
    texts, cats = readable_tokens(tok, [2, 5, 0])
    assert texts == ["</s>", "w1", "<pad>"] and cats == ["special", "subword", "special"]


def test_trace_config_fields_and_build():
    for f in fields(TraceConfig):
        assert f.name.startswith("trace_") and f.metadata.get("help"), f.name
    assert build_trace_callback(SimpleNamespace(trace_every_n_steps=0), [], None) is None
    args = SimpleNamespace(trace_every_n_steps=3, trace_token_norms="projection", output_dir="/tmp/x", mode="dft",
                           topk_keep_ratio=0.5)
    cb = build_trace_callback(args, tiny_rows(2), tiny_tokenizer())
    assert cb.cfg.trace_every_n_steps == 3 and cb.cfg.trace_token_norms == "projection" and cb.mode == "dft"
    assert cb.scheme_kwargs == {"topk_keep_ratio": 0.5}
    # every registered traced scheme is overlaid, with the run's value or the declared default
    schemes = cb.traced_schemes()
    assert {"dft", "topk", "antiop", "lr"} <= set(schemes)
    assert schemes["topk"][1] == {"topk_keep_ratio": 0.5}
    assert schemes["antiop"][1] == {"antiop_clip_mult": 3.0} and schemes["lr"][1] == {"lr_weight_alpha": 1.0}
    with pytest.raises(ValueError, match="--trace_token_norms"):
        TokenGradTraceCallback(TraceConfig(trace_token_norms="fast"), [], None, output_dir="/tmp/x")
    with pytest.raises(ValueError, match="--trace_quantities"):
        TraceConfig(trace_quantities="per_position,everything").validate_trace_config()
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(TraceConfig).parse_args_into_dataclasses(
        ["--trace_every_n_steps", "5", "--trace_modules", "q_proj$", "--trace_store_projections", "true"])
    assert cfg.trace_every_n_steps == 5 and cfg.trace_modules == "q_proj$" and cfg.trace_store_projections is True
