"""Recipes: a YAML file (plus dotted `key=value` overrides) -> typed, validated dataclasses.

Recipes are data: they are read with `yaml.safe_load` (within bounds: `hftrain.yaml_data`) and
never executed. Every key is checked against the dataclasses below, so a typo or a value of the
wrong type stops the run before it starts, with a message naming the key and the file. Relative
paths in a recipe are relative to the directory `hftrain` is started from.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hftrain.atomic import atomic_write_text
from hftrain.checks import at_least_one, in_range, in_unit_interval, non_negative, positive
from hftrain.errors import RecipeError
from hftrain.models import MODELS, GPT2Fields
from hftrain.yaml_data import load_yaml


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Folder the run writes: recipe.yaml, metrics.jsonl, tokenizer/ and final/."""
    seed: int = 1337
    """Seeds Python, NumPy and torch, the data shuffle and the model initialisation;
    0 to 2**32 - 1 (NumPy's range)."""
    overwrite: bool = False
    """Replace a finished run found in output_dir instead of refusing to start."""
    trackers: list[str] | None = None
    """Accelerate trackers to log to (`tensorboard`, `trackio`, `wandb`, ...); unset: TensorBoard
    if it is installed. metrics.jsonl is always written."""

    def __post_init__(self) -> None:
        in_range(self, 0, 2**32 - 1, "seed")
        self.output_dir = os.path.expanduser(self.output_dir)  # `key=~/x` escapes the shell
        if not self.trackers:  # Accelerate imports torch: a second parsing most recipes skip
            return
        from accelerate.utils import LoggerType

        known = [kind.value for kind in LoggerType]
        for name in self.trackers:
            if name not in known:
                raise ValueError(f"run.trackers: {name!r} is not one of Accelerate's trackers "
                                 f"({', '.join(known)})")


@dataclass
class TokenizerConfig:
    kind: Literal["char", "byte_bpe", "word"] = "char"
    """`char`: one token per character seen in the training text. `byte_bpe`: GPT-2-style
    byte-level BPE trained with `tokenizers` (never an unknown token). `word`: one token per
    whitespace-separated word (`tokenizers`' WordLevel), as in word-level Penn Treebank."""
    vocab_size: int = 8192
    """Vocabulary size for `byte_bpe` and the most frequent words kept by `word`, special
    tokens included. Ignored for `char`."""
    min_frequency: int = 1
    """`word` and `byte_bpe`: keep only words (merges) seen at least this often. With 2, words
    seen once become UNK in training, so the model learns how likely an unknown word is."""
    name_or_path: str | None = None
    """Reuse an existing tokenizer (a local folder or a Hub id) instead of building one."""

    def __post_init__(self) -> None:
        at_least_one(self, "vocab_size", "min_frequency")
        if self.kind == "byte_bpe" and self.vocab_size < 260:
            raise ValueError("vocab_size must be >= 260 for byte_bpe (256 bytes + specials)")


@dataclass
class SourceFields:
    """Where a corpus comes from and how it is read: the data section's own source, or one of
    its `sources` (a weighted mixture)."""

    train_files: list[str] = field(default_factory=list)
    """Local text (.txt), JSON Lines (.jsonl/.json) or Parquet files; globs allowed."""
    val_files: list[str] = field(default_factory=list)
    """Validation files. When empty, `val_fraction` of the training text is held out."""
    val_fraction: float = 0.1
    """Hold out the last fraction of every training document for validation
    (for a one-document corpus: the last 10% of the text, as nanoGPT does)."""
    dataset: str | None = None
    """A Hub dataset id, streamed instead of local files."""
    dataset_config: str | None = None
    """The Hub dataset's configuration name, if it has several."""
    train_split: str = "train"
    """Split of the Hub dataset to train on."""
    val_split: str | None = None
    """Split of the Hub dataset to validate on; when unset, `val_fraction` is held out."""
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    """File format; `auto` picks it from the file extension."""
    text_column: str = "text"
    """Column holding the text in JSON Lines, Parquet and Hub datasets."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """For .txt files, what one document is: the whole file, a paragraph or a line.
    Each document follows the start token and ends with EOS (`hftrain.framing`)."""


@dataclass
class SourceConfig(SourceFields):
    """One source of a weighted mixture (`data.sources`): its files or Hub dataset, read as
    its own settings say, and its share of the training blocks."""

    name: str = ""
    """Names the source in metrics.jsonl (`tokens/NAME`, `val_loss/NAME`, ...) and its token
    cache folder (`data.cache/NAME`): letters, digits, `-` and `_`; unique."""
    weight: float = 1.0
    """Its share of the training blocks: weight / the sum of the weights (> 0)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"name must be letters, digits, '-' or '_', got {shown(self.name)}")
        positive(self, "weight")
        in_unit_interval(self, "val_fraction")
        if not self.train_files and not self.dataset:
            raise ValueError("needs train_files or dataset")
        if self.train_files and self.dataset:
            raise ValueError("reads train_files or a dataset, not both")


@dataclass
class DataConfig(SourceFields):
    kind: Literal["text", "sft", "preference"] = "text"
    """`text`: language modelling on documents, every token scored. `sft`: supervised
    fine-tuning on records `{"prompt", "completion"}` or `{"messages": [...]}` (rendered with
    the tokenizer's chat template); only completion / assistant tokens are scored.
    `preference`: pairs `{"prompt", "chosen", "rejected"}` (strings, or lists of messages;
    `hftrain.preference`) for `train.objective: dpo`, one pair per block, never packed."""
    packing: bool = True
    """`sft`: pack examples (each ending with EOS) into full blocks, as text is packed, each
    attending only to itself (its own position ids); false: one example per block, padded
    (never scored) or cut to block_size + 1 tokens. Recurrent models need false."""
    block_size: int = 64
    """Tokens of context per training example (the model's maximum positions for GPT-2)."""
    shuffle_tokens: int = 1_000_000
    """Tokens of packed blocks held in the training stream's seeded shuffle buffer (it holds
    shuffle_tokens // block_size blocks, so filling it costs the same at any block size);
    each epoch also reads the files' pieces in a new seeded order. 0 keeps file order. With
    `cache`, any value > 0 shuffles all blocks of the corpus. A buffer much smaller than the
    corpus only shuffles locally, which costs validation loss."""
    num_workers: int = 1
    """Background processes that read and tokenize the training data while the model trains
    (0: on the training process, between steps). The batches do not depend on it."""
    cache: str | None = None
    """A folder for a token cache: the corpus tokenized once into memory-mapped files
    (`hftrain prepare RECIPE`, or the first run), then read with no tokenization at all.
    For local corpora read more than once; unset: stream and tokenize on every pass.
    With `sources`: one cache per source, in `cache/NAME`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of one corpus: each source's files or dataset (and how to
    read them), its `name` and `weight`. Training blocks are drawn from the sources in
    proportion to their weights; validation scores each source and all of them together.
    The settings above a source (`train_files` ... `sample_by`) are then each source's own."""

    def __post_init__(self) -> None:
        at_least_one(self, "block_size")
        in_unit_interval(self, "val_fraction")
        non_negative(self, "shuffle_tokens", "num_workers")
        if self.cache is not None:
            self.cache = str(Path(self.cache).expanduser())
        if not self.sources:
            return
        alone = SourceFields()
        given = [f.name for f in dataclasses.fields(SourceFields)
                 if getattr(self, f.name) != getattr(alone, f.name)]
        if given:
            raise ValueError(f"sources replaces data.{', data.'.join(given)}: each source "
                             "says where its data is and how to read it; set them there")
        names = [source.name.lower() for source in self.sources]
        repeated = [s.name for s in self.sources if names.count(s.name.lower()) > 1]
        if repeated:
            raise ValueError(f"sources names {repeated[0]!r} twice (in any case: the names "
                             "are folder names); each source needs a name of its own")

    @property
    def one_example_per_block(self) -> bool:
        """Each example (preference: each pair) in a block of its own, padded or cut."""
        return self.kind == "preference" or (self.kind == "sft" and not self.packing)

    def mixture(self) -> list[tuple[SourceConfig, DataConfig]]:
        """Each source with the data section for it alone: the shared settings, the
        source's own, and for a cache the source's folder in it (none without `sources`)."""
        own = [f.name for f in dataclasses.fields(SourceFields)]
        return [(source, dataclasses.replace(
            self, sources=[], **{name: getattr(source, name) for name in own},
            cache=str(Path(self.cache) / source.name) if self.cache else None))
            for source in self.sources]

    def by_source(self) -> list[DataConfig]:
        """The data section for each source alone; without `sources`, itself."""
        return [alone for _, alone in self.mixture()] or [self]

    def local_files(self) -> list[str]:
        """Every training and validation file entry of every source, as written."""
        return [f for config in self.by_source() for f in (*config.train_files,
                                                            *config.val_files)]


@dataclass
class TrainConfig:
    batch_size: int = 12
    """Blocks per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step.
    Global batch = batch_size x grad_accum_steps x number of processes."""
    max_steps: int = 2000
    """Optimizer steps to train for (derived from `max_tokens` when that is set)."""
    max_tokens: int | None = None
    """Train on this many token positions instead of counting steps: `max_steps` becomes
    the fewest steps of (global batch x data.block_size) positions that reach it, on the
    number of processes launched, and the learning-rate schedule follows. >= 1 when set."""
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adafactor", "muon"] = "adamw"
    """The torch optimizer: `adamw`, `adam`, `sgd`, `rmsprop`, `adafactor`, or `muon`: Muon
    for the 2-D hidden weight matrices (attention, MLP and recurrent weights) at `muon_lr`,
    and AdamW at `lr` for the rest (embeddings, output head, norms, biases)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup; > 0. With muon: the AdamW part's.
    Adafactor's step is relative to each weight's size: lr caps it (torch's default 1e-2)."""
    min_lr: float = 1e-4
    """Learning rate the `cosine_with_min_lr` schedule decays to: 0 to lr (other schedules
    ignore it, so there it may exceed lr)."""
    scheduler: Literal["cosine_with_min_lr", "cosine", "linear", "constant_with_warmup"] = (
        "cosine_with_min_lr"
    )
    """A `transformers.get_scheduler` schedule, stepped once per optimizer step."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr; >= 0. More than max_steps is allowed (a short
    trial run of a long recipe): the rate then never reaches lr and never decays."""
    weight_decay: float = 0.1
    """Applied to matrices and embeddings only, never to biases or norms; >= 0. Decoupled
    (scaled by the learning rate) for adamw, adafactor and muon's AdamW part; an L2 penalty
    added to the gradient for adam, sgd and rmsprop. adamw, adafactor, muon and sgd need
    lr x weight_decay < 1 (each step multiplies the weights by 1 - lr x weight_decay)."""
    beta1: float = 0.9
    """AdamW's and Adam's first-moment decay, in [0, 1)."""
    beta2: float = 0.99
    """The second-moment decay, in [0, 1): AdamW's and Adam's beta2, RMSprop's alpha."""
    momentum: float = 0.0
    """SGD and RMSprop momentum, in [0, 1)."""
    nesterov: bool = False
    """SGD: Nesterov momentum (needs momentum > 0)."""
    muon_lr: float = 0.02
    """muon: peak learning rate of the Muon part (nanochat's and Keller Jordan's 0.02); the
    schedule scales it as it scales `lr`; > 0."""
    muon_momentum: float = 0.95
    """muon: Muon's (Nesterov) momentum, in [0, 1)."""
    muon_weight_decay: float = 0.0
    """muon: decoupled weight decay of the Muon part (scaled by its learning rate); >= 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    stateful: bool = False
    """Truncated backpropagation through time, for recurrent models: the token stream is laid
    out in `batch_size` contiguous lanes, each batch is the next `block_size` window of every
    lane, and the recurrent state carries (detached) from one window to the next. Evaluation
    reads the validation stream the same way, in `eval.batch_size` lanes."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Leave unset to use what `accelerate launch`/`accelerate config` chose."""
    log_interval: int = 10
    """Write a training line to metrics.jsonl every this many steps."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (transformers' `activation_checkpointing_enable`, the
    non-reentrant form): keep only each layer's input during the forward pass and recompute
    the rest in the backward, trading about a third more compute for much less memory.
    The same updates as without it, so `--resume` may switch it (e.g. after running out of
    memory). GPT-2, Llama and Qwen3; recurrent models keep one block's activations per layer
    anyway (lower data.block_size to use less)."""
    compile: bool = False
    """`torch.compile` the model (inductor). Pays off on GPUs; on CPU compiling takes longer
    than it saves for small models."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, for the model-FLOPs-utilisation estimate; unset: known GPUs
    are looked up, and CPU runs report no MFU. > 0 when set."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss: `stop` the run (the newest checkpoint stays as it was), or `skip`
    the update and go on."""
    objective: Literal["lm", "dpo"] = "lm"
    """`lm`: next-token cross-entropy over the scored tokens. `dpo`: Direct Preference
    Optimization on `data.kind: preference` pairs (`hftrain.dpo`), from `model.init_from`,
    which is also the frozen reference (with LoRA: the model with its adapters disabled)."""
    dpo_beta: float = 0.1
    """dpo: how far the policy may move from the reference (the KL penalty's inverse
    weight; TRL's default 0.1); > 0."""

    def global_batch(self, processes: int) -> int:
        """Blocks in one optimizer update over `processes` (batch_size is per process)."""
        return self.batch_size * self.grad_accum_steps * processes

    def steps_for_tokens(self, processes: int, block_size: int) -> int:
        """The steps `max_tokens` asks for: the fewest whose positions reach it."""
        per_step = self.global_batch(processes) * block_size
        return -(-self.max_tokens // per_step)

    def __post_init__(self) -> None:
        at_least_one(self, "batch_size", "grad_accum_steps", "max_steps", "log_interval",
                     "max_tokens")
        positive(self, "lr", "peak_tflops", "muon_lr", "dpo_beta")
        non_negative(self, "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                     "muon_weight_decay")
        in_unit_interval(self, "beta1", "beta2", "momentum", "muon_momentum")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError(f"nesterov applies to optimizer sgd only, not {self.optimizer} "
                             "(muon's Muon part always uses Nesterov momentum)")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (SGD's Nesterov momentum)")
        self._check_weight_decay()
        if self.scheduler == "cosine_with_min_lr" and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): the "
                             "cosine_with_min_lr schedule decays from lr down to min_lr")

    def _check_weight_decay(self) -> None:
        """AdamW, Adafactor and Muon (decoupled decay), and SGD (an L2 term in the gradient,
        which the step multiplies by lr) shrink each decayed weight by (1 - lr x weight_decay)
        per step: at 1 or more that zeroes or flips every matrix on every step, silently (no
        NaN, and clipping acts before the decay). Adam's and RMSprop's adaptive scaling
        rescales the L2 term, so no such bound holds for them. Muon's Conv1D factor (GPT-2)
        is checked where the groups are built (`hftrain.optim.build_muon`)."""
        pairs = [("lr", "weight_decay")] if self.optimizer in ("adamw", "adafactor", "muon",
                                                                "sgd") else []
        if self.optimizer == "muon":
            pairs.append(("muon_lr", "muon_weight_decay"))
        for lr, decay in pairs:
            product = getattr(self, lr) * getattr(self, decay)
            if product >= 1:
                raise ValueError(f"{decay} x {lr} is {product:g}: {self.optimizer} multiplies "
                                 f"every decayed weight by 1 - {decay} x {lr} each step, "
                                 f"which must stay above 0; lower train.{decay} or train.{lr}")


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save a checkpoint every this many steps; 0: never.
    Ctrl-C, SIGTERM or SIGHUP also saves one before the run stops."""
    minutes: float = 30.0
    """Also save one when this many minutes have passed since the last (0: never), so that a
    kill -9, an out-of-memory kill or a power cut loses at most this much of a run that set
    no interval."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: Literal["auto", "never"] = "never"
    """`auto`: continue from the newest complete checkpoint in run.output_dir, if any
    (`hftrain train RECIPE --resume` sets it)."""

    def __post_init__(self) -> None:
        non_negative(self, "interval", "minutes")
        at_least_one(self, "keep")


@dataclass
class EvalConfig:
    interval: int = 500
    """Evaluate every this many steps, on the first `max_batches` validation batches when
    that is set (else the whole validation split), and always at the end on the whole split."""
    batch_size: int = 32
    """Blocks (or, in stateful evaluation, lanes) per evaluation batch on each process."""
    max_batches: int | None = None
    """Cap on evaluation batches during training (each process reads this many of its own,
    which together make this many global batches); the final evaluation reads everything.
    >= 1 when set."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks scored at every evaluation, on the live model (as `hftrain eval
    --tasks` scores an export; needs `pip install 'hftrain[eval]'`), by the main process while
    the others wait. Logged as `task/TASK/METRIC` in metrics.jsonl and the trackers."""
    task_limit: float | None = None
    """Documents per task (a fraction of them when below 1): lm-eval's `--limit`, > 0."""
    task_include_path: str | None = None
    """A folder of local lm-eval task YAMLs (lm-eval's `--include-path`). Task files that
    would run Python (`!function`) are refused: score those with `hftrain eval --tasks
    --trust-remote-code` on an export."""

    def __post_init__(self) -> None:
        at_least_one(self, "interval", "batch_size", "max_batches")
        positive(self, "task_limit")
        if any(not task.strip() for task in self.tasks):
            raise ValueError("tasks names an empty task")
        if (self.task_limit is not None or self.task_include_path) and not self.tasks:
            raise ValueError("task_limit and task_include_path apply to lm-eval tasks: "
                             "set eval.tasks")


@dataclass
class SampleConfig:
    prompt: str = ""
    """Text the sample printed after training continues; empty starts a new document."""
    max_new_tokens: int = 200
    """Tokens to generate, >= 0; 0 prints no sample at all."""
    temperature: float = 0.8
    """>= 0; 0 means greedy decoding."""
    top_k: int | None = 200
    """Sample from the k most likely tokens, >= 1; unset: from all of them."""

    def __post_init__(self) -> None:
        non_negative(self, "max_new_tokens", "temperature")
        at_least_one(self, "top_k")


@dataclass
class HubConfig:
    push_to_hub: bool = False
    """After training, upload final/ with a model card (as `hftrain push` does). The token
    comes from HF_TOKEN or `hf auth login`; never put it in a recipe."""
    repo_id: str | None = None
    """user/name or org/name of the model repository (a bare name: under your account)."""
    private: bool = False

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.repo_id:
            raise ValueError("push_to_hub needs hub.repo_id")
        if self.repo_id is not None:
            try:
                validate_repo_id(self.repo_id)
            except HFValidationError:
                raise ValueError(
                    f"repo_id must look like 'name' or 'owner/name' (letters, digits, '-', '_' "
                    f"and '.'; no '--' or '..'; at most 96 characters), got '{self.repo_id}'"
                ) from None


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=GPT2Fields)
    """One of the field classes in `hftrain.models.MODELS`, chosen by `model.arch`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, and validate every key."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {kind}")
    for override in overrides:
        _apply_override(raw, override, path)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Build a `Recipe` from plain data; `source` names the file in error messages."""
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise RecipeError(f"{source}: 'model' must be a mapping")
    arch = model_raw.get("arch", "gpt2")
    if not isinstance(arch, str) or arch not in MODELS:
        raise RecipeError(f"{source}: model.arch {shown(arch)} is not one of {sorted(MODELS)}")
    field_types = {"model": MODELS[arch].fields}
    recipe = _build(Recipe, raw, prefix="", source=source, field_types=field_types)
    check(recipe, source)
    return recipe


def check(recipe: Recipe, source: str = "<recipe>") -> None:
    """The rules between sections of a recipe (those within a section are its dataclass's
    `__post_init__`), one RecipeError naming the keys and `source`. `recipe_from_dict` runs
    it; `train` runs it again for recipes built or changed in code.

    Rules that need more than the recipe are checked where that is known, before anything is
    written: the model's own (`model.init_from`'s family and positions, LoRA targets on tied
    weights: `hftrain.models.base`; Muon's per-matrix rate: `hftrain.optim.build_muon`) and
    the launch's (flash-attn present, and a precision it runs in: `hftrain.models`)."""
    arch = recipe.model.arch
    if recipe.train.stateful and not recipe.model.supports_stateful:
        raise RecipeError(f"{source}: train.stateful needs a recurrent model, not '{arch}'")
    if recipe.train.stateful and recipe.data.kind != "text":
        raise RecipeError(f"{source}: train.stateful reads a continuous text stream; "
                          f"it does not combine with data.kind: {recipe.data.kind}")
    check_objective(recipe, source)
    if recipe.train.stateful and recipe.data.sources:
        raise RecipeError(f"{source}: train.stateful reads one continuous text stream in lanes;"
                          " it does not combine with data.sources (a mixture of blocks)")
    positions = getattr(recipe.model, "max_position_embeddings", None)
    if positions is not None and positions < recipe.data.block_size:
        raise RecipeError(f"{source}: model.max_position_embeddings ({positions}) is less than "
                          f"data.block_size ({recipe.data.block_size}): the model could not "
                          "attend over one block")
    if recipe.train.gradient_checkpointing and recipe.model.supports_stateful:
        raise RecipeError(f"{source}: train.gradient_checkpointing applies to transformer "
                          f"models, not '{arch}': a recurrent model holds one block's "
                          "activations per layer; lower data.block_size to use less memory")
    if recipe.model.supports_stateful and recipe.data.kind == "sft" and recipe.data.packing:
        raise RecipeError(f"{source}: data.packing would carry the recurrent state of a "
                          f"'{arch}' from one fine-tuning example into the next; set "
                          "data.packing: false")


def check_objective(recipe: Recipe, source: str) -> None:
    """DPO trains on preference pairs, from a starting model that is also its reference."""
    dpo, pairs = recipe.train.objective == "dpo", recipe.data.kind == "preference"
    if pairs and not dpo:
        raise RecipeError(f"{source}: data.kind preference is trained with "
                          "train.objective: dpo")
    if dpo and not pairs:
        raise RecipeError(f"{source}: train.objective dpo needs data.kind: preference "
                          "(records with prompt, chosen and rejected)")
    if dpo and not recipe.model.init_from:
        raise RecipeError(f"{source}: train.objective dpo tunes a trained model, which is "
                          "also its reference: set model.init_from (an SFT export)")
    if pairs and recipe.data.sources:
        raise RecipeError(f"{source}: data.kind preference reads one set of pairs; "
                          "data.sources (a mixture) is not supported for it")


def _apply_override(raw: dict[str, Any], override: str, source: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override '{override}' must look like section.key=value")
    *parents, leaf = key.split(".")
    if not all(part.strip() for part in (*parents, leaf)):
        raise RecipeError(f"override '{override}': key '{key}' has an empty part; "
                          "it must look like section.key=value")
    try:
        value = load_yaml(text) if text else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"override '{override}': the value of {key} is not valid YAML "
                          f"({problem}); quote it if it is a string") from None
    node = raw
    for part in parents:
        if node.get(part) is None:  # a missing section, or one left empty in the file
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise RecipeError(f"override '{override}': '{part}' in {source} is not a section")
        node = child
    node[leaf] = value


RENAMED = {"DataConfig": {"shuffle_buffer": "shuffle_tokens (counted in tokens, not blocks)"}}
"""Keys that changed name (and meaning): a recipe using the old name is told the new one."""


def _build(cls: type, raw: Any, prefix: str, source: str, field_types: dict[str, type]) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key in RENAMED.get(cls.__name__, {}):
            raise RecipeError(f"{source}: '{prefix}{key}' is now "
                              f"'{prefix}{RENAMED[cls.__name__][key]}'")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in raw.items():
        annotation = field_types.get(name, hints[name]) if not prefix else hints[name]
        section = _section_type(annotation)
        listed = _listed_section_type(annotation)
        if section is not None and (value is not None or annotation is section):
            kwargs[name] = _build(section, value, f"{prefix}{name}.", source, {})
        elif listed is not None:
            if not isinstance(value, list):
                raise RecipeError(f"{source}: {prefix}{name} expects a list of mappings, got "
                                  f"{shown(value)}")
            kwargs[name] = [_build(listed, item, f"{prefix}{name}[{i}].", source, {})
                            for i, item in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # "lr must be > 0" names its field: print it as the full key, "train.lr must be > 0".
        message = str(exc)
        if message.split(" ", 1)[0] in names:
            raise RecipeError(f"{source}: {prefix}{message}") from None
        raise RecipeError(f"{source}: {where}: {message}") from None


def _section_type(annotation: Any) -> type | None:
    """The dataclass a field holds (`RopeScaling` or `RopeScaling | None`), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(options) == 1 \
            and dataclasses.is_dataclass(options[0]):
        return options[0]
    return None


def _listed_section_type(annotation: Any) -> type | None:
    """The dataclass of a list of sections (`list[SourceConfig]`), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


_YAML11_BOOLS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}
"""What YAML 1.1 may have read as a bool, for choices spelled like one (`mixed_precision: no`)."""


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected, and
    floats must be finite."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except RecipeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            spellings = _YAML11_BOOLS[value]
            value = next((a for a in args if a in spellings), value)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{source}: {key} must be one of {choices}, got {shown(value)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key} expects a list, got {shown(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    # An int, a float, or a string: YAML 1.1 reads `3e-4` as a string.
    if annotation is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number: float | None = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):  # .nan, .inf, and the strings 'nan', 'inf', ...
                raise RecipeError(f"{source}: {key} must be a finite number, got {shown(value)}")
            return number
    if annotation is Any or (isinstance(value, annotation) and not (
        annotation is int and isinstance(value, bool)
    )):
        return value
    raise RecipeError(
        f"{source}: {key} expects {annotation.__name__}, got {shown(value)} "
        f"({type(value).__name__})"
    )


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 3, 40, 40


def shown(value: Any) -> str:
    """`repr(value)` cut short (three items, 40 characters of a string): an error message
    names a wrong value without printing a whole file pasted into a key."""
    return _SHORT.repr(value)


def expand_globs(patterns: list[str]) -> list[str]:
    """Data-file entries as the paths they name now: a glob as its matches (sorted), anything
    else as written. Nothing is checked here: `hftrain.data.sources.resolve_files` says which
    entry names no file when the data is read."""
    return [path for pattern in patterns
            for path in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as flat `section.key -> value` pairs (`recipe.to_dict()` in, say)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe (defaults and overrides filled in) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
