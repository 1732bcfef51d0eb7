"""Structured output from an embedded model: a JSON-schema answer, the log probabilities of
its tokens, a forced tool call, and a text's log-likelihood. Usage:
structured_output.py [MODEL] (default: the demo model, which is small: its answers follow the
schema but say little).
"""
import json
import sys

import efedge
from efedge.generate import GenerationResult

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer"},
                         "languages": {"type": "array", "items": {"type": "string"},
                                       "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
# a chat template in the Hermes <tool_call> format, for models whose own has none
HERMES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}; answer "
          "a call as <tool_call>\n{...}\n</tool_call><|im_end|>\n{% endif %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

path = sys.argv[1] if len(sys.argv) > 1 else None
with efedge.load(path) as m:
    ask = [{"role": "user", "content": "Describe a programmer as JSON."}]
    r = GenerationResult([], "")
    text = m.chat(ask, max_tokens=200, temperature=0, format=PERSON, result=r, logprobs=2)
    print("answer:", json.loads(text) if r.finish_reason == "stop" else f"{text!r} (cut)")
    worst = min(r.logprobs, key=lambda e: e.logprob)
    print(f"least likely token: {m.detokenize([worst.token])!r} ({worst.logprob:.2f}), "
          f"the model preferred {[m.detokenize([t]) for t, _ in worst.top]}")

with efedge.load(path, chat_template=None if path else HERMES) as m:
    r = GenerationResult([], "")
    m.chat([{"role": "user", "content": "Is it raining in Oslo?"}], tools=WEATHER,
           tool_choice="required", max_tokens=100, temperature=0, result=r)
    for call in r.tool_calls:
        print("tool call:", call["function"]["name"], json.loads(call["function"]["arguments"]))
    ids = m.tokenize("The cat sat on the mat.")
    print(f"log-likelihood of a sentence: {sum(e.logprob for e in m.prompt_logprobs(ids)):.2f}")
