"""One text path: the same chat messages and the same completion text in warm start, rollouts, evaluation and the
predictor (docs/pipeline.md, "The registered model")."""

from __future__ import annotations

import functools

from pte.config import params_from_dict
from pte.data.rows import chat_messages, format_prompt, prompt_messages
from pte.engine.inference import decode_completion, encode_prompts
from pte.engine.models import byte_tokenizer


def test_encode_prompts_templates_the_messages_of_chat_messages():
    tok = byte_tokenizer()
    data = params_from_dict({"data": {"system_prompt": "Be brief."}}).data
    problem = "What is 2 + 3?"
    ids, mask = encode_prompts(tok, [format_prompt(problem, data)], system=data.system_prompt)
    expected = tok.apply_chat_template(chat_messages(problem, data), tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[0][mask[0].bool()]) == expected
    assert chat_messages(problem, data) == prompt_messages(format_prompt(problem, data), "Be brief.")
    assert prompt_messages("hi") == [{"role": "user", "content": "hi"}]


def test_decode_completion_drops_only_a_trailing_eos():
    tok = byte_tokenizer()
    text_ids = tok("x = 12", add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    assert decode_completion(tok, text_ids + eos, eos) == "x = 12"
    assert decode_completion(tok, text_ids, eos) == "x = 12"  # cut at max_new_tokens: nothing to drop
    assert decode_completion(tok, [], eos) == ""


def test_training_reward_is_the_rewards_module_reward_fn():
    from pte.data.rewards import reward_fn, reward_function

    params = params_from_dict({"data": {"allow_last_number": True}})
    fn = reward_function(params.train.grpo, params.data)
    assert isinstance(fn, functools.partial) and fn.func is reward_fn and fn.keywords == {"allow_last_number": True}
    assert fn(["so the answer is 7", r"\boxed{8}"], ["7", "7"]) == [1.0, 0.0]
