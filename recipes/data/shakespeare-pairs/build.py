"""Build the Shakespeare preference pairs the DPO recipe trains on (stdlib only; deterministic).

Each pair continues a speech of Tiny Shakespeare: the prompt is the speaker's name and one
line of the speech, `chosen` the line that really follows (of four words or more),
`rejected` the same line with two neighbouring words swapped (a seeded choice), so both sides
have the same words and only their order tells them apart. Pairs come from the last tenth of the text, which the pretraining recipe
(recipes/shakespeare/gpt2-bpe.yaml, `val_fraction: 0.1`) holds out.

    python recipes/data/shakespeare-pairs/build.py   # writes sft.jsonl and preference.jsonl
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CORPUS = HERE.parent / "tinyshakespeare.txt"


def pairs(text: str, seed: int = 1337) -> list[dict[str, str]]:
    rng = random.Random(seed)
    found = []
    for speech in text.split("\n\n"):
        speaker, *lines = speech.strip("\n").split("\n")
        if not speaker.endswith(":"):
            continue
        for line, following in zip(lines, lines[1:]):
            words = following.split()
            if len(set(words)) < 4:
                continue
            swapped = words[:]
            while swapped == words:
                i = rng.randrange(len(words) - 1)
                swapped[i], swapped[i + 1] = words[i + 1], words[i]
            found.append({"prompt": f"{speaker}\n{line}\n", "chosen": following + "\n",
                          "rejected": " ".join(swapped) + "\n"})
    return found


def main() -> None:
    text = CORPUS.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9):]
    found = pairs(held_out[held_out.index("\n\n") + 2:])  # from the first whole speech
    with open(HERE / "preference.jsonl", "w", encoding="utf-8") as f:
        for pair in found:
            f.write(json.dumps(pair) + "\n")
    with open(HERE / "sft.jsonl", "w", encoding="utf-8") as f:
        for pair in found:
            f.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"]}) + "\n")
    print(f"{len(found)} pairs")


if __name__ == "__main__":
    main()
