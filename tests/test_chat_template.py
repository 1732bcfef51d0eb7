"""efedge.chat_template: sandboxed HF-compatible rendering of GGUF chat templates."""

import pytest

from efedge.chat_template import FALLBACK_TEMPLATES, ChatTemplate, get_template
from efedge.errors import EfedgeError, TemplateError

CONVO = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

# Qwen2.5 / Qwen3-style: tools block, tool calls, tool responses, a reversed scan with
# {% break %}, {% continue %} over the system message, and enable_thinking.
QWEN_STYLE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = (messages | length) - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {{- '<tool_call>\\n' + ({'name': call.function.name,
                                      'arguments': call.function.arguments} | tojson)
                + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content
            + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
{{- '' if ns.last_user >= 0 else raise_exception('no user message') }}
"""

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


# -- rendering ------------------------------------------------------------------------------
def test_chatml_exact():
    out = get_template("chatml").render(CONVO)
    assert out == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert not get_template("chatml").render(CONVO, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n")


def test_chatml_content_parts_and_none():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    assert get_template("ChatML").render(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


def test_qwen_style_tools_loop_controls_and_kwargs():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Météo",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18°C"},
    ]
    tpl = ChatTemplate(QWEN_STYLE)
    out = tpl.render(msgs, tools=tools, enable_thinking=False)
    assert out == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Météo", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
        "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # without tools: plain system turn, and no empty-think block unless asked
    out = tpl.render(msgs[:2])
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_style_with_bos_from_metadata():
    tokens = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "a"]
    meta = {"tokenizer.chat_template": LLAMA3_STYLE, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tpl = ChatTemplate.from_metadata(meta)
    assert tpl.bos_token == "<|begin_of_text|>" and tpl.eos_token == "<|end_of_text|>"
    out = tpl.render(CONVO[:2])
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "You are helpful.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert out == expected
    # the built-in llama-3 template gives the same text for plain string content
    assert get_template("llama3", bos_token="<|begin_of_text|>").render(CONVO[:2]) == expected


def test_from_metadata_without_template_and_with_piece_lookup():
    assert ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["a"]}) is None
    assert ChatTemplate.from_metadata({"tokenizer.chat_template": "  "}) is None
    meta = {"tokenizer.chat_template": "{{ bos_token }}|{{ eos_token }}",
            "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 6}
    tpl = ChatTemplate.from_metadata(meta, lambda i: f"<t{i}>")
    assert tpl.render([]) == "<t5>|<t6>"
    assert ChatTemplate.from_metadata(meta).render([]) == "|"
    named = {"tokenizer.chat_template.tool_use": "TOOLS"}
    assert ChatTemplate.from_metadata(named) is None
    assert ChatTemplate.from_metadata(named, name="tool_use").render([]) == "TOOLS"


def test_llama2_builtin():
    out = get_template("llama-2", bos_token="<s>", eos_token="</s>").render(CONVO)
    assert out == ("<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                   "<s>[INST] 2+2? [/INST]")
    with pytest.raises(TemplateError, match="alternate"):
        get_template("llama2").render([{"role": "assistant", "content": "x"}])


def test_builtin_names():
    assert {"chatml", "llama-2", "llama-3"} <= set(FALLBACK_TEMPLATES)
    for name in FALLBACK_TEMPLATES:
        assert get_template(name).render(CONVO)
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna-9'"):
        get_template("vicuna-9")
    assert get_template("{{ messages | length }}").render(CONVO) == "4"


def test_helpers_generation_tag_and_strftime():
    src = ("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}"
           "{% endfor %}|{{ strftime_now('%Y') | length }}|{{ documents is none }}")
    assert ChatTemplate(src).render(CONVO[:2]) == "[You are helpful.][Hi]|4|True"


def test_tojson_keeps_non_ascii_and_takes_kwargs():
    tpl = ChatTemplate("{{ messages[0].content | tojson }}")
    assert tpl.render([{"role": "user", "content": "café 🤖 <b>&"}]) == '"café 🤖 <b>&"'
    tpl = ChatTemplate("{{ {'b': 'é', 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
                       "{{ {'x': 1} | tojson(separators=(',', ':')) }}")
    assert tpl.render([]) == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": "é"\n}{"x":1}'


# -- failures -------------------------------------------------------------------------------
def test_raise_exception_becomes_template_error():
    tpl = ChatTemplate("{% if messages[0].role != 'user' %}"
                       "{{ raise_exception('First message must be from the user') }}{% endif %}")
    with pytest.raises(TemplateError, match="First message must be from the user") as err:
        tpl.render(CONVO)
    assert "chatml" in str(err.value)
    assert isinstance(err.value, EfedgeError)


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__ }}",
    "{{ '{0.__class__.__base__}'.format(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ 'a' * 100000000 }}",
    "{{ 2 ** 100000000 }}",
])
def test_sandbox_escape_raises(payload, tmp_path):
    marker = tmp_path / "pwned"
    tpl = ChatTemplate(payload.replace("{marker}", str(marker)))
    with pytest.raises(TemplateError, match="chat template"):
        tpl.render([{"role": "user", "content": "x"}])
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    # nested loops a server would run for hours: the render's range() budget stops them
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(20) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # a macro that calls itself twice per level: 2^40 calls (the call budget stops it)
    "{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% endif %}x{% endmacro %}"
    "{{ d(40) }}",
    # strings that exhaust memory in one call
    "{{ 'a'.ljust(100000000) }}",
    "{{ 'a'.center(20000000) }}",
    "{{ '%100000000s' % 'x' }}",
    "{{ '%.100000000f' % 1.5 }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{{ '%100000000s'|format('x') }}",
    "{{ 'a'|center(100000000) }}",
    # doubling, joining and replacing past the bound, step by step
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% set s = 'x' * 9000000 %}{{ ([s] * 9000000)|join }}",
    "{% set s = 'x' * 9000000 %}{{ ','.join([s] * 9000000) }}",
    "{% set s = 'x' * 9000000 %}{{ s|replace('x', 'xxxx') }}",
    "{% set s = 'x' * 9000000 %}{{ s.replace('x', 'xxxx') }}",
    "{% set s = '\\n' * 9000000 %}{{ s|indent(100) }}",
    # every step within the bounds, the output past them
    "{% set s = 'x' * 9000000 %}{% for i in range(1000) %}{{ s }}{% endfor %}",
])
def test_work_and_memory_a_template_may_take_are_bounded(payload):
    import time

    tpl = ChatTemplate(payload)
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="stopped by the sandbox"):
        tpl.render([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 30  # a hang guard, not a speed target


def test_the_bounds_leave_ordinary_templates_alone():
    src = ("{% for i in range(3) %}{{ i }}{% endfor %}|{% for m in messages %}"
           "{{ '%-6s' % m.role }}{{ '{:>3}'.format(loop.index) }}{{ m.content.ljust(3) }}"
           "{% endfor %}|{{ 'call 123456789 %s' % 1 }}|{{ ['a', 'b']|join(', ') }}"
           "{{ '-'.join(['x', 'y']) }}{{ 'aXb'|replace('X', 'yy') }}{{ 1 + 2 }}")
    tpl = ChatTemplate(src)
    for _ in range(3):  # the range() budget is per render, not per template
        out = tpl.render([{"role": "user", "content": "x"}] * 400)
    assert out.startswith("012|user    1x  ") and out.endswith("|call 123456789 1|a, bx-yayyb3")


def test_compile_error_names_fallback():
    with pytest.raises(TemplateError) as err:
        ChatTemplate("{% for m in messages %}{{ m.content }")
    msg = str(err.value)
    assert "failed to compile" in msg and "chatml" in msg and "--chat-template" in msg


def test_render_error_names_fallback():
    tpl = ChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(TemplateError, match="failed to render") as err:
        tpl.render([{"role": "user", "content": "x"}])
    assert 'chat_template="chatml"' in str(err.value)


@pytest.mark.parametrize("messages", [
    "hello",
    {"role": "user", "content": "x"},
    [("user", "x")],
    [{"content": "x"}],
    [{"role": 3, "content": "x"}],
    [{"role": "", "content": "x"}],
    [{"role": "user", "content": 42}],
    [{"role": "user", "content": {"type": "text", "text": "x"}}],
    [{"role": "user", "content": [{"type": "image", "url": "a.png"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 1}]}],
    [{"role": "user", "content": ["x"]}],
])
def test_bad_messages_raise(messages):
    with pytest.raises(TemplateError, match="messages"):
        get_template("chatml").render(messages)


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": "ab\ud83d"}],
     r"messages\[1\]\['content'\] has a lone surrogate '\\ud83d' at index 2"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
     r"messages\[0\]\['content'\]\[0\]\['text'\] has a lone surrogate"),
])
def test_a_lone_surrogate_in_a_message_is_named(messages, where):
    """JSON's "\\ud83d" decodes to half a surrogate pair, which UTF-8 cannot hold: the
    message is named (not an offset into the rendered prompt at tokenizing)."""
    with pytest.raises(TemplateError, match=where):
        get_template("chatml").render(messages)
    assert get_template("chatml").render([{"role": "user", "content": "\U0001F600"}])


def test_text_parts_and_none_reach_templates_that_take_only_strings():
    """OpenAI clients send content as a list of text parts; a model template that only
    takes strings gets them joined by newlines (None as ""), as llama.cpp passes them;
    a template that iterates the parts keeps them as they are."""
    concat = ChatTemplate("{% for m in messages %}[{{ m['role'] }}]{{ '' + m['content'] }}"
                          "{% endfor %}")
    printing = ChatTemplate("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                            "{% endfor %}")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    for tpl in (concat, printing):
        assert not tpl.takes_text_parts()
        assert tpl.render(msgs) == "[user]a\nb[assistant]"
    assert msgs[0]["content"][0] == {"type": "text", "text": "a"}  # the caller's list kept
    assert get_template("chatml").takes_text_parts()
    assert "user\na\nb<|im_end|>" in get_template("chatml").render(msgs)
    # the built-ins join parts as the model templates get them (llama.cpp: by newlines)
    for name in FALLBACK_TEMPLATES:
        as_str = [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}]
        assert get_template(name).render(msgs) == get_template(name).render(as_str), name


# -- the prompt's BOS, as llama.cpp makes it ----------------------------------------------
# llama.cpp drops a BOS the template writes first where the vocab adds one, then tokenizes
# with the vocab's specials: exactly one BOS whether the template writes it or not.
@pytest.mark.parametrize("template", [None, "llama-2", "chatml"])
def test_a_chat_prompt_starts_with_exactly_one_bos(tiny_gguf, template):
    import efedge

    path = tiny_gguf("qwen3moe", "F32", vocab_kind="spm")  # add_bos; its template writes BOS
    with efedge.load(path, chat_template=template) as m:
        tok = m.tokenizer
        assert tok.add_bos and tok.bos_id is not None
        ids = m.chat_prompt([{"role": "user", "content": "hello"}])
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:], ids[:8]


def test_a_chat_prompt_keeps_the_templates_bos_where_the_vocab_adds_none(tiny_gguf):
    import efedge

    path = tiny_gguf("qwen3moe", "F32")  # BPE: add_bos false
    src = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with efedge.load(path, chat_template=src) as m:
        tok = m.tokenizer
        assert not tok.add_bos and tok.bos_id is not None
        ids = m.chat_prompt([{"role": "user", "content": "hello"}])
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]


def test_a_files_template_gets_the_vocabs_default_bos_and_eos(tiny_gguf, tmp_path):
    """A SentencePiece file that names no BOS / EOS id relies on the vocab's defaults (1 and
    2), as llama.cpp reads it. Its Llama-2-style template writes bos_token first and
    eos_token after every reply: they rendered as "" (the template took the texts from the
    ids in the file only), so the reply lost its EOS."""
    import efedge
    from tests.test_gguf_file import _rewrite

    src = tiny_gguf("qwen3moe", "F32", vocab_kind="spm")
    bare = _rewrite(src, tmp_path / "no-bos.gguf", drop_key="tokenizer.ggml.bos_token_id")
    bare = _rewrite(bare, tmp_path / "no-ids.gguf", drop_key="tokenizer.ggml.eos_token_id")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "more"}]
    with efedge.load(src) as m:
        want = m.chat_prompt(chat)
        bos, eos = m.tokenizer.bos_id, m.tokenizer.eos_id
    assert want.count(bos) == 1 and want.count(eos) == 1, want
    with efedge.load(bare) as m:
        assert (m.tokenizer.bos_id, m.tokenizer.eos_id) == (bos, eos)  # the defaults
        assert m.chat_prompt(chat) == want
