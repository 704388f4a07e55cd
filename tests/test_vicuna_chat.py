"""VL-Vicuna: conversation template, stage-3 instruction tuning through train.py, generation
with the same prompt and "###" stopping, the terminal chat, and loading a trainable-only
checkpoint with a local LLM directory."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_vicuna_instruct.yaml")
INSTRUCTION = "Describe this image in detail."


@pytest.fixture(scope="module")
def plugin_and_builder(plugin):
    # The builder module registers minigpt4_instruct (lavis_vpgtrans/__init__.py imports it).
    import lavis_vpgtrans.datasets.minigpt4  # noqa: F401

    return plugin


def load_vl(**overrides):
    from helpers import load_tiny

    return load_tiny("blip2_vicuna", "tiny_vl_vicuna", **overrides).eval()


@pytest.fixture(scope="module")
def vl_model(plugin_and_builder):
    torch.manual_seed(0)
    return load_vl()


@pytest.fixture(scope="module")
def toy_set(plugin_and_builder):
    from lavis_vpgtrans.toy import zoo

    root = zoo.resolve("toy:instruct")
    anns = json.load(open(os.path.join(root, "filter_cap.json")))["annotations"]
    return root, anns


def image_tensor(model_type, path):
    from lavis.models import load_preprocess
    from omegaconf import OmegaConf
    from PIL import Image

    from lavis_vpgtrans.models.blip2_vicuna import Blip2Vicuna

    cfg = OmegaConf.load(Blip2Vicuna.default_config_path(model_type))
    vis, _ = load_preprocess(cfg.preprocess)
    return vis["eval"](Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- template


def test_template_renders_multi_turn_history():
    from lavis_vpgtrans.models.conversation import ConversationError, get_template

    t = get_template("minigpt4")
    turns = [("What is it?", "A red circle."), ("Where?", "At the top left."), ("Anything else?", None)]
    assert t.render(turns) == ("###Human: <Img><ImageHere></Img> What is it? ###Assistant: A red circle.###"
                               "Human: Where? ###Assistant: At the top left.###"
                               "Human: Anything else? ###Assistant:")
    assert t.render([("Describe it.", "Two shapes.")]) == \
        "###Human: <Img><ImageHere></Img> Describe it. ###Assistant: Two shapes.###"
    # the generation prompt is the answered conversation minus the last answer
    assert t.render([("Describe it.", "Two shapes.")]).startswith(t.render([("Describe it.", None)]))
    assert t.cut_answer("Two shapes.###Human: more") == "Two shapes."
    with pytest.raises(ConversationError, match="may not contain '###'"):
        t.render([("a ### b", None)])
    with pytest.raises(ConversationError, match="may not contain '<ImageHere>'"):
        t.render([("x", "see <ImageHere>")])
    with pytest.raises(ConversationError, match="has no answer but is not the last turn"):
        t.render([("a", None), ("b", None)])
    with pytest.raises(KeyError, match="known: \\['minigpt4'\\]"):
        get_template("vicuna_v9")


# --------------------------------------------------------------------------- tokens


def labelled_runs(tokens):
    """Contiguous runs of labelled positions, as (start, end)."""
    runs, start = [], None
    for i, lab in enumerate(tokens.labels + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_labels_only_on_assistant_tokens_and_closing_separator(vl_model):
    from lavis_vpgtrans.models.blip2_vicuna import IMAGE_TOKEN_ID

    tok = vl_model.llm_tokenizer
    turns = [("What is it?", "a red circle at the top left"), ("And the rest?", "the rest is empty")]
    t = vl_model.tokenize_conversation(turns)
    assert t.ids[0] == tok.bos_token_id and t.ids.count(tok.bos_token_id) == 1
    assert t.ids.count(IMAGE_TOKEN_ID) == vl_model.query_tokens.shape[1] == 8
    runs = labelled_runs(t)
    assert len(runs) == 2  # one per assistant turn, nothing else
    assert [tok.decode(t.ids[a:b]) for a, b in runs] == ["a red circle at the top left###", "the rest is empty###"]
    for a, b in runs:
        assert t.labels[a:b] == t.ids[a:b]
    # everything outside the answers, the user's turns and the image included, is unlabelled
    labelled = {i for a, b in runs for i in range(a, b)}
    assert all(t.labels[i] == -100 for i in range(len(t.ids)) if i not in labelled)
    text_before = tok.decode([i for i in t.ids[: runs[0][0]] if i != IMAGE_TOKEN_ID], skip_special_tokens=True)
    assert text_before.endswith("What is it? ###Assistant:")
    between = tok.decode(t.ids[runs[0][1]: runs[1][0]])
    assert between.strip() == "Human: And the rest? ###Assistant:"


def test_training_answers_are_cut_at_max_output_txt_len_chat_history_is_not(vl_model):
    turns = [("Describe it.", "a red circle at the top left and a blue square")]
    t = vl_model.tokenize_conversation(turns, max_answer_tokens=5)
    (a, b), = labelled_runs(t)
    assert b - a == 5 and b == len(t.ids)
    full = vl_model.tokenize_conversation(turns)
    assert vl_model.llm_tokenizer.decode(full.ids[a:]) == turns[0][1] + "###"

    # the training loss uses max_output_txt_len: a cut answer changes it, a longer limit does not
    image = torch.zeros(1, 3, 32, 32)
    saved = vl_model.max_output_txt_len
    try:
        losses = {}
        for limit in (5, 200, 300):
            vl_model.max_output_txt_len = limit
            with torch.no_grad():
                losses[limit] = vl_model.conversation_loss(image, [turns]).item()
    finally:
        vl_model.max_output_txt_len = saved
    assert losses[200] == losses[300] != losses[5]


@pytest.mark.parametrize("turns", [
    [("Describe this image in detail.", "an image with one shape. there is a red circle at the top left.")],
    [("What is it?", "a red circle"), ("Where is it?", "at the top left"), ("What color?", "red")],
])
def test_generation_prompt_is_a_token_prefix_of_the_training_sequence(vl_model, turns):
    train = vl_model.tokenize_conversation(turns)
    prompt = vl_model.tokenize_conversation(turns[:-1] + [(turns[-1][0], None)])
    assert train.ids[: len(prompt.ids)] == prompt.ids
    # the last answer starts right after the prompt, so generation continues where training
    # put the first answer token
    assert labelled_runs(train)[-1] == (len(prompt.ids), len(train.ids))


def test_generation_feeds_the_llm_exactly_the_training_prompt(vl_model, toy_set):
    """The embeddings (text, BOS and spliced soft prompts) that generate() gives the LLM equal
    the first positions of what training gives it for the same conversation."""
    root, anns = toy_set
    image = image_tensor("tiny_vl_vicuna", os.path.join(root, "image", anns[0]["image_id"] + ".jpg")).unsqueeze(0)
    history = [("What is it?", "shapes")]
    message, answer = "Describe this image in detail.", anns[0]["caption"][:60]
    seen = []

    def capture(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:  # not the cached decoding steps
            seen.append((kwargs["inputs_embeds"].detach().clone(), kwargs["attention_mask"].detach().clone()))

    handle = vl_model.llm_model.model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            vl_model.conversation_loss(image, [history + [(message, answer)]])
        vl_model.chat(image[0], message, history=history, max_new_tokens=2)
    finally:
        handle.remove()
    (train_embeds, _), (gen_embeds, gen_mask) = seen[0], seen[1]
    n = gen_embeds.shape[1]
    assert n == len(vl_model.tokenize_conversation(history + [(message, None)]).ids)
    assert gen_mask.all()
    torch.testing.assert_close(gen_embeds, train_embeds[:, :n], rtol=0, atol=0)


# --------------------------------------------------------------------------- stopping


def test_stop_criterion_finds_the_separator_however_it_is_tokenized(vl_model):
    tok = vl_model.llm_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    hash_id = enc("###")[-1]  # the toy tokenizer spells "#" as a byte token
    rows = [
        enc("a red circle###"),                      # glued to the word
        enc("a red circle ###"),                     # after a space ("▁" then the #s)
        enc("a red circle##") + [hash_id],           # the last "#" generated on its own
        enc("a red circle") + [hash_id] * 3,         # one "#" at a time
        enc("a red circle ## #"),                    # not a separator
        enc("a red circle"),
    ]
    width = max(map(len, rows))
    # left-padded as generation's rows are: the separator is checked where the newest token is
    ids = torch.tensor([[tok.unk_token_id] * (width - len(r)) + r for r in rows])
    done = vl_model.stop_on_text("###")(ids, None)
    assert done.tolist() == [True, True, True, True, False, False]


def test_stop_criterion_is_transformers_built_once_per_model(vl_model):
    """transformers' StopStringCriteria (issue 23: our own criterion decoded text at every step),
    built once: it preprocesses the whole vocabulary, and generate(stop_strings=...) would do that
    at every call (1.3 s for Qwen3's tokenizer). It reads a fixed tail of the row at each step."""
    from transformers import StopStringCriteria

    tok = vl_model.llm_tokenizer
    criteria = vl_model.stop_on_text("###")
    assert [type(c) for c in criteria] == [StopStringCriteria]
    assert vl_model.stop_on_text("###")[0] is criteria[0]
    long_answer = tok("a red circle and a blue square " * 50, add_special_tokens=False).input_ids
    ended = long_answer[:-3] + tok("###", add_special_tokens=False).input_ids[-3:]
    assert len(long_answer) > 200
    assert criteria(torch.tensor([long_answer, ended]), None).tolist() == [False, True]


def test_generation_stops_at_the_separator_and_cuts_it(vl_model, toy_set):
    """The LLM is steered to say "red", "#", "#", "#", then "blue" forever: generation must
    stop after the third "#" instead of running to max_new_tokens, and cut the "###"."""
    from transformers import LogitsProcessor, LogitsProcessorList

    root, _ = toy_set
    tok = vl_model.llm_tokenizer
    image = image_tensor("tiny_vl_vicuna", os.path.join(root, "image", "1.jpg")).unsqueeze(0)
    red, = tok("red", add_special_tokens=False).input_ids
    blue, = tok("blue", add_special_tokens=False).input_ids
    hash_id = tok("###", add_special_tokens=False).input_ids[-1]
    assert tok.decode([hash_id]) == "#"

    class Script(LogitsProcessor):
        def __init__(self, script, then):
            self.script, self.then = script, then

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1]  # tokens generated so far (the prompt is embeddings)
            forced = self.script[step] if step < len(self.script) else self.then
            out = torch.full_like(scores, float("-inf"))
            out[:, forced] = 0
            return out

    steps = []
    handle = vl_model.llm_model.model.register_forward_hook(lambda *a: steps.append(1))
    try:
        answers = vl_model.generate_conversations(
            image, [[(INSTRUCTION, None)]], max_new_tokens=30, num_beams=1, do_sample=False,
            logits_processor=LogitsProcessorList([Script([red, hash_id, hash_id, hash_id], blue)]))
    finally:
        handle.remove()
    assert answers == ["red"]
    assert len(steps) == 4  # "red", "#", "#", "#": stopped there, not after 30 tokens


# --------------------------------------------------------------------------- data


def test_minigpt4_builder_reads_the_self_instruct_format(plugin_and_builder, tmp_path):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_vpgtrans.datasets.minigpt4 import MINIGPT4_INSTRUCTIONS
    from lavis_vpgtrans.toy.instruct import write_instruct_set

    # the default config's layout: <data_root>/cc_sbu_align/{filter_cap.json, image/<id>.jpg}
    write_instruct_set(str(tmp_path / "cc_sbu_align"), n=6)
    prompts = tmp_path / "alignment.txt"
    prompts.write_text("<Img><ImageHere></Img> Describe this image in detail.\n"
                       "<Img><ImageHere></Img> What is in it?\n")
    cls = registry.get_builder_class("minigpt4_instruct")
    cfg = OmegaConf.load(cls.default_config_path("default")).datasets.minigpt4_instruct
    cfg.data_root = str(tmp_path)
    cfg.vis_processor.train = {"name": "blip_image_eval", "image_size": 32}
    cfg.instruction_file = "alignment.txt"  # relative to data_root
    ds = cls(cfg).build_datasets()["train"]
    assert len(ds) == 6
    ann = json.load(open(tmp_path / "cc_sbu_align" / "filter_cap.json"))["annotations"]
    for i in range(6):
        s = ds[i]
        assert s["image"].shape == (3, 32, 32)
        assert s["text_input"] in ("Describe this image in detail.", "What is in it?")
        assert s["text_output"] == ann[i]["caption"] and s["image_id"] == ann[i]["image_id"]
    batch = ds.collater([ds[0], ds[1]])
    assert set(batch) >= {"image", "text_input", "text_output"}
    assert len(MINIGPT4_INSTRUCTIONS) == 4

    # a missing image and a malformed annotation file are named
    os.remove(tmp_path / "cc_sbu_align" / "image" / "3.jpg")
    with pytest.raises(FileNotFoundError, match="1 of 6 images are missing"):
        cls(cfg).build_datasets()
    (tmp_path / "cc_sbu_align" / "filter_cap.json").write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(ValueError, match="expected MiniGPT-4's format"):
        cls(cfg).build_datasets()


# --------------------------------------------------------------------------- training


def batch_loss(model, toy_root, anns):
    """Mean conversation loss on a fixed batch (fixed instruction, first 16 pairs)."""
    images = torch.stack([image_tensor("tiny_vl_vicuna", os.path.join(toy_root, "image", a["image_id"] + ".jpg"))
                          for a in anns[:16]])
    samples = {"image": images, "text_input": [INSTRUCTION] * 16,
               "text_output": [" ".join(a["caption"].split()) for a in anns[:16]]}
    model.eval()
    with torch.no_grad():
        return model(samples)["loss"].item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vl_model, toy_set):
    """train.py's entry point on the demo config, started from a saved initial model so that
    the loss before and after is measured on the same starting point."""
    from lavis_vpgtrans.runners.launch import train_main

    out = tmp_path_factory.mktemp("stage3")
    init = out / "init.pth"
    torch.save({"model": vl_model.trainable_state_dict()}, init)
    train_main(["--cfg-path", DEMO_CFG, "--options", f"run.output_dir={out}", "run.job_id=job",
                "run.iters_per_inner_epoch=8", "run.max_iters=16", "run.batch_size_train=4",
                "run.warmup_steps=2", "model.load_finetuned=True", f"model.finetuned={init}"])
    return out / "job"


def test_train_py_instruction_tuning_lowers_the_loss(trained, vl_model, toy_set):
    root, anns = toy_set
    ckpt = torch.load(trained / "checkpoint_1.pth", weights_only=True)
    trainable = {n for n, p in vl_model.named_parameters() if p.requires_grad}
    assert set(ckpt["model"]) == trainable  # trainable parameters only (Q-Former included)
    assert any(k.startswith("Qformer.") for k in ckpt["model"])
    after = load_vl(load_finetuned=True, finetuned=str(trained / "checkpoint_1.pth"))
    before_loss, after_loss = batch_loss(vl_model, root, anns), batch_loss(after, root, anns)
    assert after_loss < before_loss - 0.2, (before_loss, after_loss)
    lines = [line.strip() for line in open(trained / "log.txt")]
    records = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
    assert len([r for r in records if "train_loss" in r]) == 2  # two inner epochs logged


# --------------------------------------------------------------------------- chat


def test_chat_fits_long_histories_and_names_an_overlong_message(vl_model, toy_set):
    from lavis_vpgtrans.models.conversation import ConversationError

    root, _ = toy_set
    image = image_tensor("tiny_vl_vicuna", os.path.join(root, "image", "2.jpg"))
    history = [(f"question {i}?", "a red circle at the top left") for i in range(12)]
    turns = vl_model.fit_history(history + [("and now?", None)], max_new_tokens=10)
    assert turns[0] == history[0] and turns[-1] == ("and now?", None) and len(turns) < 13
    assert len(vl_model.tokenize_conversation(turns).ids) + 10 <= vl_model.max_context_len
    assert isinstance(vl_model.chat(image, "and now?", history=history, max_new_tokens=10), str)
    # with nothing left to drop, the answer gets the room that is left
    first = [("Describe this image in detail.", "two shapes: red circle, blue square and there is a red "
              "circle at the top left and a blue square at the bottom right")]
    room = vl_model.max_context_len - len(vl_model.tokenize_conversation(first + [("and now?", None)]).ids)
    assert 0 < room < 100
    assert isinstance(vl_model.chat(image, "and now?", history=first, max_new_tokens=100), str)
    with pytest.raises(ConversationError, match="over the model's max_context_len of 128"):
        vl_model.chat(image, "describe " * 100, max_new_tokens=10)


def test_terminal_chat_driven_through_stdin(trained, toy_set, tmp_path):
    from lavis_vpgtrans.models.loading import load_chat_model

    root, _ = toy_set
    image_path = os.path.join(root, "image", "5.jpg")
    (tmp_path / "notes.txt").write_text("not an image\n")
    ckpt = str(trained / "checkpoint_1.pth")
    script = (f"{INSTRUCTION}\nWhat color is it?\n/reset\n/image {tmp_path / 'notes.txt'}\n"
              f"{INSTRUCTION}\n/quit\nnever read\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lavis_vpgtrans.chat", "--model-type", "tiny_vl_vicuna", "--checkpoint", ckpt,
         "--image", image_path, "--device", "cpu", "--max-new-tokens", "12"],
        input=script, capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    answers = [line[len("Assistant: "):] for line in proc.stdout.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 3, proc.stdout + proc.stderr[-2000:]
    assert "notes.txt is not an image file" in proc.stderr
    assert "(conversation reset)" in proc.stderr

    # the same answers in-process: same checkpoint, same prompt, greedy
    model, vis = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", checkpoint=ckpt, device="cpu")
    from PIL import Image

    image = vis(Image.open(image_path).convert("RGB"))
    first = model.chat(image, INSTRUCTION, max_new_tokens=12)
    second = model.chat(image, "What color is it?", history=[(INSTRUCTION, first)], max_new_tokens=12)
    assert answers == [first, second, first]  # after /reset (and a refused file) it starts afresh
    assert all("###" not in a for a in answers)


def test_chat_cli_refuses_a_non_image_at_start(tmp_path, toy_zoo):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"%PDF-1.4 not really a jpeg")
    proc = subprocess.run([sys.executable, "-m", "lavis_vpgtrans.chat", "--model-type", "tiny_vl_vicuna",
                           "--image", str(bad), "--device", "cpu"], input="", capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "error: photo.jpg is not an image file that can be read" in proc.stderr


# --------------------------------------------------------------------------- checkpoints


def test_released_style_checkpoint_loads_with_a_local_llm_dir(plugin_and_builder, tmp_path):
    """vl-vicuna.pth holds the trainable parameters only; the LLM comes from a local dir."""
    from lavis_vpgtrans.models.loading import load_chat_model
    from lavis_vpgtrans.common.checkpoint import CheckpointError
    from lavis_vpgtrans.toy import zoo

    llm_dir = zoo.resolve("toy:llama")
    assert os.path.isdir(llm_dir) and os.path.isabs(llm_dir)
    torch.manual_seed(1)
    source = load_vl(llm_model=llm_dir)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in source.trainable_state_dict().items()}
    assert {k.split(".")[0] for k in state} == {"ln_vision", "Qformer", "query_tokens", "llama_proj"}
    path = tmp_path / "vl-vicuna.pth"
    torch.save({"model": state}, path)

    model, vis = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", llm_model=llm_dir, checkpoint=str(path),
                                 device="cpu")
    assert model.llm_model_name == llm_dir and model.conv_template.name == "minigpt4"
    loaded = model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    # the frozen LLM is the local one, untouched
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(llm_dir)
    torch.testing.assert_close(model.llm_model.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)

    # a file lacking a trainable parameter, or with a key the model lacks, is refused by name
    partial = dict(state)
    del partial["llama_proj.bias"]
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="llama_proj.bias"):
        load_chat_model("blip2_vicuna", "tiny_vl_vicuna", llm_model=llm_dir,
                        checkpoint=str(tmp_path / "partial.pth"), device="cpu")
    torch.save({"model": {**state, "opt_proj.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="opt_proj.weight"):
        load_chat_model("blip2_vicuna", "tiny_vl_vicuna", llm_model=llm_dir,
                        checkpoint=str(tmp_path / "extra.pth"), device="cpu")


def test_vl_vicuna7b_asks_for_the_local_vicuna_dir(plugin_and_builder):
    from lavis_vpgtrans.models.loading import load_chat_model

    with pytest.raises(ValueError, match="pass the local LLM directory"):
        load_chat_model("blip2_vicuna", "vl_vicuna7b", checkpoint="vl-vicuna.pth")


def test_stage3_config_runs_with_tiny_models_and_keeps_the_paper_settings(plugin_and_builder, tmp_path):
    """projects/vpgtrans/stage3_vicuna_instruct.yaml as users run it (data under run.data_root,
    the stage-2 checkpoint as model.finetuned), with the tiny model swapped in."""
    from omegaconf import OmegaConf

    from lavis_vpgtrans.runners.launch import train_main
    from lavis_vpgtrans.toy.instruct import write_instruct_set

    cfg_path = os.path.join(REPO, "projects", "vpgtrans", "stage3_vicuna_instruct.yaml")
    run = OmegaConf.load(cfg_path).run
    assert (run.init_lr, run.min_lr, run.warmup_steps, run.max_iters) == (1e-5, 1e-6, 200, 800)
    assert run.batch_size_train * run.accum_grad_iters * 8 == 120  # on 8 GPUs, as the paper

    write_instruct_set(str(tmp_path / "data" / "cc_sbu_align"), n=8)
    torch.manual_seed(0)
    stage2 = load_vl()
    torch.save({"model": stage2.trainable_state_dict()}, tmp_path / "stage2.pth")
    train_main(["--cfg-path", cfg_path, "--options", "model.model_type=tiny_vicuna", "model.llm_model=toy:llama",
                f"model.finetuned={tmp_path / 'stage2.pth'}", f"run.data_root={tmp_path / 'data'}",
                "datasets.minigpt4_instruct.vis_processor.train.image_size=32", "run.device=cpu",
                "run.distributed=False", "run.amp=False", "run.num_workers=0", "run.iters_per_inner_epoch=2",
                "run.max_iters=4", "run.batch_size_train=2", "run.warmup_steps=2",
                f"run.output_dir={tmp_path / 'out'}", "run.job_id=job"])
    ckpt = torch.load(tmp_path / "out" / "job" / "checkpoint_1.pth", weights_only=True)["model"]
    assert set(ckpt) == set(stage2.trainable_state_dict())
    # it trained from the stage-2 weights: close to them, but moved
    delta = max((ckpt[k] - v).abs().max().item() for k, v in stage2.trainable_state_dict().items())
    assert 0 < delta < 0.01
    assert '"conv_template": "minigpt4"' in (tmp_path / "out" / "job" / "log.txt").read_text()
