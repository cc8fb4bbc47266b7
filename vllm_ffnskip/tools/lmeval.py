"""Factoid accuracy through lm-eval against a ``vllm serve --model-impl ffnskip`` endpoint.

This checks the whole served path (OpenAI chat endpoint, chat template, ``vllm_xargs``)
with a standard harness rather than our own loop. One server runs with the policy under
test as its default; two local lm-eval tasks over the shipped factoid jsonl differ only in
the request body's ``vllm_xargs`` (``{"ffnskip": 0}`` dense, ``{"ffnskip": 1}`` skip), which
lm-eval forwards from a task's ``generation_kwargs``. The server binds to loopback only.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from vllm_ffnskip.policy import policy_path
from vllm_ffnskip.tools import datasets
from vllm_ffnskip.tools.serving import vllm_server

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} {instruction}"
doc_to_target: "{{{{answers[0]}}}}"
process_results: !function utils.process_results
generation_kwargs:
  until: []
  max_gen_toks: {max_tokens}
  temperature: 0
  do_sample: false
  vllm_xargs: {xargs}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
UTILS = """\
from vllm_ffnskip.tools.datasets import answer_correct


def process_results(doc, results):
    return {"acc": float(answer_correct(results[0], doc["answers"]))}
"""
VARIANTS = {
    "ffnskip_factoid_dense": {"ffnskip": 0},
    "ffnskip_factoid_skip": {"ffnskip": 1},
}


def write_tasks(folder: Path, split: str, max_tokens: int) -> list[str]:
    """The two task YAMLs (and the scorer they share) in ``folder``."""
    data = datasets.DATA_DIR / f"factoid_{split}.jsonl"
    (folder / "utils.py").write_text(UTILS)
    for name, xargs in VARIANTS.items():
        (folder / f"{name}.yaml").write_text(
            TASK_YAML.format(
                name=name,
                data=data,
                instruction=datasets.QA_INSTRUCTION,
                max_tokens=max_tokens,
                xargs=json.dumps(xargs),
            )
        )
    return list(VARIANTS)


def serve_args(policy_file: str | None) -> list[str]:
    """``vllm serve`` options: ffnskip with the policy under test as the server default."""
    config = {
        "enabled": True,
        "max_skip_rows": 0,  # the rule in every pass, as engine.RULE_EXACT
        **({"policy_file": str(policy_path(policy_file).resolve())} if policy_file else {}),
    }
    return ["--model-impl", "ffnskip", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "1024", "--seed", "0",
            "--additional-config", json.dumps({"ffnskip": config})]  # fmt: skip


def run(
    model: str, policy_file: str | None, split: str, limit: int | None, max_tokens: int
) -> dict[str, Any]:
    """Accuracy of dense and skip requests on one server: ``{task: acc}`` plus the setup."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tasks = write_tasks(folder, split, max_tokens)
        sys.path.insert(0, str(folder))  # `!function utils...` resolves beside the YAML
        try:
            with vllm_server(model, *serve_args(policy_file), log=folder / "server.log") as url:
                # One call per task: with num_concurrent, lm-eval 0.4.13 sends every request
                # of a call with the first task's generation_kwargs, so both would be dense.
                results = {
                    task: lm_eval.simple_evaluate(
                        model="local-chat-completions",
                        model_args={
                            "base_url": f"{url}/v1/chat/completions",
                            "model": model,
                            "num_concurrent": 8,
                            "max_retries": 2,
                        },
                        tasks=[task],
                        task_manager=TaskManager(include_path=str(folder)),
                        apply_chat_template=True,
                        limit=limit,
                        log_samples=True,
                    )
                    for task in tasks
                }
        finally:
            sys.path.remove(str(folder))
    scores = {t: results[t]["results"][t]["acc,none"] for t in tasks}
    # Shows that vllm_xargs reached the server: skip responses differ from dense ones.
    answers = {
        t: [
            s["resps"][0][0]
            for s in sorted(results[t]["samples"][t], key=lambda s: s["doc_id"])
        ]
        for t in tasks
    }
    same = [a == b for a, b in zip(*answers.values())]
    return {
        "harness": f"lm-eval {lm_eval.__version__}, local-chat-completions",
        "server_policy": policy_file or "shipped default",
        "split": split,
        "accuracy": scores,
        "identical_responses": sum(same) / len(same),
    }
