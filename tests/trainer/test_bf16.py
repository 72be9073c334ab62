"""`--bf16 true` on the chunked head (the CPU default where bf16 is native): autocast reaches the backbone's matmuls, the LM head, the
softmax statistics and every logged statistic stay float32 (issue #25 item 3).

accelerate wraps only a *prepared* model's `forward` in autocast (`Trainer.train()` prepares it); the trainer now
enters `accelerator.autocast()` around every backbone forward itself, so a direct `compute_loss` /
`training_step` (benchmarks) runs the same bf16 computation as `train()`."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_model
from tests.trainer.test_trainer_invariance import make_trainer

from tokensft.data import CompletionCollator
from tokensft.losses import StepTokenStats


def _sharp_model(seed: int = 0):
    """The tiny random model with its linear weights x4: peaked logits, so that a bf16 backbone moves the loss by
    far more than float32 rounding does (on the near-uniform logits of the plain init it moves it by ~1e-7)."""
    model = tiny_model(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    return model


def _rows(lengths_and_prompts, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, p in lengths_and_prompts:
        ids = torch.randint(4, 64, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def _reference_log_probs(model, batch, *, bf16: bool):
    """Per-token log-probs of the supervised targets `(n,)`: the backbone under `torch.autocast("cpu", bfloat16)`
    (or in fp32), then a float32 LM head and log-softmax over full logits."""
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = hidden[:, :-1].float() @ model.lm_head.weight.float().t()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    m = targets != -100
    return torch.log_softmax(logits[m], -1).gather(-1, targets[m].unsqueeze(-1)).squeeze(-1)  # (n,)


def _loss(tmp_path, rows, *, bf16: bool, mode: str = "sft", **kw):
    tr = make_trainer(tmp_path, _sharp_model(0), rows, bs=len(rows), ga=1, mode=mode, bf16=bf16,
                      loss_head="chunked", **kw)
    tr.current_gradient_accumulation_steps = 1
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n = int((batch["labels"][:, 1:] != -100).sum())
    return tr, batch, tr.compute_loss(tr.model, batch, num_items_in_batch=n)


def test_bf16_reaches_the_backbone_and_the_head_stays_float32(tmp_path):
    rows = _rows([(40, 5), (33, 9), (47, 3), (21, 2)])
    seen = {}
    for bf16 in (False, True):
        tr, batch, loss = _loss(tmp_path, rows, bf16=bf16)
        dtypes = []
        hook = tr.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o, out=dtypes: out.append(o.dtype))
        tok = tr._token_inputs(tr.model, batch)
        hook.remove()
        # the backbone's matmuls run in bf16 only with --bf16; log-probs and entropy are float32 either way
        assert dtypes == [torch.bfloat16 if bf16 else torch.float32]
        assert tok.log_probs.dtype == tok.entropy.dtype == torch.float32
        seen[bf16] = (float(loss.detach()), _reference_log_probs(tr.model, batch, bf16=bf16))
    fp32, bf16 = seen[False][0], seen[True][0]
    # sft with num_items_in_batch = n: the loss is the mean NLL. The trainer equals backbone-under-autocast + fp32
    # head to float32 rounding of the chunked head (measured: 0 in fp32, 1.1e-7 relative in bf16), and differs from
    # the fp32 loss by a small relative amount (measured: 3.8e-5, over 300x the rounding of the head)
    assert abs(fp32 - float(-seen[False][1].mean())) <= 2e-6 * abs(fp32)
    assert abs(bf16 - float(-seen[True][1].mean())) <= 2e-6 * abs(bf16)
    assert 1e-5 < abs(bf16 - fp32) / abs(fp32) < 1e-2


def test_bf16_reaches_the_reference_model(tmp_path):
    # rho1 with a frozen reference copy: its log-probs come from its backbone under autocast + its fp32 head
    rows = _rows([(30, 4), (26, 7)], seed=1)
    ref = _sharp_model(1).eval()
    tr, batch, _ = _loss(tmp_path, rows, bf16=True, mode="rho1", ref_model=ref, ref_source="model")
    dtypes = []
    hook = tr.ref_model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    tok = tr._token_inputs(tr.model, batch)
    hook.remove()
    assert dtypes == [torch.bfloat16]
    m = batch["labels"][:, 1:] != -100
    assert tok.ref_log_probs.dtype == torch.float32
    torch.testing.assert_close(tok.ref_log_probs[m], _reference_log_probs(tr.ref_model, batch, bf16=True),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tok.ref_log_probs[m], _reference_log_probs(tr.ref_model, batch, bf16=False),
                              rtol=1e-5, atol=1e-5)


def test_bf16_logged_statistics_are_float32_token_means(tmp_path, monkeypatch):
    # 65 + 64 + 64 + 64 = 257 supervised targets: a bf16 count would round to 256 (bf16 keeps 8 significant bits)
    rows = _rows([(70, 5), (70, 6), (70, 6), (70, 6)], seed=2)
    assert torch.tensor(257.0).to(torch.bfloat16).item() == 256.0
    added = []
    original_add = StepTokenStats.add

    def add(self, out):
        added.append(out)
        original_add(self, out)

    monkeypatch.setattr(StepTokenStats, "add", add)
    tr = make_trainer(tmp_path, _sharp_model(0), rows, bs=4, ga=1, mode="dft", bf16=True, loss_head="chunked",
                      lr=1e-3)
    tr.train()
    (out,) = added
    assert all(v.dtype == torch.float32 for v in out.stat_sums.values()), {k: v.dtype for k, v in
                                                                            out.stat_sums.items()}
    assert out.token_loss.dtype == out.weights.dtype == torch.float32
    assert float(out.stat_sums["num_tokens"]) == 257.0 == int(out.mask.sum())
    logged = next(h for h in tr.state.log_history if "nll" in h)
    m = out.mask
    w = out.weights[m].double()  # dft: w = p, between 0 and 1, not all equal
    assert 0 < float(w.min()) < float(w.max()) < 1
    expect = {"nll": out.token_loss.detach()[m].double().mean(), "weight/mean": w.mean(),
              "weight/frac_reduced": (w < 1).double().mean(), "weight/frac_zero": (w == 0).double().mean()}
    for k, v in expect.items():  # float32 sums over 257 tokens / 257: equal to the float64 mean to ~1e-7
        assert abs(logged[k] - float(v)) <= 1e-6 * max(1.0, abs(float(v))), (k, logged[k], float(v))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_only_machine(tmp_path, monkeypatch, native):
    """Without a GPU: the default is bf16 exactly where the CPU's bf16 matmuls measure fast enough (cpu_bf16_pays),
    fp32 elsewhere;
    `--bf16 true` runs either way (transformers refuses bf16 without a GPU unless `use_cpu` is set: the config sets
    it) and `--bf16 false` forces fp32."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from tokensft import runtime
    from tokensft.trainer.config import TokenSFTConfig

    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: native)
    cfg = TokenSFTConfig(output_dir=str(tmp_path / "o"), report_to="none")
    assert cfg.bf16 is native and (cfg.use_cpu is True or not native)
    cfg = TokenSFTConfig(output_dir=str(tmp_path / "p"), bf16=True, report_to="none")
    assert cfg.bf16 is True and cfg.use_cpu is True
    assert TokenSFTConfig(output_dir=str(tmp_path / "q"), bf16=False, report_to="none").bf16 is False


def test_cpu_has_native_bf16_reads_the_flags(tmp_path, monkeypatch):
    import builtins

    from tokensft.runtime import cpu_has_native_bf16

    real_open = builtins.open
    for flags, expected in (("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu avx2 avx512f avx512_vnni", False)):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, _f=f, **k: real_open(_f if p == "/proc/cpuinfo" else p,
                                                                                  *a, **k))
        assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("native, fp32_s, bf16_s, pays", [(False, 1.0, 0.1, False), (True, 1.0, 0.25, True),
                                                          (True, 1.0, 1.8, False), (True, 1.0, 0.7, False)])
def test_bf16_default_follows_the_measured_speedup(monkeypatch, native, fp32_s, bf16_s, pays):
    """bf16 is the CPU default only where its matmul measures >= BF16_MIN_GAIN faster than fp32's (4x: yes; a CPU
    with avx512_bf16 whose bf16 runs at 0.55x fp32, as the Xeon without visible AMX does: no; 1.43x: below the bar),
    and never without native bf16 (no measurement then)."""
    from tokensft import runtime

    monkeypatch.setattr(runtime, "_BF16_SPEEDUP", None)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    timed = []

    def fake(a, b, budget_s=0.06):
        timed.append(a.dtype)
        return bf16_s if a.dtype == torch.bfloat16 else fp32_s

    monkeypatch.setattr(runtime, "best_matmul_seconds", fake)
    assert runtime.cpu_bf16_pays() is pays
    assert runtime.cpu_bf16_speedup() == (fp32_s / bf16_s if native else 0.0)
    assert (torch.bfloat16 in timed and torch.float32 in timed) if native else not timed
