"""`hftrain eval --tasks` through EleutherAI's lm-eval, offline: a local rolling-log-likelihood
task on a tiny export, checked against `hftrain eval --data` on the same text; and the one
line a user without the `eval` extra gets.

The tests that run lm-eval skip where it is not installed (`pip install -e ".[eval]"`); the
missing-extra test runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict

from hftrain.cli import main
from hftrain.harness import LM_EVAL_MISSING, write_rolling_task

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install -e '.[eval]')")

BLOCK = 16
@pytest.fixture(scope="module")
def scored(tmp_path_factory, shakespeare_text):
    """A tiny char GPT-2 export, a held-out text of a whole number of windows (so that
    lm-eval's windows and hftrain's cover the text identically), and a local task over it."""
    from hftrain.recipe import recipe_from_dict
    from hftrain.tokenizer import load_tokenizer
    from hftrain.train import train

    root = tmp_path_factory.mktemp("lm_eval")
    (root / "train.txt").write_text(shakespeare_text[:16_000], encoding="utf-8")
    raw = tiny_recipe_dict(root / "train.txt", root / "run", data={"block_size": BLOCK},
                           train={"max_steps": 40}, eval={"interval": 40})
    export = train(recipe_from_dict(raw)).final_dir
    # Held out, with a character the tokenizer never saw (3 UTF-8 bytes, one <|unk|>).
    text = shakespeare_text[16_000:19_000].replace("\n\n", "\n\n\u2014", 1)
    tokenizer = load_tokenizer(str(export))
    while len(tokenizer(text, add_special_tokens=False).input_ids) % BLOCK:
        text = text[:-1]
    (root / "text.txt").write_text(text, encoding="utf-8")
    tasks = root / "tasks"
    write_rolling_task(tasks, "hftrain_heldout", [text])
    return {"export": export, "text": text, "text_file": root / "text.txt", "tasks": tasks,
            "tokenizer": tokenizer}


def eval_json(capsys, *argv) -> dict:
    main(["eval", *map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def lm_eval_rolling_nll(export: Path, text: str) -> float:
    """lm-eval's own total NLL of `text` (HFLM.loglikelihood_rolling, default prefix token)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export), max_length=BLOCK, batch_size=16, device="cpu")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (log_likelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    return -log_likelihood


def closing_eos_nll(export: Path, tokenizer, text: str) -> float:
    """NLL of the EOS hftrain scores after the text, which lm-eval does not score. The text
    fills whole windows, so that EOS opens a window of its own: its context is the last token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    last = tokenizer(text, add_special_tokens=False).input_ids[-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[last]])).logits[0, -1].float()
    return -torch.log_softmax(logits, -1)[tokenizer.eos_token_id].item()


@needs_lm_eval
def test_lm_eval_task_agrees_with_hftrain_eval_on_the_same_text(scored, capsys):
    """Documents start with BOS, the token lm-eval puts before a text, and bits per byte
    counts the bytes of the text: lm-eval and hftrain give the same figures."""
    text = scored["text"]
    both = eval_json(capsys, scored["export"], "--data", scored["text_file"],
                     "--tasks", "hftrain_heldout", "--include-path", scored["tasks"],
                     "--block-size", BLOCK)
    lm_eval_bpb = both["tasks"]["hftrain_heldout"]["bits_per_byte"]
    lm_eval_nll = lm_eval_rolling_nll(scored["export"], text)
    n_bytes = len(text.encode("utf-8"))
    # lm-eval's bits_per_byte is its rolling NLL over the text's UTF-8 bytes
    assert lm_eval_bpb == pytest.approx(lm_eval_nll / n_bytes / math.log(2), rel=1e-6)
    assert both["bytes"] == n_bytes
    assert both["block_size"] == BLOCK and both["stride"] == BLOCK
    # hftrain also scores the closing EOS; the text tokens are scored in the same windows
    # with the same prefix token, so the rest agrees to float32 summation error
    eos_nll = closing_eos_nll(scored["export"], scored["tokenizer"], text)
    assert abs(both["nll"] - lm_eval_nll) / lm_eval_nll < 1e-3
    assert both["nll"] - eos_nll == pytest.approx(lm_eval_nll, rel=1e-4)
    assert both["bits_per_byte"] == pytest.approx(lm_eval_bpb, rel=1e-3)
    assert (both["nll"] - eos_nll) / n_bytes / math.log(2) == pytest.approx(lm_eval_bpb,
                                                                             rel=1e-4)


@needs_lm_eval
def test_tasks_print_one_line_per_metric(scored, capsys):
    main(["eval", str(scored["export"]), "--tasks", "hftrain_heldout",
          "--include-path", str(scored["tasks"])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["hftrain_heldout"] * 3
    metrics = {line.split()[1]: float(line.split()[2]) for line in lines}
    assert set(metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert metrics["byte_perplexity"] == pytest.approx(2 ** metrics["bits_per_byte"], rel=1e-3)


@needs_lm_eval
def test_unknown_task_is_one_line(scored, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(scored["export"]), "--tasks", "no_such_task_xyz",
              "--include-path", str(scored["tasks"])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "unknown lm-eval task 'no_such_task_xyz'" in err


def task_folder_with_code(scored: dict, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the local task folder with `evil.py` beside it, which leaves `marker` when
    imported: (folder, the task's YAML, marker)."""
    tasks = tmp_path / "tasks"
    shutil.copytree(scored["tasks"], tasks)
    marker = tmp_path / "evil-ran"
    (tasks / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                   "def fn(docs):\n    return docs\n")
    return tasks, tasks / "hftrain_heldout.yaml", marker


@needs_lm_eval
def test_a_task_folder_that_runs_python_needs_trust_remote_code(scored, capsys, tmp_path):
    """`process_docs: !function evil.fn` makes lm-eval import evil.py from the task folder:
    refused in one line (nothing imported) unless --trust-remote-code is given."""
    tasks, task, marker = task_folder_with_code(scored, tmp_path)
    task.write_text(task.read_text() + "process_docs: !function evil.fn\n")
    argv = ["eval", str(scored["export"]), "--tasks", "hftrain_heldout", "--include-path",
            str(tasks)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "runs Python (!function evil.fn)" in err and "--trust-remote-code" in err
    assert not marker.exists()
    main([*argv, "--trust-remote-code"])
    assert marker.exists()
    assert "hftrain_heldout: bits_per_byte" in capsys.readouterr().out


@needs_lm_eval
def test_a_task_file_in_utf16_is_checked_too(scored, capsys, tmp_path):
    """lm-eval's YAML reader decodes UTF-16: the check reads the bytes the same way."""
    tasks, task, marker = task_folder_with_code(scored, tmp_path)
    task.write_bytes((task.read_text() + "process_docs: !function evil.fn\n").encode("utf-16"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(scored["export"]), "--tasks", "hftrain_heldout", "--include-path",
              str(tasks)])
    assert exit_info.value.code == 2 and "runs Python" in capsys.readouterr().err
    assert not marker.exists()


@needs_lm_eval
def test_a_task_template_cannot_reach_python_without_trust(scored, capsys, tmp_path):
    """lm-eval renders task templates with jinja2: without --trust-remote-code they render
    in jinja2's sandbox, so a template reaching for os.popen raises instead of running."""
    tasks = tmp_path / "tasks"
    shutil.copytree(scored["tasks"], tasks)
    marker = tmp_path / "template-ran"
    task = tasks / "hftrain_heldout.yaml"
    payload = f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}"
    text = task.read_text()
    assert "doc_to_target:" in text
    lines = [f'doc_to_target: "{payload}{{{{text}}}}"' if line.startswith("doc_to_target:")
             else line for line in text.splitlines()]
    task.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(scored["export"]), "--tasks", "hftrain_heldout", "--include-path",
              str(tasks)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "task template reaches for Python" in err
    assert not marker.exists()


def test_tasks_without_lm_eval_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    # checked before --data is read: the missing file is not what gets reported
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path), "--tasks", "hellaswag", "--data", str(tmp_path / "no.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hftrain: error: {LM_EVAL_MISSING}"]
    assert LM_EVAL_MISSING == "hftrain eval --tasks needs lm-eval: pip install 'hftrain[eval]'"


def test_eval_needs_data_or_tasks(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "--tasks" in err[0]
