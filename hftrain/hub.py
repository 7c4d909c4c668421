"""Publish an export on the Hub: the exact folder (weights, tokenizer, the recurrent model's
code, the resolved recipe, the loss curve and a model card) is staged locally first, so a
dry run shows precisely what an upload sends.

The token is never handled here: `huggingface_hub` reads it from `HF_TOKEN` or the login
cache when it talks to the Hub, and nothing hftrain writes contains it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hftrain.atomic import atomic_write_text, write_error_reason
from hftrain.errors import HftrainError, one_line
from hftrain.launch import RUN_RECORD
from hftrain.run_folder import check_replaceable, contains, is_run_folder, record_written
from hftrain.tracking import read_metrics
from hftrain.yaml_data import load_yaml

FAMILIES = {"gpt2": "GPT-2", "llama": "Llama-style", "qwen3": "Qwen3-style"}
"""How the card names a transformers model_type."""

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A {{ description }} trained with hftrain{{ init_note }}.

## Training

| | |
|---|---|
| architecture | {{ architecture }} |
| parameters | {{ parameters }} |
| tokenizer | {{ tokenizer }} |
| training data | {{ train_data }} |
| steps x global batch | {{ steps }} x {{ global_batch }} |
| optimizer | {{ optimizer }} |
{% if validation %}| validation ({{ val_data }}) | {{ validation }} |
{% endif %}
{% if plot %}![training and validation loss](loss.png)
{% endif %}
The full recipe is `hftrain_recipe.yaml` in this repository.

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}"{{ remote }})
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}"{{ remote }})
ids = tokenizer("{{ prompt }}", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=100)[0]))
```
{% if remote %}
This is a recurrent model whose code (`modeling_recurrent.py`) ships in this repository:
read it before passing `trust_remote_code=True`.
{% endif %}"""


def stage(export: Path, folder: Path, repo_id: str) -> list[str]:
    """Write `folder`: the export, the run's loss curve and a model card. Returns the files."""
    if not (export / "config.json").is_file():
        raise HftrainError(f"not an export folder (no config.json): {export}")
    files = export_files(export)
    _claim_staging_folder(folder, export)
    try:
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export / name, folder / name, follow_symlinks=False)
        run_dir = export.parent
        plot = run_dir / "loss.png"
        if plot.is_file() and not plot.is_symlink():
            shutil.copy2(plot, folder / "loss.png")
        try:
            card = model_card(folder, repo_id, _last_evaluation(run_dir / "metrics.jsonl"))
            _publish_recipe(folder / "hftrain_recipe.yaml")
        except (yaml.YAMLError, TypeError, ValueError, AttributeError, KeyError) as exc:
            raise HftrainError(f"{export}: its hftrain_recipe.yaml or config.json holds "
                               f"values a model card cannot be made from ({one_line(exc)}); "
                               "fix or remove them") from None
        card.save(folder / "README.md")
        if folder.name == "hub":  # RUN/hub (the default): run.overwrite may remove these
            record_written(folder.parent, folder.name)
    except OSError as exc:  # a full disk: no half-copied file stays, only the marker
        _empty_staging_folder(folder)
        raise HftrainError(f"cannot stage the upload in {folder} "
                           f"({write_error_reason(exc)})") from None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != STAGING_MARKER)


def export_files(export: Path) -> list[str]:
    """The export's files (relative POSIX paths), every one a regular file inside it: a
    symbolic link (to a token file, a private folder) is refused in one line, never followed
    into a public upload."""
    files = []
    for root, dirs, names in os.walk(export):  # does not follow linked folders
        for name in sorted(dirs + names):
            path = Path(root) / name
            if path.is_symlink():
                raise HftrainError(f"{path} is a symbolic link (to {os.readlink(path)}); push "
                                   "uploads only the export's own files: replace the link "
                                   "with a copy, or remove it")
            if name in names and not path.is_file():
                raise HftrainError(f"{path} is not a regular file; remove it from the export")
            if name in names:
                files.append(path.relative_to(export).as_posix())
    return files


def _publish_recipe(path: Path) -> None:
    """The staged recipe without the trainer's local directories: every absolute path in it
    (data files, the run folder, the cache, a local `init_from`) is cut to its last two
    parts, as the model card names local models."""
    if not path.is_file():
        return
    recipe = load_yaml(path.read_text(encoding="utf-8"))
    atomic_write_text(path, yaml.safe_dump(_without_local_paths(recipe), sort_keys=False))


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    return public_name(value) if isinstance(value, str) else value


_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def looks_local(value: str) -> bool:
    """Whether `value` is a local path (POSIX or Windows, `~`, `./`, `../`, `file:`) rather
    than a Hub id (`owner/name`) or a plain name."""
    return (value.startswith(("/", "~", "./", "../", "file:", "\\")) or "\\" in value
            or bool(_WINDOWS_PATH.match(value)) or value.count("/") > 1)


def public_name(value: str) -> str:
    """A local path as its last component only: a published file names no user, home or
    directory of the machine the model was trained on. Anything else as it is."""
    if not looks_local(value):
        return value
    return re.split(r"[\\/]", value.rstrip("/\\"))[-1] or "local"


STAGING_MARKER = ".hftrain-staging"
"""Marks a folder `stage` made, so that it is the only kind of folder a new staging replaces;
it is not uploaded."""


def _claim_staging_folder(folder: Path, export: Path) -> None:
    """Make `folder` an empty staging folder of hftrain's own, or refuse: it may be new,
    empty, or a staging folder hftrain made before, and never the export, the run folder, or
    a folder that holds either."""
    if contains(folder, export) or contains(export, folder):  # holding the export: its run too
        raise HftrainError(f"--folder {folder} is, holds or lies inside the export or its run "
                           "folder; stage the upload in a folder of its own (default: RUN/hub)")
    if folder.is_symlink():
        raise HftrainError(f"--folder {folder} is a symbolic link; give the folder itself")
    if folder.name == "hub" and is_run_folder(folder.parent):  # RUN/hub, staged before
        check_replaceable(folder.parent, folder.name)
    try:
        if folder.exists():
            if not folder.is_dir():
                raise HftrainError(f"--folder {folder} is a file, not a folder")
            if not (folder / STAGING_MARKER).is_file() and any(folder.iterdir()):
                raise HftrainError(f"--folder {folder} is not empty and was not staged by "
                                   "hftrain; give a new or empty folder")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / STAGING_MARKER).write_text("staged by hftrain push; replaced by the next one\n")
    except OSError as exc:
        raise HftrainError(f"cannot stage the upload in {folder}: {exc.strerror}") from None


def _empty_staging_folder(folder: Path) -> None:
    """Remove what a failed staging copied into `folder` (hftrain's own, claimed above),
    keeping the marker by which the next push replaces it."""
    try:
        staged = [path for path in folder.iterdir() if path.name != STAGING_MARKER]
    except OSError:
        return
    for path in staged:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _last_evaluation(metrics: Path) -> dict[str, Any] | None:
    if not metrics.is_file():
        return None
    evaluations = [r for r in read_metrics(metrics) if "val_loss" in r]
    return evaluations[-1] if evaluations else None


def model_card(folder: Path, repo_id: str, val: dict[str, Any] | None) -> ModelCard:
    """The model card: Hub metadata (library, tags, datasets, the perplexity result) and how
    the model was made and is loaded, from the export's config and recipe."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    recipe_path = folder / "hftrain_recipe.yaml"
    recipe = load_yaml(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() \
        else {}
    recipe = _sections(recipe)
    data, model, train = recipe["data"], recipe["model"], recipe["train"]
    recurrent = config.get("model_type") == "hftrain_recurrent"
    arch = config.get("cell", config.get("model_type", "causal-lm"))
    dataset_name = _data_named(data, "val_files") or "custom"
    hub_datasets = [s["dataset"] for s in _sources(data) if s.get("dataset")]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hftrain", "causal-lm", arch, *(["custom_code"] if recurrent else [])],
        datasets=hub_datasets or None,
        model_name=repo_id,
        eval_results=[
            EvalResult(task_type="text-generation",
                       dataset_type=hub_datasets[0] if len(hub_datasets) == 1 else "custom",
                       dataset_name=dataset_name, metric_type="perplexity",
                       metric_value=round(val["val_ppl"], 4), dataset_split="validation"),
        ] if val else None,
    )
    n_params = _parameter_count(folder)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        description=(f"recurrent ({arch.upper()})" if recurrent else FAMILIES.get(arch, arch))
        + " causal language model",
        init_note=_init_note(model, train),
        architecture=_architecture(config),
        parameters=f"{n_params / 1e6:.2f} M" if n_params else "unknown",
        tokenizer=_tokenizer_origin(recipe),
        train_data=_data_named(data, "train_files") or "unknown",
        val_data=dataset_name,
        steps=train.get("max_steps", "?"),
        global_batch=global_batch(train, data.get("block_size", "?"), _run_record(folder)),
        optimizer=_optimizer(train),
        validation=_validation(val) if val else "",
        plot=(folder / "loss.png").is_file(),
        remote=", trust_remote_code=True" if recurrent else "",
        prompt=recipe.get("sample", {}).get("prompt", "") or "",
    )


def _init_note(model: dict[str, Any], train: dict[str, Any]) -> str:
    if not model.get("init_from"):
        return ""
    how = f"preference-tuned with DPO (beta {train.get('dpo_beta', 0.1)})" \
        if train.get("objective") == "dpo" else "fine-tuned"
    return f", {how} from {_model_name(model['init_from'])}"


def _validation(val: dict[str, Any]) -> str:
    """The card's validation line: loss, perplexity, bits per byte (each source's too); of
    a DPO run, its preference figures on the held-out pairs."""
    if "val_pairs" in val:
        return (f"DPO loss {val['val_loss']:.4f} on {val['val_pairs']:,} held-out preference "
                f"pairs: reward accuracy {val['val_reward_acc']:.3f}, margin "
                f"{val['val_margin']:.3f}; the chosen side preferred in "
                f"{val['val_pref_acc']:.1%} of the pairs ({val['val_ref_pref_acc']:.1%} before "
                f"tuning); chosen completions' perplexity {val['val_ppl']:.3f}, bits per byte "
                f"{val['val_bpb']:.4f}")
    return (f"loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.3f}, bits per "
            f"byte {val['val_bpb']:.4f} over {val['val_tokens']:,} tokens{_by_source(val)}")


def _by_source(val: dict[str, Any]) -> str:
    """A mixture's validation figures per source, for the card's validation line."""
    names = [key.split("/", 1)[1] for key in val if key.startswith("val_loss/")]
    return "".join(f"; {name}: loss {val[f'val_loss/{name}']:.4f}, bits per byte "
                   f"{val.get(f'val_bpb/{name}', float('nan')):.4f}" for name in names)


def _sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The data section's sources (a mixture's `sources`, or the section itself)."""
    sources = data.get("sources") if isinstance(data.get("sources"), list) else None
    return [s for s in sources if isinstance(s, dict)] if sources else [data]


def _data_named(data: dict[str, Any], files_key: str) -> str:
    """The data as the card names it: a Hub dataset's id or the files' names (`files_key`,
    else the training files); a mixture's sources each by name and weight."""
    named = []
    for source in _sources(data):
        files = source.get(files_key) or source.get("train_files") or []
        what = source.get("dataset") or ", ".join(public_name(str(f)) for f in files)
        if source is not data and what:
            what = f"{source.get('name')} (weight {source.get('weight')}): {what}"
        named.append(what)
    return "; ".join(n for n in named if n)


def _sections(recipe: Any) -> dict[str, dict[str, Any]]:
    """The recipe's sections as dictionaries (an edited export's recipe may hold anything:
    what is not a mapping is left out of the card rather than crash it)."""
    recipe = recipe if isinstance(recipe, dict) else {}
    return {name: recipe.get(name) if isinstance(recipe.get(name), dict) else {}
            for name in ("run", "data", "model", "train", "tokenizer", "sample")}


def _run_record(folder: Path) -> dict[str, Any]:
    """The export's `hftrain_run.json` (how many processes trained it), or {} for an export
    written before hftrain recorded it."""
    path = folder / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def global_batch(train: dict[str, Any], block_size: Any, run: dict[str, Any]) -> str:
    """The global batch and what makes it: `train.batch_size` is per process, so the figure
    is batch_size x grad_accum_steps x processes; without a record of the processes, the card
    says it gives a per-process figure rather than pass it off as the global one."""
    per_process = train.get("batch_size", 0) * train.get("grad_accum_steps", 1)
    parts = f"batch_size {train.get('batch_size', '?')} x grad_accum_steps " \
            f"{train.get('grad_accum_steps', 1)}"
    processes = run.get("processes")
    if not isinstance(processes, int) or processes < 1:
        return (f"{per_process} blocks of {block_size} tokens per process ({parts}; the number "
                "of processes was not recorded)")
    return (f"{per_process * processes} blocks of {block_size} tokens ({parts} x {processes} "
            f"process{'es' if processes > 1 else ''})")


def _model_name(reference: str) -> str:
    """A Hub id as given; a local folder by its last component only (`runs/x/final` ->
    `final`), whether or not it still exists: the card is public and the trainer's
    directories are not its business."""
    if not looks_local(reference) and not Path(reference).exists():
        return f"`{reference}`"
    return f"the local model `{public_name(str(Path(reference).expanduser().resolve()))}`"


def _tokenizer_origin(recipe: dict[str, Any]) -> str:
    """How the tokenizer was made: built by the recipe, or reused from another model."""
    reused = recipe.get("tokenizer", {}).get("name_or_path") or \
        recipe.get("model", {}).get("init_from")
    if reused:
        return f"reused from {_model_name(reused)}"
    tokenizer = recipe.get("tokenizer", {})
    kind = tokenizer.get("kind", "unknown")
    return kind if kind == "char" else f"{kind}, {tokenizer.get('vocab_size')} tokens"


def _optimizer(train: dict[str, Any]) -> str:
    """The optimizer row: muon names both parts' peak rates (the Muon part's matters most)."""
    name, lr = train.get("optimizer", "?"), train.get("lr", "?")
    rates = (f"Muon lr {train.get('muon_lr', '?')} for the hidden matrices, AdamW lr {lr} for "
             "the rest" if name == "muon" else f"lr {lr}")
    return f"{name}, {rates}, {train.get('scheduler', '?')} schedule"


def _architecture(config: dict[str, Any]) -> str:
    if config.get("model_type") == "hftrain_recurrent":
        return (f"{config['cell']}: {config['num_layers']} layers, hidden {config['hidden_size']},"
                f" embedding {config['embedding_size']}")

    def first(*keys: str) -> Any:  # GPT-2's names, then the Llama-style ones
        return next((config[k] for k in keys if config.get(k) is not None), None)

    kv_heads, heads = first("num_key_value_heads"), first("n_head", "num_attention_heads")
    grouped = f" ({kv_heads} key-value)" if kv_heads not in (None, heads) else ""
    return (f"{config.get('model_type')}: {first('n_layer', 'num_hidden_layers')} layers, "
            f"{heads} heads{grouped}, width {first('n_embd', 'hidden_size')}, "
            f"context {first('n_positions', 'max_position_embeddings')}")


def _parameter_count(folder: Path) -> int:
    """Parameters stored in the safetensors file (tied weights are stored once)."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not weights.is_file():
        return 0
    with safe_open(str(weights), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def push(export: Path, repo_id: str, folder: Path, private: bool = False,
         dry_run: bool = False) -> list[str]:
    """Stage the export in `folder`; unless `dry_run`, create the repo and upload the folder.
    Returns the staged files."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HftrainError(f"--repo-id '{repo_id}' is not a repository id: use 'name' or "
                           "'owner/name' (letters, digits, '-', '_', '.')") from None
    files = stage(export, folder, repo_id)
    if dry_run:
        return files
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), repo_type="model",
                          ignore_patterns=[STAGING_MARKER],
                          commit_message="Upload model trained with hftrain")
    # No answer at all (no network, DNS, timeout) comes as the HTTP client's own error, e.g.
    # httpx2.ConnectError under huggingface_hub 2.x: the base class HfHubHTTPError extends.
    except (HfHubHTTPError, HfHubHTTPError.__mro__[1], OSError, ValueError) as exc:
        first_line = str(exc).split("\n")[0]
        raise HftrainError(f"pushing to {repo_id} failed ({type(exc).__name__}): {first_line}; "
                           f"the staged folder is {folder}") from None
    return files
