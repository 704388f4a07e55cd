"""A toy instruction set in MiniGPT-4's self-instruct layout, from the toy world's scenes.

    python -m lavis_vpgtrans.toy.instruct --out DIR

writes
    DIR/filter_cap.json   {"annotations": [{"image_id": "1", "caption": "<detailed description>"}, ...]}
    DIR/image/<image_id>.jpg

like MiniGPT-4's cc_sbu_align (3,439 pairs there). The answers are longer descriptions of a
scene than the toy captions (a summary, then each shape with its colour and place), so the
toy stage 3 teaches what the real one does: answer the instruction, then "###".

The toy zoo builds it (toy/zoo.py), where dataset configs find it as "toy:instruct" (see
datasets/configs/minigpt4/toy.yaml).
"""

import argparse
import json
import os
import random
from typing import Sequence

from lavis_vpgtrans.toy import world



def describe(scene: Sequence[world.Thing], rng: random.Random) -> str:
    """A two-part description of a scene (a summary, then where each shape is), made of the
    toy captions' phrases: the frozen toy LLMs only know the toy world's words, and they have
    a 128-token context, so the whole conversation must stay short."""
    n = len(scene)
    ordered = sorted(scene, key=lambda t: world.CELLS[t.cell][::-1])
    summary = f"{world.NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: " + ", ".join(
        f"{t.color} {t.shape}" for t in ordered)
    located = list(ordered)
    if rng.random() < 0.3:  # some variety in the order, as the toy captions have
        rng.shuffle(located)
    return f"{summary} and there is " + " and ".join(f"a {t.color} {t.shape} at the {t.cell}" for t in located)


def write_instruct_set(out_dir: str, n: int = 96, seed: int = 7) -> str:
    """Writes n image-description pairs; returns the path of filter_cap.json."""
    rng = random.Random(seed)
    image_dir = os.path.join(out_dir, "image")
    os.makedirs(image_dir, exist_ok=True)
    annotations = []
    for i in range(1, n + 1):
        scene = world.sample_scene(rng)
        world.render(scene).save(os.path.join(image_dir, f"{i}.jpg"), quality=95)
        annotations.append({"image_id": str(i), "caption": describe(scene, rng)})
    path = os.path.join(out_dir, "filter_cap.json")
    with open(path, "w") as f:
        json.dump({"annotations": annotations}, f, indent=1)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=96, help="number of image-description pairs")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    print(write_instruct_set(args.out, n=args.n, seed=args.seed))


if __name__ == "__main__":
    main()
