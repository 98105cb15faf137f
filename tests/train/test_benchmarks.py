"""Benchmarks scored as llm-jp-eval-mm scores them (train/benchmarks/): its metrics on its own test pairs and against
its formula, the judge through a real OpenAI-compatible HTTP server on 127.0.0.1, every task on its synthetic set
for both model families, batched generation, bad files, and benchmarks inside training."""

import json
import re
import threading
import unicodedata
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from data_pipelines.synthetic.synth_bench import BENCH_TASKS, synth_bench
from tests.conftest import REPO, kakehashi
from train.benchmarks import TASKS, metrics
from train.benchmarks.data import BenchmarkDataError
from train.benchmarks.heron import heron_aggregate
from train.benchmarks.jdocqa import JDocQA
from train.benchmarks.jmmmu import Jmmmu, aggregate, parse_multi_choice, parse_open
from train.benchmarks.judge import LLM_AS_A_JUDGE_PROMPT, Judge, JudgeError, parse_heron

RECIPES = {"llava": REPO / "recipes/tiny/asagi-2stage.yaml", "qwen2vl": REPO / "recipes/tiny/sarashina-3stage.yaml"}


# ---------------------------------------------------------------------------------------------- reference formula


def eval_mm_rouge_l(reference: str, prediction: str) -> float:
    """eval_mm/metrics/rougel_scorer.py's rouge_ja([reference], [prediction])["rougeL"], written out here from its
    source: emoji removal, NFKC, whitespace folding, fugashi -Owakati, rouge_score with a bootstrap aggregator."""
    import emoji
    from fugashi import Tagger
    from rouge_score import rouge_scorer, scoring

    class Tokenizer:
        tagger = Tagger("-Owakati")

        def tokenize(self, text):
            text = "".join("" if emoji.is_emoji(c) else c for c in text)
            text = re.sub("[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff"
                          "\U00002702-\U000027b0]+", "", text)
            return self.tagger.parse(" ".join(unicodedata.normalize("NFKC", text).split())).split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Tokenizer())
    aggregator = scoring.BootstrapAggregator()
    aggregator.add_scores(scorer.score(reference, prediction))
    return aggregator.aggregate()["rougeL"].mid.fmeasure * 100


def test_rouge_l_gives_eval_mms_own_test_values():
    # eval_mm/tests/test_rougel_scorer.py: 100.0, 66.66, 80.0 (two pairs, averaged per sample), 50.0
    assert metrics.rouge_l_mecab_pct("私は猫です。", "私は猫です。") == 100.0
    assert metrics.rouge_l_mecab_pct("たかしが公園で遊んでいた。", "たかしが公園にいたようだ。") == pytest.approx(66.66, rel=0.01)
    pairs = [("私は猫です。", "私は犬です。"), ("私は犬です。", "私は猫です。")]
    assert metrics.mean([metrics.rouge_l_mecab_pct(r, p) for r, p in pairs]) == pytest.approx(80.0, rel=0.01)
    assert metrics.rouge_l_mecab_pct("池のほとりです。", "ここは湖の岸です。") == pytest.approx(50.0, rel=0.01)


@pytest.mark.parametrize("reference, prediction", [
    ("赤色です。", "赤色です。"), ("赤色です。", "青色です。"), ("円です。", "この図形は円です😀"),
    ("ＡＢＣの１２３です", "ABCの123です"), ("白い  背景に\n赤い円", "白い背景に赤い円があります"), ("", "赤"), ("赤", ""),
    ("東京タワーは赤と白に塗られている。", "タワーは白色と赤色です✨"),
])
def test_rouge_l_equals_the_reference_formula(reference, prediction):
    assert metrics.rouge_l_mecab_pct(reference, prediction) == pytest.approx(eval_mm_rouge_l(reference, prediction), abs=1e-9)


def test_the_character_level_rouge_is_a_second_field_on_another_scale():
    assert metrics.rouge_l_chars_f1("青色です。", "赤色です。") == pytest.approx(0.8)  # LCS 色です。: 4 of 5 characters
    assert metrics.rouge_l_mecab_pct("赤色です。", "青色です。") == pytest.approx(200 / 3)     # MeCab: 青色|です|。 vs 赤色|です|。


def test_jdocqa_bleu_and_exact_match_as_eval_mm(tmp_path):
    from sacrebleu import sentence_bleu

    sentence = ("白い背景に赤色の円が描かれています", "白い背景に青色の円が描かれています")
    expected = sentence_bleu(hypothesis=sentence[1], references=[sentence[0]], smooth_method="exp", smooth_value=0.0,
                             tokenize="ja-mecab", use_effective_order=False, lowercase=False).score / 100
    assert metrics.bleu_ja(*sentence) == pytest.approx(expected) and 0 < expected < 1
    assert metrics.bleu_ja("赤色です", "赤色です") == 0.0  # under four tokens there is no 4-gram: 0, as in eval-mm
    samples = JDocQA().load(synth_bench("jdocqa", tmp_path / "jdocqa", samples=4)["out"])
    scores = JDocQA().score(samples, [s.reference for s in samples])
    assert scores.per_sample["jdocqa"][:3] == [1.0, 1.0, 1.0]  # yes/no, factoid, numerical: containment
    assert set(scores.details["jdocqa"]) == {"yesno_exact", "factoid_exact", "numerical_exact", "open-ended_bleu",
                                             "overall"}


def test_jdocqa_scorer_test_of_eval_mm():
    # eval_mm/tests/test_jdocqa_scorer.py: a factoid answer equal to the reference
    from train.benchmarks.base import Sample

    scores = JDocQA().score([Sample("0", "q", [], "私は猫です。", {"answer_type": 1})], ["私は猫です。"])
    assert scores.per_sample["jdocqa"] == [1.0] and scores.summary["jdocqa"] == 1.0
    assert scores.details["jdocqa"] == {"yesno_exact": 0.0, "factoid_exact": 1.0, "numerical_exact": 0.0,
                                        "open-ended_bleu": 0.0, "overall": 1.0}


def test_jmmmu_parsing_and_aggregation_as_eval_mm():
    # eval_mm/tests/test_jmmmu_scorer.py
    assert aggregate(["validation_Accounting_1"], [1]) == {
        "Overall-Art and Psychology": 0, "Overall-Business": 1.0, "Accounting": 1.0, "Overall-Science": 0,
        "Overall-Health and Medicine": 0, "Overall-Tech and Engineering": 0, "Overall": 1.0}
    choices, answers = ["A", "B", "C", "D"], {"A": "赤色", "B": "青色", "C": "緑色", "D": "黄色"}
    assert parse_multi_choice("A", choices, answers) == "A"
    assert parse_multi_choice("答えは(B)です。", choices, answers) == "B"
    assert parse_multi_choice("答えはC。", choices, answers) == "C"       # punctuation stripped, then "C "
    assert parse_multi_choice("正解はDです", choices, answers) == "D"     # a letter between Japanese characters
    assert parse_multi_choice("A か B なら B", choices, answers) == "B"   # several: the last one
    assert parse_multi_choice("色 は たぶん 青色 だと 思います", choices, answers) == "B"  # > 5 words: by content
    assert parse_multi_choice("わかりません", choices, answers) is None
    assert 3.0 in parse_open("答えは3つです") and " 円" in parse_open("よって、円")  # one character: padded


def test_heron_aggregate_as_eval_mm():
    # eval_mm/tests/test_heron_bench_scorer.py: one unparsable judgement
    assert heron_aggregate(["conv"], [{"score": -1, "score_gpt": -1}]) == {
        "parse_error_count": 1, "overall": -1.0, "conv_rel": 0.0, "detail_rel": 0.0, "complex_rel": 0.0,
        "overall_rel": 0.0}
    judged = [{"score": 6, "score_gpt": 8}, {"score": 4, "score_gpt": 8}, {"score": 9, "score_gpt": 9}]
    result = heron_aggregate(["conv", "detail", "complex"], judged)
    assert result["conv_rel"] == 75.0 and result["detail_rel"] == 50.0 and result["complex_rel"] == 100.0
    assert result["overall_rel"] == 75.0 and result["overall"] == pytest.approx(19 / 3)
    assert parse_heron('```json\n{"score_gpt": 8, "score": 6}\n```') == {"score": 6, "score_gpt": 8}
    assert parse_heron('scores: {"score": 3, "score_gpt": 7} done') == {"score": 3, "score_gpt": 7}


# ---------------------------------------------------------------------------------------------- the judge


class OpenAICompatible(BaseHTTPRequestHandler):
    """A small /v1/chat/completions server: replies with `reply(body)`, or HTTP `status` when set."""

    requests: list = []
    status: int | None = None
    reply = staticmethod(lambda body: "4")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if type(self).status is not None:
            self.send_error(type(self).status, "judge is down")
            return
        document = {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": type(self).reply(body)}}]}
        data = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAICompatible)
    OpenAICompatible.requests, OpenAICompatible.status = [], None
    OpenAICompatible.reply = staticmethod(lambda body: "4")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_llm_as_a_judge_sends_eval_mms_prompt_and_reads_its_scale(judge_server, tmp_path):
    OpenAICompatible.reply = staticmethod(lambda body: "Score: 5" if "赤色" in body["messages"][1]["content"] else "2")
    task = TASKS["ja-vg-vqa-500"]
    samples = task.load(synth_bench("ja-vg-vqa-500", tmp_path / "vg", samples=2)["path"])
    judge = Judge(judge_server, "judge-model-x", key="secret", backoff=0.01)
    predictions = [s.reference for s in samples]
    scores = task.score(samples, predictions, judge)
    assert len(OpenAICompatible.requests) == len(samples) == 4
    path, auth, body = OpenAICompatible.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "judge-model-x" and body["max_tokens"] == 1024 and body["temperature"] == 0
    assert body["seed"] == 0 and body["messages"][0] == {"role": "system", "content": "You are an expert evaluator."}
    contents = sorted(b["messages"][1]["content"] for _, _, b in OpenAICompatible.requests)
    s = samples[0]
    assert LLM_AS_A_JUDGE_PROMPT.format(Question=s.question, Answer=s.reference, Prediction=s.reference) in contents
    expected = [5 if "赤色" in s.reference else 2 for s in samples]
    assert scores.per_sample["llm_as_a_judge"] == expected
    assert scores.summary["llm_as_a_judge"] == sum(expected) / 4 and scores.judged_by == {"llm_as_a_judge": "judge-model-x"}
    assert scores.summary["rouge_l_mecab_pct"] == 100.0


def test_heron_bench_judges_through_the_endpoint(judge_server, tmp_path):
    OpenAICompatible.reply = staticmethod(lambda body: '```json\n{"score_gpt": 8, "score": 6}\n```')
    task = TASKS["japanese-heron-bench"]
    samples = task.load(synth_bench("japanese-heron-bench", tmp_path / "heron", samples=3)["path"])
    scores = task.score(samples, ["赤色です。"] * 3, Judge(judge_server, "j", backoff=0.01))
    assert scores.summary["heron_bench"] == 75.0 and scores.details["heron_bench"]["conv"] == 6.0
    _, _, body = OpenAICompatible.requests[0]
    assert body["messages"][0]["content"].startswith("You are a helpful and precise assistant")
    assert '"context": 白い背景に' in body["messages"][1]["content"] and scores.judged_by == {"heron_bench": "j"}


def test_a_failing_endpoint_is_retried_then_one_line(judge_server):
    OpenAICompatible.status = 500
    judge = Judge(judge_server, "j", tries=3, backoff=0.01)
    with pytest.raises(JudgeError) as caught:
        judge.complete([{"role": "user", "content": "x"}])
    assert len(OpenAICompatible.requests) == 3
    message = str(caught.value)
    assert "\n" not in message and "failed after 3 tries: HTTP 500" in message and judge_server in message
    refused = Judge("http://127.0.0.1:9/v1", "j", tries=2, backoff=0.01)  # nothing listens on port 9
    with pytest.raises(JudgeError, match="failed after 2 tries"):
        refused.complete([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------- files


def test_synthetic_sets_read_the_same_from_every_format(tmp_path):
    for task_name in BENCH_TASKS:
        loaded = []
        for fmt in ("disk", "parquet", "jsonl"):
            written = synth_bench(task_name, tmp_path / f"{task_name}-{fmt}", samples=3, fmt=fmt)
            path = written["out"] if fmt != "jsonl" else written["path"]
            samples = TASKS[task_name].load(path)
            loaded.append([(s.question_id, s.question, s.reference, s.doc,
                            [i.load().tobytes() for i in s.images]) for s in samples])
        assert loaded[0] == loaded[1] == loaded[2], task_name
        assert len(loaded[0]) == (6 if task_name == "ja-vg-vqa-500" else 3)


def test_jmmmu_prompt_is_eval_mms(tmp_path):
    samples = TASKS["jmmmu"].load(synth_bench("jmmmu", tmp_path / "jmmmu", samples=2)["path"])
    question = samples[0].question
    assert question.startswith("<image>この図形は何色ですか？\nA. ") and question.endswith(
        "\n\n与えられた選択肢の中から最も適切な回答のアルファベットを直接記入してください。")
    assert samples[0].prompt == question.removeprefix("<image>") and len(samples[0].images) == 1
    assert Jmmmu().score(samples, [s.reference for s in samples]).summary["accuracy"] == 1.0


@pytest.mark.parametrize("task_name, breaks, message", [
    ("ja-vg-vqa-500", lambda row: row.pop("qas"), "missing field 'qas'"),
    ("ja-vg-vqa-500", lambda row: row["qas"][0].pop("answer"), "missing field 'qas.0.answer'"),
    ("ja-vlm-bench-in-the-wild", lambda row: row.update(image="images/nowhere.png"), "field 'image': image file"),
    ("japanese-heron-bench", lambda row: row["answer"].pop("gpt-4-0125-preview"), "answer.gpt-4-0125-preview"),
    ("jmmmu", lambda row: row.update(image_1=None), "field 'image_1'"),
    ("jdocqa", lambda row: row.update(answer_type=7), "field 'answer_type' is 7"),
])
def test_a_bad_file_names_the_file_and_the_field(tmp_path, task_name, breaks, message):
    path = Path(synth_bench(task_name, tmp_path / "set", samples=2, fmt="jsonl")["path"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    breaks(rows[1])
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with pytest.raises(BenchmarkDataError) as caught:
        TASKS[task_name].load(path)
    assert str(path) in str(caught.value) and message in str(caught.value) and "row 1" in str(caught.value)


# ---------------------------------------------------------------------------------------------- exports


def tiny_export(recipe_path: Path, out: Path) -> Path:
    """A random-weight export of a tiny recipe's architecture, in its family's format, with kakehashi.json."""
    from train.models import family_for, model_config
    from train.recipe import load_recipe
    from train.run import build_processor

    recipe = load_recipe(recipe_path, check_files=False)
    processor = build_processor(recipe, out.parent / "cache")
    family = family_for(recipe.model)
    torch.manual_seed(0)
    family.save_export(family.build(recipe.model, model_config(recipe.model, processor.tokenizer)), processor, out)
    (out / "kakehashi.json").write_text(json.dumps({"recipe": recipe.name, "template": recipe.template}))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    return {name: tiny_export(recipe, tmp / name) for name, recipe in RECIPES.items()}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sets")
    return {name: synth_bench(name, tmp / name, samples=3)["out"] for name in BENCH_TASKS}


@pytest.mark.parametrize("family", list(RECIPES))
def test_every_task_runs_on_its_synthetic_set(exports, sets, family, tmp_path):
    from train.benchmarks.run import run_benchmark

    for task_name in BENCH_TASKS:
        report = run_benchmark(exports[family], task_name, sets[task_name], limit=3, max_new_tokens=4,
                               predictions_file=tmp_path / f"{task_name}.jsonl")
        rows = [json.loads(line) for line in (tmp_path / f"{task_name}.jsonl").read_text().splitlines()]
        assert report["samples"] == len(rows) == 3, task_name
        assert set(report["metrics"]) == set(TASKS[task_name].metrics) - set(TASKS[task_name].judge_metrics)
        assert set(report["not_scored"]) == set(TASKS[task_name].judge_metrics)
        for metric in report["metrics"]:
            assert metric in rows[0] and report["scales"][metric]
        assert {"question_id", "question", "prediction", "reference"} <= set(rows[0])
        assert report["generation"]["do_sample"] is False and report["generation"]["max_new_tokens"] == 4
    stops = ["\n###"] if family == "qwen2vl" else []  # the Sarashina template's stop string
    assert report["generation"]["stop_strings"] == stops


@pytest.mark.parametrize("family", list(RECIPES))
def test_batched_generation_answers_as_one_at_a_time(exports, sets, family):
    from train.benchmarks.generate import GenerationSettings, generate_answers
    from train.models import family_of_export

    model, processor = family_of_export(exports[family]).load_export(exports[family])
    samples = TASKS["jmmmu"].load(sets["jmmmu"]) + TASKS["ja-vg-vqa-500"].load(sets["ja-vg-vqa-500"], limit=3)
    requests = [(s.images, s.prompt) for s in samples]  # prompts of different lengths: left padding
    padding_side = processor.tokenizer.padding_side
    batched = generate_answers(model, processor, requests, GenerationSettings(max_new_tokens=6, batch_size=6))
    alone = generate_answers(model, processor, requests, GenerationSettings(max_new_tokens=6, batch_size=1))
    assert batched == alone and processor.tokenizer.padding_side == padding_side  # left as it was found


def test_eval_task_through_the_command_matches_eval_mms_formula_on_its_predictions(exports, sets, tmp_path):
    predictions = tmp_path / "p.jsonl"
    done = kakehashi("eval", exports["llava"], "--task", "ja-vg-vqa-500", "--data", sets["ja-vg-vqa-500"],
                     "--predictions", predictions, "--max-new-tokens", "8", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    recomputed = sum(eval_mm_rouge_l(r["reference"], r["prediction"]) for r in rows) / len(rows)
    assert report["metrics"]["rouge_l_mecab_pct"] == pytest.approx(recomputed, abs=0.01) and len(rows) == 6
    assert report["judge"] is None and "llm_as_a_judge" in report["not_scored"]


def test_bad_files_and_a_failing_judge_exit_2_with_one_line(exports, sets, judge_server, tmp_path):
    path = Path(synth_bench("ja-vg-vqa-500", tmp_path / "bad", samples=2, fmt="jsonl")["path"])
    (path.parent / "images" / "000001-image.png").unlink()
    done = kakehashi("eval", exports["llava"], "--task", "ja-vg-vqa-500", "--data", path)
    assert done.returncode == 2 and done.stdout == ""
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("kakehashi: error: ") and str(path) in line and "row 1: field 'image'" in line
    OpenAICompatible.status = 503
    env = {"KAKEHASHI_JUDGE_URL": judge_server, "KAKEHASHI_JUDGE_RETRIES": "2", "KAKEHASHI_JUDGE_BACKOFF": "0.01"}
    done = kakehashi("eval", exports["llava"], "--task", "ja-vg-vqa-500", "--data", sets["ja-vg-vqa-500"], "--limit",
                     "1", "--max-new-tokens", "2", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("kakehashi: error: judge endpoint ")
    assert "failed after 2 tries: HTTP 503" in done.stderr and len(OpenAICompatible.requests) == 2


# ---------------------------------------------------------------------------------------------- inside training


@pytest.mark.parametrize("fields, message", [
    ({"benchmark": "nope", "path": "x"}, "benchmark: unknown task 'nope'"),
    ({"benchmark": "jmmmu"}, "path is missing"),
    ({"benchmark": "jmmmu", "path": "x", "task": "vqa"}, "task does not go with benchmark"),
    ({"path": "x"}, "shards is missing"),
])
def test_benchmark_eval_sources_are_validated(tiny_recipe_text, fields, message):
    import yaml

    from train.recipe import RecipeError, parse_recipe

    recipe = yaml.safe_load(tiny_recipe_text)
    recipe["stages"][1].update(eval_every=2, eval_data=[fields])
    with pytest.raises(RecipeError) as caught:
        parse_recipe(yaml.safe_dump(recipe, allow_unicode=True), check_files=False)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_periodic_eval_scores_a_benchmark_on_the_training_model(sets, tmp_path):
    import yaml

    from train.models import family_for, model_config
    from train.periodic_eval import build_periodic_eval
    from train.recipe import parse_recipe
    from train.report import eval_panels, eval_table
    from train.run import build_processor

    recipe = yaml.safe_load(RECIPES["llava"].read_text())
    recipe["stages"][1].update(eval_every=2, eval_samples=2, eval_data=[
        {"benchmark": "ja-vg-vqa-500", "path": sets["ja-vg-vqa-500"]},
        {"benchmark": "jmmmu", "path": sets["jmmmu"], "name": "jmmmu-shapes"}])
    parsed = parse_recipe(yaml.safe_dump(recipe, allow_unicode=True), check_files=False)
    processor = build_processor(parsed, tmp_path / "cache")
    family = family_for(parsed.model)
    model = family.build(parsed.model, model_config(parsed.model, processor.tokenizer))
    periodic = build_periodic_eval(parsed, 1, processor, rank=0, world_size=1)
    record = periodic.run(family.training_module(model), step=2)
    assert record["eval/ja-vg-vqa-500/samples"] == 2 and record["eval/jmmmu-shapes/samples"] == 2
    assert 0 <= record["eval/ja-vg-vqa-500/rouge_l_mecab_pct"] <= 100 and "eval/jmmmu-shapes/accuracy" in record
    assert not any(k.startswith("eval_loss") for k in record)  # no shard sources: no losses
    labels = [label for label, _ in eval_panels([record])]
    assert "ja-vg-vqa-500/rouge_l_mecab_pct" in labels and "jmmmu-shapes/accuracy" in labels
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert "ja-vg-vqa-500/rouge_l_mecab_pct" in eval_table(run)


@pytest.mark.slow
def test_a_training_logs_benchmark_metrics_per_stage_and_the_report_plots_them(tmp_path):
    import yaml

    from tests.train.conftest import short_recipe

    recipe = short_recipe(tmp_path, steps=(2, 2), samples=60)
    bench = synth_bench("ja-vg-vqa-500", tmp_path / "vg", samples=2)["out"]
    text = yaml.safe_load(recipe.read_text())
    for stage in text["stages"]:
        stage.update(eval_every=2, eval_samples=4, eval_data=[{"benchmark": "ja-vg-vqa-500", "path": bench}])
    recipe.write_text(yaml.safe_dump(text, allow_unicode=True))
    done = kakehashi("train", recipe, "--output", tmp_path / "run", "--no-export")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["stage"] for r in evals] == ["align", "instruct"]
    assert all("eval/ja-vg-vqa-500/rouge_l_mecab_pct" in r and r["eval/ja-vg-vqa-500/samples"] == 4 for r in evals)
    assert kakehashi("report", tmp_path / "run").returncode == 0
    assert (tmp_path / "run" / "report" / "instruct-eval.png").is_file()
