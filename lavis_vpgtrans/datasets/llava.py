"""Your own instruction data: LLaVA's conversation JSON, for instruction tuning (stage 3).

LLaVA's format (its docs/Finetune_Custom_Data.md; llava_instruct_150k.json, llava_v1_5_mix665k.json):

    [{"id": "000000033471",
      "image": "coco/train2017/000000033471.jpg",
      "conversations": [
          {"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
          {"from": "gpt", "value": "The bus in the image is white and red."},
          {"from": "human", "value": "What feature can be seen on the back of the bus?"},
          {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
     ...]

(a .json list, or one record per line in a .jsonl file). Each record is one sample:

    {"image": tensor, "conversation": [[human, gpt], [human, gpt], ...], "image_id": int}

which the model renders in its own template, labels on the answers only, every turn:

  blip2_vicuna (conv_template minigpt4, VL-Vicuna)
      ###Human: <Img><ImageHere></Img> {human 1} ###Assistant: {gpt 1}###Human: {human 2} ###Assistant: {gpt 2}###
  a tokenizer's own chat template (models/chat_template.py: apply_chat_template)
      the user's first message starts with the image's soft prompts, then "\\n" and the text

Where the image sits: the `<image>` marker says which turn holds the image; it must be the first
human turn (VL-Vicuna's template puts the soft prompts there). Within that turn the image goes
first, as LLaVA's own training code (preprocess_multimodal) moves the marker to the start of its
message and as VL-Vicuna places <Img><ImageHere></Img>. A first turn without the marker gets the
image at the same place. Text-only records (no `image`) are an error here.

Dataset config keys (besides build_info.annotations.train.storage, a file or a list of files,
absolute or relative to `data_root`, and build_info.images.storage, the root of relative image
paths, default the directory of the annotation file):

  keys          the record's keys: image, conversations (default "image", "conversations") and
                the turn's keys from, value (default "from", "value")
  roles         the `from` of each side: {human: "human", gpt: "gpt"} (LLaVA's; e.g. user /
                assistant for other dumps)
  image_marker  default "<image>"

Bad input stops with an error naming the file and the record (from 0; the line, from 1, in
.jsonl): a file that is not JSON, a record without `conversations` (listing the keys it has) or
without an image, a turn whose `from` is neither role, a conversation that does not alternate
human / gpt (starting with human, ending with gpt), an empty message, a marker outside the first
human turn or more than one, a missing image (or, with run.skip_bad_samples, skipped and counted
when read, like every unreadable training image).
"""

import logging
import os
from typing import Dict, List

from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_vpgtrans.datasets.checked import DataError
from lavis_vpgtrans.datasets.generic import (OwnDataBuilder, OwnDataset, Sources, _closest, _short, check_names,
                                             iter_json, iter_jsonl)

INSTRUCT = "instruct"
DEFAULT_KEYS = {"image": "image", "conversations": "conversations", "from": "from", "value": "value"}
DEFAULT_ROLES = {"human": "human", "gpt": "gpt"}
DEFAULT_MARKER = "<image>"


def parse_conversation(turns, where: str, keys: Dict[str, str], roles: Dict[str, str],
                       marker: str = DEFAULT_MARKER) -> List[List[str]]:
    """LLaVA's list of {"from", "value"} turns -> [[human, gpt], ...], the image marker taken out
    of the first human message (the image goes first in that turn); errors name `where`."""
    ckey, fkey, vkey = keys["conversations"], keys["from"], keys["value"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {ckey!r} must be a non-empty list of turns, got {_short(turns)}")
    side = {roles["human"]: "human", roles["gpt"]: "gpt"}
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or fkey not in turn or vkey not in turn:
            has = f"the keys {sorted(turn)}" if isinstance(turn, dict) else _short(turn)
            raise DataError(f"{where}: turn {t} needs the keys {fkey!r} and {vkey!r}; it has {has}")
        who = turn[fkey]
        if who not in side:
            raise DataError(f"{where}: turn {t} is from {_short(who)}, not {roles['human']!r} or {roles['gpt']!r} "
                            f"(set roles.human / roles.gpt){_closest(who, side)}")
        expected = "human" if t % 2 == 0 else "gpt"
        if side[who] != expected:
            raise DataError(f"{where}: turn {t} is from {who!r} where {roles[expected]!r} was expected: a conversation "
                            f"alternates {roles['human']!r} / {roles['gpt']!r}, starting with {roles['human']!r}")
        value = turn[vkey]
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {t}: {vkey!r} must be a string, got {_short(value)}")
        count = value.count(marker)
        if count and (t != 0 or count > 1):
            raise DataError(f"{where}: turn {t} holds the image marker {marker!r}"
                            + (" more than once" if t == 0 else "; it must be in the first human turn only"))
        text = "\n".join(line.strip() for line in value.replace(marker, "").strip().splitlines()).strip()
        if not text:
            raise DataError(f"{where}: turn {t} ({who!r}) is empty" + (" but for the image marker" if count else ""))
        messages.append(text)
    if len(messages) % 2:
        raise DataError(f"{where}: the conversation ends with a {roles['human']!r} turn (turn {len(messages) - 1}) "
                        f"without a {roles['gpt']!r} answer")
    return [[messages[i], messages[i + 1]] for i in range(0, len(messages), 2)]


class InstructTrainSet(OwnDataset):
    """Conversations about images; errors name the file and record (OwnDataset)."""

    def _sample(self, index):
        ann = self.annotation[index]
        return {"image": self.image(ann), "conversation": [list(turn) for turn in ann["conversation"]],
                "image_id": ann["image_id"]}

    def collater(self, samples):
        """default_collate would transpose the conversations: they stay one list per sample."""
        kept = [s for s in samples if s is not None]
        conversations = [s.pop("conversation") for s in kept]
        batch = super().collater(kept)  # CheckedSamples: a batch of only skipped samples is an error
        batch["conversation"] = conversations
        return batch


@registry.register_builder("own_instruct")
class OwnInstructBuilder(OwnDataBuilder):
    """LLaVA-format conversation files (module doc) for instruction tuning."""

    kind = INSTRUCT
    SPLITS = ("train",)
    DATASET_CONFIG_DICT = {"default": "datasets/configs/own_data/instruct.yaml"}

    def _options(self):
        name = self._name()
        keys = OmegaConf.to_container(self.config.get("keys", None) or OmegaConf.create({}))
        roles = OmegaConf.to_container(self.config.get("roles", None) or OmegaConf.create({}))
        check_names(name, "keys", keys, DEFAULT_KEYS, "one of")
        check_names(name, "roles", roles, DEFAULT_ROLES, "one of")
        roles = {**DEFAULT_ROLES, **roles}
        if roles["human"] == roles["gpt"]:
            raise DataError(f"dataset {name!r}: roles.human and roles.gpt are both {roles['human']!r}")
        marker = self.config.get("image_marker", None) or DEFAULT_MARKER
        images = self.config.build_info.get("images", None)
        root = images.get("storage", None) if images is not None else None
        return dict(keys={**DEFAULT_KEYS, **keys}, roles=roles, marker=marker, image_root=root or None)

    def read(self, paths: List[str], keys, roles, marker, image_root):
        sources, records = Sources(), []
        for path in paths:
            fmt = os.path.splitext(path)[1].lower().lstrip(".")
            if fmt not in ("json", "jsonl"):
                raise DataError(f"{path}: LLaVA's conversations are read from a .json list or a .jsonl file")
            src = sources.add(path, fmt)
            root = image_root or os.path.dirname(path)
            before = len(records)
            for at, row in (iter_json(path) if fmt == "json" else iter_jsonl(path)):
                where = sources.where(src, at)
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected an object with {keys['image']!r} and "
                                    f"{keys['conversations']!r}, got {_short(row)}")
                if keys["conversations"] not in row:
                    raise DataError(f"{where}: no key {keys['conversations']!r} (set keys.conversations); the record "
                                    f"has the keys {sorted(row)}{_closest(keys['conversations'], row)}")
                image = row.get(keys["image"], None)
                if image is None:
                    raise DataError(f"{where}: no image (key {keys['image']!r}; set keys.image): text-only records are "
                                    f"not supported; the record has the keys {sorted(row)}")
                if not isinstance(image, str) or not image.strip():
                    raise DataError(f"{where}: the image {keys['image']!r} must be a path, got {_short(image)}")
                conversation = parse_conversation(row[keys["conversations"]], where, keys, roles, marker)
                records.append({"image": os.path.join(root, image.strip()), "conversation": conversation,
                                "_src": src, "_at": at})
            if len(records) == before:
                raise DataError(f"{path}: no records")
        return sources, records

    def build(self):
        self.build_processors()
        run_cfg = self._run_cfg()
        skip = bool(run_cfg.get("skip_bad_samples", False)) if run_cfg is not None else False
        options = self._options()
        datasets = {}
        for split, ann in self.config.build_info.annotations.items():
            sources, records = self.read(list(ann.storage), **options)
            self._check_images(records, sources, split, skip=skip)
            image_ids: Dict[str, int] = {}
            for r in records:
                r["image_id"] = image_ids.setdefault(r["image"], len(image_ids) + 1)
            datasets[split] = InstructTrainSet(self.vis_processors["train"], self.text_processors["train"], sources,
                                               records)
            datasets[split].skip_bad_samples = skip
            turns = sum(len(r["conversation"]) for r in records)
            logging.info("%s %s: %d conversations (%d turns) from %s", self._name(), split, len(records), turns,
                         ", ".join(sources.paths))
        return datasets
