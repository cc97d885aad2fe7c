"""The official OpenAI Python SDK against a running Stipend server.

Run by crates/stipend/tests/openai_sdk.rs, which starts the server and the fake upstream and passes
STIPEND_BASE_URL and STIPEND_KEY. Only the base URL and the key differ from calling OpenAI.
"""

import os
import unittest

import openai
from openai import OpenAI

try:  # the SDK's HTTP library: httpx2 from openai 3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

BASE_URL = os.environ["STIPEND_BASE_URL"]
KEY = os.environ["STIPEND_KEY"]


def counting_client(key=KEY):
    """A client that counts the HTTP requests the SDK actually sends (retries included)."""
    sent = []
    http_client = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url)]})
    return OpenAI(base_url=BASE_URL, api_key=key, http_client=http_client), sent


class OpenAISdk(unittest.TestCase):
    def test_chat_completion(self):
        client, _ = counting_client()
        completion = client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=5,
        )
        self.assertEqual(completion.model, "echo")
        self.assertEqual(completion.choices[0].message.content, "t0 t1 t2 t3 t4")
        self.assertEqual(completion.choices[0].finish_reason, "length")
        self.assertEqual(completion.usage.completion_tokens, 5)
        self.assertGreater(completion.usage.prompt_tokens, 0)

    def test_streaming_with_usage(self):
        client, _ = counting_client()
        stream = client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        self.assertEqual(text, "t0 t1 t2")
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, 3)

    def test_legacy_completion(self):
        client, _ = counting_client()
        completion = client.completions.create(model="echo", prompt="Once upon a time", max_tokens=2)
        self.assertEqual(completion.choices[0].text, "t0 t1")

    def test_models(self):
        client, _ = counting_client()
        ids = [model.id for model in client.models.list()]
        self.assertIn("echo", ids)

    def test_exhausted_budget_raises_the_quota_error_once(self):
        client, sent = counting_client()
        with self.assertRaises(openai.RateLimitError) as raised:
            client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "Write a very long book."}],
                max_tokens=100000,
            )
        error = raised.exception
        self.assertEqual(error.status_code, 429)
        self.assertEqual(error.code, "budget_exhausted")
        self.assertEqual(error.type, "insufficient_quota")
        self.assertEqual(len(sent), 1, f"the SDK retried: {sent}")

    def test_bad_key_raises_authentication_error(self):
        client, sent = counting_client(key="sk-stipend-0000000000000000-" + "0" * 64)
        with self.assertRaises(openai.AuthenticationError):
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        self.assertEqual(len(sent), 1)

    def test_unknown_model_raises_not_found(self):
        client, _ = counting_client()
        with self.assertRaises(openai.NotFoundError):
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )


if __name__ == "__main__":
    unittest.main(verbosity=2)
