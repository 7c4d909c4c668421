"""The export: `<run>/final/`, a folder plain `transformers` loads (`AutoModelForCausalLM`,
`AutoTokenizer`): safetensors weights with LoRA adapters merged in, gathered whole when the
model was sharded, the tokenizer, a generation config from the recipe's `sample:` section, the
recipe and a record of the processes that trained it. Written under a temporary name and
renamed when complete, like a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import GenerationConfig

from hftrain.atomic import atomic_directory
from hftrain.launch import write_run_record
from hftrain.models.base import is_lora
from hftrain.recipe import Recipe, dump_recipe
from hftrain.run_folder import check_replaceable, record_written
from hftrain.sharding import bare_model, gathered_model, is_sharded


def export(accelerator: Accelerator, model: Any, tokenizer: Any, recipe: Recipe,
           run_dir: Path) -> tuple[Path, Any]:
    """Write `final/`: safetensors weights, config, tokenizer, generation config, recipe.
    Returns the folder and the model saved there (LoRA adapters merged; on the main process
    only when the model is sharded, None on the others).

    Plain `transformers` loads it with `AutoModelForCausalLM` and `AutoTokenizer`.
    """
    final_dir = run_dir / "final"
    whole = whole_model(accelerator, model)
    if accelerator.is_main_process:
        whole.generation_config = generation_config(recipe, tokenizer)
        check_replaceable(run_dir, final_dir.name)  # checked at start too: a file put since
        with atomic_directory(final_dir) as tmp:
            whole.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            dump_recipe(recipe, tmp / "hftrain_recipe.yaml")
            write_run_record(accelerator, recipe, tmp)  # processes: the recipe cannot say
        record_written(run_dir, final_dir.name)  # run.overwrite may remove exactly these
    accelerator.wait_for_everyone()
    return final_dir, whole


def whole_model(accelerator: Accelerator, model: Any) -> Any:
    """The trained model as one plain `PreTrainedModel`, LoRA adapters merged in: the model
    itself, unwrapped, or, when it is sharded, a copy gathered onto the main process (None on
    the others; every process must call this)."""
    bare = bare_model(accelerator, model)
    whole = gathered_model(accelerator, model, bare) if is_sharded(accelerator) else bare
    if whole is not None and is_lora(whole):  # LoRA: fold the adapters in; a plain model
        whole = whole.merge_and_unload()
    return whole


def generation_config(recipe: Recipe, tokenizer: Any) -> GenerationConfig:
    sample = recipe.sample
    sampling = (
        {"do_sample": True, "temperature": sample.temperature, "top_k": sample.top_k}
        if sample.temperature > 0 else {"do_sample": False}
    )
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=sample.max_new_tokens or None,  # 0: no sample, no default length
        **sampling,
    )
