"""Tool calls through the OpenAI-compatible server with the official `openai` client: 20 varied prompts with
`tools`, each answered with a call whose arguments are checked against the tool's schema, then one conversation
continued after the tool's result. Prints one line per prompt and a summary (the run shown in docs/copilot.md).

    python examples/copilot_tools.py [--ckpt checkpoints/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search_web", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                                    "max_results": {"type": "integer", "minimum": 1, "maximum": 5}},
                   "required": ["query"]}}}
TOOLS = [WEATHER, ADD, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What's the weather like in Paris right now?", "Is it raining in Tokyo? Use celsius.", "How hot is it in Cairo?",
    "Weather for New York in fahrenheit please", "Tell me the temperature in Oslo.",
    "What is 17 plus 25?", "Add 100 and -42.", "Please compute 3 + 4", "What is the sum of 250 and 750?",
    "I need 9 + 10", "Search the web for the tallest mountain", "Find recent news about electric cars",
    "Look up a recipe for pancakes", "Who won the 2018 World Cup? Search for it.", "Find me three articles on bees",
    "Hello! How are you today?", "Write a haiku about autumn.", "Translate 'good morning' into Spanish.",
    "What should I pack for a trip to London?", "Explain photosynthesis in one sentence.",
]


def tool_choice(i: int) -> str | dict:
    """Even prompts let the model pick the tool ("required"); odd ones name one, in turn."""
    if i % 2 == 0:
        return "required"
    return {"type": "function", "function": {"name": ["get_weather", "add", "search_web"][i % 3]}}


def check_calls(message) -> list[dict]:  # noqa: ANN001 - an openai ChatCompletionMessage
    """Every tool call parses and matches its tool's schema (jsonschema); returns the arguments."""
    import jsonschema

    if not message.tool_calls:
        raise AssertionError(f"no tool call in {message}")
    out = []
    for call in message.tool_calls:
        if call.type != "function" or not call.id.startswith("call_"):
            raise AssertionError(f"not an OpenAI function call: {call}")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append(args)
    return out


def run(client, model: str = "m", max_tokens: int = 128, log=print) -> int:  # noqa: ANN001 - an openai.OpenAI
    """The 20 prompts and the continuation; returns how many calls validated.

    max_tokens must cover the longest call the schemas allow (a 40-character query can be 40 tokens of digits, plus
    about 30 for the tool name and JSON): with 60 a sampled query of digits once ran out (finish_reason "length")."""
    valid, last = 0, None
    for i, prompt in enumerate(PROMPTS):
        start = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                           tool_choice=tool_choice(i), max_tokens=max_tokens)
        args = check_calls(r.choices[0].message)
        valid += 1
        last = r.choices[0].message.tool_calls[0]
        log(f"{prompt!r:50} -> {last.function.name}({json.dumps(args[0])})  [{time.perf_counter() - start:.1f} s]")
    history = [{"role": "user", "content": PROMPTS[-1]},
               {"role": "assistant", "content": None, "tool_calls": [last.model_dump()]},
               {"role": "tool", "tool_call_id": last.id, "content": "Plants turn light, water and CO2 into sugar."}]
    after = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=40)
    if not after.choices[0].message.content or after.choices[0].message.tool_calls:
        raise AssertionError(f"the conversation did not continue with text: {after}")
    log(f"after the tool message: {after.choices[0].message.content!r}")
    log(f"{valid}/{len(PROMPTS)} tool calls parsed and matched their schema")
    return valid


def main() -> None:
    import openai
    import uvicorn

    from llmlab.serve import load_engine
    from llmlab.serve.api import create_app
    from llmlab.serve.copilot import CopilotExtension

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    engine, tok = load_engine(args.ckpt, None, max_batch=4, max_seq_len=1024)
    app = create_app(engine, tok, "m", extensions=[CopilotExtension(tok, engine.model.config.vocab_size)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0,
                               timeout=600)
        run(client)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()


if __name__ == "__main__":
    main()
