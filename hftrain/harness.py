"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`).

hftrain does not re-implement benchmarks: their prompts, few-shot layouts, answer matching
and normalisations are what make figures comparable between papers, and lm-eval is where the
field keeps them. `hftrain eval EXPORT --tasks T1,T2` hands the export folder to lm-eval's
`HFLM` as any transformers client would load it (remote code included, with
`--trust-remote-code`) and runs `lm_eval.simple_evaluate`; local task YAMLs come in through
`--include-path`. lm-eval is an optional extra (`pip install 'hftrain[eval]'`): it pulls in
some 30 packages that training does not need.

Windows: lm-eval scores a long text (`loglikelihood_rolling`) in windows of `max_length`
tokens, the first one after a prefix token (the tokenizer's `bos_token`, else `eos_token`).
hftrain passes its block size as `max_length`, so with the default `--block-size` lm-eval sees
the text in the windows the model was trained on, like `hftrain eval --data`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from hftrain.errors import HftrainError, one_line

LM_EVAL_MISSING = "hftrain eval --tasks needs lm-eval: pip install 'hftrain[eval]'"


def require_lm_eval() -> None:
    """Stop with one line (exit status 2) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing in (None, "lm_eval") or str(missing).startswith("lm_eval."):
            raise HftrainError(LM_EVAL_MISSING) from None
        raise HftrainError(f"{LM_EVAL_MISSING} (lm-eval is installed but cannot import "
                           f"'{missing}')") from None


ROLLING_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_rolling_task(folder: Path, name: str, texts: list[str]) -> Path:
    """A local lm-eval task (for `--include-path folder --tasks name`) that scores `texts`,
    each as one document, by rolling log-likelihood (perplexity, bits per byte), as lm-eval's
    wikitext task does: `folder/name.jsonl` and `folder/name.yaml`."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    task = folder / f"{name}.yaml"
    task.write_text(ROLLING_TASK_YAML.format(name=name, data=data.resolve()), encoding="utf-8")
    return task


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TaskScorer:
    """lm-eval `tasks`, checked once (lm-eval importable, `include_path` a folder, no task
    code unless trusted, every task known: lm-eval's index of its own tasks takes seconds to
    build, so tasks that are all in `include_path` are looked up there alone), then
    run on any model: an export folder (`hftrain eval --tasks`) or the live model of a
    training run (`eval.tasks`), which is scored as it is, without writing an export.

    Metric names are lm-eval's, with its filter appended when it is not the default one
    ("exact_match,strict-match"); standard errors come as "<metric>_stderr" where lm-eval
    computed one. `limit`: documents per task (a fraction when below 1), for quick checks;
    lm-eval marks such figures as not for reporting. `max_length`: the window of rolling
    log-likelihoods and the longest context (None: lm-eval reads it from the model config).
    """

    def __init__(self, tasks: list[str], include_path: str | None = None,
                 limit: float | None = None, batch_size: int = 16,
                 max_length: int | None = None, trust_remote_code: bool = False) -> None:
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        if include_path is not None and not Path(include_path).is_dir():
            raise HftrainError(f"--include-path: no such folder: {include_path}")
        if not trust_remote_code:
            refuse_task_code(include_path, tasks)
        self.manager = TaskManager(include_path=include_path, include_defaults=False) \
            if include_path else None
        if self.manager is None or set(self.manager.match_tasks(tasks)) != set(tasks):
            self.manager = TaskManager(include_path=include_path)  # lm-eval's own: seconds
        known = set(self.manager.match_tasks(tasks))
        unknown = [t for t in tasks if t not in known and "*" not in t and not Path(t).is_file()]
        if unknown:
            where = (f" or in {include_path}" if include_path
                     else " (local task YAMLs: --include-path)")
            raise HftrainError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: not one "
                               f"of lm-eval's tasks{where}; `lm-eval ls tasks` lists them")
        self.tasks, self.limit, self.batch_size = tasks, limit, batch_size
        self.max_length, self.trust_remote_code = max_length, trust_remote_code

    def score_export(self, export: str) -> dict[str, dict[str, float]]:
        """The tasks' metrics of the model in the export folder `export`, loaded as any
        transformers client would load it."""
        from lm_eval.models.huggingface import HFLM

        from hftrain.generation import check_export_exists

        check_export_exists(export)
        try:
            lm = HFLM(pretrained=export, trust_remote_code=self.trust_remote_code,
                      max_length=self.max_length, batch_size=self.batch_size, device=_device())
        except (OSError, ValueError) as exc:
            raise HftrainError(f"lm-eval cannot load '{export}': {exc}".split("\n")[0]) from None
        return self._evaluate(lm)

    def score_model(self, model: Any, tokenizer: Any) -> dict[str, dict[str, float]]:
        """The tasks' metrics of a live `transformers` model (on its device, in eval mode for
        the time of the scoring), in this process alone."""
        import torch
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        model.eval()
        try:
            with _quiet_lm_eval():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=self.max_length,
                          batch_size=self.batch_size)
            with torch.no_grad():
                return self._evaluate(lm)
        finally:
            model.train(was_training)

    def _evaluate(self, lm: Any) -> dict[str, dict[str, float]]:
        from jinja2.exceptions import SecurityError
        from lm_eval import simple_evaluate

        try:
            with nullcontext() if self.trust_remote_code else sandboxed_templates():
                output = simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.manager,
                                         limit=self.limit, log_samples=False)
        except SecurityError as exc:
            raise HftrainError(f"an lm-eval task template reaches for Python ({one_line(exc)}); "
                               "hftrain runs no code it did not ship unless asked: pass "
                               "--trust-remote-code if you trust the task") from None
        if output is None:  # only on processes other than the main one
            return {}
        return {task: _metrics(values) for task, values in output["results"].items()}


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns, each time a live model is handed to it, that it will not distribute
    the work: hftrain means exactly that (the main process scores, the others wait)."""
    import logging

    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


TASK_WAIT = timedelta(hours=2)
"""How long the other processes of a run wait while the main process scores `eval.tasks`."""


def task_scorer(recipe: Any, accelerator: Any) -> TaskScorer | None:
    """The scorer of the recipe's `eval.tasks` on the main process (None elsewhere, and
    without tasks), checked there before the run writes anything; a refusal stops every
    process in one line."""
    from hftrain.nodes import on_main_process
    from hftrain.sharding import is_sharded

    cfg = recipe.eval
    if not cfg.tasks:
        return None
    if is_sharded(accelerator):
        raise HftrainError("eval.tasks scores the main process's whole model, and this launch "
                           "shards it over the processes (FSDP, DeepSpeed): score the "
                           "checkpoints' exports with hftrain eval --tasks instead")
    made: list[TaskScorer] = []

    def make() -> None:
        try:
            made.append(TaskScorer(cfg.tasks, cfg.task_include_path, cfg.task_limit,
                                   cfg.batch_size, recipe.data.block_size))
        except HftrainError as exc:
            message = str(exc).replace("--include-path", "eval.task_include_path").replace(
                "pass --trust-remote-code if you trust it",
                "score it on an export with hftrain eval --tasks --trust-remote-code")
            raise HftrainError(f"eval.tasks: {message}") from None

    on_main_process(accelerator, make)
    return made[0] if made else None


def run_tasks(export: str, tasks: list[str], include_path: str | None = None,
              limit: float | None = None, batch_size: int = 16, max_length: int | None = None,
              trust_remote_code: bool = False) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the model in `export`; returns {task: {metric: value}}
    (`TaskScorer`)."""
    return TaskScorer(tasks, include_path, limit, batch_size, max_length,
                      trust_remote_code).score_export(export)


@contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval renders every task template (`doc_to_text`, `doc_to_target`, ...) with a plain
    `jinja2.Environment`, in which `{{ cycler.__init__.__globals__.os.popen(...) }}` runs a
    command. Without --trust-remote-code, hftrain swaps lm-eval's module-level environment for
    jinja2's own `ImmutableSandboxedEnvironment` (same settings and filters) for the time of
    the evaluation: templates that only read fields render the same, one that reaches for
    Python internals raises jinja2's SecurityError. (lm-eval offers no setting for this.)"""
    import lm_eval.utils
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    original = lm_eval.utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined,
                                            keep_trailing_newline=True)
    sandbox.filters.update(original.filters)
    lm_eval.utils.env = sandbox
    try:
        yield
    finally:
        lm_eval.utils.env = original


def refuse_task_code(include_path: str | None, tasks: list[str]) -> None:
    """Refuse, in one line, local task files that would make lm-eval run Python: a `!function`
    tag imports a module from beside the YAML (or anywhere on the path) when the task is
    built. Tasks that ship with lm-eval are its own code; a folder or file the user points
    at runs only with --trust-remote-code, as a model's code does."""
    files = [Path(t) for t in tasks if Path(t).is_file()]
    if include_path is not None:
        files += sorted(p for p in Path(include_path).rglob("*")
                        if p.suffix in (".yaml", ".yml") and p.is_file())
    seen: set[Path] = set()
    while files:
        file = files.pop().resolve()
        if file in seen:
            continue
        seen.add(file)
        functions, includes = _task_file_code(file)
        if functions:
            raise HftrainError(
                f"{file}: this lm-eval task runs Python ({functions[0]}); hftrain "
                "runs no code it did not ship unless asked: pass --trust-remote-code if you "
                "trust it")
        files += [file.parent / name for name in includes if (file.parent / name).is_file()]


class _TagRecorder(yaml.SafeLoader):
    """Reads a task YAML without constructing anything: records each tag that would run or
    build Python (`!function NAME`, `!!python/...`)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.functions: list[str] = []


def _record_tag(loader: _TagRecorder, suffix: str, node: yaml.Node) -> None:
    if suffix == "function" and isinstance(node, yaml.ScalarNode):
        loader.functions.append(f"!function {node.value}")


def _record_python_tag(loader: _TagRecorder, suffix: str, node: yaml.Node) -> None:
    loader.functions.append(f"!!python/{suffix}")  # PyYAML's FullLoader builds Python objects


_TagRecorder.add_multi_constructor("!", _record_tag)
_TagRecorder.add_multi_constructor("tag:yaml.org,2002:python/", _record_python_tag)


def _task_file_code(file: Path) -> tuple[list[str], list[str]]:
    """(the tags in `file` that would run Python, the files its `include:` names); a file that
    cannot be read or parsed is refused: lm-eval might read it otherwise."""
    try:  # bytes, as lm-eval reads them: the YAML reader detects UTF-16 and BOMs itself
        loader = _TagRecorder(file.read_bytes())
        try:
            document = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, yaml.YAMLError) as exc:  # unreadable here: not handed on unchecked
        raise HftrainError(f"{file}: cannot read this lm-eval task file to check it "
                           f"({one_line(exc)})") from None
    includes = document.get("include") if isinstance(document, dict) else None
    names = includes if isinstance(includes, list) else [includes]
    return loader.functions, [str(name) for name in names if isinstance(name, str)]


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"bits_per_byte,none": x, "bits_per_byte_stderr,none": "N/A", "alias": ...}
    as {"bits_per_byte": x}: numbers only, default filter name dropped."""
    metrics = {}
    for key, value in values.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or "," not in key:
            continue  # alias, "N/A" standard errors, sample counts
        name, _, filter_name = key.partition(",")
        if filter_name != "none":
            name = f"{name},{filter_name}"
        metrics[name] = float(value)
    return metrics


def format_results(results: dict[str, dict[str, float]]) -> list[str]:
    """One line per task metric: `task  metric  value [± stderr]`."""
    lines = []
    for task, metrics in results.items():
        for name, value in metrics.items():
            if "_stderr" in name:
                continue
            base, _, filter_name = name.partition(",")
            stderr = metrics.get(f"{base}_stderr" + (f",{filter_name}" if filter_name else ""))
            line = f"{task}: {name} {value:.4f}"
            if stderr is not None and math.isfinite(stderr):
                line += f" ± {stderr:.4f}"
            lines.append(line)
    return lines
