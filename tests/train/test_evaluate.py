"""Generation metrics: character ROUGE-L on known strings, and the judge hook against a local stub server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from train.benchmarks.judge import Judge, reference_score_1_10
from train.benchmarks.metrics import rouge_l_chars_f1


@pytest.mark.parametrize("candidate, reference, expected", [
    ("赤色です。", "赤色です。", 1.0),
    ("青色です。", "赤色です。", 0.8),            # LCS 色です。 = 4 of 5 characters each way
    ("赤", "赤色です。", 2 * (1 * 0.2) / 1.2),   # P = 1, R = 1/5
    ("円です。", "赤色です。", 2 * 0.75 * 0.6 / 1.35),  # LCS です。 = 3: P = 3/4, R = 3/5
    ("", "赤色です。", 0.0),
    ("", "", 1.0),
    ("abc", "xyz", 0.0),
])
def test_character_rouge_l(candidate, reference, expected):
    assert rouge_l_chars_f1(candidate, reference) == pytest.approx(expected)


class StubJudge(BaseHTTPRequestHandler):
    requests: list = []
    content = " 8\n"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append((self.path, self.headers.get("Authorization"), body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": StubJudge.content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubJudge.requests = []
    StubJudge.content = " 8\n"
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_hook_asks_an_openai_compatible_endpoint(judge_server, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_JUDGE_KEY", "secret")
    score = reference_score_1_10(Judge(judge_server, key="secret"), "この図形は何色ですか？", "赤色です。", "赤色です。")
    assert score == 8.0
    ((path, auth, body),) = StubJudge.requests
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert "参照回答: 赤色です。" in body["messages"][0]["content"] and body["temperature"] == 0


def test_a_judge_reply_without_a_number_scores_none(judge_server):
    StubJudge.content = "²"  # a digit to str.isdigit(), not a number to int()
    assert reference_score_1_10(Judge(judge_server, key="secret"), "質問", "参照", "回答") is None
