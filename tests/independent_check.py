"""Score an hftrain export with plain transformers, in a process where hftrain cannot load.

    python tests/independent_check.py EXPORT_DIR TEXT_FILE VAL_FRACTION

Recomputes the held-out split's perplexity from scratch (its own tokenization, blocks and
cross-entropy) and prints it as JSON, with the logits of the first validation block, so a test
can compare both with what hftrain reported.
"""

import json
import sys
from pathlib import Path

sys.modules["hftrain"] = None  # any `import hftrain` in this process now fails

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

export, text_path, val_fraction = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(export).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
text = Path(text_path).read_text(encoding="utf-8")
held_out = text[int(len(text) * (1 - val_fraction)):]
# the document framing every client uses: BOS (the export's start token) before, EOS after
ids = [tokenizer.bos_token_id, *tokenizer(held_out, add_special_tokens=False).input_ids,
       tokenizer.eos_token_id]
block = model.config.max_position_embeddings  # GPT-2: n_positions
nll, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids) - 1, block):
        chunk = torch.tensor([ids[start : start + block + 1]])
        logits = model(chunk[:, :-1]).logits
        nll += F.cross_entropy(logits[0].double(), chunk[0, 1:], reduction="sum").item()
        count += chunk.size(1) - 1
    first_block = ids[:block]
    first_logits = model(torch.tensor([first_block])).logits[0]
print(json.dumps({"perplexity": float(torch.tensor(nll / count, dtype=torch.float64).exp()),
                  "tokens": count, "first_block": first_block,
                  "first_logits": first_logits.tolist()}))
