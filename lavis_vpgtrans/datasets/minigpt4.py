"""MiniGPT-4's self-instruct image-description pairs, for VL-Vicuna's stage 3 (instruction tuning).

Layout (MiniGPT-4's cc_sbu_align, 3,439 pairs):
    filter_cap.json   {"annotations": [{"image_id": "2", "caption": "<detailed description>"}, ...]}
    image/<image_id>.jpg

Each sample follows LAVIS's samples contract for prefix-LM training:
    {"image": tensor, "text_input": <an instruction drawn from `instructions`>,
     "text_output": <the description>, "image_id": str}
and Blip2Vicuna (conv_template set) renders it as
    ###Human: <Img><ImageHere></Img> {text_input} ###Assistant: {text_output}###
"""

import logging
import os
import random
from typing import List, Optional, Sequence

from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import BaseDataset
from PIL import Image

from lavis_vpgtrans.datasets.builders import LocalFilesBuilder
from lavis_vpgtrans.datasets.checked import CheckedSamples, load_annotation_file

# MiniGPT-4's stage-2 instructions (its prompts/alignment.txt, without the image tag, which
# the conversation template adds).
MINIGPT4_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
IMAGE_TAG = "<Img><ImageHere></Img>"


def clean_instructions(lines: Sequence[str], source: str) -> List[str]:
    """Instructions as given, or as MiniGPT-4's prompt files write them (with the image tag)."""
    out = [" ".join(str(line).replace(IMAGE_TAG, " ").split()) for line in lines]
    out = [line for line in out if line]
    if not out:
        raise ValueError(f"{source}: no instructions")
    bad = [line for line in out if "<ImageHere>" in line or "###" in line]
    if bad:
        raise ValueError(f"{source}: instructions may not contain '<ImageHere>' or '###': {bad[:3]}")
    return out


def read_annotations(path: str) -> List[dict]:
    data = load_annotation_file(path)
    records = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected MiniGPT-4's format "
                         '{"annotations": [{"image_id": ..., "caption": ...}, ...]}')
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "image_id" not in rec or not isinstance(rec.get("caption"), str):
            raise ValueError(f"{path}: annotation {i} needs an \"image_id\" and a \"caption\" string, got {rec!r:.200}")
        if not rec["caption"].strip():
            raise ValueError(f"{path}: annotation {i} (image {rec['image_id']}) has an empty caption")
    return records


class MiniGPT4InstructDataset(CheckedSamples, BaseDataset):
    def __init__(self, vis_processor=None, text_processor=None, vis_root=None, ann_paths=(),
                 instructions: Sequence[str] = MINIGPT4_INSTRUCTIONS, image_ext: str = ".jpg"):
        super().__init__(vis_processor=vis_processor, text_processor=text_processor, vis_root=vis_root, ann_paths=[])
        self.ann_paths = list(ann_paths)  # named in sample errors (CheckedSamples)
        self.annotation = [rec for path in ann_paths for rec in read_annotations(path)]
        if not self.annotation:
            raise ValueError(f"no annotations in {list(ann_paths)}")
        self._add_instance_ids()
        self.instructions = clean_instructions(instructions, "instructions")
        self.image_ext = image_ext
        missing = [p for p in map(self.image_path, self.annotation) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.annotation)} images are missing under "
                                    f"{vis_root}, e.g. {missing[:3]}")

    def image_path(self, ann) -> str:
        return os.path.join(self.vis_root, f"{ann['image_id']}{self.image_ext}")

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = Image.open(self.image_path(ann)).convert("RGB")
        caption = " ".join(ann["caption"].split())
        return {
            "image": self.vis_processor(image),
            # MiniGPT-4 draws an instruction per sample; the runner seeds `random` per epoch/rank.
            "text_input": random.choice(self.instructions),
            "text_output": self.text_processor(caption),
            "image_id": str(ann["image_id"]),
        }


@registry.register_builder("minigpt4_instruct")
class MiniGPT4InstructBuilder(LocalFilesBuilder):
    """MiniGPT-4's self-instruct set (`default`: cc_sbu_align under data_root) or its toy
    stand-in (`toy`: built into the toy zoo on first use)."""

    train_dataset_cls = MiniGPT4InstructDataset
    DATASET_CONFIG_DICT = {
        "default": "datasets/configs/minigpt4/defaults.yaml",
        "toy": "datasets/configs/minigpt4/toy.yaml",
    }

    def _resolve_paths(self):
        super()._resolve_paths()
        if self.config.get("instruction_file", None):
            self.config.instruction_file = self.resolve_path(self.config.instruction_file)

    def _instructions(self) -> List[str]:
        path: Optional[str] = self.config.get("instruction_file", None)
        if path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"dataset minigpt4_instruct: instruction_file not found: {path}")
            with open(path, encoding="utf-8") as f:
                return clean_instructions(f.read().splitlines(), path)
        given = self.config.get("instructions", None)
        if not given:
            return list(MINIGPT4_INSTRUCTIONS)
        return clean_instructions(list(given), "dataset config `instructions`")

    def build(self):
        self.build_processors()
        info = self.config.build_info
        instructions = self._instructions()
        datasets = {}
        for split, ann in info.annotations.items():
            if split != "train":
                raise ValueError(f"minigpt4_instruct is a training set; split {split!r} is not supported")
            paths = ann.storage if not isinstance(ann.storage, str) else [ann.storage]
            datasets[split] = MiniGPT4InstructDataset(
                vis_processor=self.vis_processors["train"], text_processor=self.text_processors["train"],
                vis_root=info.images.storage, ann_paths=list(paths), instructions=instructions)
            logging.info("minigpt4_instruct %s: %d pairs, %d instructions", split,
                         len(datasets[split]), len(instructions))
        return datasets
