"""The official OpenAI Python SDK against Stipend serving its embedded model (SmolLM2-135M-Instruct).

Run by crates/stipend/tests/openai_sdk.rs, which starts the server with the embedded model and
passes STIPEND_BASE_URL, STIPEND_KEY and STIPEND_MODEL. Only the base URL and the key differ from
calling OpenAI.
"""

import os
import unittest
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI

BASE_URL = os.environ["STIPEND_BASE_URL"]
KEY = os.environ["STIPEND_KEY"]
MODEL = os.environ["STIPEND_MODEL"]
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client():
    return OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0)


class EmbeddedModel(unittest.TestCase):
    def test_chat_answers_and_streams_the_same_text(self):
        plain = client().chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=64
        )
        text = plain.choices[0].message.content
        self.assertIn("Paris", text)
        self.assertEqual(plain.model, MODEL)
        self.assertEqual(plain.choices[0].finish_reason, "stop")
        self.assertGreater(plain.usage.prompt_tokens, 30)
        self.assertEqual(
            plain.usage.total_tokens, plain.usage.prompt_tokens + plain.usage.completion_tokens
        )
        stream = client().chat.completions.create(
            model=MODEL,
            messages=FRANCE,
            temperature=0,
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed, usage, finish = "", None, None
        for chunk in stream:
            if chunk.choices:
                streamed += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        self.assertEqual(streamed, text)
        self.assertEqual(finish, "stop")
        self.assertEqual(usage.completion_tokens, plain.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, plain.usage.prompt_tokens)
        # The same person's same prompt again: all of it but its last token is read from the
        # prefix cache, and the SDK reads the count where OpenAI puts it.
        self.assertEqual(usage.prompt_tokens_details.cached_tokens, plain.usage.prompt_tokens - 1)
        self.assertLess(
            plain.usage.prompt_tokens_details.cached_tokens, plain.usage.prompt_tokens - 1
        )

    def test_max_tokens_and_stop(self):
        short = client().chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_completion_tokens=2
        )
        self.assertEqual(short.choices[0].finish_reason, "length")
        self.assertEqual(short.usage.completion_tokens, 2)
        stopped = client().chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, max_tokens=64, stop="Paris"
        )
        self.assertNotIn("Paris", stopped.choices[0].message.content)
        self.assertEqual(stopped.choices[0].finish_reason, "stop")

    def test_legacy_completion_streams(self):
        text = ""
        for chunk in client().completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        ):
            text += chunk.choices[0].text if chunk.choices else ""
        self.assertTrue(text.strip(), text)

    def test_concurrent_clients_get_the_answers_they_get_alone(self):
        questions = ["What is 2 + 2?", "Name a fruit.", "Say hello in French.", "What do bees make?"]

        def ask(question):
            answer = client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=24,
            )
            return answer.choices[0].message.content

        alone = [ask(question) for question in questions]
        with ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(ask, questions))
        self.assertEqual(alone, together)

    def test_a_prompt_too_long_is_a_bad_request(self):
        with self.assertRaises(openai.BadRequestError) as raised:
            client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "France. " * 3000}],
                max_tokens=8,
            )
        self.assertEqual(raised.exception.code, "context_length_exceeded")

    def test_a_budget_too_small_raises_the_quota_error(self):
        # The server's stipend is 3 TFLOP = 3000 cu; 4000 tokens at 1 cu each cannot be reserved.
        with self.assertRaises(openai.RateLimitError) as raised:
            client().chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4000)
        self.assertEqual(raised.exception.type, "insufficient_quota")


if __name__ == "__main__":
    unittest.main(verbosity=2)
