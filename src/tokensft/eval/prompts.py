"""Prompt construction and stop tokens.

Default prompt: the problem followed by the Qwen2.5-Math chain-of-thought instruction
`COT_INSTRUCTION` ("Please reason step by step, and put your final answer within \\boxed{}.").

- `chat`: one user turn `{problem}\\n{COT_INSTRUCTION}` rendered with the tokenizer's chat template and the
  assistant generation prompt (instruct models, and base models fine-tuned on a chat template);
- `plain`: `Question: {problem}\\n{COT_INSTRUCTION}\\nAnswer: ` (base models without a chat template);

Both come from the training formatter (`tokensft.data.prompt_text`): one formatter, one list of end-of-turn markers
(`tokensft.data.tokenize.KNOWN_END_OF_TURN`).
- `auto`: `chat` when the tokenizer has a chat template, else `plain`.

Generation stops at the tokenizer's EOS and at the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
...): `stop_token_ids` collects both, since a base model tuned on a chat template ends its turn with the template's
token while its `eos_token` may still be `<|endoftext|>`.
"""

from __future__ import annotations

from tokensft.data.presets import DEFAULT_INSTRUCTION, with_instruction
from tokensft.data.tokenize import KNOWN_END_OF_TURN, TEMPLATES, prompt_text, resolve_template

__all__ = ["COT_INSTRUCTION", "build_prompt", "resolve_prompt_template", "stop_token_ids"]

COT_INSTRUCTION = DEFAULT_INSTRUCTION  # the Qwen2.5-Math chain-of-thought instruction, as in training
PROMPT_TEMPLATES = TEMPLATES


def resolve_prompt_template(tokenizer, prompt_template: str = "auto") -> str:
    """`"chat"` or `"plain"`: `auto` picks `chat` iff the tokenizer has a chat template (`resolve_template`).

    Raises:
        ValueError: unknown template name, or `chat` for a tokenizer without a chat template.
    """
    return resolve_template(tokenizer, prompt_template)


def build_prompt(problem: str, tokenizer, template: str, instruction: str = COT_INSTRUCTION) -> str:
    """The prompt string for one problem: the user turn `problem + "\\n" + instruction` formatted by the training
    formatter (`tokensft.data.prompt_text`), so a model is evaluated on exactly the prompt format it was trained on.

    Args:
        problem: problem statement.
        tokenizer: a `PreTrainedTokenizer`; only its chat template is used (for `chat`).
        template: `"chat"` or `"plain"` (resolve `auto` first with `resolve_prompt_template`).
        instruction: appended to the problem; default the Qwen-math CoT instruction.

    Returns:
        Text to tokenize with `add_special_tokens=False` for `chat` (the template holds its own special tokens)
        and `True` for `plain`.

    Raises:
        ValueError: a template other than `chat` / `plain`.
    """
    if template not in ("chat", "plain"):
        raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
    return prompt_text([{"role": "user", "content": with_instruction(problem, instruction)}], tokenizer,
                       template=template)


def _end_of_turn_from_template(tokenizer) -> list[int]:
    """Token ids the chat template puts right after an assistant message (its end-of-turn marker)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    sentinel = "XyZzY-end-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except Exception:
        return []
    if sentinel not in text:
        return []
    after = text.split(sentinel, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return [ids[0]] if ids and ids[0] in special else []


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids at which generation stops: EOS (tokenizer and `model.generation_config`) plus end-of-turn tokens.

    Args:
        tokenizer: the model's tokenizer.
        model: optional; its `generation_config.eos_token_id` (int or list) is included.

    Returns:
        Sorted unique token ids (never empty when the tokenizer has an EOS token).
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    ids.update(_end_of_turn_from_template(tokenizer))
    vocab_specials = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    for tok in KNOWN_END_OF_TURN:
        if tok in vocab_specials:
            ids.add(int(vocab_specials[tok]))
    return sorted(ids)
